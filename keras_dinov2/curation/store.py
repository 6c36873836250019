"""The embedding folder that `embed_pool` writes and `load_embeddings` opens.

Layout of a folder (nothing else is written there):

    embeddings.json        what was embedded and how: the pool, its size, the backbone's identity, dtype, shards
    shard_00000.npy        (rows, dim) float16/float32 features of pool positions [0, shard_size), readable ones only
    shard_00000.ids.npy    (rows,) int64: the pool position of each of those rows
    ...
    files.csv              position, path (empty for pools not read from files), readable 0/1: every pool image

Each shard's two files are written to a temporary name and renamed (ids first, features last), so a shard whose
`shard_XXXXX.npy` exists is complete: after a kill, `embed_pool` redoes only the missing shards.
"""

import csv
import dataclasses
import json
import os
import tempfile

import numpy as np

from keras_dinov2.curation.views import ShardedArray

META_FILE = "embeddings.json"
FILES_FILE = "files.csv"
FORMAT = "keras_dinov2.pool_embeddings"


def shard_path(folder, shard):
    """The features file of shard `shard`."""
    return os.path.join(folder, f"shard_{shard:05d}.npy")


def ids_path(folder, shard):
    """The positions file of shard `shard`."""
    return os.path.join(folder, f"shard_{shard:05d}.ids.npy")


def temporary_file(folder):
    """(handle, path) of a new temporary file in `folder`, readable by all as the file it will replace."""
    handle, temporary = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.chmod(temporary, 0o644)
    return handle, temporary


def save_atomic(path, array):
    """`np.save(path, array)` through a temporary file in the same folder, renamed over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = temporary_file(folder)
    try:
        with os.fdopen(handle, "wb") as f:
            np.save(f, array)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def write_json_atomic(path, value):
    """`value` as indented JSON at `path`, through a temporary file renamed over it."""
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = temporary_file(folder)
    with os.fdopen(handle, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
    os.replace(temporary, path)


def read_meta(folder):
    """The parsed embeddings.json of `folder`; a `ValueError` naming the folder when it is no embedding folder."""
    path = os.path.join(os.fspath(folder), META_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{os.fspath(folder)!r} holds no {META_FILE}; expected a folder written by embed_pool "
                         "(`keras-dinov2 curate embed`).")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path!r} could not be read as JSON: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not an embeddings description (format {FORMAT!r}).")
    return meta


def finished_shards(folder, num_shards):
    """Indices of the shards whose features file exists (written last, so the shard is whole)."""
    return [s for s in range(num_shards) if os.path.isfile(shard_path(folder, s))]


def write_files_table(folder, num_images, positions, paths):
    """files.csv: every pool position, its file (or ""), and whether it was read (1) or was unreadable (0)."""
    readable = np.zeros(num_images, bool)
    readable[positions] = True
    handle, temporary = temporary_file(folder)
    with os.fdopen(handle, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["position", "path", "readable"])
        for i in range(num_images):
            writer.writerow([i, "" if paths is None else paths[i], int(readable[i])])
    os.replace(temporary, os.path.join(folder, FILES_FILE))
    return np.flatnonzero(~readable)


@dataclasses.dataclass(frozen=True)
class PoolEmbeddings:
    """An embedded pool, as `load_embeddings` opens it (nothing but the positions is read into memory).

    Attributes:
        embeddings: (rows, dim) np.memmap (one shard) or `ShardedArray` (several, end to end). Row r embeds pool
            image `positions[r]`; every curation function takes it as is.
        positions: int64 array (rows,). Pool position of each row, ascending.
        num_images: int. Images in the pool, readable or not.
        unreadable: int64 array. Pool positions that could not be decoded (no row).
        paths: tuple of str (num_images,) or None. The file of each pool position, for pools read from files.
        meta: dict. The embeddings.json: source, backbone identity, dtype, shard size.
        folder: str. The folder.
    """

    embeddings: object
    positions: np.ndarray
    num_images: int
    unreadable: np.ndarray
    paths: tuple
    meta: dict
    folder: str

    @property
    def dim(self):
        """The embedding dimension."""
        return self.embeddings.shape[1]

    @property
    def identity(self):
        """The backbone identity recorded at embedding time (`backbone_identity`)."""
        return self.meta["backbone"]


def load_embeddings(folder):
    """Opens a folder written by `embed_pool`: the embeddings as one memory-mapped view, with positions and files.

    Args:
        folder: str or path-like.

    Returns:
        `PoolEmbeddings`.

    Raises:
        ValueError: not an embedding folder, or an unfinished one (naming the missing shards).

    Example:
    >>> pool = load_embeddings("emb/")
    >>> result = curation.deduplicate(pool.embeddings, threshold=0.95)
    >>> pool.positions[result.kept_indices]          # pool positions of the kept images
    """
    folder = os.fspath(folder)
    meta = read_meta(folder)
    num_shards = int(meta["num_shards"])
    done = finished_shards(folder, num_shards)
    if len(done) < num_shards or not meta.get("complete"):
        missing = sorted(set(range(num_shards)) - set(done))
        raise ValueError(
            f"{folder!r} is unfinished: {len(done)} of {num_shards} shards are written"
            + (f" (missing {missing[:5]}{' ...' if len(missing) > 5 else ''})" if missing else "")
            + "; run embed_pool (`keras-dinov2 curate embed`) again with the same arguments to finish it."
        )
    shards = [np.load(shard_path(folder, s), mmap_mode="r") for s in range(num_shards)]
    positions = np.concatenate([np.load(ids_path(folder, s)) for s in range(num_shards)]).astype(np.int64)
    non_empty = [s for s in shards if len(s)]
    if not non_empty:
        raise ValueError(f"{folder!r}: none of the pool's {meta['num_images']} images could be read.")
    embeddings = non_empty[0] if len(non_empty) == 1 else ShardedArray(non_empty)
    paths = None
    table = os.path.join(folder, FILES_FILE)
    unread = np.ones(meta["num_images"], bool)
    unread[positions] = False
    if os.path.isfile(table):
        with open(table, newline="") as f:
            rows = list(csv.DictReader(f))
        if any(row["path"] for row in rows):
            paths = tuple(row["path"] for row in rows)
    return PoolEmbeddings(embeddings=embeddings, positions=positions, num_images=int(meta["num_images"]),
                          unreadable=np.flatnonzero(unread), paths=paths, meta=meta, folder=folder)
