"""keras_dinov2.curation on embeddings with planted ground truth: near-copies, contamination, domains, imbalance.

Precision and recall are measured against what each test planted. The functions are NumPy and faiss only, so the
tests run once, not per backend.
"""

import re

import faiss
import numpy as np
import pytest
import threadpoolctl

from keras_dinov2 import curation

pytestmark = pytest.mark.once

DIM = 64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The arrays here are tiny: BLAS's and faiss's threads cost more than they save, and on a busy CI machine their
    # barriers made each k-means call 60x slower (0.6 s instead of 0.01 s).
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    with threadpoolctl.threadpool_limits(limits=1):
        yield
    faiss.omp_set_num_threads(threads)


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def random_unit(rng, n, dim=DIM):
    return unit(rng.normal(size=(n, dim)))


def near_copy(rng, x, low=0.97, high=0.995):
    """A copy of each unit row of `x` at a cosine similarity drawn in [low, high]."""
    cosine = rng.uniform(low, high, size=(len(x), 1))
    noise = rng.normal(size=x.shape)
    noise -= np.sum(noise * x, axis=1, keepdims=True) * x  # orthogonal to x: the cosine is exactly `cosine`
    return unit(cosine * x + np.sqrt(1 - cosine**2) * unit(noise))


def precision_recall(predicted, planted):
    predicted, planted = set(np.flatnonzero(predicted).tolist()), set(np.asarray(planted).tolist())
    hits = len(predicted & planted)
    return hits / max(len(predicted), 1), hits / len(planted)


@pytest.fixture(scope="module")
def dedup_pool():
    """2,000 random unit vectors, then 150 near-copies and 10 exact copies of known items, then a chain a ~ b ~ c."""
    rng = np.random.default_rng(0)
    base = random_unit(rng, 2000)
    near_sources = rng.choice(1990, size=150, replace=False)
    exact_sources = np.arange(1990, 2000)
    a = base[5]
    side = rng.normal(size=DIM)
    side = unit(side - (side @ a) * a)  # a unit direction orthogonal to a
    angle = np.deg2rad(22.0)  # cos 22 deg = 0.927 >= 0.9 for a ~ b and b ~ c; cos 44 deg = 0.72 for a, c
    chain = unit(np.stack([np.cos(angle) * a + np.sin(angle) * side, np.cos(2 * angle) * a + np.sin(2 * angle) * side]))
    pool = np.concatenate([base, near_copy(rng, base[near_sources]), base[exact_sources], chain])
    sources = np.concatenate([near_sources, exact_sources, [5, 5]])
    copies = np.arange(2000, len(pool))
    return pool, copies, sources


def test_deduplicate_finds_planted_copies_and_joins_chains(dedup_pool):
    pool, copies, sources = dedup_pool
    result = curation.deduplicate(pool, threshold=0.9)
    precision, recall = precision_recall(~result.kept, copies)
    assert recall >= 0.95 and precision >= 0.95, (precision, recall)
    found = ~result.kept[copies]
    np.testing.assert_array_equal(result.duplicate_of[copies][found], sources[found])
    # The chain: a ~ b ~ c is one group although a and c (cosine 0.72) are not near-copies.
    b, c = len(pool) - 2, len(pool) - 1
    assert float(pool[5] @ pool[c]) < 0.9
    assert result.group[5] == result.group[b] == result.group[c]
    assert result.kept[5] and not result.kept[b] and not result.kept[c]
    assert result.duplicate_of[c] == 5
    # One kept item per group, the group's lowest index; kept items point nowhere.
    assert result.num_groups == len(np.unique(result.group))
    first = np.unique(result.group, return_index=True)[1]
    np.testing.assert_array_equal(result.kept_indices, np.sort(first))
    assert np.all(result.duplicate_of[result.kept] == -1)
    assert np.all(result.pairs[:, 0] < result.pairs[:, 1]) and np.all(result.similarities >= 0.9 - 1e-5)


def test_deduplicate_at_one_keeps_only_exact_copies_out(dedup_pool):
    pool, copies, _ = dedup_pool
    result = curation.deduplicate(pool, threshold=1.0)
    exact = copies[150:160]
    np.testing.assert_array_equal(np.flatnonzero(~result.kept), exact)


def test_deduplicate_ivf_index_finds_the_same_copies(dedup_pool):
    pool, copies, _ = dedup_pool
    exact = curation.deduplicate(pool, threshold=0.9)
    approximate = curation.deduplicate(pool, threshold=0.9, index="ivf", nprobe=8)
    precision, recall = precision_recall(~approximate.kept, copies)
    assert recall >= 0.9 and precision >= 0.95, (precision, recall)
    assert np.mean(approximate.kept == exact.kept) > 0.99


