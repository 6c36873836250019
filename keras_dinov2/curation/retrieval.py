"""Retrieval of pool images that resemble a seed set, by nearest neighbours or by whole k-means clusters.

DINOv2 (Oquab et al., 2023, Sec. 3) builds LVD-142M from curated seed sets this way: for a large seed set, the
k nearest pool images of every seed image (k = 4, or 32 for ImageNet-1k); for a small one, the pool is clustered
with k-means and whole clusters holding seed images are taken (the paper: 100,000 clusters, 10,000 images from each
cluster holding more than 3 seed images).
"""

import dataclasses

import faiss
import numpy as np

from keras_dinov2.curation.arrays import (
    build_index,
    check_embeddings,
    check_index,
    check_positive_int,
    check_same_dim,
    check_seed,
    search,
    take_per_group,
)
from keras_dinov2.curation.clustering import assign, check_init, check_num_clusters, fit_kmeans


@dataclasses.dataclass(frozen=True)
class RetrievalResult:
    """What `retrieve` found.

    Attributes:
        indices: int64 array (R,). The retrieved pool items, ascending, without repeats.
        similarity: float32 array (R,). Each one's highest cosine similarity to a seed that retrieved it.
        seed: int64 array (R,). That seed's index.
    """

    indices: np.ndarray
    similarity: np.ndarray
    seed: np.ndarray


@dataclasses.dataclass(frozen=True)
class ClusterRetrievalResult:
    """What `retrieve_by_cluster` found.

    Attributes:
        indices: int64 array (R,). The retrieved pool items (members of the selected clusters), ascending.
        clusters: int64 array. The selected clusters, ascending.
        assignment: int64 array (N,). The k-means cluster of every pool item.
        seed_counts: int64 array (num_clusters,). Seeds that fell in (or near) each cluster.
        centroids: float32 array (num_clusters, dim). The k-means centroids (of the normalized pool).
    """

    indices: np.ndarray
    clusters: np.ndarray
    assignment: np.ndarray
    seed_counts: np.ndarray
    centroids: np.ndarray


def check_pool_seeds(pool, seeds):
    """The two arrays checked (2-D, non-empty, floats, one embedding dimension)."""
    pool = check_embeddings("pool", pool)
    seeds = check_embeddings("seeds", seeds)
    check_same_dim("pool", pool, "seeds", seeds)
    return pool, seeds


def retrieve(pool, seeds, *, k=4, index="flat", nprobe=16, chunk_size=16384, seed=0, verbose=False):
    """Sample-based retrieval: the `k` pool items most similar (cosine) to each seed, all seeds together.

    The pool is indexed chunk by chunk (L2-normalized) and the seeds search it in chunks; the result is the union
    of the seeds' neighbours.

    Args:
        pool: float array (N, dim), a NumPy array or a memory map.
        seeds: float array (S, dim). Embeddings of the seed images (a curated dataset).
        k: int, default 4 (the paper's value for large seed sets; 32 for ImageNet-1k). At most N.
        index: str, default "flat". "flat" (exact), "ivf" or a faiss index_factory string; see `build_index`.
        nprobe: int, default 16. Lists visited per query by an IVF index.
        chunk_size: int, default 16384. Rows indexed and searched at a time.
        seed: int, default 0. Picks the training rows of an IVF index.
        verbose: bool, default False. Progress bars over the chunks.

    Returns:
        `RetrievalResult`: the retrieved indices with the best similarity and seed of each.

    Example:
    >>> result = retrieve(np.load("pool.npy", mmap_mode="r"), imagenet_embeddings, k=4)
    >>> np.save("retrieved.npy", result.indices)
    """
    pool, seeds = check_pool_seeds(pool, seeds)
    k = check_positive_int("k", k, at_most=len(pool), what="the number of pool items")
    chunk_size = check_positive_int("chunk_size", chunk_size)
    nprobe = check_positive_int("nprobe", nprobe)
    index, seed = check_index(index), check_seed(seed)
    searched = build_index(pool, "pool", index, nprobe, chunk_size, seed, verbose)
    found_ids, found_sims, found_seeds = [], [], []
    for start, sims, ids in search(searched, seeds, "seeds", k, chunk_size, verbose, "retrieving"):
        valid = ids >= 0
        found_ids.append(ids[valid])
        found_sims.append(sims[valid])
        found_seeds.append(np.broadcast_to(np.arange(start, start + len(ids))[:, None], ids.shape)[valid])
    ids, sims, seed_ids = (np.concatenate(found) for found in (found_ids, found_sims, found_seeds))
    # Per pool item, its most similar seed (the lowest seed index on ties): sort by item, then similarity.
    order = np.lexsort((seed_ids, -sims, ids))
    ids, sims, seed_ids = ids[order], sims[order], seed_ids[order]
    first = np.ones(len(ids), bool)
    first[1:] = ids[1:] != ids[:-1]
    return RetrievalResult(indices=ids[first].astype(np.int64), similarity=sims[first].astype(np.float32),
                           seed=seed_ids[first].astype(np.int64))


