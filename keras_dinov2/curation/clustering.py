"""k-means over embedding pools with faiss, and the seed-free hierarchical k-means of Vo et al. (2024).

Plain k-means follows the density of the data: a concept with twenty times more images gets about twenty times
more centroids. Vo et al. ("Automatic Data Curation for Self-Supervised Learning: A Clustering-Based Approach")
cluster again: level 1 clusters the points, level 2 clusters level 1's centroids, and so on, so the many centroids
of a dense concept merge into few clusters at the top, and sampling the top clusters evenly (`balanced_sample`)
balances the concepts. Optional resampling rounds at each level (k-means again on the points closest to each
centroid, then every point reassigned) push centroids further toward an even cover of the data.
"""

import dataclasses
import numbers

import faiss
import numpy as np

from keras_dinov2.curation.arrays import (
    check_embeddings,
    check_positive_int,
    check_seed,
    chunks,
    progress,
    random_rows,
    read_rows,
    take_per_group,
    to_float32,
)


def check_num_clusters(name, num_clusters, num_points, what):
    """`num_clusters` as an int, or a `ValueError` when it is not in [1, num_points]."""
    return check_positive_int(name, num_clusters, at_most=num_points, what=what)


INITS = ("kmeans++", "random")
# Rows per centre that k-means++ seeding reads (a random subset of the k-means sample).
SEEDING_POINTS_PER_CENTROID = 32


def check_init(init):
    """`init` if it is "kmeans++" or "random"."""
    if not isinstance(init, str) or init not in INITS:
        raise ValueError(f"`init` must be one of {INITS}, received {init!r}.")
    return init


def kmeans_plus_plus(sample, num_clusters, rng):
    """Greedy k-means++ seeding: each new centre is the best of a few candidates drawn with probability ~ D(x)^2.

    Random seeding (faiss's) puts centres where the points are dense, so twenty times more points of one concept
    take twenty times more centres and small, distant concepts can end up sharing one; D^2 seeding (Arthur and
    Vassilvitskii, 2007) reaches distant groups first, and keeping the candidate that lowers the total squared
    distance most (2 + ln k candidates a step, the greedy variant) makes a missed group unlikely. Cost: one pass
    over the sample per centre.
    """
    squared = np.einsum("ij,ij->i", sample, sample)
    trials = 2 + int(np.log(num_clusters))
    centres = np.empty((num_clusters, sample.shape[1]), np.float32)
    centres[0] = sample[rng.integers(len(sample))]
    closest = np.maximum(squared - 2 * sample @ centres[0] + centres[0] @ centres[0], 0)
    for i in range(1, num_clusters):
        cumulative = np.cumsum(closest, dtype=np.float64)
        if cumulative[-1] <= 0:  # every point sits on a centre already: any point will do
            candidates = rng.integers(len(sample), size=trials)
        else:
            draws = np.searchsorted(cumulative, rng.random(trials) * cumulative[-1], side="right")
            candidates = np.minimum(draws, len(sample) - 1)
        chosen = sample[candidates]
        distances = np.maximum(squared[:, None] - 2 * sample @ chosen.T + np.einsum("ij,ij->i", chosen, chosen), 0)
        updated = np.minimum(closest[:, None], distances)
        best = int(np.argmin(updated.sum(axis=0, dtype=np.float64)))
        centres[i], closest = chosen[best], np.ascontiguousarray(updated[:, best])
    return centres


def fit_kmeans(embeddings, num_clusters, *, name="embeddings", normalize=True, niter=20, seed=0,
               max_points_per_centroid=256, init="kmeans++", row_ids=None):
    """Centroids (num_clusters, dim) float32 of faiss k-means on (a sample of) the rows of `embeddings`.

    Args:
        embeddings: float array (N, dim) or memory map; only the sampled rows are read.
        num_clusters: int, at most N.
        name: str, default "embeddings". The argument's name, for error messages.
        normalize: bool, default True. L2-normalize the rows first.
        niter: int, default 20. k-means iterations.
        seed: int, default 0. Seeds the initialization and the row sample.
        max_points_per_centroid: int, default 256 (faiss's default). At most num_clusters * this many random rows
            are read and clustered.
        init: "kmeans++", "random" or a float array (num_clusters, dim); default "kmeans++". The initial
            centroids: k-means++ seeding, faiss's random rows, or the given ones.
        row_ids: int array or None, default None. Restrict the clustering to these rows (sorted).

    Returns:
        float32 array (num_clusters, dim).

    Example:
    >>> centroids = fit_kmeans(pool, 1000, seed=0)
    """
    rng = np.random.default_rng(seed)
    total = len(embeddings) if row_ids is None else len(row_ids)
    picked = random_rows(total, num_clusters * max_points_per_centroid, rng)
    if row_ids is not None:
        picked = row_ids[picked]
    sample = read_rows(embeddings, picked, name, normalize=normalize)
    kmeans = faiss.Kmeans(
        sample.shape[1], num_clusters, niter=niter, seed=seed, verbose=False,
        min_points_per_centroid=1, max_points_per_centroid=max(len(sample), 1),
    )
    if isinstance(init, str) and check_init(init) == "kmeans++":
        # Seeding reads its rows once per centre: a smaller random subset keeps that cost near one k-means run.
        seeding = sample[random_rows(len(sample), num_clusters * SEEDING_POINTS_PER_CENTROID, rng)]
        init = kmeans_plus_plus(seeding, num_clusters, rng)
    elif isinstance(init, str):
        init = None
    kmeans.train(sample, init_centroids=None if init is None else np.ascontiguousarray(init, np.float32))
    return np.array(kmeans.centroids, np.float32)


