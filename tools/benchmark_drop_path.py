"""Times a forward + backward pass of the backbone with the two forms of stochastic depth.

The reference computes each residual branch only for the kept subset of samples when the
drop rate is above 0.1 (saving the dropped samples' compute); the plain form computes every
sample and multiplies by a keep mask. This measures whether the subset form pays, on the
current Keras backend (set KERAS_BACKEND; JAX is the one the decision is made for).

Example:
    KERAS_BACKEND=jax python tools/benchmark_drop_path.py --preset dinov2_vit_small14 \
        --batch-size 8 --rate 0.3 --repeats 5
"""

import functools
import os
import platform
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench import cli  # noqa: E402
from bench.timing import time_calls, warm_up  # noqa: E402


def main(argv=None):
    parser = cli.parser(__doc__)
    parser.add_argument("--preset", default="dinov2_vit_small14",
                        help="architecture preset (default: dinov2_vit_small14)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (default 8)")
    parser.add_argument("--image-size", type=int, default=224, help="square side (default 224)")
    parser.add_argument("--rate", type=float, nargs="+", default=[0.0, 0.3, 0.4],
                        help="drop-path rates of the last block (default 0.0 0.3 0.4)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps (default 5)")
    parser.add_argument("--dtype", default="float32", help="dtype policy (default float32)")
    args = parser.parse_args(argv)

    import keras
    import numpy as np

    from keras_dinov2.backbone import DINOv2Backbone

    backend = keras.backend.backend()
    images = np.random.default_rng(0).random(
        (args.batch_size, args.image_size, args.image_size, 3)).astype("float32")
    print(f"backend={backend} machine={platform.processor() or platform.machine()} "
          f"cores={os.cpu_count()} preset={args.preset} batch={args.batch_size} "
          f"size={args.image_size} dtype={args.dtype}")
    rows = []
    for rate in args.rate:
        for subset in (True, False):
            if rate <= 0.1 and not subset:
                continue
            model = DINOv2Backbone.from_preset(args.preset, load_weights=False,
                                               drop_path_rate=rate, subset_drop_path=subset,
                                               image_size=args.image_size, dtype=args.dtype)
            call = functools.partial(_make_step(model, backend), images)
            warm_up(call, 1)  # compile
            median = statistics.median(time_calls(call, args.repeats).times)
            label = "subset" if subset and rate > 0.1 else "mask"
            rows.append((rate, label, median))
            print(f"rate={rate:.2f} form={label:6s} median {median:.3f} s/step "
                  f"({args.batch_size / median:.2f} images/s)")
    base = {r: t for r, form, t in rows if form == "mask"}
    for rate, form, t in rows:
        if form == "subset" and rate in base:
            print(f"rate={rate:.2f}: subset form is {base[rate] / t:.2f}x the mask form")


def _make_step(model, backend):
    """A compiled forward + backward of sum(prenorm ** 2), returning the loss as a float."""
    import keras

    if backend == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        def loss_fn(trainable, non_trainable, images):
            out, non_trainable = model.stateless_call(trainable, non_trainable,
                                                      {"images": images}, training=True)
            return keras.ops.mean(keras.ops.square(out["prenorm"])), non_trainable

        grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
        state = {"nt": non_trainable}

        def step(images):
            (loss, state["nt"]), grads = grad_fn(trainable, state["nt"], images)
            jax.block_until_ready(grads)
            return float(loss)

        return step
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def tf_step(images):
            with tf.GradientTape() as tape:
                out = model({"images": images}, training=True)
                loss = tf.reduce_mean(tf.square(out["prenorm"]))
            grads = tape.gradient(loss, model.trainable_variables)
            # The mask token gets no gradient here (no masks are passed): None, left out.
            return loss, tf.add_n([tf.reduce_sum(g) for g in grads if g is not None])

        return lambda images: float(tf_step(tf.constant(images))[0])
    import torch

    def torch_step(images):
        model.zero_grad() if hasattr(model, "zero_grad") else None
        out = model({"images": torch.from_numpy(images)}, training=True)
        loss = torch.mean(torch.square(out["prenorm"]))
        loss.backward()
        return float(loss)

    return torch_step


if __name__ == "__main__":
    main()
