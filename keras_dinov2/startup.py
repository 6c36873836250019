"""A quiet start for the `keras-dinov2` command: TensorFlow's C++ start-up lines are not shown.

Importing TensorFlow prints lines such as "Could not find cuda drivers on your machine" and, on a machine without
a GPU, "failed call to cuInit" at its first operation; the command uses TensorFlow only for its input pipeline
under JAX and torch, and none of these lines asks the user to do anything. They come from C++ before Python can
filter them, so this runs first in `keras_dinov2/__init__.py`, before anything imports TensorFlow, and only when
the process is the command line (`keras-dinov2 ...` or `python -m keras_dinov2.cli ...`): a program importing the
library keeps TensorFlow's defaults. A user who sets TF_CPP_MIN_LOG_LEVEL (0 shows everything) keeps their choice
and sees every line.
"""

import os
import re
import sys

# Start-up lines of TensorFlow, XLA and absl that carry no request to the user.
NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|cudart_stub\.cc.*Could not find cuda drivers"
    r"|failed call to cuInit"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|computation placer already registered"
    r"|oneDNN custom operations are on"
    r"|This TensorFlow binary is optimized to use available CPU instructions"
    r"|To enable the following instructions: .* rebuild TensorFlow"
)


def is_command_line():
    """Whether this process runs the `keras-dinov2` command (its console script or `python -m keras_dinov2.cli`)."""
    if os.path.basename(sys.argv[0] if sys.argv else "") in ("keras-dinov2", "keras-dinov2.exe"):
        return True
    argv = list(getattr(sys, "orig_argv", []))
    return "-m" in argv[:-1] and argv[argv.index("-m") + 1] == "keras_dinov2.cli"


def _import_tensorflow_filtered():
    """Import TensorFlow with file descriptor 2 captured, then write back every captured line but the noise."""
    import tempfile

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (an embedded interpreter): import as is
        saved = None
    captured = tempfile.TemporaryFile(mode="w+b") if saved is not None else None
    try:
        if captured is not None:
            os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        except ImportError:
            pass
    finally:
        if captured is not None:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if not NOISE.search(line)]
            captured.close()
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def quiet_command_line_startup():
    """For the command line only: hide TensorFlow's start-up lines unless TF_CPP_MIN_LOG_LEVEL is set."""
    if not is_command_line() or "TF_CPP_MIN_LOG_LEVEL" in os.environ or "tensorflow" in sys.modules:
        return
    # 3 also hides the error-level "failed call to cuInit" of a machine without a GPU; real TensorFlow
    # errors still arrive as Python exceptions.
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    _import_tensorflow_filtered()
    try:  # absl's Python logger (TensorFlow Datasets' notes about dataset folders)
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass


quiet_command_line_startup()
