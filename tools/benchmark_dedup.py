"""Times keras_dinov2.curation.deduplicate on N random 384-d float32 embeddings with planted near-copies.

The pool is N random unit vectors of which a fraction (--copies) are replaced by near-copies (cosine 0.95-0.99)
of other rows, so the pairs found can be checked against the planted ones. Each index in --index runs the whole
deduplication (index build, chunked k-NN search, connected components); "flat" is faiss's exact search, the
others are timed against it (ratio). The machine, faiss's thread count and the load average print with the rows.

Example:
    python tools/benchmark_dedup.py                      # N = 100,000
    python tools/benchmark_dedup.py --n 1000000 --index flat ivf --memmap
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench import cli  # noqa: E402
from bench.machine import load_average, machine_info, peak_rss_mb, version  # noqa: E402


def parse_args(argv=None):
    parser = cli.parser(__doc__)
    parser.add_argument("--n", type=int, default=100_000, help="Embeddings in the pool (default 100000).")
    parser.add_argument("--dim", type=int, default=384, help="Embedding dimension (default 384, ViT-S/14).")
    parser.add_argument("--copies", type=float, default=0.01,
                        help="Fraction of rows replaced by near-copies of others (default 0.01).")
    parser.add_argument("--threshold", type=float, default=0.9, help="Cosine threshold (default 0.9).")
    parser.add_argument("--neighbors", type=int, default=64, help="k of the k-NN search (default 64).")
    parser.add_argument("--index", nargs="+", default=["flat"],
                        help="Indexes: flat, ivf or faiss factory strings such as IVF1024,PQ48; the first is the "
                        "peer of the others (default flat).")
    parser.add_argument("--chunk-size", type=int, default=16384, help="Rows per chunk (default 16384).")
    parser.add_argument("--memmap", action="store_true",
                        help="Write the pool to a temporary .npy and deduplicate its memory map.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the pool (default 0).")
    parser.add_argument("--verbose", action="store_true", help="Progress bars.")
    args = parser.parse_args(argv)
    cli.check_counts(parser, args, at_least_one=("n", "dim", "neighbors", "chunk_size"), at_least_zero=())
    if not 0 <= args.copies < 0.5:
        parser.error("--copies must be in [0, 0.5).")
    return args


def make_pool(n, dim, copies, seed, chunk_size=65536):
    """(float32 unit rows (n, dim), planted copy rows, their sources): copies sit after their sources."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pool = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk_size):
        rows = rng.standard_normal((min(chunk_size, n - start), dim), dtype=np.float32)
        pool[start : start + len(rows)] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    num_copies = int(n * copies)
    planted = np.sort(rng.choice(np.arange(n // 2, n), size=num_copies, replace=False))
    sources = rng.integers(0, n // 2, size=num_copies)
    cosine = rng.uniform(0.95, 0.99, size=(num_copies, 1)).astype(np.float32)
    base = pool[sources]
    noise = rng.standard_normal(base.shape, dtype=np.float32)
    noise -= np.sum(noise * base, axis=1, keepdims=True) * base
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    pool[planted] = cosine * base + np.sqrt(1 - cosine**2) * noise
    return pool, planted, sources


def main(argv=None):
    args = parse_args(argv)
    import faiss
    import numpy as np

    from keras_dinov2.curation import deduplicate

    info = machine_info(packages=("numpy", "faiss-cpu", "scipy"))
    print(f"cpu={info['cpu']} cores={info['cpu_count']} usable={info['cpus_usable']} memory_gb={info['memory_gb']} "
          f"faiss={version('faiss-cpu')} faiss_threads={faiss.omp_get_max_threads()} load={load_average()}")
    print(f"n={args.n} dim={args.dim} copies={args.copies} threshold={args.threshold} k={args.neighbors} "
          f"chunk={args.chunk_size} memmap={args.memmap}")
    pool, planted, sources = make_pool(args.n, args.dim, args.copies, args.seed)
    with tempfile.TemporaryDirectory() as folder:
        if args.memmap:
            np.save(os.path.join(folder, "pool.npy"), pool)
            del pool
            pool = np.load(os.path.join(folder, "pool.npy"), mmap_mode="r")
        peer = None
        for index in args.index:
            start = time.perf_counter()
            result = deduplicate(pool, threshold=args.threshold, num_neighbors=args.neighbors, index=index,
                                 chunk_size=args.chunk_size, verbose=args.verbose)
            seconds = time.perf_counter() - start
            dropped = np.flatnonzero(~result.kept)
            hits = np.isin(planted, dropped).sum()
            recall = hits / max(len(planted), 1)
            precision = hits / max(len(dropped), 1)
            right_source = np.mean(result.duplicate_of[planted] == sources) if len(planted) else 1.0
            peer = seconds if peer is None else peer
            print(f"index={index} seconds={seconds:.1f} pairs={len(result.pairs)} groups={result.num_groups} "
                  f"dropped={len(dropped)} planted={len(planted)} recall={recall:.4f} precision={precision:.4f} "
                  f"right_source={right_source:.4f} "
                  f"rows_per_s={args.n / seconds:.0f} vs_first={seconds / peer:.2f} peak_rss_mb={peak_rss_mb():.0f}")
            del result
        del pool


if __name__ == "__main__":
    main()
