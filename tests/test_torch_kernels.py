"""The PyTorch backend's kernels against the plain Keras path and NumPy.

On PyTorch, DINOv2AdamW, the gradient clipping and the teacher's EMA run in multi-tensor `torch._foreach_*` kernels,
and the transformer block's two residual branches in one call each (`keras_dinov2.ops.torch`); every other backend
takes the per-variable Keras ops and layers that XLA / tf.function compile. These tests switch the kernels off
(`keras_dinov2.ops.plain_keras_ops()`) to run the plain path in the same process and require the same numbers within
float32 rounding, over steps that cross every branch: several groups, a frozen last layer, weight decay masks,
clipping that binds, blocks with and without LayerScale and with both forms of stochastic depth.
"""

import contextlib

import keras
import numpy as np
import pytest
from conftest import to_numpy
from keras import ops

from keras_dinov2 import DINOHead, DINOv2Backbone
from keras_dinov2 import ops as kd_ops
from keras_dinov2.layers import TransformerBlock
from keras_dinov2.ops import eager as kd_eager
from keras_dinov2.optim import DINOv2AdamW, clip_by_part, param_groups
from keras_dinov2.pretrainer.teacher import EMATeacher

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="the multi-tensor kernels exist on the torch backend only"
)


@pytest.fixture
def plain_path():
    """Call it to switch the backend kernels off for the rest of the test (`keras_dinov2.ops.plain_keras_ops`)."""
    with contextlib.ExitStack() as stack:
        yield lambda: stack.enter_context(kd_ops.plain_keras_ops())


def parts(seed):
    keras.utils.set_random_seed(seed)
    backbone = DINOv2Backbone(patch_size=4, hidden_dim=8, num_layers=2, num_heads=2, image_size=8,
                              num_register_tokens=1, mlp_ratio=2.0)
    head = DINOHead(num_prototypes=6, hidden_dim=8, bottleneck_dim=4, num_layers=2, name="dino_head")
    head.build((None, 8))
    return backbone, head


def gradients(variables, step, scale=1.0):
    rng = np.random.default_rng(100 + step)
    return [ops.convert_to_tensor(scale * rng.standard_normal(v.shape).astype("float32")) for v in variables]


def train(frozen, steps=4, clip=None):
    """Values and optimizer moments after `steps` updates of a fresh model with fixed gradients."""
    backbone, head = parts(0)
    groups = param_groups(backbone, heads=[head], layer_decay=0.8, patch_embed_lr_mult=0.3)
    variables = backbone.trainable_variables + head.trainable_variables
    optimizer = DINOv2AdamW(0.05, weight_decay=0.2, last_layer_learning_rate=0.02, param_groups=groups,
                            frozen_last_layer_steps=frozen)
    norms = []
    for step in range(steps):
        grads = gradients(variables, step, scale=4.0)
        if clip is not None:
            grads, part_norms = clip_by_part(grads, variables, groups, clip)
            norms.append({k: float(to_numpy(v)) for k, v in part_norms.items()})
        optimizer.apply(grads, variables)
    return [to_numpy(v) for v in variables + optimizer.variables], norms


@pytest.mark.parametrize("frozen", [0, 2])
def test_grouped_adamw_matches_the_per_variable_update(frozen, plain_path):
    assert kd_ops.has_multi_tensor_adamw()
    fast, _ = train(frozen)
    plain_path()
    assert not kd_ops.has_multi_tensor_adamw()
    plain, _ = train(frozen)
    assert len(fast) == len(plain)
    for a, b in zip(fast, plain):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    # The runs moved: the comparison is not between two untouched models.
    assert not np.allclose(fast[0], to_numpy(parts(0)[0].trainable_variables[0]))


def test_clipped_training_matches_and_clipping_binds(plain_path):
    fast, fast_norms = train(0, steps=3, clip=1.0)
    plain_path()
    plain, plain_norms = train(0, steps=3, clip=1.0)
    for a, b in zip(fast, plain):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    for f, p in zip(fast_norms, plain_norms):
        assert f.keys() == p.keys() == {"backbone", "dino_head"}
        for part in f:
            assert f[part] > 1.0  # the clip at 1.0 scales every step's gradients
            np.testing.assert_allclose(f[part], p[part], rtol=1e-6)


def test_scaled_by_global_norm_against_numpy():
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(shape).astype("float32") for shape in [(3, 4), (5,), (2, 2, 2)]]
    total = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads))
    for max_norm in (0.5 * total, 2.0 * total):
        scaled, norm = kd_ops.scaled_by_global_norm([ops.convert_to_tensor(g) for g in grads], max_norm)
        np.testing.assert_allclose(float(to_numpy(norm)), total, rtol=1e-6)
        factor = min(max_norm / (total + 1e-6), 1.0)
        for s, g in zip(scaled, grads):
            np.testing.assert_allclose(to_numpy(s), g * factor, rtol=1e-6, atol=1e-7)
    # Mixed dtypes keep each gradient's own.
    mixed = [ops.convert_to_tensor(grads[0]), ops.cast(grads[1], "bfloat16")]
    scaled, _ = kd_ops.scaled_by_global_norm(mixed, 1e-3)
    assert [keras.backend.standardize_dtype(s.dtype) for s in scaled] == ["float32", "bfloat16"]
    # In place (the torch step's own gradient buffers): the same values, in the tensors given; by default the
    # tensors given are left as they were.
    tensors = [ops.convert_to_tensor(g) for g in grads]
    scaled, _ = kd_ops.scaled_by_global_norm(tensors, 0.5 * total)
    assert all(s is not t for s, t in zip(scaled, tensors))
    np.testing.assert_array_equal(to_numpy(tensors[0]), grads[0])
    in_place, norm = kd_ops.scaled_by_global_norm(tensors, 0.5 * total, in_place=True)
    np.testing.assert_allclose(float(to_numpy(norm)), total, rtol=1e-6)
    for s, t, expected in zip(in_place, tensors, scaled):
        assert s is t
        np.testing.assert_array_equal(to_numpy(t), to_numpy(expected))


