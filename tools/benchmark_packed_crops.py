"""Times the student's transformer blocks over the global and the local crops: two passes, or one packed pass.

The reference's efficient path (xFormers) runs the student once over both crop sizes: every token of every crop in
one sequence with a block-diagonal attention mask, so each linear layer is one matrix product over all the tokens.
No backend's attention here skips the masked blocks of such a mask on a CPU (a dense masked attention over the
packed sequence would cost (sum n)^2 instead of sum n^2), so this tool times the form that needs no mask and gives
the same numbers: LayerNorm, the qkv and output projections, LayerScale and the MLP on the concatenated token rows
of both crop sizes, attention separately per crop size on slices of them. Against it, the blocks called once per
crop size, as DINOv2Pretrainer does. Forward + backward of sum(out^2) over a stack of the preset's blocks on random
tokens, each form compiled as the trainers compile (JAX jit, TensorFlow tf.function, PyTorch eager); on PyTorch the
two-pass row also runs with the fused block branches switched off (`keras_dinov2.ops.plain_keras_ops`), the kernels
the packed prototype uses. It reports the median seconds per pass and the largest difference of the outputs.

Example:
    KERAS_BACKEND=jax python tools/benchmark_packed_crops.py --preset dinov2_vit_small14 --batch-size 4
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
                        help="architecture preset whose width, heads and depth are used (default: dinov2_vit_small14)")
    parser.add_argument("--batch-size", type=int, default=4,
                        help="source images; each gives 2 global and 8 local crops (default 4)")
    parser.add_argument("--global-tokens", type=int, default=257,
                        help="tokens of a global crop (default 257: 224 px, patch 14, class token)")
    parser.add_argument("--local-tokens", type=int, default=50,
                        help="tokens of a local crop (default 50: 98 px, patch 14, class token)")
    parser.add_argument("--layers", type=int, default=None, help="blocks in the stack (default: the preset's depth)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per form (default 5)")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.global_tokens, args.local_tokens, args.repeats) < 1:
        parser.error("--batch-size, --global-tokens, --local-tokens and --repeats must be >= 1")

    import keras
    import numpy as np

    from keras_dinov2 import ops as kd_ops
    from keras_dinov2.backbone import DINOv2Backbone

    backend = keras.backend.backend()
    config = DINOv2Backbone.from_preset(args.preset, load_weights=False).get_config()
    width, heads = config["hidden_dim"], config["num_heads"]
    depth = args.layers or config["num_layers"]
    keras.utils.set_random_seed(0)
    stack = BlockStack(width, heads, depth, config.get("mlp_ratio", 4.0))
    rng = np.random.default_rng(0)
    crops = [rng.standard_normal((2 * args.batch_size, args.global_tokens, width)).astype("float32"),
             rng.standard_normal((8 * args.batch_size, args.local_tokens, width)).astype("float32")]
    stack(crops, packed=False)  # build
    print(f"backend={backend} machine={platform.processor() or platform.machine()} cores={os.cpu_count()} "
          f"blocks={depth} width={width} heads={heads} crops: {crops[0].shape[0]} x {args.global_tokens} and "
          f"{crops[1].shape[0]} x {args.local_tokens} tokens")
    forms = [("two passes", False, False), ("packed", True, False)]
    if backend == "torch":
        forms.insert(1, ("two passes, plain Keras layers", False, True))
    results = {}
    for label, packed, plain in forms:
        call = functools.partial(_make_step(stack, backend, packed, plain, kd_ops), crops)
        warm_up(call, 1)
        outputs = call()
        median = statistics.median(time_calls(call, args.repeats).times)
        results[label] = (median, outputs)
        print(f"{label:32s} median {median:.4f} s per forward + backward")
    base_time, base_out = results["two passes"]
    for label, (median, outputs) in results.items():
        if label != "two passes":
            diff = max(float(np.max(np.abs(a - b))) for a, b in zip(outputs, base_out))
            print(f"{label}: {base_time / median:.2f}x the two passes' speed; largest output difference {diff:.2e}")


class BlockStack:
    """A stack of TransformerBlocks called on a list of token tensors, per crop size or packed."""

    def __init__(self, width, heads, depth, mlp_ratio):
        import keras

        from keras_dinov2.layers import TransformerBlock

        class Stack(keras.layers.Layer):
            def __init__(self):
                super().__init__()
                # LayerScale 1 (not the training init 1e-5): the blocks change the tokens enough for the
                # comparison of the two forms' outputs to mean something.
                self.blocks = [TransformerBlock(width, heads, mlp_ratio=mlp_ratio, layer_scale_init=1.0,
                                                name=f"block_{i}") for i in range(depth)]

            def build(self, shapes):
                for block in self.blocks:
                    block.build(shapes[0])
                self.built = True

            def call(self, crops, packed=False):
                crops = list(crops)
                for block in self.blocks:
                    crops = packed_block(block, crops) if packed else [block(x) for x in crops]
                return crops

        self.layer = Stack()

    def __call__(self, crops, packed=False):
        return self.layer(crops, packed=packed)


def packed_block(block, crops):
    """`block` over every crop with one matrix product per linear layer (rows of all crops), attention per crop."""
    from keras import ops

    from keras_dinov2.ops import dot_product_attention

    shapes = [tuple(x.shape) for x in crops]
    width = shapes[0][-1]
    rows = ops.concatenate([ops.reshape(x, (-1, width)) for x in crops], axis=0)
    qkv = block.attn.qkv(block.norm1(rows))
    attended, start = [], 0
    heads, head_dim = block.attn.num_heads, block.attn.head_dim
    for batch, tokens, _ in shapes:
        part = ops.reshape(qkv[start:start + batch * tokens], (batch, tokens, 3, heads, head_dim))
        out = dot_product_attention(part[:, :, 0], part[:, :, 1], part[:, :, 2], scale=head_dim**-0.5)
        attended.append(ops.reshape(out, (batch * tokens, width)))
        start += batch * tokens
    rows = rows + block.ls1(block.attn.proj(ops.concatenate(attended, axis=0)))
    rows = rows + block.ls2(block.mlp(block.norm2(rows)))
    out, start = [], 0
    for batch, tokens, _ in shapes:
        out.append(ops.reshape(rows[start:start + batch * tokens], (batch, tokens, width)))
        start += batch * tokens
    return out


def _make_step(stack, backend, packed, plain, kd_ops):
    """forward + backward of sum(out^2) over all crops; returns the outputs as NumPy arrays."""
    import contextlib

    import keras
    import numpy as np

    layer = stack.layer
    if backend == "jax":
        import jax

        def loss_fn(trainable, non_trainable, crops):
            outs, _ = layer.stateless_call(trainable, non_trainable, crops, packed=packed)
            return sum(keras.ops.sum(keras.ops.square(o)) for o in outs), outs

        grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        def step(crops):
            (_, outs), grads = grad_fn(trainable, non_trainable, crops)
            jax.block_until_ready(grads)
            return [np.asarray(o) for o in outs]

        return step
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function
        def tf_step(crops):
            with tf.GradientTape() as tape:
                outs = layer(crops, packed=packed)
                loss = tf.add_n([tf.reduce_sum(tf.square(o)) for o in outs])
            grads = tape.gradient(loss, layer.trainable_variables)
            return outs, tf.add_n([tf.reduce_sum(g) for g in grads])

        return lambda crops: [o.numpy() for o in tf_step([tf.constant(c) for c in crops])[0]]
    import torch

    def torch_step(crops):
        for v in layer.trainable_variables:
            v.value.grad = None
        with kd_ops.plain_keras_ops() if plain else contextlib.nullcontext():
            outs = layer([torch.from_numpy(c) for c in crops], packed=packed)
        sum(torch.sum(torch.square(o)) for o in outs).backward()
        return [o.detach().numpy() for o in outs]

    return torch_step


if __name__ == "__main__":
    main()
