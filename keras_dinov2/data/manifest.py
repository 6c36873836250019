"""Curation manifests: a CSV with one row per pool image saying whether curation kept it and why.

`keras-dinov2 curate select` (`keras_dinov2.curation.write_selection`) writes one; `get_source` (and so
`multicrop_dataset` and `keras-dinov2 pretrain --data`) reads its kept rows directly.

Naming: a file named `manifest.csv` or `NAME.manifest.csv`, or a folder holding a `manifest.csv` (the output
folder of `curate select`, which also holds the report), is a manifest.

Columns, in this order (`MANIFEST_COLUMNS`, then one `cluster_lT` column per k-means level T = 1, 2, ...):

    index     the image's position in the pool source (0 .. N - 1, the order `get_source(source)` reads)
    source    the pool's data spec ("digits:train", "tfds:NAME:SPLIT", a folder); the same on every row
    path      the image file (absolute, or relative to the manifest's folder); empty for pools not read from files
    kept      1 when curation kept the image, else 0
    reason    kept | unreadable | duplicate_of:<index> | contaminated:<eval index> | not_retrieved | not_sampled
    cluster_l1, cluster_l2, ...   the image's k-means cluster per level, -1 where it was not clustered

Rows with a `path` are read as files (so a manifest of a folder pool still works when moved next to its images
with relative paths); rows without one are the `index`-th images of `source`.
"""

from __future__ import annotations

import csv
import os
import tempfile

import numpy as np
import tensorflow as tf

from keras_dinov2.data.image_source import ImageSource

__all__ = [
    "MANIFEST_COLUMNS",
    "MANIFEST_FILE",
    "MANIFEST_SUFFIX",
    "index_subset",
    "manifest_path",
    "read_manifest",
    "write_manifest",
]

MANIFEST_FILE = "manifest.csv"
MANIFEST_SUFFIX = ".manifest.csv"
MANIFEST_COLUMNS = ("index", "source", "path", "kept", "reason")

# Our map functions have no Python control flow on tensors: skipping AutoGraph saves tracing time.
_plain = tf.autograph.experimental.do_not_convert


def manifest_path(spec):
    """The manifest file that `spec` (a str or path-like) names, or None when it names none.

    Example:
        >>> manifest_path("curated/")              # a folder holding manifest.csv  # doctest: +SKIP
        'curated/manifest.csv'
    """
    if not isinstance(spec, (str, os.PathLike)):
        return None
    text = os.fspath(spec)
    if not isinstance(text, str):
        return None
    name = os.path.basename(text)
    if name == MANIFEST_FILE or name.endswith(MANIFEST_SUFFIX):
        return text
    inside = os.path.join(text, MANIFEST_FILE)
    return inside if os.path.isdir(text) and os.path.isfile(inside) else None


def write_manifest(path, index, kept, reason, source="", paths=None, clusters=()):
    """Writes a manifest (see the module docstring), atomically: a temporary file renamed over `path`.

    Args:
        path: str. The file to write (name it `manifest.csv` or `*.manifest.csv` so `get_source` knows it).
        index: int array (N,). Pool positions.
        kept: bool array (N,).
        reason: sequence of str (N,).
        source: str, default "". The pool's data spec.
        paths: sequence of str (N,) or None, default None. Image files, written as absolute paths.
        clusters: sequence of int arrays (N,), default (). Cluster per level, bottom first; -1 for none.

    Example:
    >>> write_manifest("out/manifest.csv", np.arange(3), [1, 0, 1], ["kept", "duplicate_of:0", "kept"])
    """
    index, kept = np.asarray(index, np.int64), np.asarray(kept).astype(bool)
    if len(kept) != len(index) or len(reason) != len(index) or (paths is not None and len(paths) != len(index)):
        raise ValueError(
            f"write_manifest needs one kept flag, reason (and path) per index: received {len(index)} indices, "
            f"{len(kept)} flags, {len(reason)} reasons" + ("" if paths is None else f", {len(paths)} paths") + "."
        )
    clusters = [np.asarray(c, np.int64) for c in clusters]
    header = list(MANIFEST_COLUMNS) + [f"cluster_l{t + 1}" for t in range(len(clusters))]
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i in range(len(index)):
            file = "" if paths is None or not paths[i] else os.path.abspath(paths[i])
            writer.writerow([int(index[i]), source, file, int(kept[i]), reason[i]]
                            + [int(c[i]) for c in clusters])
        temporary = f.name
    os.chmod(temporary, 0o644)  # a temporary file is private to its owner; the manifest is not
    os.replace(temporary, path)


