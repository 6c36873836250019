"""Callbacks of a pretraining run: checkpoints and resume, per-step CSV, plots, run monitoring."""

import csv
import json
import math
import os
import re
import time
import warnings

import keras
import numpy as np

CHECKPOINT_PREFIX = "checkpoint-"
# Written first and then moved into place (besides ".checkpoint-*.npz.tmp"): a kill can leave them.
TEMPORARY_NAMES = ("metrics.csv.tmp", "epochs.csv.tmp", "config.json.tmp")


def _sync(model):
    # On JAX, fit() keeps the state outside the variables until the end of the epoch loop.
    if hasattr(model, "jax_state_sync"):
        model.jax_state_sync()


def _state_variables(model):
    variables = list(model.variables)
    if getattr(model, "optimizer", None) is not None:
        variables += list(model.optimizer.variables)
    return variables


def save_checkpoint(model, path, metadata=None):
    """Writes every variable of `model` and its optimizer to `path` (.npz), atomically.

    The file is written under a temporary name and moved into place, so a kill during the
    save leaves the previous checkpoint intact and never a truncated one under `path`.

    Distributed runs: every process calls it (on several JAX hosts, reading sharded variables
    is a collective), and only the chief (JAX process 0, torch rank 0, the TF chief) writes.

    Args:
        model: keras.Model (a DINOv2Pretrainer: students, teachers, heads, centers, optimizer
            moments and step, and the random-generator states of stochastic depth).
        path: str. Destination file.
        metadata: optional dict, stored as JSON inside the file (epoch, step, config...).

    Example:
    >>> save_checkpoint(pretrainer, "runs/x/checkpoint-0003.npz", {"epoch": 3})
    """
    from keras_dinov2 import distribute

    _sync(model)
    variables = _state_variables(model)
    arrays = {f"v{i:05d}": distribute.to_numpy(v.value) for i, v in enumerate(variables)}
    if not distribute.is_chief():
        return
    arrays["__paths__"] = np.array([v.path for v in variables])
    arrays["__metadata__"] = np.array(json.dumps(metadata or {}))
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(model, path):
    """Restores what `save_checkpoint` wrote into `model` (built and compiled); returns metadata.

    Raises:
        ValueError: naming the first variable whose path or shape does not match.
    """
    if getattr(model, "optimizer", None) is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    variables = _state_variables(model)
    with np.load(path, allow_pickle=False) as data:
        paths = [str(p) for p in data["__paths__"]]
        if len(paths) != len(variables):
            raise ValueError(
                f"Checkpoint {path} holds {len(paths)} variables, the model has "
                f"{len(variables)}: it was written by a different configuration."
            )
        for i, (variable, stored_path) in enumerate(zip(variables, paths)):
            value = data[f"v{i:05d}"]
            same_path = _generic(stored_path) == _generic(variable.path)
            if not same_path or tuple(value.shape) != tuple(variable.shape):
                raise ValueError(
                    f"Checkpoint {path} does not fit the model at variable {i}: it holds "
                    f"{stored_path!r} {tuple(value.shape)}, the model has {variable.path!r} "
                    f"{tuple(variable.shape)}."
                )
            variable.assign(value)
        return json.loads(str(data["__metadata__"]))


def _generic(path):
    # Auto-generated names carry a process-wide counter ("seed_generator_12"): ignore it.
    return re.sub(r"_\d+(?=/|$)", "", path)


def trim_run_logs(run_dir, step, epoch):
    """Cuts `metrics.csv` and `epochs.csv` back to a checkpoint: rows of later steps and epochs go.

    A run killed mid-epoch has logged steps that its last checkpoint does not hold; the resumed
    run logs them again, so without the cut the CSVs would hold those steps twice.

    Args:
        run_dir: str. Folder of the run.
        step: int. The checkpoint's global step (metrics.csv's `step` column): rows with a
            step at or past it are removed.
        epoch: int. The checkpoint's epoch (epochs completed): epochs.csv rows past it are removed.

    Returns:
        dict: file name -> number of rows removed (only files that lost rows).

    Example:
    >>> trim_run_logs("runs/x", step=42, epoch=2)
    {'metrics.csv': 7}
    """
    removed = {}
    for name, column, limit in (("metrics.csv", "step", int(step)),
                                ("epochs.csv", "epoch", int(epoch) + 1)):
        path = os.path.join(run_dir, name)
        if not os.path.exists(path):
            continue
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows or column not in rows[0]:
            continue
        index = rows[0].index(column)
        kept = [row for row in rows[1:] if _before(row, index, limit)]
        if len(kept) == len(rows) - 1:
            continue
        temporary = path + ".tmp"
        with open(temporary, "w", newline="") as f:
            csv.writer(f).writerows([rows[0]] + kept)
        os.replace(temporary, path)
        removed[name] = len(rows) - 1 - len(kept)
    return removed


