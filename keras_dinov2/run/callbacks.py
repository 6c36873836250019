"""Callbacks of a pretraining run: per-step CSV, the progress line, run monitoring."""

import math
import shutil
import sys
import time
import warnings

import keras

from keras_dinov2.run.directory import RunDirectory


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

    Epoch-level values (k-NN accuracy...) go to `run_dir/epochs.csv`, one row per epoch.

    Args:
        run_dir: str. Folder of the run (a `RunDirectory`'s path).
        initial_step: int, default 0. Global step of the first batch (for resumed runs).
    """

    def __init__(self, run_dir, initial_step=0):
        super().__init__()
        self.run = RunDirectory(run_dir)
        self.path = self.run.metrics_path
        self.step = int(initial_step)
        self.epoch = 0
        self._fields = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        self.run.append_epoch({"epoch": epoch + 1, "step": self.step, **_floats(logs)})

    def on_train_batch_end(self, batch, logs=None):
        row = {"step": self.step, "epoch": self.epoch, **_floats(logs)}
        self.step += 1
        self._fields = self.run.append_step(row, self._fields)


class ConstantLogs(keras.callbacks.Callback):
    """Adds fixed values to the logs of every `every_n_epochs`-th epoch (e.g. a frozen teacher's k-NN, measured
    once, beside its students' in epochs.csv). Place it before the `StepLogger`.

    Args:
        values: dict of log key -> number.
        every_n_epochs: int, default 1.
    """

    def __init__(self, values, every_n_epochs=1):
        super().__init__()
        self.values = dict(values)
        self.every_n_epochs = int(every_n_epochs)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and not (epoch + 1) % self.every_n_epochs:
            logs.update(self.values)


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
        return self.stream if self.stream is not None else sys.stdout

    def _width(self):
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