def assign(embeddings, centroids, *, name="embeddings", normalize=True, chunk_size=16384, verbose=False,
           description="assigning"):
    """Nearest centroid (int64 (N,)) and squared L2 distance to it (float32 (N,)) of every row, chunk by chunk."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, np.float32))
    labels = np.empty(len(embeddings), np.int64)
    distances = np.empty(len(embeddings), np.float32)
    with progress(len(embeddings), verbose, description) as bar:
        for start, stop in chunks(len(embeddings), chunk_size):
            found, ids = index.search(to_float32(embeddings[start:stop], name, first_row=start, normalize=normalize), 1)
            labels[start:stop], distances[start:stop] = ids[:, 0], found[:, 0]
            bar.update(stop - start)
    return labels, distances


@dataclasses.dataclass(frozen=True)
class ClusterTree:
    """The result of `hierarchical_kmeans`.

    Attributes:
        levels: tuple of int. Clusters per level, bottom (clusters of points) first.
        assignments: tuple of int64 arrays, one per level. `assignments[0]` (N,) gives each point's level-1
            cluster; `assignments[t]` (levels[t - 1],) gives each level-t cluster's parent at level t + 1.
        centroids: tuple of float32 arrays, one per level: `centroids[t]` (levels[t], dim).
        distances: float32 array (N,). Squared L2 distance of each (normalized) point to its level-1 centroid.
    """

    levels: tuple
    assignments: tuple
    centroids: tuple
    distances: np.ndarray

    @property
    def num_points(self):
        """Number of clustered points N."""
        return len(self.assignments[0])

    def point_clusters(self, level):
        """int64 array (N,): each point's cluster at `level` (0 = the first level, len(levels) - 1 = the top)."""
        if isinstance(level, bool) or not isinstance(level, numbers.Integral) or not 0 <= level < len(self.levels):
            raise ValueError(f"`level` must be an int in [0, {len(self.levels) - 1}], received {level!r}.")
        labels = self.assignments[0]
        for parents in self.assignments[1 : level + 1]:
            labels = parents[labels]
        return labels

    def cluster_sizes(self, level):
        """int64 array (levels[level],): the number of points in each cluster of `level`."""
        return np.bincount(self.point_clusters(level), minlength=self.levels[level]).astype(np.int64)


def check_levels(levels, num_points):
    """`levels` as a tuple of positive ints, each at most the number of items it clusters."""
    if isinstance(levels, (int, np.integer)) and not isinstance(levels, bool):
        levels = (levels,)
    try:
        levels = tuple(levels)
    except TypeError:
        raise ValueError(f"`levels` must be a sequence of cluster counts, received {levels!r}.") from None
    if not levels:
        raise ValueError("`levels` must hold at least one cluster count, received an empty sequence.")
    below, what = num_points, "the number of embeddings"
    checked = []
    for t, count in enumerate(levels):
        checked.append(check_num_clusters(f"levels[{t}]", count, below, what))
        below, what = checked[-1], f"levels[{t}]"
    return tuple(checked)


def cluster_level(data, num_clusters, *, name, normalize, niter, seed, init, resampling_rounds, resample_size,
                  max_points_per_centroid, chunk_size, verbose, level):
    """(centroids, labels, distances) of one level: k-means, then `resampling_rounds` rounds of resampling."""
    centroids = fit_kmeans(data, num_clusters, name=name, normalize=normalize, niter=niter, seed=seed, init=init,
                           max_points_per_centroid=max_points_per_centroid)
    labels, distances = assign(data, centroids, name=name, normalize=normalize, chunk_size=chunk_size,
                               verbose=verbose, description=f"level {level + 1}: assigning")
    for round_ in range(resampling_rounds):
        sizes = np.bincount(labels, minlength=num_clusters)
        closest = take_per_group(labels, distances, np.minimum(sizes, resample_size))
        if len(closest) < num_clusters:
            break
        centroids = fit_kmeans(data, num_clusters, name=name, normalize=normalize, niter=niter,
                               seed=(seed + round_ + 1) % 2**31, max_points_per_centroid=max(len(closest), 1),
                               init=centroids, row_ids=closest)
        labels, distances = assign(data, centroids, name=name, normalize=normalize, chunk_size=chunk_size,
                                   verbose=verbose, description=f"level {level + 1}: reassigning")
    return centroids, labels, distances