def read_manifest(path, kept_only=True):
    """The rows of a manifest as columns: {"index": int64 array, "source": [...], "path": [...], "kept": ...}.

    Relative paths are resolved against the manifest's folder.

    Args:
        path: str. The manifest file (or a folder holding `manifest.csv`).
        kept_only: bool, default True. Only the rows with kept = 1.

    Raises:
        ValueError: a missing file, a missing column, a bad `index` or `kept` value (naming the line).

    Example:
    >>> rows = read_manifest("curated/manifest.csv")
    >>> len(rows["index"])          # the kept images
    """
    file = manifest_path(path) or os.fspath(path)
    if not os.path.isfile(file):
        raise ValueError(f"manifest {file!r} does not exist; expected a CSV written by `keras-dinov2 curate select`.")
    base = os.path.dirname(os.path.abspath(file))
    columns = {"index": [], "source": [], "path": [], "kept": [], "reason": []}
    with open(file, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"manifest {file!r} lacks the column(s) {missing}; expected {list(MANIFEST_COLUMNS)}.")
        for line, row in enumerate(reader, start=2):
            try:
                index, kept = int(row["index"]), int(row["kept"])
            except (TypeError, ValueError):
                raise ValueError(f"manifest {file!r} line {line}: index and kept must be integers, received "
                                 f"{row['index']!r} and {row['kept']!r}.") from None
            if index < 0 or kept not in (0, 1):
                raise ValueError(f"manifest {file!r} line {line}: expected index >= 0 and kept 0 or 1, received "
                                 f"{index} and {kept}.")
            if kept_only and not kept:
                continue
            path_ = row["path"] or ""
            columns["index"].append(index)
            columns["source"].append(row["source"] or "")
            columns["path"].append(os.path.join(base, path_) if path_ else "")
            columns["kept"].append(kept)
            columns["reason"].append(row["reason"] or "")
    columns["index"] = np.asarray(columns["index"], np.int64)
    columns["kept"] = np.asarray(columns["kept"], np.int8)
    return columns


def index_subset(source, indices, name):
    """The images `indices` (sorted, unique int64) of `source`, as a source of their own, in that order.

    A random-access source is read by index (its labels follow); a stream is read whole, in stored order, and
    filtered by position (the stream's sharding is then applied to the filtered images).
    """
    indices = np.asarray(indices, np.int64)
    if source.num_examples is not None and len(indices) and indices[-1] >= source.num_examples:
        raise ValueError(f"{name}: index {int(indices[-1])} is past the {source.num_examples} images of "
                         f"{source.name}; was the manifest written for another pool?")
    table = tf.constant(indices)
    describe = source.describe if source.can_fail else None
    paths = None if source.paths is None else [source.paths[i] for i in indices]
    if source.random_access:
        return ImageSource(name, len(indices), read=lambda i: source.read(tf.gather(table, i)), decode=source.decode,
                           labels=None if source.labels is None else source.labels[indices],
                           class_names=source.class_names, describe=describe, explain=source.explain, paths=paths)
    wanted = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(table, tf.ones_like(table)), default_value=tf.constant(0, tf.int64))

    def stream(num_shards, shard_index, shuffle_files):
        ds = source.stream(1, 0, False).enumerate()
        ds = ds.filter(_plain(lambda i, record: wanted.lookup(i) > 0)).map(_plain(lambda i, record: record))
        return ds.shard(num_shards, shard_index) if num_shards > 1 else ds

    return ImageSource(name, len(indices), stream=stream, decode=source.decode, class_names=source.class_names,
                       describe=describe, explain=source.explain)