def test_grouped_adamw_follows_a_new_order_of_the_variables(plain_path):
    """The update's group plan is kept for the last list of variables; another list (here reversed) gets its own."""
    def run(order):
        backbone, head = parts(0)
        groups = param_groups(backbone, heads=[head], layer_decay=0.8, patch_embed_lr_mult=0.3)
        variables = backbone.trainable_variables + head.trainable_variables
        optimizer = DINOv2AdamW(0.05, weight_decay=0.2, param_groups=groups)
        for step, reverse in enumerate(order):
            grads = gradients(variables, step)
            pairs = list(zip(grads, variables))[::-1] if reverse else list(zip(grads, variables))
            optimizer.apply([g for g, _ in pairs], [v for _, v in pairs])
        return [to_numpy(v) for v in variables]

    mixed = run([False, False, True, False])
    plain_path()
    for a, b in zip(mixed, run([False] * 4)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("momentum", [0.9, 0.996])
def test_ema_update_matches_numpy_and_the_plain_path(momentum, plain_path):
    def moved_teacher():
        student, _ = parts(1)
        teacher, _ = parts(2)
        role = EMATeacher([(student, teacher)])
        for s in student.trainable_weights:  # the student moves away from the copy
            s.assign(s + 0.5)
        start = [to_numpy(t) for _, t in role.pairs]
        role.update(ops.convert_to_tensor(momentum))
        role.update(momentum)  # a Python float works too
        return start, [to_numpy(s) for s, _ in role.pairs], [to_numpy(t) for _, t in role.pairs]

    start, students, fast = moved_teacher()
    for t0, s, t in zip(start, students, fast):
        once = momentum * t0.astype(np.float64) + (1 - momentum) * s
        np.testing.assert_allclose(t, momentum * once + (1 - momentum) * s, rtol=1e-6, atol=1e-7)
    plain_path()
    _, _, plain = moved_teacher()
    for a, b in zip(fast, plain):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def block_run(block, x, training):
    """Output, input gradient and weight gradients of sum(block(x) * w)."""
    import torch

    x = torch.tensor(x, requires_grad=True)
    weights = torch.linspace(-1.0, 1.0, x.numel()).reshape(x.shape)
    for v in block.trainable_variables:
        v.value.grad = None
    y = block(x, training=training)
    (y * weights).sum().backward()
    return [to_numpy(y.detach()), to_numpy(x.grad)] + [to_numpy(v.value.grad) for v in block.trainable_variables]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"layer_scale_init": None},
        {"drop_path_rate": 0.3, "subset_drop_path": False},
        {"drop_path_rate": 0.5},  # the subset form
        {"ffn_type": "swiglu"},  # no fused SwiGLU: the Keras layers, both runs
    ],
)
def test_fused_block_branches_match_the_keras_layers(options, plain_path):
    block = TransformerBlock(16, 4, mlp_ratio=2.0, seed=3, **{"layer_scale_init": 0.5, **options})
    x = np.random.default_rng(0).standard_normal((4, 7, 16)).astype("float32")
    block.build(x.shape)
    training = "drop_path_rate" in options
    keras.utils.set_random_seed(5)  # the same stochastic-depth draws in both runs
    block.drop_path.seed_generator.state.assign(ops.convert_to_tensor([5, 0], "uint32"))
    fused = block_run(block, x, training)
    plain_path()
    block.drop_path.seed_generator.state.assign(ops.convert_to_tensor([5, 0], "uint32"))
    plain = block_run(block, x, training)
    for a, b in zip(fused, plain):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert all(np.any(g != 0) for g in fused[1:])  # every weight got a gradient


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_fused_block_branches_match_the_keras_layers_under_mixed_precision(policy, plain_path):
    # The dtypes as the block's Keras layers run them: LayerNorm and LayerScale in float32 on the float32 stream,
    # the products and attention in the compute dtype with the weights cast down.
    keras.config.set_dtype_policy(policy)
    block = TransformerBlock(16, 4, mlp_ratio=2.0, layer_scale_init=0.5)
    x = np.random.default_rng(0).standard_normal((4, 7, 16)).astype("float32")
    block.build(x.shape)
    fused = block_run(block, x, False)
    plain_path()
    plain = block_run(block, x, False)
    tolerance = 2e-2 if policy == "mixed_bfloat16" else 2e-3
    for a, b in zip(fused, plain):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a.astype("float32"), b.astype("float32"), rtol=tolerance, atol=tolerance)