def hierarchical_kmeans(embeddings, levels, *, normalize=True, niter=20, init="kmeans++", resampling_rounds=0,
                        resample_size=10, max_points_per_centroid=256, chunk_size=16384, seed=0, verbose=False):
    """Seed-free hierarchical k-means (Vo et al., 2024): each level clusters the previous level's centroids.

    Level 1 runs faiss k-means on the (L2-normalized) points and assigns every point to its nearest centroid,
    chunk by chunk; level t + 1 runs k-means on level t's centroids. With `resampling_rounds`, each level then
    repeats: take the `resample_size` members closest to each centroid, run k-means on them from the current
    centroids, reassign all members (Vo et al.'s resampling; their public configuration uses a few rounds on the
    upper levels and none on the first, whose cost is largest).

    Args:
        embeddings: float array (N, dim), a NumPy array or a memory map.
        levels: sequence of int. Clusters per level, bottom first, for example (1000, 100, 10); each at most the
            number of items it clusters (N for the first, the previous level's count after).
        normalize: bool, default True. L2-normalize the points first (k-means on cosine geometry).
        niter: int, default 20. k-means iterations per run.
        init: str or sequence of str (one per level), default "kmeans++". Initial centroids: "kmeans++" (greedy
            D^2 seeding, as Vo et al.'s code; it reaches small, distant concepts) or "random" (faiss's random rows).
            k-means++ reads 32 random rows per centre once per centre, so on level 1 its cost grows as
            32 * levels[0]^2 * dim; with tens of thousands of level-1 clusters use ("random", "kmeans++", ...):
            the upper levels cluster centroids and stay cheap.
        resampling_rounds: int, default 0. Resampling rounds per level.
        resample_size: int, default 10. Members closest to each centroid used by a resampling round.
        max_points_per_centroid: int, default 256. Level 1's k-means reads at most levels[0] * this many random
            points (faiss's default subsampling); every point is still assigned.
        chunk_size: int, default 16384. Points read and assigned at a time.
        seed: int, default 0. Seeds faiss's initialization and the samples; the same seed gives the same tree.
        verbose: bool, default False. Progress bars over the assignment chunks.

    Returns:
        `ClusterTree`: per level, the assignments and centroids; the points' distances to their level-1 centroids.

    Example:
    >>> tree = hierarchical_kmeans(np.load("pool.npy", mmap_mode="r"), levels=(10_000, 1_000, 100), seed=0)
    >>> indices = balanced_sample(tree, total=200_000, seed=0)
    """
    embeddings = check_embeddings("embeddings", embeddings)
    levels = check_levels(levels, len(embeddings))
    niter = check_positive_int("niter", niter)
    inits = (init,) * len(levels) if isinstance(init, str) else tuple(init) if isinstance(init, (list, tuple)) else ()
    if len(inits) != len(levels):
        raise ValueError(f"`init` must be a string or one string per level ({len(levels)}), received {init!r}.")
    inits = tuple(check_init(one) for one in inits)
    if isinstance(resampling_rounds, bool) or not isinstance(resampling_rounds, (int, np.integer)) \
            or resampling_rounds < 0:
        raise ValueError(f"`resampling_rounds` must be a non-negative integer, received {resampling_rounds!r}.")
    resample_size = check_positive_int("resample_size", resample_size)
    max_points_per_centroid = check_positive_int("max_points_per_centroid", max_points_per_centroid)
    chunk_size = check_positive_int("chunk_size", chunk_size)
    seed = check_seed(seed)
    data, name, assignments, all_centroids, first_distances = embeddings, "embeddings", [], [], None
    for level, num_clusters in enumerate(levels):
        centroids, labels, distances = cluster_level(
            data, num_clusters, name=name, normalize=normalize and level == 0, niter=niter,
            seed=(seed + 7919 * level) % 2**31, init=inits[level],
            resampling_rounds=int(resampling_rounds), resample_size=resample_size,
            max_points_per_centroid=max_points_per_centroid if level == 0 else max(len(data), 1),
            chunk_size=chunk_size, verbose=verbose and level == 0, level=level,
        )
        assignments.append(labels)
        all_centroids.append(centroids)
        if level == 0:
            first_distances = distances
        data, name = centroids, f"level {level + 1} centroids"
    return ClusterTree(levels=levels, assignments=tuple(assignments), centroids=tuple(all_centroids),
                       distances=first_distances)