def _before(row, index, limit):
    try:
        return float(row[index]) < limit
    except (IndexError, ValueError):
        return False  # a line cut short by the kill


def remove_interrupted_files(run_dir):
    """Deletes what an interrupted save left behind in `run_dir`; returns the names removed.

    `save_checkpoint` and the CSV rewrites write to a temporary file and move it into place, so
    a kill between the two leaves only the temporary file: it is never read, and removed here.
    """
    if not os.path.isdir(run_dir):
        return []
    names = sorted(n for n in os.listdir(run_dir)
                   if n.endswith(".tmp") and (n.startswith("." + CHECKPOINT_PREFIX)
                                              or n in TEMPORARY_NAMES))
    for name in names:
        os.remove(os.path.join(run_dir, name))
    return names


def latest_checkpoint(run_dir):
    """Path of the newest complete checkpoint in `run_dir`, or None."""
    if not os.path.isdir(run_dir):
        return None
    names = sorted(n for n in os.listdir(run_dir)
                   if n.startswith(CHECKPOINT_PREFIX) and n.endswith(".npz"))
    return os.path.join(run_dir, names[-1]) if names else None


class CheckpointCallback(keras.callbacks.Callback):
    """Saves the full training state every `every_n_epochs` epochs; keeps the newest `keep`.

    Args:
        run_dir: str. Folder of the run.
        every_n_epochs: int, default 1.
        keep: int, default 2.
        metadata: optional dict added to every checkpoint.
    """

    def __init__(self, run_dir, every_n_epochs=1, keep=2, metadata=None):
        super().__init__()
        self.run_dir = run_dir
        self.every_n_epochs = int(every_n_epochs)
        self.keep = int(keep)
        self.metadata = dict(metadata or {})

    def on_epoch_end(self, epoch, logs=None):
        if self.model.stop_training and _bad(logs):
            return  # never overwrite a good checkpoint with a diverged state
        if (epoch + 1) % self.every_n_epochs:
            return
        path = os.path.join(self.run_dir, f"{CHECKPOINT_PREFIX}{epoch + 1:05d}.npz")
        save_checkpoint(self.model, path, {**self.metadata, "epoch": epoch + 1})
        from keras_dinov2 import distribute

        if not distribute.is_chief():
            return
        names = sorted(n for n in os.listdir(self.run_dir)
                       if n.startswith(CHECKPOINT_PREFIX) and n.endswith(".npz"))
        for old in names[: -self.keep]:
            os.remove(os.path.join(self.run_dir, old))


def _bad(logs):
    return any(isinstance(v, (int, float)) and not math.isfinite(v) for v in (logs or {}).values())


def _floats(logs):
    out = {}
    for key, value in (logs or {}).items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


