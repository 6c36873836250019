"""Embedding throughput: keras_dinov2.curation.embed_pool against the backbone's own inference rate, in one run.

Two rates on the active Keras backend (KERAS_BACKEND), with one compiled feature model:

1. peer: `predict_on_batch` of the CLS feature model on one in-memory batch, called over and over (no input
   pipeline, no disk): the most a pool can be embedded at;
2. embed_pool: the whole pool read through the evaluation pipeline (decode, resize, center crop), embedded
   and written as shards (.npy, atomically renamed) into a temporary folder.

The ratio embed_pool / peer says what the input pipeline and the writes cost; 1.0 means the backbone is the
bottleneck. The machine, backend, load average and settings print with the figures.

Example:
    KERAS_BACKEND=jax python tools/benchmark_embed.py                           # digits, tiny random ViT
    KERAS_BACKEND=jax python tools/benchmark_embed.py --data /data/photos --model dinov2_vit_small14 \\
        --image-size 224 --batch-size 128
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench import cli  # noqa: E402
from bench.machine import load_average, machine_info, peak_rss_mb  # noqa: E402


def parse_args(argv=None):
    parser = cli.parser(__doc__)
    parser.add_argument("--data", default="digits:all",
                        help="The pool: digits[:SPLIT], an image folder, tfds:NAME[:SPLIT] (default digits:all, "
                             "1,797 bundled images).")
    parser.add_argument("--model", default="dinov2_vit_tiny4",
                        help="Backbone: preset name (random weights when it has none released), folder or run "
                             "(default dinov2_vit_tiny4).")
    parser.add_argument("--random-weights", action="store_true", help="Random weights for a released preset.")
    parser.add_argument("--image-size", type=int, default=None, help="Crop side (default: the backbone's).")
    parser.add_argument("--batch-size", type=int, default=64, help="Images per forward pass (default 64).")
    parser.add_argument("--shard-size", type=int, default=512, help="Images per shard (default 512).")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                        help="On-disk dtype (default float16).")
    parser.add_argument("--peer-batches", type=int, default=20,
                        help="Timed predict_on_batch calls of the peer (default 20).")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed peer calls first (default 2).")
    args = parser.parse_args(argv)
    cli.check_counts(parser, args, at_least_one=("batch_size", "shard_size", "peer_batches"),
                     at_least_zero=("warmup",))
    return args


def main(argv=None):
    args = parse_args(argv)
    import keras
    import numpy as np

    from keras_dinov2 import curation
    from keras_dinov2.evaluation import feature_model

    info = machine_info()
    print(f"cpu={info['cpu']} cores={info['cpu_count']} usable={info['cpus_usable']} gpus={info['gpus'] or 'none'} "
          f"backend={keras.backend.backend()} load={load_average()}")
    backbone = curation.open_backbone(args.model, random_weights=args.random_weights)
    model = feature_model(backbone)
    size = args.image_size or backbone.image_size
    print(f"data={args.data} model={args.model} params={backbone.count_params():,} image_size={size} "
          f"batch={args.batch_size} shard={args.shard_size} dtype={args.dtype}")

    images = np.random.default_rng(0).normal(size=(args.batch_size, size, size, 3)).astype(np.float32)
    for _ in range(args.warmup):
        np.asarray(keras.ops.convert_to_numpy(model.predict_on_batch(images)))
    start = time.perf_counter()
    for _ in range(args.peer_batches):
        np.asarray(keras.ops.convert_to_numpy(model.predict_on_batch(images)))
    peer_rate = args.peer_batches * args.batch_size / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        pool = curation.embed_pool(args.data, model, folder, batch_size=args.batch_size, shard_size=args.shard_size,
                                   dtype=args.dtype, image_size=size, backbone_name=args.model, verbose=False)
        seconds = time.perf_counter() - start
        shards = pool.meta["num_shards"]
        rate = pool.num_images / seconds
        disk_mb = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)) / 2**20
    print(f"peer predict_on_batch: {peer_rate:.0f} images/s ({args.peer_batches} batches of {args.batch_size})")
    print(f"embed_pool: {rate:.0f} images/s ({pool.num_images} images, {len(pool.unreadable)} unreadable, "
          f"{shards} shards, {disk_mb:.1f} MB written, {seconds:.1f} s)")
    print(f"ratio embed_pool / peer = {rate / peer_rate:.2f}  peak_rss_mb={peak_rss_mb():.0f} "
          f"load_after={load_average()}")


if __name__ == "__main__":
    main()
