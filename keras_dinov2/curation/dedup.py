"""Near-copy removal: self-deduplication of a pool and decontamination against evaluation sets.

DINOv2 (Oquab et al., 2023, Sec. 3 and App. A) deduplicates its 1.2B-image web pool with copy-detection embeddings:
each image's k = 64 nearest neighbours by cosine similarity, an edge for each pair above 0.6, connected components,
one image kept per component; then it removes pool images within similarity 0.45 of any evaluation image. Those
thresholds belong to copy-detection (SSCD) embeddings; with DINOv2 embeddings near-copies sit much higher (about
0.9 and above), so these functions take `threshold` without a default.
"""

import dataclasses

import numpy as np
from scipy import sparse
from scipy.sparse import csgraph

from keras_dinov2.curation.arrays import (
    SIMILARITY_TOLERANCE,
    build_index,
    check_embeddings,
    check_index,
    check_positive_int,
    check_same_dim,
    check_seed,
    check_threshold,
    search,
)


@dataclasses.dataclass(frozen=True)
class DedupResult:
    """What `deduplicate` found.

    Attributes:
        kept: bool array (N,). True for the one item kept per group (its lowest index).
        group: int64 array (N,). Group id of each item, 0 .. num_groups - 1, numbered in the order of the groups'
            lowest indices; an item with no near-copy is a group of its own.
        duplicate_of: int64 array (N,). For a dropped item, the kept item of its group (the one it duplicates,
            possibly through a chain of near-copies); -1 for a kept item.
        pairs: int64 array (P, 2). The pairs (i, j), i < j, whose cosine similarity reached the threshold.
        similarities: float32 array (P,). Their cosine similarities.
    """

    kept: np.ndarray
    group: np.ndarray
    duplicate_of: np.ndarray
    pairs: np.ndarray
    similarities: np.ndarray

    @property
    def num_groups(self):
        """Number of groups, which is also the number of kept items."""
        return int(self.kept.sum())

    @property
    def kept_indices(self):
        """int64 array of the kept items' indices, ascending."""
        return np.flatnonzero(self.kept)


@dataclasses.dataclass(frozen=True)
class DecontaminationResult:
    """What `decontaminate` found.

    Attributes:
        kept: bool array (N,). False for a pool item within the threshold of an evaluation item (or, with
            `groups`, in the same group as such an item).
        nearest: int64 array (N,). The most similar evaluation item of each pool item (-1 where an approximate
            index found none).
        similarity: float32 array (N,). Its cosine similarity (approximate with a compressing index).
    """

    kept: np.ndarray
    nearest: np.ndarray
    similarity: np.ndarray

    @property
    def kept_indices(self):
        """int64 array of the kept pool items' indices, ascending."""
        return np.flatnonzero(self.kept)