class StepLogger(keras.callbacks.Callback):
    """Appends every step's logs to `run_dir/metrics.csv` (step, epoch, then the log keys).

    Args:
        run_dir: str.
        initial_step: int, default 0. Global step of the first batch (for resumed runs).
    """

    def __init__(self, run_dir, initial_step=0):
        super().__init__()
        self.path = os.path.join(run_dir, "metrics.csv")
        self.step = int(initial_step)
        self.epoch = 0
        self._fields = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        # Epoch-level values (k-NN accuracy...) go to epochs.csv, one row per epoch.
        # Some values appear only in some epochs (k-NN every few epochs): a new key widens the
        # header and the file is rewritten, so every column keeps its name.
        path = os.path.join(os.path.dirname(self.path), "epochs.csv")
        row = {"epoch": epoch + 1, "step": self.step, **_floats(logs)}
        fields, rows = [], []
        if os.path.exists(path):
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                fields = list(reader.fieldnames or [])
                rows = list(reader)
        missing = [k for k in row if k not in fields]
        if fields and not missing:
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, fields, restval="").writerow(row)
            return
        fields += missing
        temporary = path + ".tmp"
        with open(temporary, "w", newline="") as f:
            writer = csv.DictWriter(f, fields, restval="")
            writer.writeheader()
            writer.writerows(rows + [row])
        os.replace(temporary, path)

    def on_train_batch_end(self, batch, logs=None):
        row = {"step": self.step, "epoch": self.epoch, **_floats(logs)}
        self.step += 1
        if self._fields is None:
            if os.path.exists(self.path):
                with open(self.path, newline="") as f:
                    self._fields = next(csv.reader(f), None)
            if not self._fields:
                self._fields = list(row)
                with open(self.path, "w", newline="") as f:
                    csv.writer(f).writerow(self._fields)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self._fields, extrasaction="ignore").writerow(row)


def _format_duration(seconds):
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}:{seconds % 60:02d}"
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressBar(keras.callbacks.ProgbarLogger):
    """fit's progress line, fitted to the terminal: the loss, its parts and the learning rate.

    Keras' bar prints every log of a step, about 15 for a pretraining step, and wraps on an 80-column terminal.
    This one draws the chosen `keys` only, with 4 significant digits, and drops the bar, a digit, then the time,
    when the line would not fit. The other callbacks still receive every log (`StepLogger` writes all of them to
    metrics.csv): only what is drawn changes. On a terminal the line is redrawn in place; elsewhere (a log file)
    each epoch prints one line, as with `verbose=2`. Pass it to `fit(callbacks=...)`: Keras then adds no bar of
    its own, and fit's `verbose` still decides (0 draws nothing). Place it first, so that lines other callbacks
    print at the end of an epoch come after the finished bar.

    Args:
        keys: sequence of (log key, label) pairs, default `DEFAULT_KEYS` (loss, dino_local as "local",
            dino_global as "global", ibot, koleo, lr). Keys missing from the logs are left out.
        stream: file-like or None, default None (sys.stdout when writing).
        columns: int or None, default None: the terminal's width (the COLUMNS variable, else 80).

    Example:
    >>> pretrainer.fit(data, epochs=10, callbacks=[ProgressBar(), StepLogger("runs/x")])
    """

    DEFAULT_KEYS = (("loss", "loss"), ("dino_local", "local"), ("dino_global", "global"),
                    ("ibot", "ibot"), ("koleo", "koleo"), ("lr", "lr"))
    _REFRESH_SECONDS = 0.1

    def __init__(self, keys=None, stream=None, columns=None):
        super().__init__()
        self.keys = tuple(self.DEFAULT_KEYS if keys is None else keys)
        self.stream = stream
        self.columns = columns
        self._start = self._last_draw = 0.0
        self._drawn = 0
        self._step_logs = {}

    def _out(self):
        import sys

        return self.stream if self.stream is not None else sys.stdout

    def _width(self):
        import shutil

        return max(20, int(self.columns or shutil.get_terminal_size((80, 24)).columns) - 1)

    def _dynamic(self):
        out = self._out()
        return self.verbose == 1 and hasattr(out, "isatty") and out.isatty()

    def _values(self, logs, digits):
        values = _floats(logs)
        shown = []
        for key, label in self.keys:
            if key in values:
                value = values[key]
                if key == "lr":  # 3.5e-4: two digits are all a schedule needs to be read
                    mantissa, exponent = f"{value:.1e}".split("e")
                    text = f"{mantissa}e{int(exponent)}"
                else:
                    text = f"{value:.{digits}g}"
                shown.append(f"{label} {text}")
        return " ".join(shown)

    def line(self, seen, logs, final=False):
        """The progress line after `seen` steps with these logs (at most the terminal's width - 1).

        Everything fits when it can: 4 significant digits, a bar and the time; else, in this order, no bar, 3
        digits, no time, and at last the line is cut.
        """
        width = self._width()
        target = self.target
        counter = f"{seen}/{target}" if target else f"{seen}"
        if target:
            counter = counter.rjust(2 * len(str(target)) + 1)
        elapsed = time.monotonic() - self._start
        if final:
            per_step = elapsed / max(seen, 1)
            rate = f"{per_step * 1000:.0f}ms/step" if per_step < 1 else f"{per_step:.1f}s/step"
            clock = f"{_format_duration(elapsed)} {rate}"
        elif target and seen:
            clock = f"eta {_format_duration(elapsed / seen * (target - seen))}"
        else:
            clock = _format_duration(elapsed)
        tails = {}
        for digits in (4, 3):
            values = self._values(logs, digits)
            tails[digits] = f" - {values}" if values else ""
        if target:
            room = width - len(f"{counter}  {clock}{tails[4]}")  # what a bar between two spaces may take
            if room >= 10:
                cells = min(20, room)
                done = int(cells * min(seen, target) / target)
                bar = "\u2501" * done + "\u2500" * (cells - done)
                return f"{counter} {bar} {clock}{tails[4]}"
        for text in (f"{counter} {clock}{tails[4]}", f"{counter} {clock}{tails[3]}", f"{counter}{tails[4]}",
                     f"{counter}{tails[3]}"):
            if len(text) <= width:
                return text
        return text[: width - 1] + "\u2026"

    def _write(self, text, newline):
        out = self._out()
        if self._dynamic():
            out.write("\r" + text.ljust(self._drawn) + ("\n" if newline else ""))
            self._drawn = 0 if newline else len(text)
        elif newline:
            out.write(text + "\n")
        out.flush()

    def on_epoch_begin(self, epoch, logs=None):
        self._reset_progbar()
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._step_logs = {}
        if self.verbose and self.epochs > 1:
            self._write(f"Epoch {epoch + 1}/{self.epochs}", newline=True)

    def on_train_batch_end(self, batch, logs=None):
        self.seen = batch + 1
        self._step_logs = dict(logs or {})
        now = time.monotonic()
        if self._dynamic() and (now - self._last_draw >= self._REFRESH_SECONDS or self.seen == self.target):
            self._last_draw = now
            self._write(self.line(self.seen, self._step_logs), newline=False)

    def on_epoch_end(self, epoch, logs=None):
        if not self.verbose:
            return
        shown = dict(self._step_logs)
        shown.update(logs or {})
        if self.target is None:
            self.target = self.seen
        self._write(self.line(self.seen, shown, final=True), newline=True)


