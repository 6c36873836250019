"""Row views that the curation functions read like arrays without loading them: shards end to end, chosen rows.

`deduplicate`, `retrieve`, `hierarchical_kmeans` ... read embeddings through `len`, `.shape`, `.dtype`, slices
`x[start:stop]` and sorted index arrays `x[rows]`; these classes answer exactly that, reading only the rows asked
for from the memory maps under them. `np.asarray(view)` reads everything.
"""

import numpy as np


class RowArray:
    """Base of the lazy (num_rows, dim) views: shape, dtype, and reads by slice, index array or int."""

    lazy_rows = True  # what `check_embeddings` looks for to keep a view a view
    ndim = 2

    def __init__(self, num_rows, dim, dtype):
        self.shape = (int(num_rows), int(dim))
        self.dtype = np.dtype(dtype)

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype})"

    def read(self, rows):
        """The rows `rows` (int64 array, any order) as an in-memory array (len(rows), dim)."""
        raise NotImplementedError

    def __getitem__(self, key):
        if isinstance(key, tuple):
            rows, columns = key[0], key[1:]
            return self[rows][(slice(None),) + columns]
        if isinstance(key, (int, np.integer)):
            if not -len(self) <= key < len(self):
                raise IndexError(f"row {key} is out of range for {len(self)} rows.")
            return self.read(np.array([key % len(self)], np.int64))[0]
        if isinstance(key, slice):
            return self.read(np.arange(len(self), dtype=np.int64)[key])
        rows = np.asarray(key)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
            raise IndexError(f"rows must be a slice, an int or a 1-D integer array, received {key!r}.")
        rows = rows.astype(np.int64)
        if len(rows) and (rows.min() < -len(self) or rows.max() >= len(self)):
            raise IndexError(f"rows out of range for {len(self)} rows.")
        return self.read(rows % max(len(self), 1))

    def __array__(self, dtype=None, copy=None):
        out = self.read(np.arange(len(self), dtype=np.int64))
        return out if dtype is None else out.astype(dtype)


class ShardedArray(RowArray):
    """Memory-mapped shards (each (rows_i, dim), one dtype) seen as their concatenation along rows.

    Example:
    >>> view = ShardedArray([np.load(p, mmap_mode="r") for p in sorted(glob.glob("emb/shard_*.npy"))])
    >>> view[10:20].shape
    (10, 384)
    """

    def __init__(self, shards):
        shards = list(shards)
        if not shards:
            raise ValueError("ShardedArray needs at least one shard.")
        dims, dtypes = {s.shape[1] for s in shards}, {np.dtype(s.dtype) for s in shards}
        if len(dims) != 1 or len(dtypes) != 1:
            raise ValueError(f"shards must share one dim and dtype, received dims {dims} and dtypes {dtypes}.")
        self.shards = shards
        self.offsets = np.cumsum([0] + [len(s) for s in shards])
        super().__init__(self.offsets[-1], dims.pop(), dtypes.pop())

    def read(self, rows):
        out = np.empty((len(rows), self.shape[1]), self.dtype)
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        for shard in np.unique(which):
            mine = which == shard
            out[mine] = self.shards[shard][rows[mine] - self.offsets[shard]]
        return out


class RowSubset(RowArray):
    """The rows `rows` of `base` (an array or a view) as an array of their own, read on demand.

    Example:
    >>> alive = RowSubset(pool, np.flatnonzero(kept))   # what survived deduplication, not loaded
    """

    def __init__(self, base, rows):
        self.base = base
        self.rows = np.asarray(rows, np.int64)
        super().__init__(len(self.rows), base.shape[1], base.dtype)

    def read(self, rows):
        wanted = self.rows[rows]
        order = np.argsort(wanted, kind="stable")  # memory maps read best in ascending order
        out = np.empty((len(rows), self.shape[1]), self.dtype)
        out[order] = np.asarray(self.base[wanted[order]])
        return out