def retrieve_by_cluster(pool, seeds, *, num_clusters, min_seeds=1, nearest_clusters=1, max_per_cluster=None,
                        niter=20, init="kmeans++", max_points_per_centroid=256, chunk_size=16384, seed=0,
                        verbose=False):
    """Cluster-based retrieval: k-means on the pool, then every member of the clusters the seeds fall in.

    The pool is L2-normalized and clustered with faiss k-means (trained on at most num_clusters *
    max_points_per_centroid random items; every item is then assigned, chunk by chunk). Each seed votes for its
    `nearest_clusters` nearest centroids; a cluster with at least `min_seeds` votes is selected whole, or as a
    random `max_per_cluster` of its members.

    Args:
        pool: float array (N, dim), a NumPy array or a memory map.
        seeds: float array (S, dim).
        num_clusters: int, at most N. k-means clusters of the pool (the paper: 100,000 for 1.2B images).
        min_seeds: int, default 1. Votes a cluster needs (the paper takes clusters holding more than 3 seeds: 4).
        nearest_clusters: int, default 1. Centroids each seed votes for (1: the cluster it falls in; more: also
            clusters near it).
        max_per_cluster: int or None, default None. At most this many random members per selected cluster (the
            paper: 10,000); None takes all of them.
        niter: int, default 20. k-means iterations.
        init: str, default "kmeans++". "kmeans++" or "random" (cheaper for tens of thousands of clusters); see
            `hierarchical_kmeans`.
        max_points_per_centroid: int, default 256. Bounds the k-means training sample.
        chunk_size: int, default 16384. Pool rows assigned at a time.
        seed: int, default 0. Seeds k-means and the member draws.
        verbose: bool, default False. A progress bar over the assignment chunks.

    Returns:
        `ClusterRetrievalResult`: retrieved indices, selected clusters, the pool's cluster assignment, votes.

    Example:
    >>> result = retrieve_by_cluster(pool, seeds, num_clusters=10_000, min_seeds=4, max_per_cluster=10_000)
    """
    pool, seeds = check_pool_seeds(pool, seeds)
    num_clusters = check_num_clusters("num_clusters", num_clusters, len(pool), "the number of pool items")
    min_seeds = check_positive_int("min_seeds", min_seeds)
    nearest_clusters = check_positive_int("nearest_clusters", nearest_clusters, at_most=num_clusters,
                                          what="num_clusters")
    if max_per_cluster is not None:
        max_per_cluster = check_positive_int("max_per_cluster", max_per_cluster)
    niter = check_positive_int("niter", niter)
    max_points_per_centroid = check_positive_int("max_points_per_centroid", max_points_per_centroid)
    chunk_size = check_positive_int("chunk_size", chunk_size)
    seed, init = check_seed(seed), check_init(init)
    centroids = fit_kmeans(pool, num_clusters, name="pool", niter=niter, seed=seed, init=init,
                           max_points_per_centroid=max_points_per_centroid)
    assignment, _ = assign(pool, centroids, name="pool", chunk_size=chunk_size, verbose=verbose,
                           description="assigning pool")
    seed_clusters = nearest_centroids(seeds, centroids, nearest_clusters, chunk_size)
    seed_counts = np.bincount(seed_clusters.ravel(), minlength=num_clusters).astype(np.int64)
    clusters = np.flatnonzero(seed_counts >= min_seeds)
    selected = np.isin(assignment, clusters)
    if max_per_cluster is None:
        indices = np.flatnonzero(selected)
    else:
        sizes = np.bincount(assignment, minlength=num_clusters)
        budget = np.where(np.isin(np.arange(num_clusters), clusters), np.minimum(sizes, max_per_cluster), 0)
        keys = np.random.default_rng(seed).random(len(pool))
        indices = take_per_group(assignment, keys, budget)
    return ClusterRetrievalResult(indices=indices.astype(np.int64), clusters=clusters.astype(np.int64),
                                  assignment=assignment, seed_counts=seed_counts, centroids=centroids)


def nearest_centroids(seeds, centroids, count, chunk_size):
    """int64 (S, count): the `count` nearest centroids (squared L2 on normalized rows) of every seed."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, np.float32))
    found = [ids for _, _, ids in search(index, seeds, "seeds", count, chunk_size)]
    return np.concatenate(found).astype(np.int64)
