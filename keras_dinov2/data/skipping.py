"""Undecodable images in the pipelines: decode each record so that a failure drops it instead of ending the pass,
name the dropped files, and report them once at the end of each pass."""

from __future__ import annotations

import sys

import tensorflow as tf

__all__ = ["SkipLog", "decode_skipping", "report_at_end"]

# Our map functions have no Python control flow on tensors: skipping AutoGraph saves tracing time.
_plain = tf.autograph.experimental.do_not_convert


class SkipLog:
    """Names of the images a pipeline skipped because they could not be decoded, reported once per pass.

    tf.data cannot catch a decoding error inside a map function; `decode_skipping` decodes each record in a
    one-element dataset with `ignore_errors`, so a failure becomes a missing element, and calls back into Python
    only for those failures. At the end of each pass the pipeline prints one message with the count and the
    names (paths), each with the source's note on it when it has one (a header declaring too many pixels);
    files already named in an earlier pass are only counted.
    """

    max_listed = 20

    def __init__(self, source_name, refilled, explain=None):
        self.source_name = source_name
        self.refilled = refilled
        self.explain = explain or (lambda name: "")
        self.skipped = {}  # pass id -> {name: None}, in order of appearance
        self.reported = set()

    def record(self, pass_id, name):
        """Note that the record named `name` (string tensor) was skipped in pass `pass_id`; returns False."""
        self.skipped.setdefault(int(pass_id), {})[name.numpy().decode("utf-8", "replace")] = None
        return False

    def report(self, pass_id):
        """Print the warning for pass `pass_id` (nothing when it skipped nothing); returns 0."""
        names = list(self.skipped.pop(int(pass_id), {}))
        if not names:
            return 0
        what = f"{len(names)} image(s) of {self.source_name} that could not be decoded"
        after = (
            "Other images took their places, so the pass kept its length."
            if self.refilled
            else "They were left out."
        )
        new = [name for name in names if name not in self.reported]
        if new:
            notes = {name: self.explain(name) for name in new[: self.max_listed]}
            listed = "\n  ".join(f"{name} ({note})" if note else name for name, note in notes.items())
            more = len(new) - self.max_listed
            tail = f"\n  ... and {more} more" if more > 0 else ""
            large = (
                " Images that are only too large can be read with a higher max_image_pixels "
                "(--max-image-pixels)." if any(notes.values()) else ""
            )
            message = (
                f"skipped {what} (corrupt, truncated, not an image, or more pixels than max_image_pixels) "
                f"in this pass over the data:\n  {listed}{tail}\n{after} Remove or repair these files.{large}"
            )
        else:
            message = f"skipped the same {what} again in this pass."
        self.reported.update(names)
        print("\nWARNING: " + message, file=sys.stderr, flush=True)
        return 0


def decode_skipping(src, records, log, pass_id, num_parallel_calls, deterministic):
    """(record, extra) -> (image, label, extra), dropping records whose image cannot be decoded (named in `log`).

    Each record is decoded inside its own one-element dataset with `ignore_errors`, followed by a placeholder
    flagged as failed; `take(1)` keeps the image when decoding worked and the placeholder when it raised. The
    placeholders are dropped, and logged, by the filter. Everything stays in the graph except the logging of
    failures.
    """

    def one(record, extra):
        def decoded(record, extra):
            image, label = src.decode(record)
            return image, label, extra, tf.constant(True), tf.constant("")

        attempt = tf.data.Dataset.from_tensors((record, extra)).map(_plain(decoded)).ignore_errors()
        failed = tf.data.Dataset.from_tensors(
            (tf.zeros([1, 1, 3], tf.float32), tf.constant(-1, tf.int32), extra, tf.constant(False),
             src.describe(record))
        )
        return attempt.concatenate(failed).take(1)

    def keep(image, label, extra, ok, name):
        def log_failure():
            flag = tf.py_function(lambda p, n: log.record(p, n), [pass_id, name], tf.bool)
            flag.set_shape([])
            return flag

        return tf.cond(ok, lambda: tf.constant(True), log_failure)

    ds = records.interleave(
        _plain(one),
        cycle_length=8,
        block_length=1,
        num_parallel_calls=num_parallel_calls,
        deterministic=deterministic,
    )
    ds = ds.filter(_plain(keep))
    return ds.map(_plain(lambda image, label, extra, ok, name: (image, label, extra)))


def report_at_end(ds, log, pass_id):
    """`ds`, then a call to `log.report(pass_id)` once `ds` is exhausted (it adds no element)."""

    def blank(spec):
        shape = [1 if d is None else d for d in spec.shape]
        return tf.fill(shape, "") if spec.dtype == tf.string else tf.zeros(shape, spec.dtype)

    def report(_):
        done = tf.py_function(lambda p: log.report(p) != 0, [pass_id], tf.bool)
        done.set_shape([])
        return tf.nest.map_structure(blank, ds.element_spec), done

    # One extra element that runs the report; its flag is False, so the filter drops it.
    tail = tf.data.Dataset.range(1).map(_plain(report))
    flagged = ds.map(_plain(lambda *element: (element if len(element) > 1 else element[0], tf.constant(True))))
    return flagged.concatenate(tail).filter(_plain(lambda element, ok: ok)).map(
        _plain(lambda element, ok: element)
    )
