"""A selection written out: the manifest, the counts per step, and two pictures (matplotlib, Agg backend).

`write_selection(selection, pool, out_dir)` writes into `out_dir`:

    manifest.csv          one row per pool image (`keras_dinov2.data.manifest`); `get_source(out_dir)` reads it
    report.json           images left after each step, cluster counts and sizes
    cluster_sizes.png     histogram of the cluster sizes of every k-means level (when clustering ran)
    cluster_members.png   a row of random members for a few random first-level clusters (when the images can be
                          read back: pools of files, or of a data spec with random access such as digits)
"""

import json
import os

import numpy as np

from keras_dinov2.data import MANIFEST_FILE, get_source, write_manifest

REPORT_FILE = "report.json"
SIZES_FILE = "cluster_sizes.png"
MEMBERS_FILE = "cluster_members.png"


def read_images(pool, positions, side=64):
    """The pool images at `positions` as (side, side, 3) float arrays in [0, 1], or None when they cannot be read.

    Files are read with PIL; otherwise the pool's data spec (recorded by `embed_pool`) is reopened when it reads
    by index. An unreadable file gives a grey tile.
    """
    from PIL import Image

    if pool.paths is not None:
        tiles = []
        for position in positions:
            try:
                with Image.open(pool.paths[position]) as image:
                    tiles.append(np.asarray(image.convert("RGB").resize((side, side)), np.float32) / 255.0)
            except OSError:
                tiles.append(np.full((side, side, 3), 0.5, np.float32))
        return tiles
    spec = pool.meta.get("source")
    if not spec:
        return None
    try:
        source = get_source(spec)
    except ValueError:
        return None
    if not source.random_access:
        return None
    tiles = []
    for position in positions:
        image = np.asarray(source.decode(source.read(int(position)))[0], np.float32)
        tiles.append(np.asarray(Image.fromarray((image * 255).astype(np.uint8)).resize((side, side)),
                                np.float32) / 255.0)
    return tiles


def plot_cluster_sizes(selection, path):
    """Histogram of the cluster sizes, one panel per k-means level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = selection.tree.levels
    figure, axes = plt.subplots(1, len(levels), figsize=(4 * len(levels), 3), squeeze=False)
    for level, axis in enumerate(axes[0]):
        sizes = selection.tree.cluster_sizes(level)
        axis.hist(sizes, bins=min(30, max(5, len(sizes) // 2)), color="#4878a8")
        axis.set_title(f"level {level + 1}: {levels[level]} clusters")
        axis.set_xlabel("images per cluster")
        axis.set_ylabel("clusters")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_cluster_members(selection, pool, path, num_clusters=4, per_cluster=8, seed=0):
    """A grid: one row per random first-level cluster, `per_cluster` random members; False when unreadable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    labels = selection.tree.assignments[0]
    non_empty = np.flatnonzero(np.bincount(labels, minlength=selection.tree.levels[0]))
    chosen = np.sort(rng.choice(non_empty, size=min(num_clusters, len(non_empty)), replace=False))
    rows = []
    for cluster in chosen:
        members = np.flatnonzero(labels == cluster)
        picked = rng.choice(members, size=min(per_cluster, len(members)), replace=False)
        rows.append((cluster, len(members), selection.clustered[np.sort(picked)]))
    tiles = read_images(pool, np.concatenate([r[2] for r in rows]))
    if tiles is None:
        return False
    figure, axes = plt.subplots(len(rows), per_cluster, figsize=(1.2 * per_cluster, 1.3 * len(rows)),
                                squeeze=False)
    used = 0
    for r, (cluster, size, positions) in enumerate(rows):
        for c in range(per_cluster):
            axis = axes[r][c]
            axis.axis("off")
            if c < len(positions):
                axis.imshow(np.clip(tiles[used], 0, 1))
                used += 1
        axes[r][0].set_title(f"cluster {cluster} ({size} images)", fontsize=8, loc="left")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def write_selection(selection, pool, out_dir, settings=None, seed=0):
    """Writes the manifest, report.json and the pictures of a `Selection` of `pool` into `out_dir`.

    Args:
        selection: `Selection` from `select_pool`.
        pool: the `PoolEmbeddings` it was made from (its paths and data spec go into the manifest).
        out_dir: str. Created if needed.
        settings: dict or None. Recorded in report.json (the thresholds and budgets used).
        seed: int, default 0. Picks the clusters and members drawn.

    Returns:
        dict: the report (also in report.json), with the files written under "files".

    Example:
    >>> write_selection(select_pool(pool, dedup_threshold=0.95, levels=(50, 5), total=2000), pool, "curated/")
    """
    os.makedirs(out_dir, exist_ok=True)
    positions = np.arange(pool.num_images, dtype=np.int64)
    write_manifest(os.path.join(out_dir, MANIFEST_FILE), positions, selection.kept, selection.reason,
                   source=pool.meta.get("source") or "", paths=pool.paths, clusters=selection.clusters)
    files = [MANIFEST_FILE, REPORT_FILE]
    report = {"counts": selection.counts, "kept": int(selection.kept.sum()), "settings": settings or {},
              "embeddings": pool.folder, "backbone": pool.meta.get("backbone")}
    reasons = {}
    for reason in selection.reason:
        key = reason.split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    report["reasons"] = reasons
    if selection.tree is not None:
        report["clusters"] = [
            {"level": t + 1, "clusters": int(n), "sizes_min_median_max": [int(f(sizes)) for f in (np.min, np.median,
                                                                                                  np.max)]}
            for t, n in enumerate(selection.tree.levels) for sizes in [selection.tree.cluster_sizes(t)]
        ]
        plot_cluster_sizes(selection, os.path.join(out_dir, SIZES_FILE))
        files.append(SIZES_FILE)
        if plot_cluster_members(selection, pool, os.path.join(out_dir, MEMBERS_FILE), seed=seed):
            files.append(MEMBERS_FILE)
    report["files"] = files
    with open(os.path.join(out_dir, REPORT_FILE), "w") as f:
        json.dump(report, f, indent=2)
    return report


__all__ = ["MEMBERS_FILE", "REPORT_FILE", "SIZES_FILE", "read_images", "write_selection"]
