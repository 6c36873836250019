"""Checks, chunked reading and faiss indexes shared by the curation modules.

Embedding arrays may be NumPy arrays or memory maps (`np.load(path, mmap_mode="r")`) larger than memory: the
modules read them in row chunks, convert each chunk to float32 and L2-normalize it here, and never form an
(N, N) array. A faiss index over a pool holds the normalized rows in float32 (N * dim * 4 bytes; 1.5 GB for a
million 384-d rows) unless a compressing faiss factory string (for example "IVF4096,PQ32") is chosen.
"""

import contextlib
import numbers

import faiss
import numpy as np

# Cosine similarities of float32 unit vectors carry rounding of about 1e-7 * sqrt(dim); a threshold of 1.0 (exact
# copies) must still match a row with itself, so comparisons are made against `threshold - SIMILARITY_TOLERANCE`.
SIMILARITY_TOLERANCE = 1e-5


def check_embeddings(name, embeddings):
    """`embeddings` checked to be a non-empty 2-D float array; a memory map stays a memory map, and a lazy view
    (`keras_dinov2.curation.views`: shards end to end, a subset of rows) stays a view (nothing is read).

    Args:
        name: str. The argument's name, for the error message.
        embeddings: array-like (num_items, dim) of float16, float32 or float64.

    Returns:
        np.ndarray (or np.memmap) (num_items, dim).

    Example:
    >>> check_embeddings("pool", np.load("pool.npy", mmap_mode="r")).shape
    (1000000, 384)
    """
    if not isinstance(embeddings, np.ndarray) and not getattr(embeddings, "lazy_rows", False):
        if hasattr(embeddings, "detach") and hasattr(embeddings, "cpu"):  # a torch tensor, possibly on a GPU
            embeddings = embeddings.detach().cpu()
        embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D array (num_items, dim), received shape {embeddings.shape}.")
    if embeddings.shape[0] == 0 or embeddings.shape[1] == 0:
        raise ValueError(f"`{name}` is empty: received shape {embeddings.shape}, expected at least one row and column.")
    if not np.issubdtype(embeddings.dtype, np.floating):
        raise ValueError(f"`{name}` must hold floats (float16, float32 or float64), received dtype {embeddings.dtype}.")
    return embeddings


def check_same_dim(name_a, a, name_b, b):
    """A `ValueError` naming both arguments when their embedding dimensions differ."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"`{name_a}` and `{name_b}` must have the same embedding dimension, received {a.shape[1]} and "
            f"{b.shape[1]}."
        )


def check_threshold(name, value):
    """`value` as a float, or a `ValueError` when it is not a cosine similarity in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"`{name}` must be a cosine similarity in (0, 1], received {value!r}.")
    return float(value)


def check_positive_int(name, value, at_most=None, what=None):
    """`value` as an int; a `ValueError` when it is not a positive integer, or above `at_most` (`what` says why)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, received {value!r}.")
    if at_most is not None and value > at_most:
        raise ValueError(f"`{name}` must be at most {what} ({at_most}), received {value}.")
    return int(value)


def check_seed(seed):
    """`seed` as an int that faiss accepts (0 <= seed < 2**31)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**31:
        raise ValueError(f"`seed` must be an integer in [0, 2**31), received {seed!r}.")
    return int(seed)


def to_float32(rows, name, first_row=0, row_ids=None, normalize=True):
    """A fresh, contiguous float32 copy of `rows`, L2-normalized unless `normalize` is False.

    A row holding NaN or inf raises a `ValueError` naming its index in the full array (`first_row` + its position,
    or `row_ids[position]`). An all-zero row stays zero (cosine 0 with everything) rather than becoming NaN.
    """
    x = np.array(rows, dtype=np.float32, copy=True, order="C")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        where = int(np.flatnonzero(bad)[0])
        row = int(row_ids[where]) if row_ids is not None else first_row + where
        raise ValueError(f"`{name}` row {row} holds NaN or inf; remove or repair such rows before curation.")
    if normalize:
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))
    return x


def chunks(num_rows, chunk_size):
    """(start, stop) of consecutive row chunks covering `num_rows`."""
    return [(start, min(start + chunk_size, num_rows)) for start in range(0, num_rows, chunk_size)]


def read_rows(embeddings, row_ids, name, normalize=True):
    """The rows `row_ids` (sorted, unique) of `embeddings` as float32, read by fancy indexing (memory maps too)."""
    return to_float32(embeddings[row_ids], name, row_ids=row_ids, normalize=normalize)


def random_rows(num_rows, size, rng):
    """Sorted indices of `size` distinct rows out of `num_rows` (all of them when `size >= num_rows`)."""
    if size >= num_rows:
        return np.arange(num_rows)
    return np.sort(rng.choice(num_rows, size=size, replace=False))


class Progress:
    """A progress bar over rows when `verbose` (tqdm if installed, else keras.utils.Progbar); silent otherwise."""

    def __init__(self, total, verbose, description, unit="row"):
        self.bar, self.done, self.total = None, 0, total
        if not verbose:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            import keras

            self.bar = keras.utils.Progbar(total, unit_name=unit)
            self.kind = "keras"
        else:
            self.bar = tqdm(total=total, desc=description, unit=unit)
            self.kind = "tqdm"

    def update(self, rows):
        """Advance by `rows`."""
        self.done += rows
        if self.bar is None:
            return
        if self.kind == "tqdm":
            self.bar.update(rows)
        else:
            self.bar.update(self.done, finalize=self.done >= self.total)

    def close(self):
        """Close the bar (tqdm)."""
        if self.bar is not None and self.kind == "tqdm":
            self.bar.close()


