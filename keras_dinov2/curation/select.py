"""The curation steps in order on an embedded pool, with a reason for every image that is dropped.

`select_pool` runs, each step on what the previous ones kept:

1. unreadable images (no embedding) are out;
2. `deduplicate` (with `dedup_threshold`): one image per group of near-copies;
3. `decontaminate` (with `eval_embeddings`): whole groups close to an evaluation image;
4. `retrieve` (with `seeds`): the `k` nearest remaining images of every seed image;
5. `hierarchical_kmeans` (with `levels`), then `balanced_sample` (with `per_cluster` or `total`).

The result (`Selection`) has one kept flag, reason and cluster id per level for every pool image, which
`write_selection` turns into a manifest (`keras_dinov2.data.manifest`) and a report.
"""

import dataclasses

import numpy as np

from keras_dinov2.curation.clustering import hierarchical_kmeans
from keras_dinov2.curation.dedup import decontaminate, deduplicate
from keras_dinov2.curation.retrieval import retrieve, retrieve_by_cluster
from keras_dinov2.curation.sampling import balanced_sample
from keras_dinov2.curation.store import PoolEmbeddings, load_embeddings
from keras_dinov2.curation.views import RowSubset


@dataclasses.dataclass(frozen=True)
class Selection:
    """What `select_pool` kept and why, per pool image (position).

    Attributes:
        kept: bool array (num_images,).
        reason: list of str (num_images,): "kept", "unreadable", "duplicate_of:<position>",
            "contaminated:<eval row>", "not_retrieved" or "not_sampled".
        clusters: tuple of int64 arrays (num_images,), one per k-means level (bottom first); -1 where an image
            was not clustered (dropped before, or no clustering).
        counts: dict step -> images left after it, in order: "pool", "readable", then "after_dedup",
            "after_decontamination", "after_retrieval", "after_sampling" for the steps that ran.
        tree: `ClusterTree` or None. Over the clustered images (`clustered`).
        clustered: int64 array. The pool positions clustered, in the tree's point order.
    """

    kept: np.ndarray
    reason: list
    clusters: tuple
    counts: dict
    tree: object = None
    clustered: np.ndarray = None

    @property
    def kept_positions(self):
        """int64 array of the kept pool positions, ascending."""
        return np.flatnonzero(self.kept)


def as_pool(value, name):
    """`value` as `PoolEmbeddings`: an embedding folder, PoolEmbeddings, or an array (N, dim) whose row i is image i."""
    if isinstance(value, PoolEmbeddings):
        return value
    if isinstance(value, str):
        return load_embeddings(value)
    array = value if getattr(value, "lazy_rows", False) else np.asarray(value)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"`{name}` must be an embedding folder, PoolEmbeddings or a non-empty (N, dim) array, "
                         f"received shape {getattr(array, 'shape', None)}.")
    positions = np.arange(len(array), dtype=np.int64)
    return PoolEmbeddings(embeddings=array, positions=positions, num_images=len(array),
                          unreadable=np.zeros(0, np.int64), paths=None, meta={}, folder="")


def check_compatible(pool, other, name):
    """A `ValueError` when `other`'s embeddings cannot be compared with the pool's (dimension, backbone)."""
    if other.dim != pool.dim:
        raise ValueError(f"{name} embeddings have dimension {other.dim} but the pool's have {pool.dim}: embed both "
                         "with the same backbone.")
    mine, theirs = pool.meta.get("backbone"), other.meta.get("backbone")
    if mine and theirs and mine["fingerprint"] != theirs["fingerprint"]:
        changed = [key for key in ("config_hash", "weights_hash", "image_size", "resize_size")
                   if mine.get(key) != theirs.get(key)]
        raise ValueError(f"the backbone changed between the pool's embeddings ({mine['name']}, fingerprint "
                         f"{mine['fingerprint']}) and the {name} embeddings ({theirs['name']}, fingerprint "
                         f"{theirs['fingerprint']}): {', '.join(changed) or 'identity'} differ; embed both with one "
                         "backbone.")


