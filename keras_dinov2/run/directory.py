"""The run directory of `keras-dinov2 pretrain` and `distill`: every file of a run is named here, and only here."""

import csv
import json
import os

CHECKPOINT_PREFIX = "checkpoint-"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.csv"
EPOCHS_FILE = "epochs.csv"
PLOT_FILE = "metrics.png"
KNN_FILE = "knn.json"
TEACHER_PRESET = "teacher_preset"
# Written first and then moved into place (besides ".checkpoint-*.npz.tmp"): a kill can leave them.
TEMPORARY_NAMES = (f"{METRICS_FILE}.tmp", f"{EPOCHS_FILE}.tmp", f"{CONFIG_FILE}.tmp")


def write_json(path, value):
    """Writes `value` as indented JSON to `path` through a temporary file, so a kill never leaves half a file."""
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(value, f, indent=2)
    os.replace(temporary, path)


class RunDirectory:
    """The files of one pretraining run, in one folder.

    - `config.json`: the run's SSLConfig ("ssl"), "model", "data", "recipe" and "backend"; each resume
      appends a record to its "resumes" list (time, epoch, step, checkpoint, backend, changes).
    - `metrics.csv`: one row per step (step, epoch, then every log of the step).
    - `epochs.csv`: one row per epoch (epoch, step, then epoch-level values such as knn_top1).
    - `metrics.png`: the plot of both CSVs.
    - `checkpoint-NNNNN.npz`: the full training state after epoch NNNNN.
    - `teacher_preset/`: the final teacher backbone (`DINOv2Backbone.from_preset`).
    - `student_preset/` (`student_I_preset/` for several students): a distillation run's final EMA students.
    - `knn.json`: the final k-NN of the teacher and of the random-init baseline (digits runs); of a distillation
      run, of the teacher and every EMA student.

    Files that are replaced are written under a temporary name and moved into place; a kill
    between the two leaves the temporary file, which `remove_interrupted_files` deletes.

    Args:
        path: str or path-like. The folder (`create` makes it).

    Example:
    >>> run = RunDirectory("runs/latest")
    >>> run.latest_checkpoint()
    'runs/latest/checkpoint-00010.npz'
    """

    def __init__(self, path):
        self.path = os.fspath(path)

    def __repr__(self):
        return f"RunDirectory({self.path!r})"

    def _file(self, name):
        return os.path.join(self.path, name)

    @property
    def config_path(self):
        """Path of config.json."""
        return self._file(CONFIG_FILE)

    @property
    def metrics_path(self):
        """Path of metrics.csv (one row per step)."""
        return self._file(METRICS_FILE)

    @property
    def epochs_path(self):
        """Path of epochs.csv (one row per epoch)."""
        return self._file(EPOCHS_FILE)

    @property
    def plot_path(self):
        """Path of metrics.png."""
        return self._file(PLOT_FILE)

    @property
    def knn_path(self):
        """Path of knn.json."""
        return self._file(KNN_FILE)

    @property
    def teacher_preset_path(self):
        """Path of the final teacher's preset folder."""
        return self._file(TEACHER_PRESET)

    def create(self):
        """Makes the folder (and its parents) where missing."""
        os.makedirs(self.path, exist_ok=True)

    def read_config(self):
        """The dict in config.json, or None when the run has none."""
        if not os.path.exists(self.config_path):
            return None
        with open(self.config_path) as f:
            return json.load(f)

    def start(self, config):
        """Begins a new run: writes `config` (a dict) to config.json and removes the CSVs of an earlier run."""
        write_json(self.config_path, config)
        for path in (self.metrics_path, self.epochs_path):
            if os.path.exists(path):
                os.remove(path)

    def record_resume(self, stored, ssl, record):
        """Writes the resumed run's config.json: `stored` with the SSLConfig dict `ssl` and `record` appended to
        its "resumes" list."""
        write_json(self.config_path, {**stored, "ssl": ssl, "resumes": stored.get("resumes", []) + [record]})

    def checkpoint_path(self, epoch):
        """Path of the checkpoint written after `epoch` epochs."""
        return self._file(f"{CHECKPOINT_PREFIX}{int(epoch):05d}.npz")

    def checkpoints(self):
        """Paths of the complete checkpoints, oldest first."""
        if not os.path.isdir(self.path):
            return []
        names = sorted(n for n in os.listdir(self.path)
                       if n.startswith(CHECKPOINT_PREFIX) and n.endswith(".npz"))
        return [self._file(name) for name in names]

    def latest_checkpoint(self):
        """Path of the newest complete checkpoint, or None."""
        paths = self.checkpoints()
        return paths[-1] if paths else None

    def remove_old_checkpoints(self, keep):
        """Deletes all but the newest `keep` checkpoints."""
        for old in self.checkpoints()[: -int(keep)]:
            os.remove(old)

    def append_step(self, row, columns=None):
        """Appends one step's `row` (a dict) to metrics.csv; returns the file's columns.

        `columns` are the file's columns when known (what the previous call returned); else they
        are read from the file, or, for a new or empty file, taken from `row` and written as its
        header. Keys of `row` outside the columns are left out.
        """
        if columns is None:
            if os.path.exists(self.metrics_path):
                with open(self.metrics_path, newline="") as f:
                    columns = next(csv.reader(f), None)
            if not columns:
                columns = list(row)
                with open(self.metrics_path, "w", newline="") as f:
                    csv.writer(f).writerow(columns)
        with open(self.metrics_path, "a", newline="") as f:
            csv.DictWriter(f, columns, extrasaction="ignore").writerow(row)
        return columns

    def append_epoch(self, row):
        """Appends one epoch's `row` (a dict) to epochs.csv.

        Some values appear only in some epochs (k-NN every few epochs): a new key widens the
        header and the file is rewritten, so every column keeps its name.
        """
        path = self.epochs_path
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

    def trim_logs(self, step, epoch):
        """Cuts metrics.csv and epochs.csv back to a checkpoint: rows of later steps and epochs go.

        A run killed mid-epoch has logged steps that its last checkpoint does not hold; the resumed
        run logs them again, so without the cut the CSVs would hold those steps twice.

        Args:
            step: int. The checkpoint's global step (metrics.csv's `step` column): rows with a
                step at or past it are removed.
            epoch: int. The checkpoint's epoch (epochs completed): epochs.csv rows past it are removed.

        Returns:
            dict: file name -> number of rows removed (only files that lost rows).

        Example:
        >>> RunDirectory("runs/x").trim_logs(step=42, epoch=2)
        {'metrics.csv': 7}
        """
        removed = {}
        for name, column, limit in ((METRICS_FILE, "step", int(step)), (EPOCHS_FILE, "epoch", int(epoch) + 1)):
            path = self._file(name)
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

    def remove_interrupted_files(self):
        """Deletes what an interrupted save left behind; returns the names removed.

        Checkpoints and the CSV and config rewrites go to a temporary file that is then moved
        into place, so a kill between the two leaves only the temporary file: it is never read,
        and removed here.
        """
        if not os.path.isdir(self.path):
            return []
        names = sorted(n for n in os.listdir(self.path)
                       if n.endswith(".tmp") and (n.startswith("." + CHECKPOINT_PREFIX) or n in TEMPORARY_NAMES))
        for name in names:
            os.remove(self._file(name))
        return names

    def write_knn(self, teacher, random_init, minutes):
        """Writes knn.json: the final {k: top-1 %} of the teacher and of the random-init baseline, and the
        training time in minutes."""
        with open(self.knn_path, "w") as f:
            json.dump({"teacher": teacher, "random_init": random_init, "minutes": round(minutes, 2)}, f,
                      indent=2)


    def write_results(self, results):
        """Writes knn.json of a distillation run: `results` (the teacher's and every EMA student's {k: top-1 %},
        the students' presets and parameter counts, the minutes)."""
        write_json(self.knn_path, results)


def is_run_directory(path):
    """Whether `path` is a folder written by `pretrain` or `distill` (its config.json holds an SSLConfig; a
    transformers folder has a config.json too)."""
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
        return False
    try:
        with open(os.path.join(path, CONFIG_FILE)) as f:
            stored = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(stored, dict) and "ssl" in stored


def latest_checkpoint(run_dir):
    """Path of the newest complete checkpoint in the run directory `run_dir`, or None."""
    return RunDirectory(run_dir).latest_checkpoint()


def _before(row, index, limit):
    try:
        return float(row[index]) < limit
    except (IndexError, ValueError):
        return False  # a line cut short by the kill
