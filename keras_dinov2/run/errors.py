"""What stops a training run: exceptions that the command line turns into messages and exit statuses."""


class RunError(Exception):
    """A training run cannot start or go on as asked; the message says why and what to do."""


class ResumeError(RunError, ValueError):
    """`pretrain --resume` cannot resume the run in its directory as asked.

    Nothing to resume (no config.json, no checkpoint), flags that the run cannot take, or fewer
    epochs than it has trained. A `ValueError`: it describes a bad input.
    """


class TrainingDiverged(RunError):
    """The loss became NaN or infinite and the run stopped.

    The `TrainingMonitor` has printed the step and how to resume; the last good checkpoint is kept.
    """


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the training; the message says how to resume the run from its last checkpoint.

    A `KeyboardInterrupt`, so a program that catches those catches it too.

    Args:
        run_dir: str. The run directory.
    """

    def __init__(self, run_dir):
        super().__init__(f"Interrupted. Resume with: keras-dinov2 pretrain --out {run_dir} --resume")
        self.run_dir = run_dir
