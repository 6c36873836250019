"""How the command line reports a failure: exit statuses and one-line error messages."""

# Exit statuses: 2 for anything the user can fix in the command (a flag, a path, the data), 3 when an
# export was written but its upload failed, 1 when training stopped on a NaN loss, 130 on Ctrl-C.
USAGE_ERROR = 2
UPLOAD_FAILED = 3
DIVERGED = 1
INTERRUPTED = 130


def is_user_error(error):
    """Errors that describe a bad input (a flag, a path, a file, the data), as the library raises them on
    purpose; anything else is a bug and keeps its traceback."""
    return isinstance(error, (ValueError, OSError)) or type(error).__module__.startswith("keras_dinov2")


def one_line(error, limit=600):
    """`error` as one line of at most `limit` characters; an OSError names its file."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and not isinstance(error, ConnectionError) and error.filename:
        text = f"{error.strerror or text}: {error.filename!r}"
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"
