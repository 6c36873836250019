"""The command-line flags the benchmarks share, and their checks."""

import argparse

BACKENDS = ("jax", "tensorflow", "torch")
DTYPES = ("float32", "mixed_bfloat16", "mixed_float16")


def parser(description):
    """An argument parser that prints `description` as written."""
    return argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_dtype(parser, help):
    """--dtype: float32 or a Keras mixed policy."""
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help=help)


def add_backends(parser, help):
    """--backends: a comma-separated subset of jax,tensorflow,torch (see `choose`)."""
    parser.add_argument("--backends", default=",".join(BACKENDS), help=help)


def add_warmup(parser, default, calls):
    """--warmup: untimed `calls` ("calls", "steps") before timing."""
    parser.add_argument(
        "--warmup",
        type=int,
        default=default,
        help=f"Untimed {calls} before timing (the first compiles). Default: {default}.",
    )


def add_device(parser, sees, skips):
    """--device auto / cpu / gpu; `sees` is who sees a GPU, `skips` what "gpu" skips."""
    parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "gpu"),
        help=f"auto: a GPU where {sees} sees one; cpu: hide GPUs; gpu: skip {skips} that see "
        "none. Default: auto.",
    )


def add_subprocess_flags(parser, timeout_of, keep_what):
    """--json, --timeout, --keep, --verbose and the hidden --worker of a benchmark with workers."""
    parser.add_argument(
        "--json", metavar="OUT", help="Also write the settings, machine and rows as JSON to OUT."
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800,
        help=f"Seconds before {timeout_of} is killed. Default: 1800.",
    )
    parser.add_argument(
        "--keep",
        metavar="DIR",
        help=f"Write {keep_what} into DIR and keep them (default: a temporary folder, deleted at "
        "the end).",
    )
    add_worker_flags(parser, "Show the subprocesses' own output.")


def add_worker_flags(parser, verbose_help):
    """--verbose (show the workers' output) and the hidden --worker SPEC a worker runs with."""
    parser.add_argument("--verbose", action="store_true", help=verbose_help)
    parser.add_argument("--worker", help=argparse.SUPPRESS)


def check_counts(parser, args, at_least_one=(), at_least_zero=("warmup",)):
    """Errors out when a count flag is below its minimum."""
    for minimum, names in ((1, at_least_one), (0, at_least_zero)):
        for name in names:
            if getattr(args, name) < minimum:
                parser.error(f"--{name.replace('_', '-')} must be at least {minimum}.")


def choose(parser, text, allowed, flag, none=False):
    """The comma-separated items of `text`, each one of `allowed` ('-' read as '_').

    With `none`, the text "none" gives an empty list.
    """
    if none and text.strip() == "none":
        return []
    items = [item.strip().replace("-", "_") for item in text.split(",") if item.strip()]
    allowed = [a.replace("-", "_") for a in allowed]
    for item in items:
        if item not in allowed:
            parser.error(
                f"{flag}: unknown {item!r}, expected a comma-separated subset of "
                f"{','.join(allowed)}" + (" or 'none'." if none else ".")
            )
    return items


def add_model(parser, models, help, default="small"):
    """--model: one of `models` (a benchmark's table of architectures)."""
    parser.add_argument("--model", default=default, choices=sorted(models), help=help)