def test_fused_branches_take_float_inputs_with_float32_variables_only():
    import torch

    block = TransformerBlock(8, 2, mlp_ratio=2.0)
    block.build((1, 3, 8))
    x = torch.ones((1, 3, 8))
    norm = (block.norm1.gamma, block.norm1.beta, 1e-6)
    dense = (block.attn.qkv.kernel, block.attn.qkv.bias)
    proj = (block.attn.proj.kernel, block.attn.proj.bias)
    assert kd_ops.attention_branch(x, norm, dense, proj, 2, 0.5) is not None
    out = kd_ops.attention_branch(x, norm, dense, proj, 2, 0.5, compute_dtype="bfloat16")
    assert out.dtype == torch.bfloat16  # no LayerScale: the products' dtype
    assert kd_ops.attention_branch(x.bfloat16(), norm, dense, proj, 2, 0.5) is not None
    assert kd_ops.attention_branch(x.int(), norm, dense, proj, 2, 0.5) is None
    with kd_ops.plain_keras_ops():
        assert kd_ops.attention_branch(x, norm, dense, proj, 2, 0.5) is None
    keras.config.set_dtype_policy("bfloat16")  # bfloat16 variables: the Keras layers
    low = TransformerBlock(8, 2, mlp_ratio=2.0)
    low.build((1, 3, 8))
    assert kd_ops.attention_branch(x.bfloat16(), (low.norm1.gamma, low.norm1.beta, 1e-6),
                                   (low.attn.qkv.kernel, low.attn.qkv.bias),
                                   (low.attn.proj.kernel, low.attn.proj.bias), 2, 0.5) is None


@pytest.mark.parametrize("zero_column", [False, True])
def test_weight_normalized_kernel_and_its_gradient_match_the_keras_ops(zero_column, plain_path):
    import torch

    rng = np.random.default_rng(0)
    v0 = rng.standard_normal((6, 5)).astype("float32")
    if zero_column:
        v0[:, 2] = 0.0  # below the floor: the formula with the floor
    g0 = rng.uniform(0.5, 2.0, 5).astype("float32")
    probe = torch.tensor(rng.standard_normal((6, 5)).astype("float32"))

    def run():
        v, g = torch.tensor(v0, requires_grad=True), torch.tensor(g0, requires_grad=True)
        kernel = kd_ops.weight_normalized_kernel(v, g, 1e-24)
        (kernel * probe).sum().backward()
        return [to_numpy(t) for t in (kernel.detach(), v.grad, g.grad)]

    fast = run()
    expected = g0 * v0 / np.maximum(np.sqrt((v0.astype(np.float64) ** 2).sum(0)), 1e-12)
    np.testing.assert_allclose(fast[0], expected, rtol=1e-6)
    plain_path()
    for a, b in zip(fast, run()):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_patch_embedding_kernel_matches_the_conv2d_with_gradients(policy, plain_path):
    # Patches gathered by a view and one F.linear against Keras' Conv2D (stride = kernel): tokens row-major over the
    # image height, and the kernel's and bias' gradients.
    import torch

    from keras_dinov2.layers.embeddings import PatchEmbedding

    keras.config.set_dtype_policy(policy)
    layer = PatchEmbedding(6, 4)
    layer.build((2, 12, 8, 3))
    images = np.random.default_rng(1).standard_normal((2, 12, 8, 3)).astype("float32")
    probe = torch.linspace(-1.0, 1.0, 2 * 6 * 6).reshape(2, 6, 6)

    def run():
        for v in layer.trainable_variables:
            v.value.grad = None
        tokens = layer(torch.tensor(images))
        (tokens.float() * probe).sum().backward()
        return [to_numpy(tokens.detach().float())] + [to_numpy(v.value.grad) for v in layer.trainable_variables]

    assert kd_ops.patch_embedding(torch.tensor(images), layer.projection.kernel, layer.projection.bias, 4) is not None
    fast = run()
    plain_path()
    plain = run()
    tolerance = 2e-2 if policy == "mixed_bfloat16" else 1e-5
    assert fast[0].shape == (2, 6, 6)
    for a, b in zip(fast, plain):
        np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance)
    assert all(np.any(g != 0) for g in fast[1:])