def test_decontaminate_removes_copies_of_evaluation_items():
    rng = np.random.default_rng(1)
    evaluation = random_unit(rng, 200)
    planted_sources = rng.choice(200, size=60, replace=False)
    pool = np.concatenate([random_unit(rng, 2000), near_copy(rng, evaluation[planted_sources])])
    order = rng.permutation(len(pool))  # spread the copies through the pool
    pool, planted = pool[order], np.flatnonzero(order >= 2000)
    result = curation.decontaminate(pool, evaluation, threshold=0.9)
    precision, recall = precision_recall(~result.kept, planted)
    assert recall >= 0.95 and precision >= 0.95, (precision, recall)
    np.testing.assert_array_equal(result.nearest[planted], planted_sources[order[planted] - 2000])
    assert np.all(result.similarity[planted] > 0.96)
    assert result.kept[order < 2000].mean() >= 0.99


def test_decontaminate_drops_whole_groups():
    rng = np.random.default_rng(2)
    evaluation = random_unit(rng, 10)
    pool = random_unit(rng, 50)
    pool[3] = near_copy(rng, evaluation[:1])[0]
    groups = np.arange(50)
    groups[[3, 17, 40]] = 3  # 17 and 40 are in 3's group (as deduplicate would have said) but far from evaluation
    plain = curation.decontaminate(pool, evaluation, threshold=0.9)
    grouped = curation.decontaminate(pool, evaluation, threshold=0.9, groups=groups)
    np.testing.assert_array_equal(np.flatnonzero(~plain.kept), [3])
    np.testing.assert_array_equal(np.flatnonzero(~grouped.kept), [3, 17, 40])


@pytest.fixture(scope="module")
def two_domains():
    """1,000 + 1,000 pool items around two distant directions, domain A first, and 30 fresh seeds from A."""
    rng = np.random.default_rng(3)
    a, b = random_unit(rng, 2)
    spread = 0.1
    pool = np.concatenate([unit(a + spread * rng.normal(size=(1000, DIM))),
                           unit(b + spread * rng.normal(size=(1000, DIM)))])
    seeds = unit(a + spread * rng.normal(size=(30, DIM)))
    return pool, seeds, np.arange(len(pool)) < 1000


def test_retrieve_returns_neighbours_from_the_seeds_domain(two_domains):
    pool, seeds, in_a = two_domains
    result = curation.retrieve(pool, seeds, k=8)
    assert len(result.indices) >= 8 and np.all(np.diff(result.indices) > 0)
    assert in_a[result.indices].mean() >= 0.9
    # Brute force: the union of every seed's 8 most similar items, each with its best such seed and cosine.
    sims = unit(seeds) @ unit(pool).T
    top = np.argsort(-sims, axis=1)[:, :8]
    np.testing.assert_array_equal(result.indices, np.unique(top))
    in_top = np.zeros_like(sims, bool)
    np.put_along_axis(in_top, top, True, axis=1)
    best = np.where(in_top, sims, -np.inf)[:, result.indices]
    np.testing.assert_allclose(result.similarity, best.max(axis=0), atol=1e-5)
    np.testing.assert_allclose(result.similarity, sims[result.seed, result.indices], atol=1e-5)


def test_retrieve_by_cluster_keeps_the_seeds_clusters(two_domains):
    pool, seeds, in_a = two_domains
    result = curation.retrieve_by_cluster(pool, seeds, num_clusters=10, seed=0)
    assert len(result.indices) >= 100
    assert in_a[result.indices].mean() >= 0.9
    np.testing.assert_array_equal(result.indices, np.flatnonzero(np.isin(result.assignment, result.clusters)))
    capped = curation.retrieve_by_cluster(pool, seeds, num_clusters=10, max_per_cluster=20, seed=0)
    assert np.all(np.bincount(result.assignment[capped.indices]) <= 20)
    assert set(capped.indices.tolist()) <= set(result.indices.tolist())


@pytest.fixture(scope="module")
def imbalanced():
    """20 well-separated clusters in 32-d; cluster 0 holds 2,000 points, the 19 others 100 each (20:1)."""
    rng = np.random.default_rng(4)
    centres = random_unit(rng, 20, dim=32)
    sizes = np.full(20, 100)
    sizes[0] = 2000
    labels = np.repeat(np.arange(20), sizes)
    points = (centres[labels] + 0.05 * rng.normal(size=(len(labels), 32))).astype(np.float32)
    return points, labels


def imbalance(labels):
    counts = np.bincount(labels, minlength=20)
    return counts.max() / max(counts.min(), 0.5)


