"""A training run: the run directory, its callbacks and checkpoints, resuming, and `pretrain`.

Public names:
    RunDirectory        the files of one run (config.json, CSVs, checkpoints, knn.json, teacher_preset/)
    pretrain            the `keras-dinov2 pretrain` run, from parsed arguments (training.py)
    distill             the `keras-dinov2 distill` run, from parsed arguments (distillation.py)
    load_teacher, teacher_from_run   a distillation teacher from any source (teacher.py)
    save_checkpoint, load_checkpoint, latest_checkpoint, CheckpointCallback
    StepLogger, ProgressBar, TrainingMonitor, plot_metrics
    RunError, ResumeError, TrainingDiverged, RunInterrupted
    RESUME_CHANGEABLE, resumed_config, data_position

Library code here raises these exceptions and never exits; `keras_dinov2.cli` turns them into messages and
exit statuses.
"""

from keras_dinov2.run.callbacks import ProgressBar, StepLogger, TrainingMonitor
from keras_dinov2.run.checkpoint import CheckpointCallback, load_checkpoint, save_checkpoint
from keras_dinov2.run.directory import RunDirectory, latest_checkpoint
from keras_dinov2.run.distillation import distill
from keras_dinov2.run.errors import ResumeError, RunError, RunInterrupted, TrainingDiverged
from keras_dinov2.run.plot import plot_metrics
from keras_dinov2.run.resume import RESUME_CHANGEABLE, data_position, resumed_config
from keras_dinov2.run.teacher import load_teacher, teacher_from_run
from keras_dinov2.run.training import pretrain

__all__ = [
    "distill",
    "load_teacher",
    "teacher_from_run",
    "RESUME_CHANGEABLE",
    "CheckpointCallback",
    "ProgressBar",
    "ResumeError",
    "RunDirectory",
    "RunError",
    "RunInterrupted",
    "StepLogger",
    "TrainingDiverged",
    "TrainingMonitor",
    "data_position",
    "latest_checkpoint",
    "load_checkpoint",
    "plot_metrics",
    "pretrain",
    "resumed_config",
    "save_checkpoint",
]
