"""Throughput of the multi-crop tf.data pipeline: source images per second, decode included.

Writes `--images` JPEGs of about 500 x 375 (crops of scikit-learn's bundled sample photos) to a
temporary folder, then times `keras_dinov2.data.multicrop_dataset` with the ViT-14 recipe
(2 x 224 + 8 x 98 crops, block masks for patch 14) and, with `--digits`, the bundled digits
recipe. The pipeline runs alone (no model), so the figure is the input rate the CPU can feed.

Example:
    python tools/benchmark_data.py --batch-size 32 --batches 20
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmark_common import load_average, machine_info  # noqa: E402


def write_jpegs(folder, count, seed=0):
    """Saves `count` 500 x 375 JPEG crops of scikit-learn's sample images into `folder`."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    for i in range(count):
        photo = photos[i % len(photos)]
        top = rng.integers(0, photo.shape[0] - 375 + 1)
        left = rng.integers(0, photo.shape[1] - 500 + 1)
        Image.fromarray(photo[top : top + 375, left : left + 500]).save(
            os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def time_pipeline(source, config, batch_size, batches, jit_compile):
    from keras_dinov2.data import multicrop_dataset

    dataset = multicrop_dataset(source, batch_size=batch_size, config=config, repeat=True,
                                jit_compile=jit_compile)
    iterator = iter(dataset)
    start = time.perf_counter()
    next(iterator)
    first = time.perf_counter() - start
    for _ in range(3):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - start
    return batches * batch_size / seconds, first


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="JPEGs to write (default 256)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    parser.add_argument("--batches", type=int, default=20, help="timed batches (default 20)")
    parser.add_argument("--no-xla", action="store_true",
                        help="also time the pipeline without the XLA-compiled color stage")
    parser.add_argument("--digits", action="store_true", help="also time the digits recipe")
    args = parser.parse_args()

    from keras_dinov2.config import DataConfig

    info = machine_info()
    print(f"CPU: {info['cpu']} ({info['cpu_count']} cores), tensorflow "
          f"{info['versions'].get('tensorflow')}; load average before {load_average():.2f}")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        write_jpegs(folder, args.images)
        for jit in [True] + ([False] if args.no_xla else []):
            rate, first = time_pipeline(folder, DataConfig(), args.batch_size, args.batches, jit)
            rows.append((f"ViT-14 recipe, 2x224 + 8x98, JPEG 500x375, XLA {'on' if jit else 'off'}",
                         rate, first))
    if args.digits:
        rate, first = time_pipeline("digits", DataConfig.recipe("digits"), 64, args.batches, True)
        rows.append(("digits recipe, 2x32 + 8x16", rate, first))
    for name, rate, first in rows:
        print(f"{name}: {rate:.1f} images/s (first batch {first:.1f} s)")
    print(f"load average after {load_average():.2f}; batch {args.batch_size}, "
          f"{args.batches} timed batches after 3 warm-up batches")


if __name__ == "__main__":
    main()