def threshold_pairs(starts_sims_ids, threshold, num_rows):
    """Unique pairs (i < j) and their similarities from chunks of k-NN results, above `threshold`, self excluded."""
    found_i, found_j, found_s = [], [], []
    for start, sims, ids in starts_sims_ids:
        rows = np.arange(start, start + len(ids))[:, None]
        hit = (ids >= 0) & (ids != rows) & (sims >= threshold - SIMILARITY_TOLERANCE)
        i, j = np.broadcast_to(rows, ids.shape)[hit], ids[hit]
        found_i.append(np.minimum(i, j))
        found_j.append(np.maximum(i, j))
        found_s.append(sims[hit])
    i = np.concatenate(found_i).astype(np.int64) if found_i else np.zeros(0, np.int64)
    j = np.concatenate(found_j).astype(np.int64) if found_j else np.zeros(0, np.int64)
    s = np.concatenate(found_s).astype(np.float32) if found_s else np.zeros(0, np.float32)
    # Each pair is usually found from both ends: keep it once, in (i, j) order.
    keys, first = np.unique(i * np.int64(num_rows) + j, return_index=True)
    return np.stack([keys // num_rows, keys % num_rows], axis=1), s[first]


def group_components(pairs, num_rows):
    """(group id, representative) per item: connected components of the pair graph, numbered by lowest index."""
    graph = sparse.coo_matrix(
        (np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(num_rows, num_rows)
    ).tocsr()
    num_components, labels = csgraph.connected_components(graph, directed=False)
    lowest = np.full(num_components, num_rows, np.int64)
    np.minimum.at(lowest, labels, np.arange(num_rows))
    rank = np.empty(num_components, np.int64)
    rank[np.argsort(lowest, kind="stable")] = np.arange(num_components)
    return rank[labels], lowest[labels]


def deduplicate(embeddings, *, threshold, num_neighbors=64, index="flat", nprobe=16, chunk_size=16384, seed=0,
                verbose=False):
    """Near-copies within a pool: pairs with cosine similarity >= `threshold`, grouped, one item kept per group.

    Rows are L2-normalized; each row's `num_neighbors` most similar rows (a k-NN search, as the DINOv2 paper's
    k = 64) give the pairs at or above the threshold; connected components of those pairs are the groups (so a
    chain a ~ b ~ c is one group even when a and c are not similar), and each group keeps its lowest index. A row
    with more than `num_neighbors` near-copies may miss some pairs, but its copies are still joined through each
    other. Memory: the index (see `index`) plus chunk_size * num_neighbors results; no (N, N) array.

    Args:
        embeddings: float array (N, dim), a NumPy array or a memory map (`np.load(path, mmap_mode="r")`).
        threshold: float in (0, 1]. Cosine similarity at or above which two items are near-copies; 1.0 finds exact
            copies (within float32 rounding, 1e-5). The paper's 0.6 is for copy-detection embeddings; DINOv2
            embeddings of near-copies are about 0.9 and above.
        num_neighbors: int, default 64. Neighbours searched per item; at most N - 1 are used.
        index: str, default "flat". "flat" (exact faiss.IndexFlatIP), "ivf" (approximate, for big pools) or a faiss
            index_factory string; see `build_index`.
        nprobe: int, default 16. Lists visited per query by an IVF index.
        chunk_size: int, default 16384. Rows read, indexed and searched at a time.
        seed: int, default 0. Picks the training rows of an IVF index.
        verbose: bool, default False. Progress bars over the chunks.

    Returns:
        `DedupResult`: kept mask, group ids, the kept item each dropped item duplicates, and the pairs found.

    Example:
    >>> result = deduplicate(np.load("pool.npy", mmap_mode="r"), threshold=0.95)
    >>> np.save("kept.npy", result.kept_indices)
    """
    embeddings = check_embeddings("embeddings", embeddings)
    threshold = check_threshold("threshold", threshold)
    num_neighbors = check_positive_int("num_neighbors", num_neighbors)
    chunk_size = check_positive_int("chunk_size", chunk_size)
    nprobe = check_positive_int("nprobe", nprobe)
    index, seed = check_index(index), check_seed(seed)
    num_rows = len(embeddings)
    searched = build_index(embeddings, "embeddings", index, nprobe, chunk_size, seed, verbose)
    k = min(num_neighbors + 1, num_rows)  # +1: a row finds itself first
    results = search(searched, embeddings, "embeddings", k, chunk_size, verbose, "deduplicating")
    pairs, similarities = threshold_pairs(results, threshold, num_rows)
    group, representative = group_components(pairs, num_rows)
    kept = representative == np.arange(num_rows)
    return DedupResult(
        kept=kept,
        group=group,
        duplicate_of=np.where(kept, -1, representative),
        pairs=pairs,
        similarities=similarities,
    )


def decontaminate(pool_embeddings, eval_embeddings, *, threshold, groups=None, index="flat", nprobe=16,
                  chunk_size=16384, seed=0, verbose=False):
    """Drops every pool item whose cosine similarity to some evaluation item is >= `threshold`.

    The evaluation embeddings are indexed (L2-normalized) and each chunk of the pool searches its most similar
    evaluation item. With `groups` (for example `deduplicate(pool, ...).group`), a whole group goes when any of its
    members is too close to the evaluation set, as the DINOv2 paper drops whole components.

    Args:
        pool_embeddings: float array (N, dim), a NumPy array or a memory map.
        eval_embeddings: float array (M, dim). Embeddings of the evaluation images (train and test splits).
        threshold: float in (0, 1]. The paper's 0.45 is for copy-detection embeddings; see `deduplicate`.
        groups: int array (N,) or None, default None. A group id per pool item; a group is dropped as a whole.
        index: str, default "flat". Index over the evaluation set; see `deduplicate`.
        nprobe: int, default 16. Lists visited per query by an IVF index.
        chunk_size: int, default 16384. Pool rows searched at a time.
        seed: int, default 0. Picks the training rows of an IVF index.
        verbose: bool, default False. Progress bars over the chunks.

    Returns:
        `DecontaminationResult`: kept mask, nearest evaluation item and its similarity, per pool item.

    Example:
    >>> result = decontaminate(pool, np.concatenate([imagenet_val, imagenet_train]), threshold=0.9)
    >>> pool_kept = np.flatnonzero(result.kept)
    """
    pool_embeddings = check_embeddings("pool_embeddings", pool_embeddings)
    eval_embeddings = check_embeddings("eval_embeddings", eval_embeddings)
    check_same_dim("pool_embeddings", pool_embeddings, "eval_embeddings", eval_embeddings)
    threshold = check_threshold("threshold", threshold)
    chunk_size = check_positive_int("chunk_size", chunk_size)
    nprobe = check_positive_int("nprobe", nprobe)
    index, seed = check_index(index), check_seed(seed)
    num_rows = len(pool_embeddings)
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != (num_rows,) or not np.issubdtype(groups.dtype, np.integer):
            raise ValueError(
                f"`groups` must be an integer array with one group id per pool item, shape ({num_rows},), received "
                f"shape {groups.shape} and dtype {groups.dtype}."
            )
    searched = build_index(eval_embeddings, "eval_embeddings", index, nprobe, chunk_size, seed, verbose)
    nearest = np.empty(num_rows, np.int64)
    similarity = np.empty(num_rows, np.float32)
    for start, sims, ids in search(searched, pool_embeddings, "pool_embeddings", 1, chunk_size, verbose,
                                   "decontaminating"):
        nearest[start : start + len(ids)] = ids[:, 0]
        similarity[start : start + len(ids)] = sims[:, 0]
    kept = ~((nearest >= 0) & (similarity >= threshold - SIMILARITY_TOLERANCE))
    if groups is not None:
        kept &= ~np.isin(groups, groups[~kept])
    return DecontaminationResult(kept=kept, nearest=nearest, similarity=similarity)