class TrainingMonitor(keras.callbacks.Callback):
    """Stops on a NaN or infinite loss and warns when the teacher's targets collapse.

    Collapse shows in the teacher's outputs: targets close to uniform (mean KL to uniform
    near 0: every prototype equally likely for every image) or every image sent to the
    same few prototypes (entropy of the batch-mean target near 0). Either one holding for
    `patience` consecutive steps after `warmup_steps` gets one warning with what to try.

    Steps count from the start of the run: a resumed run passes the step it resumes at, so
    messages name the same step as `metrics.csv`.

    Args:
        warmup_steps: int, default 20. Steps before collapse is judged.
        patience: int, default 20.
        uniform_kl: float, default 0.01. Mean KL to uniform (nats) below which targets count
            as uniform.
        marginal_fraction: float, default 0.05. Batch-mean entropy below this fraction of
            log(K) counts as one-prototype collapse.
        initial_step: int, default 0. Global step of the first batch (for resumed runs).
        resume_hint: optional str. A command printed after a NaN loss, to resume with a
            lower learning rate.
    """

    ADVICE = (
        "Try: a lower learning rate or a longer warmup, a lower teacher temperature "
        "(warmup_teacher_temp, teacher_temp), fewer prototypes for a small dataset, larger "
        "effective batches (gradient_accumulation_steps), Sinkhorn-Knopp centering, or a "
        "higher teacher momentum."
    )

    def __init__(self, warmup_steps=20, patience=20, uniform_kl=0.01, marginal_fraction=0.05,
                 initial_step=0, resume_hint=None):
        super().__init__()
        self.warmup_steps = int(warmup_steps)
        self.patience = int(patience)
        self.uniform_kl = float(uniform_kl)
        self.marginal_fraction = float(marginal_fraction)
        self.step = int(initial_step)
        self.resume_hint = resume_hint
        self.uniform_run = 0
        self.single_run = 0
        self.warned = False
        self.stopped_for_nan = False

    def on_train_batch_end(self, batch, logs=None):
        values = _floats(logs)
        step = self.step  # metrics.csv's step of this batch
        self.step += 1
        loss = values.get("loss")
        if loss is not None and not math.isfinite(loss):
            self.stopped_for_nan = True
            self.model.stop_training = True
            hint = (f" (e.g. {self.resume_hint})" if self.resume_hint else "")
            print(
                f"\nThe loss became {loss} at step {step}: stopping. The last good "
                "checkpoint is kept; resume with a lower learning rate" + hint
                + " or check the data."
            )
            return
        kl = values.get("teacher_kl_uniform")
        marginal = values.get("teacher_marginal_entropy")
        entropy = values.get("teacher_entropy")
        if kl is None or marginal is None or entropy is None or step < self.warmup_steps:
            return
        log_k = kl + entropy
        self.uniform_run = self.uniform_run + 1 if kl < self.uniform_kl else 0
        self.single_run = (self.single_run + 1
                           if marginal < self.marginal_fraction * log_k else 0)
        if self.warned:
            return
        if self.uniform_run >= self.patience:
            kind = "uniform targets (the teacher's outputs carry no information)"
        elif self.single_run >= self.patience:
            kind = "one-prototype targets (every image gets the same assignment)"
        else:
            return
        self.warned = True
        message = f"The run looks collapsed since {self.patience} steps: {kind}. {self.ADVICE}"
        warnings.warn(message, stacklevel=2)
        print("\nWARNING: " + message)