@contextlib.contextmanager
def progress(total, verbose, description):
    """`Progress` as a context manager that closes the bar.

    Example:
    >>> with progress(len(pool), verbose, "deduplicate") as bar:
    ...     bar.update(chunk_rows)
    """
    bar = Progress(total, verbose, description)
    try:
        yield bar
    finally:
        bar.close()


def check_index(index):
    """`index` if it names an index that `build_index` makes: "flat", "ivf" or a faiss factory string."""
    if not isinstance(index, str) or not index:
        raise ValueError(f"`index` must be 'flat', 'ivf' or a faiss index_factory string, received {index!r}.")
    return index


def new_index(index, dim, num_rows, nprobe):
    """An empty faiss inner-product index: exact ("flat"), IVF-flat ("ivf") or a faiss factory string."""
    if index == "flat":
        return faiss.IndexFlatIP(dim)
    if index == "ivf":
        # About 4 * sqrt(N) lists, as faiss's guidelines suggest, with at least 39 training rows per list.
        nlist = int(max(1, min(4 * np.sqrt(num_rows), num_rows // 39)))
        index = f"IVF{nlist},Flat"
    try:
        made = faiss.index_factory(dim, index, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise ValueError(f"`index` {index!r} is not a faiss index_factory string: {error}") from None
    with contextlib.suppress(RuntimeError):
        faiss.extract_index_ivf(made).nprobe = nprobe
    return made


def build_index(embeddings, name, index="flat", nprobe=16, chunk_size=16384, seed=0, verbose=False,
                train_rows_per_list=64):
    """A faiss inner-product index over the L2-normalized rows of `embeddings`, added chunk by chunk.

    Args:
        embeddings: array (num_items, dim), checked by `check_embeddings`; a memory map is read chunk by chunk.
        name: str. The argument's name, for error messages.
        index: str, default "flat". "flat" (exact, faiss.IndexFlatIP), "ivf" (IVF-flat with about 4 * sqrt(N)
            lists, approximate, faster on big pools) or any faiss index_factory string (built with the inner
            product metric; a compressing one such as "IVF4096,PQ32" keeps big pools in memory, with
            approximate similarities).
        nprobe: int, default 16. Lists visited per query by an IVF index.
        chunk_size: int, default 16384. Rows read and added at a time.
        seed: int, default 0. Picks the rows an index that needs training is trained on.
        verbose: bool, default False. A progress bar over the added rows.
        train_rows_per_list: int, default 64. Training rows per IVF list (a random sample of the rows).

    Returns:
        A faiss index holding the rows in order (faiss id = row index).

    Example:
    >>> index = build_index(pool, "pool", index="ivf", nprobe=32)
    """
    num_rows, dim = embeddings.shape
    made = new_index(index, dim, num_rows, nprobe)
    if not made.is_trained:
        try:
            nlist = faiss.extract_index_ivf(made).nlist
        except RuntimeError:  # a trained index that is not an IVF (a PQ alone, say)
            nlist = 256
        rows = random_rows(num_rows, max(nlist * train_rows_per_list, 10_000), np.random.default_rng(seed))
        made.train(read_rows(embeddings, rows, name))
    with progress(num_rows, verbose, f"indexing {name}") as bar:
        for start, stop in chunks(num_rows, chunk_size):
            made.add(to_float32(embeddings[start:stop], name, first_row=start))
            bar.update(stop - start)
    return made


def search(index, queries, name, k, chunk_size=16384, verbose=False, description="searching"):
    """Yields (start, similarities (rows, k) float32, ids (rows, k) int64) over chunks of normalized `queries`.

    faiss returns neighbours most similar first; an id of -1 (an IVF index finding fewer than k) has similarity
    -inf in faiss's inner-product convention, so it never passes a threshold.
    """
    with progress(len(queries), verbose, description) as bar:
        for start, stop in chunks(len(queries), chunk_size):
            sims, ids = index.search(to_float32(queries[start:stop], name, first_row=start), k)
            yield start, sims, ids
            bar.update(stop - start)


def take_per_group(labels, keys, budget):
    """Sorted indices of the `budget[g]` items of each group g with the smallest `keys` (ties by index).

    Args:
        labels: int array (N,). The group of each item, in [0, len(budget)).
        keys: array (N,). Order inside a group (random numbers for a random draw, distances for "closest").
        budget: int array (num_groups,). Items to take per group, at most its size.

    Returns:
        int64 array of item indices, sorted.

    Example:
    >>> take_per_group(np.array([0, 0, 1]), np.array([0.3, 0.1, 0.5]), np.array([1, 1]))
    array([1, 2])
    """
    order = np.lexsort((np.arange(len(labels)), keys, labels))
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, np.arange(len(budget)))
    rank = np.arange(len(labels)) - starts[sorted_labels]
    return np.sort(order[rank < budget[sorted_labels]]).astype(np.int64)