def select_pool(pool, *, dedup_threshold=None, eval_embeddings=None, decontamination_threshold=0.95, seeds=None,
                k=4, retrieval_clusters=None, min_seeds=1, levels=None, per_cluster=None, total=None,
                num_neighbors=64, index="flat", niter=20, seed=0, verbose=False):
    """Runs the curation steps on an embedded pool and says, for every image, whether it is kept and why.

    Args:
        pool: an embedding folder (`embed_pool`), `PoolEmbeddings`, or an array (N, dim) (row i = image i).
        dedup_threshold: float in (0, 1] or None, default None (no deduplication). Cosine similarity of
            near-copies (see `deduplicate`; DINOv2 embeddings of near-copies are about 0.9 and above).
        eval_embeddings: folder, PoolEmbeddings, array or None, default None. Evaluation images to stay away from.
        decontamination_threshold: float, default 0.95. Pool images at least this similar to an evaluation image
            are dropped, with their whole near-copy group.
        seeds: folder, PoolEmbeddings, array or None, default None. Seed images: keep only the `k` nearest
            remaining pool images of each (sample-based retrieval).
        k: int, default 4. Neighbours per seed.
        retrieval_clusters: int or None, default None. With `seeds`, cluster-based retrieval instead: k-means of
            the remaining pool into this many clusters, and every member of a cluster with at least `min_seeds`
            seeds kept (`retrieve_by_cluster`); `k` is then unused.
        min_seeds: int, default 1. Seeds a cluster needs in cluster-based retrieval.
        levels: sequence of int or None, default None. Hierarchical k-means clusters per level, bottom first.
        per_cluster: int or None. With `levels`: keep this many images per top-level cluster (`balanced_sample`).
        total: int or None. With `levels`: keep this many images in all, balanced over the clusters.
        num_neighbors: int, default 64. k of the deduplication's k-NN search.
        index: str, default "flat". faiss index of every search ("flat", "ivf", or a factory string).
        niter: int, default 20. k-means iterations.
        seed: int, default 0. Seeds k-means, the sample and IVF training.
        verbose: bool, default False. Progress bars.

    Returns:
        `Selection`.

    Raises:
        ValueError: embeddings of different dimensions or backbones, a budget without `levels`, bad values.

    Example:
    >>> selection = select_pool("emb/", dedup_threshold=0.95, eval_embeddings="emb_eval/", levels=(100, 10),
    ...                         per_cluster=500)
    >>> selection.counts
    {'pool': 100000, 'readable': 99990, 'after_dedup': 91000, 'after_decontamination': 90950, ...}
    """
    pool = as_pool(pool, "pool")
    if (per_cluster is not None or total is not None) and not levels:
        raise ValueError("`per_cluster` and `total` sample over k-means clusters: give `levels` too.")
    if per_cluster is not None and total is not None:
        raise ValueError(f"give `per_cluster` or `total`, not both (received {per_cluster} and {total}).")
    others = {}
    for name, value in (("eval", eval_embeddings), ("seed", seeds)):
        if value is not None:
            others[name] = as_pool(value, f"{name}_embeddings")
            check_compatible(pool, others[name], name)
    reason = np.full(pool.num_images, "kept", dtype=object)
    reason[pool.unreadable] = "unreadable"
    alive = np.ones(len(pool.positions), bool)  # over the pool's rows
    counts = {"pool": pool.num_images, "readable": int(len(pool.positions))}
    rows, groups = pool.embeddings, None
    if dedup_threshold is not None:
        found = deduplicate(rows, threshold=dedup_threshold, num_neighbors=num_neighbors, index=index, seed=seed,
                            verbose=verbose)
        dropped = np.flatnonzero(~found.kept)
        reason[pool.positions[dropped]] = [f"duplicate_of:{p}" for p in pool.positions[found.duplicate_of[dropped]]]
        alive &= found.kept
        groups = found.group
        counts["after_dedup"] = int(alive.sum())
    if "eval" in others:
        found = decontaminate(rows, others["eval"].embeddings, threshold=decontamination_threshold, groups=groups,
                              index=index, seed=seed, verbose=verbose)
        hit = np.flatnonzero(alive & ~found.kept)
        reason[pool.positions[hit]] = [f"contaminated:{i}" for i in others["eval"].positions[found.nearest[hit]]]
        alive &= found.kept
        counts["after_decontamination"] = int(alive.sum())
    live = np.flatnonzero(alive)
    if not len(live):
        raise ValueError("no pool image is left after deduplication and decontamination; raise --dedup-threshold / "
                         "--decontamination-threshold (fewer pairs count as copies), or check that the embedding "
                         "backbone tells the images apart (an untrained one gives every image the same features).")
    if "seed" in others:
        if retrieval_clusters is None:
            found = retrieve(RowSubset(rows, live), others["seed"].embeddings, k=min(k, len(live)), index=index,
                             seed=seed, verbose=verbose)
        else:
            found = retrieve_by_cluster(RowSubset(rows, live), others["seed"].embeddings,
                                        num_clusters=retrieval_clusters, min_seeds=min_seeds, niter=niter,
                                        seed=seed, verbose=verbose)
        missed = np.setdiff1d(live, live[found.indices])
        reason[pool.positions[missed]] = "not_retrieved"
        live = live[found.indices]
        counts["after_retrieval"] = int(len(live))
    clusters, tree = (), None
    if total is not None and not isinstance(total, bool) and isinstance(total, int) and total > len(live):
        raise ValueError(f"`total` ({total}) is more than the {len(live)} images left before sampling "
                         f"({counts}); lower it, or sample with `per_cluster`.")
    if levels:
        tree = hierarchical_kmeans(RowSubset(rows, live), levels, niter=niter, seed=seed, verbose=verbose)
        clusters = []
        for level in range(len(tree.levels)):
            labels = np.full(pool.num_images, -1, np.int64)
            labels[pool.positions[live]] = tree.point_clusters(level)
            clusters.append(labels)
        clusters = tuple(clusters)
        if per_cluster is not None or total is not None:
            chosen = balanced_sample(tree, total=total, per_cluster=per_cluster, seed=seed)
            reason[pool.positions[np.setdiff1d(live, live[chosen])]] = "not_sampled"
            counts["after_sampling"] = int(len(chosen))
    kept = reason == "kept"
    return Selection(kept=kept, reason=list(reason), clusters=clusters, counts=counts, tree=tree,
                     clustered=pool.positions[live] if levels else None)


__all__ = ["Selection", "as_pool", "check_compatible", "select_pool"]