def plot_metrics(csv_path, png_path, keys=None):
    """Draws the losses, schedules and collapse signals of a metrics CSV into a PNG.

    Args:
        csv_path: str. A `metrics.csv` written by `StepLogger`.
        png_path: str. Output image.
        keys: optional list of column groups; default losses, schedules, teacher signals and
            k-NN accuracy where present.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def read(path):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        return {k: np.array([float(r[k]) if r.get(k) not in (None, "") else np.nan
                             for r in rows]) for k in (rows[0] if rows else [])}

    columns = read(csv_path)
    if not columns:
        raise ValueError(f"{csv_path} has no rows to plot.")
    epochs_path = os.path.join(os.path.dirname(csv_path), "epochs.csv")
    epoch_columns = read(epochs_path) if os.path.exists(epochs_path) else {}
    groups = keys or [
        ["loss", "dino_local", "dino_global", "ibot", "koleo"],
        ["lr", "wd"],
        ["momentum", "teacher_temp"],
        ["teacher_entropy", "teacher_kl_uniform", "teacher_marginal_entropy"],
        ["knn_top1", "knn_top1_random_init"],
    ]
    groups = [[k for k in g if k in columns or k in epoch_columns] for g in groups]
    groups = [g for g in groups if g]
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 2.4 * len(groups)), sharex=True)
    axes = np.atleast_1d(axes)
    def series(key):
        source = columns if key in columns else epoch_columns
        values = source[key]
        mask = np.isfinite(values)
        return source["step"][mask], values[mask]

    def scale(key):
        values = np.abs(series(key)[1])
        return float(values.max()) if values.size else 0.0

    for ax, group in zip(axes, groups):
        # Two series of very different scales (learning rate and weight decay, momentum and
        # temperature) get one y axis each, so neither is drawn flat.
        twin = (len(group) == 2 and min(scale(k) for k in group) > 0
                and max(scale(k) for k in group) > 10 * min(scale(k) for k in group))
        lines = []
        for i, key in enumerate(group):
            target = ax.twinx() if twin and i == 1 else ax
            steps, values = series(key)
            lines += target.plot(steps, values, label=key, color=f"C{i}",
                                 marker="o" if len(values) < 30 else None)
            if twin:
                target.set_ylabel(key, color=f"C{i}", fontsize=8)
        ax.legend(lines, [line.get_label() for line in lines], loc="best", fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
