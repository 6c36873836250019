"""Balanced sampling down a `ClusterTree` (Vo et al., 2024): an even share for every cluster, level by level."""

import numbers

import numpy as np

from keras_dinov2.curation.arrays import check_positive_int, check_seed, take_per_group
from keras_dinov2.curation.clustering import ClusterTree

STRATEGIES = ("random", "closest")


def split_budget(budget, sizes, rng):
    """`budget` shared as evenly as `sizes` allow: int64 array, entry i at most sizes[i], summing to the budget.

    The largest cap c with sum(min(c, sizes)) <= budget gives every cluster min(c, size); what is left (fewer
    units than there are clusters bigger than c) goes one unit each to clusters bigger than c, drawn by `rng`.
    A cluster smaller than the even share thus gives its unused share to the others.

    Example:
    >>> split_budget(10, np.array([1, 8, 8]), np.random.default_rng(0))
    array([1, 5, 4])   # or [1, 4, 5]: the odd unit goes to a random one of the two big clusters
    """
    sizes = np.asarray(sizes, np.int64)
    if budget >= sizes.sum():
        return sizes.copy()
    low, high = 0, int(sizes.max())
    while low < high:  # the largest cap whose allocation fits the budget
        middle = (low + high + 1) // 2
        if np.minimum(sizes, middle).sum() <= budget:
            low = middle
        else:
            high = middle - 1
    allocation = np.minimum(sizes, low)
    left = int(budget - allocation.sum())
    if left:
        allocation[rng.choice(np.flatnonzero(sizes > low), size=left, replace=False)] += 1
    return allocation


def split_over_children(parent_budget, parent_of, child_sizes, rng):
    """Budget of each child cluster: each parent's budget split over its children by `split_budget`."""
    budget = np.zeros(len(parent_of), np.int64)
    order = np.argsort(parent_of, kind="stable")
    bounds = np.searchsorted(parent_of[order], np.arange(len(parent_budget) + 1))
    for parent in np.flatnonzero(parent_budget):
        children = order[bounds[parent] : bounds[parent + 1]]
        budget[children] = split_budget(int(parent_budget[parent]), child_sizes[children], rng)
    return budget


def balanced_sample(tree, *, total=None, per_cluster=None, strategy="random", seed=0):
    """Indices of a sample of the clustered points that is balanced over the clusters of every level.

    Top-down, as Vo et al. (2024): the budget is split evenly over the top-level clusters (capped by the number of
    points each holds, the unused share going to the larger ones), each cluster's share is split the same way over
    its child clusters, down to the first level, whose clusters give their share as random points (or the points
    closest to the centroid). A concept that dominates the pool keeps the share of one top-level cluster.

    Args:
        tree: `ClusterTree` from `hierarchical_kmeans`.
        total: int or None. Points in the sample, at most the number of clustered points. Give this or
            `per_cluster`.
        per_cluster: int or None. Points per top-level cluster (all of a smaller cluster); the sample holds
            sum(min(per_cluster, size)) points.
        strategy: str, default "random". "random" draws points at random inside each first-level cluster;
            "closest" takes those closest to its centroid.
        seed: int, default 0. Seeds the draws (the odd units of a split and the random points).

    Returns:
        int64 array of point indices, ascending, without repeats.

    Example:
    >>> tree = hierarchical_kmeans(pool, levels=(1000, 100))
    >>> indices = balanced_sample(tree, total=20_000, seed=0)
    """
    if not isinstance(tree, ClusterTree):
        raise ValueError(f"`tree` must be a ClusterTree from hierarchical_kmeans, received {type(tree).__name__}.")
    if (total is None) == (per_cluster is None):
        raise ValueError(f"Give exactly one of `total` and `per_cluster`, received total={total!r} and "
                         f"per_cluster={per_cluster!r}.")
    if strategy not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {STRATEGIES}, received {strategy!r}.")
    rng = np.random.default_rng(check_seed(seed))
    top = len(tree.levels) - 1
    top_sizes = tree.cluster_sizes(top)
    if total is not None:
        total = check_positive_int("total", total, at_most=tree.num_points, what="the number of clustered points")
        budget = split_budget(total, top_sizes, rng)
    else:
        if isinstance(per_cluster, bool) or not isinstance(per_cluster, numbers.Integral) or per_cluster < 1:
            raise ValueError(f"`per_cluster` must be a positive integer, received {per_cluster!r}.")
        budget = np.minimum(top_sizes, int(per_cluster))
    for level in range(top - 1, -1, -1):
        budget = split_over_children(budget, tree.assignments[level + 1], tree.cluster_sizes(level), rng)
    labels = tree.assignments[0]
    keys = rng.random(len(labels)) if strategy == "random" else tree.distances
    return take_per_group(labels, keys, budget)