class Scale(keras.layers.Layer):
    """x * w (+ 1 in training), counting its `Layer.__call__`s."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.keras_calls = 0

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def __call__(self, *args, **kwargs):
        self.keras_calls += 1
        return super().__call__(*args, **kwargs)

    def call(self, x, training=None):
        y = x * self.w + 0.5
        return y + 1.0 if training else y


class Outer(keras.layers.Layer):
    """Calls `inner` through `call_layer` inside its own `Layer.__call__` (an autocast scope under a mixed policy)."""

    def __init__(self, inner, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner

    def call(self, x, *more):
        return kd_ops.call_layer(self.inner, x, *more, training=True) if not more else self.inner(x, *more)


def test_call_layer_skips_layer_call_only_where_it_is_a_no_op():
    import torch

    layer = Scale()
    x = torch.full((2, 3), 2.0)
    first = kd_ops.call_layer(layer, x, training=True)  # not built yet: Keras builds it
    assert layer.keras_calls == 1 and layer.built
    direct = kd_ops.call_layer(layer, x, training=True)
    assert layer.keras_calls == 1  # skipped
    np.testing.assert_array_equal(to_numpy(direct), to_numpy(first))
    np.testing.assert_array_equal(to_numpy(direct), np.full((2, 3), 3.5))
    # Each of these needs Keras' bookkeeping: `training` from the context, an array to convert, the plain path.
    kd_ops.call_layer(layer, x)
    kd_ops.call_layer(layer, np.ones((2, 3), "float32"), training=False)
    with kd_ops.plain_keras_ops():
        kd_ops.call_layer(layer, x, training=True)
    assert layer.keras_calls == 4


def test_call_layer_keeps_layer_call_where_dtypes_need_it():
    import torch

    mixed = Scale(dtype="mixed_bfloat16")
    mixed.build((None, 3))
    out = kd_ops.call_layer(mixed, torch.ones((2, 3)), training=False)
    assert mixed.keras_calls == 1 and out.dtype == torch.bfloat16  # input cast and autocast scope, as Keras does
    plain = Scale(dtype="float32")
    plain.build((None, 3))
    assert kd_ops.call_layer(plain, torch.ones((2, 3), dtype=torch.float64), training=False).dtype == torch.float32
    assert plain.keras_calls == 1  # a float64 input: Keras casts it to the compute dtype
    plain.w.assign([1.001, 1.0, 1.0])
    out = Outer(plain, dtype="mixed_bfloat16")(torch.ones((1, 3)))
    # Inside the outer layer's bfloat16 autocast scope the inner float32 layer still reads its float32 weight.
    assert plain.keras_calls == 2
    np.testing.assert_allclose(to_numpy(out), [[2.501, 2.5, 2.5]], rtol=1e-6)
    # A mixed layer that does not autocast still gets a scope from Keras (its variables read in bfloat16 there).
    unscaled = Scale(dtype="mixed_bfloat16", autocast=False)
    unscaled.build((None, 3))
    unscaled.w.assign([1.001, 1.0, 1.0])
    out = kd_ops.call_layer(unscaled, torch.ones((1, 3), dtype=torch.bfloat16), training=False)
    assert unscaled.keras_calls == 1
    np.testing.assert_array_equal(to_numpy(out), [[1.5, 1.5, 1.5]])  # 1.001 rounds to 1 in bfloat16


def test_backbone_blocks_run_without_layer_call_and_match_the_plain_path(monkeypatch, plain_path):
    backbone, _ = parts(7)
    calls = []
    original = TransformerBlock.__call__
    monkeypatch.setattr(TransformerBlock, "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    images = np.random.default_rng(1).uniform(size=(2, 8, 8, 3)).astype("float32")
    masks = np.zeros((2, 4), bool)
    masks[0, 1] = True
    inputs = {"images": ops.convert_to_tensor(images), "masks": ops.convert_to_tensor(masks)}
    direct = backbone(inputs, training=True)
    assert calls == []
    plain_path()
    plain = backbone(inputs, training=True)
    assert len(calls) == 2
    for key in ("cls_token", "patch_tokens", "prenorm"):
        np.testing.assert_allclose(to_numpy(direct[key]), to_numpy(plain[key]), rtol=1e-5, atol=1e-6)


def test_variable_tensors_are_the_variables_parameters_and_keep_nothing_alive():
    import gc
    import weakref

    from keras_dinov2.ops.torch import variable_tensors

    a, b = keras.Variable(np.ones(3, "float32")), keras.Variable(np.zeros(2, "float32"))
    first = variable_tensors([a, None, b])
    assert first[0] is a.value and first[1] is None and first[2] is b.value
    a.assign(np.full(3, 2.0, "float32"))  # Keras copies into the Parameter: the kept tensor sees it
    again = variable_tensors([a, None, b])
    assert again[0] is first[0] and np.all(to_numpy(again[0]) == 2.0)
    assert variable_tensors([b, a])[0] is b.value  # another list, read anew
    dead = weakref.ref(first[0])
    del a, first, again
    gc.collect()
    assert dead() is None  # the cache holds only weak references
    c = keras.Variable(np.full(3, 5.0, "float32"))
    # Whatever the ids, a list with a new variable gets that variable's tensor.
    assert np.all(to_numpy(variable_tensors([c, None, b])[0]) == 5.0)


@pytest.mark.parametrize("options", [{}, {"num_layers": 1}, {"use_bias": False, "norm_last_layer": True}])
def test_fused_projection_head_matches_the_keras_layers_with_gradients(options, plain_path, monkeypatch):
    import torch

    keras.utils.set_random_seed(11)
    head = DINOHead(num_prototypes=12, hidden_dim=16, bottleneck_dim=8, **{"num_layers": 3, **options})
    head.build((None, 10))
    x = np.random.default_rng(2).standard_normal((5, 10)).astype("float32")
    x[3] = 0.0  # a zero row: the normalization's floor
    dense_calls = []
    original = keras.layers.Dense.call
    monkeypatch.setattr(keras.layers.Dense, "call",
                        lambda self, *a, **k: dense_calls.append(1) or original(self, *a, **k))

    def run():
        for v in head.trainable_variables:
            v.value.grad = None
        inputs = torch.tensor(x, requires_grad=True)
        logits = head(inputs)
        (logits * torch.linspace(-1, 1, 12)).sum().backward()
        return [to_numpy(logits), to_numpy(inputs.grad)] + [to_numpy(v.value.grad) for v in head.trainable_variables]

    fused = run()
    assert dense_calls == []  # one kernel call, no Dense layer
    plain_path()
    plain = run()
    assert len(dense_calls) == head.num_layers
    for a, b in zip(fused, plain):  # the zero row's gradients are ~1e10 (1 / the floor): tolerances scale with them
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6 * max(1.0, np.abs(b).max()))
    assert np.all(np.isfinite(fused[1]))


def test_projection_head_kernel_declines_mixed_precision_and_batch_norm():
    import torch

    x = torch.ones((2, 6))
    for kwargs in ({"dtype": "mixed_bfloat16"}, {"use_bn": True}):
        head = DINOHead(num_prototypes=4, hidden_dim=8, bottleneck_dim=4, **kwargs)
        head.build((None, 6))
        assert head._fused(x) is None
        assert tuple(head(x).shape) == (2, 4)


def test_kept_kernel_arguments_give_way_to_lora_enabled_after_a_fused_call(plain_path):
    import torch

    block = TransformerBlock(8, 2, mlp_ratio=2.0, layer_scale_init=0.5)
    x = torch.tensor(np.random.default_rng(4).standard_normal((2, 5, 8)).astype("float32"))
    block.build(x.shape)
    before = to_numpy(block(x))  # the fused kernels, their arguments now kept
    assert len(block.trainable_variables) == 14  # the kept tuples add no tracked variable
    block.attn.qkv.enable_lora(2)
    block.attn.qkv.lora_kernel_b.assign(np.full((2, 24), 0.1, "float32"))
    with_lora = to_numpy(block(x))
    plain_path()
    np.testing.assert_allclose(with_lora, to_numpy(block(x)), rtol=1e-5, atol=1e-6)
    assert np.abs(with_lora - before).max() > 1e-3


def test_layer_norm_kernel_against_numpy_and_where_it_declines():
    import torch

    x = np.random.default_rng(6).standard_normal((3, 4, 8)).astype("float32") * 3 + 1
    layer = keras.layers.LayerNormalization(epsilon=1e-6)
    layer.build(x.shape)
    layer.gamma.assign(np.linspace(0.5, 1.5, 8).astype("float32"))
    layer.beta.assign(np.linspace(-1, 1, 8).astype("float32"))
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    expected = (x - mean) / np.sqrt(var + 1e-6) * np.linspace(0.5, 1.5, 8) + np.linspace(-1, 1, 8)
    got = kd_ops.layer_norm(torch.tensor(x), layer.gamma, layer.beta, 1e-6)
    np.testing.assert_allclose(to_numpy(got), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_numpy(kd_ops.layer_norm(torch.tensor(x), None, None, 1e-6)),
                               (x - mean) / np.sqrt(var + 1e-6), rtol=1e-5, atol=1e-5)
    assert kd_ops.layer_norm(torch.tensor(x).bfloat16(), layer.gamma, layer.beta, 1e-6) is None
    with kd_ops.plain_keras_ops():
        assert kd_ops.layer_norm(torch.tensor(x), layer.gamma, layer.beta, 1e-6) is None


def _np_koleo(x, eps=1e-8):
    """KoLeo in float64 NumPy: the reference's normalization, nearest other row by dot product, pairwise distance."""
    x = x.astype("float64")
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)
    dots = x @ x.T
    np.fill_diagonal(dots, -2.0)
    distance = np.linalg.norm(x - x[dots.argmax(-1)] + eps, axis=-1)
    return -np.mean(np.log(distance + eps))