def test_balanced_sampling_flattens_a_planted_imbalance(imbalanced):
    points, labels = imbalanced
    tree = curation.hierarchical_kmeans(points, levels=(60, 20), seed=0)
    assert tree.levels == (60, 20) and len(tree.assignments[1]) == 60
    assert tree.cluster_sizes(1).sum() == len(points)
    sample = curation.balanced_sample(tree, total=400, seed=0)
    assert len(sample) == 400 and len(np.unique(sample)) == 400
    assert imbalance(labels[sample]) <= 2.0
    # The contrast: a uniform random sample of the same size keeps the pool's ~20:1.
    uniform = np.random.default_rng(0).choice(len(points), size=400, replace=False)
    assert imbalance(labels[uniform]) >= 10.0


def test_balanced_sampling_options(imbalanced):
    points, labels = imbalanced
    tree = curation.hierarchical_kmeans(points, levels=(60, 20), seed=0, resampling_rounds=2)
    sizes = tree.cluster_sizes(1)
    per_cluster = curation.balanced_sample(tree, per_cluster=30, seed=0)
    assert len(per_cluster) == np.minimum(sizes, 30).sum()
    closest = curation.balanced_sample(tree, total=400, strategy="closest")
    assert len(closest) == 400 and imbalance(labels[closest]) <= 2.0
    everything = curation.balanced_sample(tree, total=len(points))
    np.testing.assert_array_equal(everything, np.arange(len(points)))
    mixed = curation.hierarchical_kmeans(points, levels=(60, 20), seed=0, init=("random", "kmeans++"))
    assert [len(a) for a in mixed.assignments] == [len(points), 60]


def test_split_budget_caps_small_clusters_and_redistributes():
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(curation.split_budget(9, np.array([1, 8, 8]), rng), [1, 4, 4])
    odd = curation.split_budget(10, np.array([1, 8, 8]), rng)
    assert odd.sum() == 10 and odd[0] == 1 and sorted(odd[1:]) == [4, 5]
    np.testing.assert_array_equal(curation.split_budget(30, np.array([2, 3]), rng), [2, 3])


def test_memmapped_pool_gives_the_in_memory_results(tmp_path, dedup_pool, imbalanced):
    pool = dedup_pool[0]
    np.save(tmp_path / "pool.npy", pool)
    mapped = np.load(tmp_path / "pool.npy", mmap_mode="r")
    assert isinstance(mapped, np.memmap)
    in_memory = curation.deduplicate(pool, threshold=0.9, chunk_size=300)
    from_disk = curation.deduplicate(mapped, threshold=0.9, chunk_size=300)
    for field in ("kept", "group", "duplicate_of", "pairs"):
        np.testing.assert_array_equal(getattr(from_disk, field), getattr(in_memory, field))
    np.testing.assert_array_equal(curation.decontaminate(mapped, pool[:50], threshold=0.9, chunk_size=300).kept,
                                  curation.decontaminate(pool, pool[:50], threshold=0.9).kept)
    points = imbalanced[0].astype(np.float16)
    np.save(tmp_path / "points.npy", points)
    trees = [curation.hierarchical_kmeans(x, levels=(30, 10), seed=0, chunk_size=500)
             for x in (points, np.load(tmp_path / "points.npy", mmap_mode="r"))]
    np.testing.assert_array_equal(trees[0].assignments[0], trees[1].assignments[0])


def test_results_are_deterministic_for_a_seed(imbalanced, two_domains):
    points, _ = imbalanced
    first, second = (curation.hierarchical_kmeans(points, levels=(60, 20), seed=3) for _ in range(2))
    for a, b in zip(first.assignments + first.centroids, second.assignments + second.centroids):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(curation.balanced_sample(first, total=300, seed=5),
                                  curation.balanced_sample(second, total=300, seed=5))
    assert not np.array_equal(curation.balanced_sample(first, total=300, seed=5),
                              curation.balanced_sample(first, total=300, seed=6))
    pool, seeds, _ = two_domains
    runs = [curation.retrieve_by_cluster(pool, seeds, num_clusters=10, max_per_cluster=50, seed=1) for _ in range(2)]
    np.testing.assert_array_equal(runs[0].indices, runs[1].indices)


