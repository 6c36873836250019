"""The `keras-dinov2` command line: pretrain, distill, curate, evaluate, export, convert, visualize.

The only place that turns exceptions into one-line messages and exit statuses (see `cli.errors`): the
library raises, `main` reports.
"""

import os
import sys

from keras_dinov2.cli.commands import COMMANDS
from keras_dinov2.cli.curate import run_curate
from keras_dinov2.cli.errors import DIVERGED, INTERRUPTED, USAGE_ERROR, is_user_error, one_line
from keras_dinov2.cli.parser import build_parser
from keras_dinov2.run import RunInterrupted, TrainingDiverged

# Commands that are announced but not landed yet: name -> what they wait for.
NOT_YET = {}


def main(argv=None):
    """Runs `keras-dinov2` with `argv` (default sys.argv[1:]); returns the exit status.

    0 on success, 2 for an error the user can fix (printed in one line), 3 when an export was
    written but its upload failed, 1 when training stopped on a NaN loss, 130 on Ctrl-C. Any other
    exception is a bug and propagates with its traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command in NOT_YET:
        print(
            f"keras-dinov2 {args.command} is not available yet: {NOT_YET[args.command]} has "
            "not landed. Nothing was run. `keras-dinov2 pretrain` and `keras-dinov2 convert` "
            "work today.",
            file=sys.stderr,
        )
        return USAGE_ERROR
    try:
        return {**COMMANDS, "curate": run_curate}[args.command](args)
    except RunInterrupted as interrupted:
        print(f"\n{interrupted}")
        return INTERRUPTED
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        return INTERRUPTED
    except TrainingDiverged:
        return DIVERGED  # the TrainingMonitor has printed the step and how to resume
    except Exception as error:
        if not is_user_error(error):
            raise
        message = one_line(error)
        if args.command == "export":
            from keras_dinov2.export.hub import redact_secrets

            message = redact_secrets(message, secrets=[os.environ.get("HF_TOKEN", "")])
        command = args.command + (f" {args.curate_command}" if args.command == "curate" else "")
        print(f"keras-dinov2 {command}: error: {message}", file=sys.stderr)
        return USAGE_ERROR


__all__ = ["main"]