@pytest.mark.parametrize("rows", ["random", "duplicates", "zero row"])
def test_koleo_kernel_matches_numpy_and_the_plain_gradient(rows, plain_path):
    import torch

    from keras_dinov2.losses import koleo

    x = np.random.default_rng(7).standard_normal((6, 5)).astype("float32")
    if rows == "duplicates":
        x[4] = x[1]
    if rows == "zero row":
        x[2] = 0.0
    assert kd_eager.koleo(torch.tensor(x), 1e-8) is not None  # the kernel runs here

    def run():
        inputs = torch.tensor(x, requires_grad=True)
        loss = koleo(inputs)
        loss.backward()
        return to_numpy(loss), to_numpy(inputs.grad)

    loss, grad = run()
    np.testing.assert_allclose(loss, _np_koleo(x), rtol=1e-5, atol=1e-6)
    plain_path()
    plain_loss, plain_grad = run()
    np.testing.assert_allclose(loss, plain_loss, rtol=1e-6, atol=1e-6)
    # Duplicated rows sit eps apart: their gradients are ~1/eps, so the tolerance scales with them.
    np.testing.assert_allclose(grad, plain_grad, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(plain_grad).max()))


def test_koleo_kernel_declines_other_dtypes_and_gathers_first():
    import torch

    from keras_dinov2.losses import CrossReplica, koleo

    x = np.random.default_rng(8).standard_normal((4, 3)).astype("float32")
    assert kd_eager.koleo(torch.tensor(x).double(), 1e-8) is None
    assert kd_eager.koleo(torch.tensor(x).bfloat16(), 1e-8) is None
    # A reduction gathers every replica's rows before the (kernel's) search: two identical replicas here.
    doubled = CrossReplica(all_gather_fn=lambda t: torch.cat([t, t + 0.5]), num_replicas=2)
    np.testing.assert_allclose(to_numpy(koleo(torch.tensor(x), reduction=doubled)),
                               _np_koleo(np.concatenate([x, x + 0.5])), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 10), (1, 1, 10)])