def bad_calls(pool, seeds):
    nan_pool = pool.copy()
    nan_pool[7, 3] = np.nan
    return [
        (lambda: curation.deduplicate(pool, threshold=0.0), "`threshold` must be a cosine similarity in (0, 1]"),
        (lambda: curation.deduplicate(pool, threshold=1.5), "`threshold` must be a cosine similarity in (0, 1]"),
        (lambda: curation.deduplicate(np.zeros((0, DIM), np.float32), threshold=0.9), "`embeddings` is empty"),
        (lambda: curation.deduplicate(pool[0], threshold=0.9), "`embeddings` must be a 2-D array"),
        (lambda: curation.deduplicate(pool.astype(np.int32), threshold=0.9), "must hold floats"),
        (lambda: curation.deduplicate(nan_pool, threshold=0.9), "`embeddings` row 7 holds NaN or inf"),
        (lambda: curation.deduplicate(pool, threshold=0.9, index="nonsense"), "not a faiss index_factory string"),
        (lambda: curation.decontaminate(pool, seeds[:, :10], threshold=0.9),
         "`pool_embeddings` and `eval_embeddings` must have the same embedding dimension, received 64 and 10"),
        (lambda: curation.decontaminate(pool, seeds, threshold=-0.2), "`threshold` must be a cosine similarity"),
        (lambda: curation.decontaminate(pool, seeds, threshold=0.9, groups=[1, 2]), "`groups` must be an integer"),
        (lambda: curation.retrieve(pool, seeds[:, :10]), "`pool` and `seeds` must have the same embedding dimension"),
        (lambda: curation.retrieve(pool, seeds, k=len(pool) + 1), "`k` must be at most the number of pool items"),
        (lambda: curation.retrieve(pool, np.zeros((0, DIM), np.float32)), "`seeds` is empty"),
        (lambda: curation.retrieve(pool, nan_pool[:10]), "`seeds` row 7 holds NaN or inf"),
        (lambda: curation.retrieve_by_cluster(pool, seeds, num_clusters=len(pool) + 1),
         "`num_clusters` must be at most the number of pool items"),
        (lambda: curation.retrieve_by_cluster(pool, seeds, num_clusters=4, nearest_clusters=5),
         "`nearest_clusters` must be at most num_clusters"),
        (lambda: curation.hierarchical_kmeans(pool, levels=(10, 20)), "`levels[1]` must be at most levels[0]"),
        (lambda: curation.hierarchical_kmeans(pool, levels=()), "`levels` must hold at least one cluster count"),
        (lambda: curation.hierarchical_kmeans(pool, levels=(10,), init="best"), "`init` must be one of"),
        (lambda: curation.hierarchical_kmeans(pool, levels=(10, 5), init=("random",)), "one string per level (2)"),
        (lambda: curation.hierarchical_kmeans(nan_pool, levels=(10,)), "`embeddings` row 7 holds NaN or inf"),
    ]


def test_bad_inputs_raise_value_errors_naming_the_problem():
    rng = np.random.default_rng(5)
    pool, seeds = random_unit(rng, 100), random_unit(rng, 5)
    for call, message in bad_calls(pool, seeds):
        with pytest.raises(ValueError) as error:
            call()
        assert message in str(error.value), (message, str(error.value))
    tree = curation.hierarchical_kmeans(pool, levels=(10,), seed=0)
    for kwargs, message in [({}, "exactly one of `total` and `per_cluster`"),
                            ({"total": 5, "per_cluster": 2}, "exactly one of `total` and `per_cluster`"),
                            ({"total": 101}, "`total` must be at most the number of clustered points"),
                            ({"total": 5, "strategy": "first"}, "`strategy` must be one of")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            curation.balanced_sample(tree, **kwargs)
    with pytest.raises(ValueError, match="`tree` must be a ClusterTree"):
        curation.balanced_sample(pool, total=5)


def test_verbose_shows_a_progress_bar(capsys, two_domains):
    pool, seeds, _ = two_domains
    curation.retrieve(pool, seeds, k=2, chunk_size=500, verbose=True)
    assert "retrieving" in capsys.readouterr().err


def test_the_dedup_benchmark_runs_and_finds_its_planted_copies(capsys):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "tools" / "benchmark_dedup.py"
    spec = importlib.util.spec_from_file_location("benchmark_dedup", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    benchmark.main(["--n", "2000", "--dim", "32", "--memmap", "--index", "flat", "ivf"])
    out = capsys.readouterr().out
    assert "cpu=" in out and out.count("recall=1.0000 precision=1.0000") == 2, out


def test_select_pool_cluster_based_retrieval_keeps_the_seeds_clusters():
    from keras_dinov2.curation import select_pool

    rng = np.random.default_rng(3)
    centers = rng.normal(size=(3, 16))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    pool = np.concatenate([c + 0.05 * rng.normal(size=(40, 16)) for c in centers]).astype(np.float32)
    seeds = (centers[1] + 0.05 * rng.normal(size=(5, 16))).astype(np.float32)
    selection = select_pool(pool, seeds=seeds, retrieval_clusters=3, seed=0)
    kept = np.flatnonzero(selection.kept)
    np.testing.assert_array_equal(kept, np.arange(40, 80))  # the whole cluster the seeds fall in, nothing else
    assert {selection.reason[i] for i in range(120) if not 40 <= i < 80} == {"not_retrieved"}
    assert selection.counts["after_retrieval"] == 40
    # Sample-based retrieval with the same seeds keeps only their k nearest.
    assert select_pool(pool, seeds=seeds, k=2).counts["after_retrieval"] <= 10