def test_centering_kernels_match_numpy(shape, plain_path):
    import torch

    from keras_dinov2.losses import CrossReplica, softmax_center, update_center

    rng = np.random.default_rng(9)
    logits = rng.standard_normal((7, 10)).astype("float32") * 3
    center = rng.standard_normal(shape).astype("float32")
    valid = np.array([1, 1, 0, 1, 0, 1, 1], bool)
    assert kd_eager.softmax_center(torch.tensor(logits), torch.tensor(center), 0.07) is not None
    shifted = (logits - center.reshape(-1)) / 0.07
    expected = np.exp(shifted - shifted.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    twice = CrossReplica(sum_fn=lambda t: 2 * t, num_replicas=2)  # two replicas holding the same rows
    cases = {
        "probs": lambda: softmax_center(torch.tensor(logits), torch.tensor(center), 0.07),
        "probs, tensor temperature": lambda: softmax_center(torch.tensor(logits), torch.tensor(center),
                                                            torch.tensor(0.07)),
        "center": lambda: update_center(torch.tensor(center), torch.tensor(logits), momentum=0.8),
        "masked center": lambda: update_center(torch.tensor(center), torch.tensor(logits), 0.8,
                                               valid=torch.tensor(valid)),
        "masked center, two replicas": lambda: update_center(torch.tensor(center), torch.tensor(logits), 0.8,
                                                             valid=torch.tensor(valid), reduction=twice),
        "center, two replicas": lambda: update_center(torch.tensor(center), torch.tensor(logits), 0.8,
                                                      reduction=twice),
    }
    numpy = {
        "probs": expected,
        "probs, tensor temperature": expected,
        "center": 0.8 * center + 0.2 * logits.mean(0).reshape(shape),
        "masked center": 0.8 * center + 0.2 * logits[valid].mean(0).reshape(shape),
        "masked center, two replicas": 0.8 * center + 0.2 * logits[valid].mean(0).reshape(shape),
        "center, two replicas": 0.8 * center + 0.2 * logits.mean(0).reshape(shape),
    }
    fused = {name: to_numpy(case()) for name, case in cases.items()}
    plain_path()
    for name, case in cases.items():
        assert fused[name].shape == numpy[name].shape, name
        np.testing.assert_allclose(fused[name], numpy[name], rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(fused[name], to_numpy(case()), rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("shape", [(1, 10), (1, 1, 10)])
def test_centered_targets_kernel_updates_the_center_in_place_as_numpy(shape, plain_path, monkeypatch):
    import torch

    import keras_dinov2.ops.torch as torch_kernels
    from keras_dinov2.losses import CrossReplica
    from keras_dinov2.pretrainer.teacher import centered_targets

    kernel, used = torch_kernels.center_targets, []
    monkeypatch.setattr(torch_kernels, "center_targets", lambda *a: used.append(1) or kernel(*a))
    rng = np.random.default_rng(19)
    logits = rng.standard_normal((7, 10)).astype("float32") * 3
    start = rng.standard_normal(shape).astype("float32")
    valid = np.array([1, 0, 1, 1, 0, 1, 1], bool)
    twice = CrossReplica(sum_fn=lambda t: 2 * t, num_replicas=2)  # two replicas holding the same rows
    shifted = (logits - start.reshape(-1)) / 0.05
    probs = np.exp(shifted - shifted.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    cases = {  # (keyword arguments, the center after the call)
        "mean": ({}, 0.9 * start + 0.1 * logits.mean(0).reshape(shape)),
        "masked, two replicas": ({"valid": torch.tensor(valid), "reduction": twice},
                                 0.9 * start + 0.1 * logits[valid].mean(0).reshape(shape)),
        "no update": ({"update": False}, start),
    }

    def run(kwargs):
        center = keras.Variable(start, trainable=False, dtype="float32")
        out = centered_targets(torch.tensor(logits), center, 0.05, 0.9, **kwargs)
        return to_numpy(out), to_numpy(center)

    fused = {name: run(kwargs) for name, (kwargs, _) in cases.items()}
    assert len(used) == 2  # the two updating cases ran the kernel; without an update, softmax_center alone
    plain_path()
    for name, (kwargs, center) in cases.items():
        # The targets use the center from before the update (the reference's staging).
        np.testing.assert_allclose(fused[name][0], probs, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(fused[name][1], center, rtol=1e-5, atol=1e-6, err_msg=name)
        for a, b in zip(fused[name], run(kwargs)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=name)
    assert len(used) == 2


def test_centered_targets_kernel_declines_what_it_does_not_read():
    import torch

    from keras_dinov2.losses import CrossReplica

    logits, one = torch.zeros(3, 4), CrossReplica()
    center = keras.Variable(np.zeros((1, 4), "float32"), trainable=False)
    assert kd_eager.center_targets(logits, center, 0.1, 0.9, torch.tensor([True, False, True]), one) is not None
    assert kd_eager.center_targets(logits, center, 0.1, 0.9, torch.tensor([1.0, 0.0, 1.0]), one) is None  # 0/1 floats
    assert kd_eager.center_targets(logits, center.value, 0.1, 0.9, None, one) is None  # a tensor: nothing to assign
    assert kd_eager.center_targets(logits.double(), center, 0.1, 0.9, None, one) is None
    bf16 = keras.Variable(np.zeros((1, 4), "float32"), trainable=False, dtype="bfloat16")
    assert kd_eager.center_targets(logits, bf16, 0.1, 0.9, None, one) is None


@pytest.mark.parametrize("mode", ["original", "registers"])
def test_resample_axes_kernel_matches_einsum_with_gradients(mode, plain_path):
    import torch

    from keras_dinov2.layers.interpolation import resample_grid

    grid = np.random.default_rng(10).standard_normal((6, 6, 4)).astype("float32")
    weights = np.random.default_rng(11).standard_normal((3, 5, 4)).astype("float32")

    def run(height, width):
        inputs = torch.tensor(grid, requires_grad=True)
        out = resample_grid(inputs, height, width, mode)
        (out * torch.tensor(weights)).sum().backward()
        return to_numpy(out), to_numpy(inputs.grad)

    fused = run(3, 5)  # known sizes: the kept NumPy matrices
    again = run(3, 5)  # converted once, the same values after
    traced = run(torch.tensor(3), torch.tensor(5))  # tensor sizes: matrices built by keras.ops
    plain_path()
    plain = run(3, 5)
    for a, b in zip(fused, plain):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(fused, again):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(traced[0], plain[0], rtol=1e-5, atol=3e-5)
    rows, cols = (np.asarray(np.random.default_rng(12).standard_normal(s), "float32") for s in ((3, 6), (5, 6)))
    np.testing.assert_allclose(to_numpy(kd_eager.resample_axes(rows, torch.tensor(grid), cols)),
                               np.einsum("hm,mnd,wn->hwd", rows, grid, cols), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize("registers", [0, 2])
def test_assembled_tokens_match_numpy_and_the_plain_gradients(policy, registers, plain_path, monkeypatch):
    import torch

    import keras_dinov2.ops.torch as torch_kernels
    from keras_dinov2.layers.embeddings import DINOv2Embeddings

    kernel, assembled = torch_kernels.assemble_tokens, []
    monkeypatch.setattr(torch_kernels, "assemble_tokens", lambda *a: assembled.append(kernel(*a)) or assembled[-1])

    keras.utils.set_random_seed(12)
    layer = DINOv2Embeddings(8, 4, 16, num_register_tokens=registers, dtype=policy)
    rng = np.random.default_rng(13)
    images = rng.standard_normal((2, 8, 12, 3)).astype("float32")  # a 2 x 3 grid: positions resampled
    masks = rng.random((2, 6)) > 0.5
    layer(images, masks)
    for w in layer.weights:
        w.assign(rng.standard_normal(w.shape).astype("float32"))
    patches = to_numpy(layer.patch_embedding(images)).astype("float32")
    positions = to_numpy(layer.interpolated_position_embedding(8, 12))
    x = np.where(masks[..., None], to_numpy(layer.mask_token)[None], patches)
    x = np.concatenate([np.broadcast_to(to_numpy(layer.cls_token), (2, 1, 8)), x], 1) + positions
    if registers:
        x = np.concatenate([x[:, :1], np.broadcast_to(to_numpy(layer.register_tokens), (2, 2, 8)), x[:, 1:]], 1)
    assert kd_eager.assemble_tokens(torch.tensor(patches), torch.tensor(masks), layer.mask_token, layer.cls_token,
                                  torch.tensor(positions), layer.register_tokens if registers else None) is not None

    # Inside a model (here an outer layer of the same policy), as the backbone calls it: under a mixed policy the
    # outer layer's bfloat16 scope is lifted for the embeddings, which read their tokens in float32.
    outer = Outer(layer, dtype=policy)

    def run():
        for v in layer.trainable_variables:
            v.value.grad = None
        out = outer(torch.tensor(images), torch.tensor(masks))
        (out * torch.linspace(-1, 1, out.shape[1])[:, None]).sum().backward()
        return [to_numpy(out)] + [to_numpy(v.value.grad) for v in layer.trainable_variables]

    before = len(assembled)
    fused = run()
    assert len(assembled) == before + 1 and assembled[-1] is not None  # the kernel made the tokens
    tolerance = 1e-5 if policy == "float32" else 2e-2  # bfloat16 patch products
    np.testing.assert_allclose(fused[0], x, rtol=tolerance, atol=tolerance)
    plain_path()
    for a, b in zip(fused, run()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_take_rows_kernel_matches_numpy_with_gradients(plain_path):
    import torch

    x = np.random.default_rng(14).standard_normal((7, 3)).astype("float32")
    indices = np.array([4, 0, 4, 6], "int32")

    def run():
        inputs = torch.tensor(x, requires_grad=True)
        out = kd_eager.take_rows(inputs.reshape(7, 1, 3), torch.tensor(indices))  # leading axes flattened
        (out * torch.arange(4.0)[:, None]).sum().backward()
        return to_numpy(out), to_numpy(inputs.grad)

    out, grad = run()
    np.testing.assert_array_equal(out, x[indices])
    expected = np.zeros_like(x)
    np.add.at(expected, indices, np.broadcast_to(np.arange(4.0)[:, None], (4, 3)))
    np.testing.assert_array_equal(grad, expected)
    plain_path()
    for a, b in zip((out, grad), run()):
        np.testing.assert_array_equal(a, b)


def test_cross_entropies_and_collapse_signals_match_numpy_and_the_plain_path(plain_path):
    import torch

    from keras_dinov2.losses import CrossReplica, dino_cross_entropy, ibot_cross_entropy
    from keras_dinov2.pretrainer.teacher import collapse_signals

    rng = np.random.default_rng(15)
    logits = rng.standard_normal((6, 9)).astype("float32") * 2
    probs = rng.dirichlet(np.ones(9), 6).astype("float32")
    probs[0] = np.eye(9, dtype="float32")[3]  # a one-hot row: log of the floor, 0 * log 1e-12
    weight = np.array([0.5, 0.5, 0.0, 1.0, 0.25, 0.0], "float32")  # zeros: padding rows
    assert kd_eager.soft_cross_entropy(torch.tensor(logits), torch.tensor(probs), 0.1) is not None
    log_probs = logits / 0.1 - np.log(np.exp(logits / 0.1).sum(-1, keepdims=True))
    rows = -(probs * log_probs).sum(-1)
    marginal = probs.mean(0)
    entropy = -(probs * np.log(np.maximum(probs, 1e-12))).sum(-1).mean()
    numpy = {"dino": rows.mean(), "ibot": (rows * weight).sum() / 4, "teacher_entropy": entropy,
             "teacher_kl_uniform": np.log(9) - entropy,
             "teacher_marginal_entropy": -(marginal * np.log(marginal)).sum()}
    twice = CrossReplica(sum_fn=lambda t: 2 * t, num_replicas=2)  # two replicas with the same rows

    def run():
        inputs = torch.tensor(logits, requires_grad=True)
        values = {"dino": dino_cross_entropy(inputs, torch.tensor(probs), 0.1),
                  "ibot": ibot_cross_entropy(inputs, torch.tensor(probs), torch.tensor(weight), 4, 0.1)}
        (values["dino"] + 2 * values["ibot"]).backward()
        values.update(collapse_signals(torch.tensor(probs)))
        replicas = collapse_signals(torch.tensor(probs), reduction=twice)
        return {k: to_numpy(v) for k, v in values.items()}, to_numpy(inputs.grad), to_numpy(
            replicas["teacher_marginal_entropy"])

    fused, grad, replicated = run()
    for name, value in numpy.items():
        np.testing.assert_allclose(fused[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(replicated, numpy["teacher_marginal_entropy"], rtol=1e-5)
    plain_path()
    plain, plain_grad, plain_replicated = run()
    for name in numpy:
        np.testing.assert_allclose(fused[name], plain[name], rtol=1e-6, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(grad, plain_grad, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(replicated, plain_replicated, rtol=1e-6)


def test_split_rows_matches_slices_with_gradients(plain_path):
    import torch

    x = np.random.default_rng(16).standard_normal((7, 3)).astype("float32")
    weights = [torch.tensor(w) for w in (1.0, -2.0, 0.5)]

    def run():
        inputs = torch.tensor(x, requires_grad=True)
        parts = kd_eager.split_rows(inputs, [2, 4, 1])
        sum((p * w).sum() for p, w in zip(parts, weights)).backward()
        return [to_numpy(p) for p in parts], to_numpy(inputs.grad)

    parts, grad = run()
    for part, expected in zip(parts, (x[:2], x[2:6], x[6:])):
        np.testing.assert_array_equal(part, expected)
    np.testing.assert_array_equal(grad, np.repeat([1.0, -2.0, 0.5], [2, 4, 1])[:, None] * np.ones((1, 3)))
    plain_path()  # slices
    plain_parts, plain_grad = run()
    np.testing.assert_array_equal(plain_grad, grad)
    for a, b in zip(parts, plain_parts):
        np.testing.assert_array_equal(a, b)


def test_kept_head_arguments_give_way_to_lora_enabled_after_a_fused_call(plain_path, monkeypatch):
    import torch

    head = DINOHead(num_prototypes=6, hidden_dim=8, bottleneck_dim=4, num_layers=2)
    head.build((None, 5))
    x = torch.tensor(np.random.default_rng(17).standard_normal((3, 5)).astype("float32"))
    before = to_numpy(head(x))  # the one-call kernel, its variables now kept
    assert len(head.trainable_variables) == 6  # the kept lists add no tracked variable
    head.mlp_layers[0].enable_lora(2)
    head.mlp_layers[0].lora_kernel_b.assign(np.full((2, 8), 0.3, "float32"))
    dense_calls = []
    original = keras.layers.Dense.call
    monkeypatch.setattr(keras.layers.Dense, "call",
                        lambda self, *a, **k: dense_calls.append(1) or original(self, *a, **k))
    with_lora = to_numpy(head(x))
    assert dense_calls  # the Keras layers again
    plain_path()
    np.testing.assert_allclose(with_lora, to_numpy(head(x)), rtol=1e-5, atol=1e-6)
    assert np.abs(with_lora - before).max() > 1e-3
