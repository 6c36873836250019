"""DINOv2Backbone: token path, masks, registers, stochastic depth, errors, saving, precision."""

import keras
import keras_hub
import numpy as np
import pytest
from conftest import to_numpy
from keras import ops

from keras_dinov2.backbone import ARCHITECTURES, DINOv2Backbone
from keras_dinov2.layers.block import DropPath, TransformerBlock
from keras_dinov2.layers.feedforward import swiglu_hidden_dim

TINY = dict(patch_size=4, hidden_dim=32, num_layers=2, num_heads=2, image_size=16,
            layer_scale_init=0.5)


def _images(batch, height, width, seed=0):
    return np.random.default_rng(seed).random((batch, height, width, 3)).astype("float32")


def _patchify(images, patch):
    b, h, w, c = images.shape
    x = images.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def test_outputs_for_several_sizes_in_one_model():
    backbone = DINOv2Backbone(num_register_tokens=3, **TINY)
    for height, width in [(16, 16), (8, 8), (12, 20)]:
        out = backbone({"images": _images(2, height, width)})
        n = (height // 4) * (width // 4)
        assert tuple(out["cls_token"].shape) == (2, 32)
        assert tuple(out["register_tokens"].shape) == (2, 3, 32)
        assert tuple(out["patch_tokens"].shape) == (2, n, 32)
        assert tuple(out["prenorm"].shape) == (2, 1 + 3 + n, 32)
    # A bare tensor is read as the images.
    bare = backbone(_images(2, 16, 16))
    keyed = backbone({"images": _images(2, 16, 16)})
    np.testing.assert_allclose(to_numpy(bare["cls_token"]), to_numpy(keyed["cls_token"]))


def test_token_path_matches_a_numpy_reimplementation():
    """Patch projection, mask token, CLS, positions, then registers without positions."""
    backbone = DINOv2Backbone(num_register_tokens=2, **TINY)
    emb = backbone.embeddings
    rng = np.random.default_rng(1)
    for variable in (emb.mask_token, emb.cls_token, emb.register_tokens):
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    images = _images(2, 16, 16)
    masks = rng.random((2, 16)) < 0.5
    got = to_numpy(emb(images, ops.convert_to_tensor(masks)))

    kernel = to_numpy(emb.patch_embedding.projection.kernel).reshape(-1, 32)
    bias = to_numpy(emb.patch_embedding.projection.bias)
    patches = _patchify(images, 4) @ kernel + bias
    patches = np.where(masks[..., None], to_numpy(emb.mask_token)[None], patches)
    tokens = np.concatenate([np.broadcast_to(to_numpy(emb.cls_token), (2, 1, 32)), patches], 1)
    tokens = tokens + to_numpy(emb.position_embedding)  # 16 x 16 image: the table as is
    registers = np.broadcast_to(to_numpy(emb.register_tokens), (2, 2, 32))
    expected = np.concatenate([tokens[:, :1], registers, tokens[:, 1:]], axis=1)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_table_is_resampled_for_non_square_images_with_the_same_patch_count():
    emb = DINOv2Backbone(**TINY).embeddings
    table = to_numpy(emb.position_embedding)
    square = to_numpy(emb.interpolated_position_embedding(16, 16))
    np.testing.assert_array_equal(square, table)
    wide = to_numpy(emb.interpolated_position_embedding(8, 32))  # 2 x 8 = 16 patches too
    assert wide.shape == table.shape
    assert np.abs(wide - table).max() > 1e-3


@pytest.mark.parametrize(
    "inputs,match",
    [
        ({"images": np.zeros((1, 18, 16, 3), "float32")}, "multiple of the patch size"),
        ({"images": np.zeros((1, 16, 16, 4), "float32")}, "3"),
        ({"images": np.zeros((2, 16, 16, 3), "float32"), "masks": np.zeros((2, 15), bool)},
         "num_patches"),
        ({"images": np.zeros((2, 16, 16, 3), "float32"), "masks": np.zeros((2, 16), "int32")},
         "boolean"),
    ],
)
def test_bad_inputs_raise_value_errors(inputs, match):
    backbone = DINOv2Backbone(**TINY)
    with pytest.raises(ValueError, match=match):
        backbone(inputs)


def test_bad_constructor_arguments_raise():
    with pytest.raises(ValueError, match="interpolation"):
        DINOv2Backbone(interpolation="bilinear", **TINY)
    with pytest.raises(ValueError, match="num_heads"):
        DINOv2Backbone(**{**TINY, "num_heads": 3})
    with pytest.raises(ValueError, match="ffn_type"):
        DINOv2Backbone(ffn_type="geglu", **TINY)


def test_drop_path_drops_whole_samples_and_rescales():
    layer = DropPath(0.25, seed=3)
    x = np.ones((4000, 2, 3), "float32")
    y = to_numpy(layer(x, training=True))
    per_sample = y.reshape(4000, -1)
    assert set(np.unique(per_sample)) <= {0.0, np.float32(1 / 0.75)}
    assert (per_sample.min(axis=1) == per_sample.max(axis=1)).all()
    assert abs((per_sample[:, 0] > 0).mean() - 0.75) < 0.03
    np.testing.assert_array_equal(to_numpy(layer(x, training=False)), x)


def test_subset_stochastic_depth_updates_only_the_kept_samples():
    block = TransformerBlock(8, 2, drop_path_rate=0.4, seed=1)
    block.build((6, 3, 8))
    x = np.zeros((6, 3, 8), "float32")
    out = to_numpy(block._subset_residual(ops.convert_to_tensor(x), lambda t: t * 0 + 1.0))
    kept = int(6 * (1 - 0.4))
    changed = np.abs(out).reshape(6, -1).max(axis=1) > 0
    assert changed.sum() == kept
    np.testing.assert_allclose(out[changed], 6 / kept, rtol=1e-6)
    # In inference the block is deterministic and uses every sample.
    tokens = _images(6, 3, 8)[..., 0]
    a = to_numpy(block(tokens, training=False))
    np.testing.assert_array_equal(a, to_numpy(block(tokens, training=False)))


def _grad_of(fn, x):
    """d sum(fn(x)) / dx on the current backend, as NumPy."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return np.asarray(jax.grad(lambda t: fn(t).sum())(x))
    if backend == "tensorflow":
        import tensorflow as tf

        t = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(t)
            y = tf.reduce_sum(fn(t))
        return tape.gradient(y, t).numpy()
    import torch

    t = torch.tensor(x, requires_grad=True)
    fn(t).sum().backward()
    return t.grad.numpy()


def test_subset_stochastic_depth_adds_the_branch_to_the_kept_rows_and_passes_the_others():
    # The reference's index_add: kept rows x + scale * branch(x), the others x unchanged, and the gradient
    # 1 + scale * 2 through a kept row (branch 2t), 1 through a dropped one.
    block = TransformerBlock(8, 2, drop_path_rate=0.5, seed=3)
    block.build((8, 3, 8))
    x = np.random.default_rng(0).normal(size=(8, 3, 8)).astype("float32")
    kept, scale = 4, 8 / 4
    out = to_numpy(block._subset_residual(ops.convert_to_tensor(x), lambda t: 2.0 * t))
    changed = np.abs(out - x).reshape(8, -1).max(axis=1) > 0
    assert changed.sum() == kept
    np.testing.assert_allclose(out[changed], x[changed] * (1 + 2 * scale), rtol=1e-6)
    np.testing.assert_array_equal(out[~changed], x[~changed])
    grad = _grad_of(lambda t: block._subset_residual(t, lambda u: 2.0 * u), x)
    rows = grad.reshape(8, -1)
    assert sorted(np.unique(rows.round(5)).tolist()) == [1.0, 1 + 2 * scale]
    assert ((rows == 1 + 2 * scale).all(axis=1)).sum() == kept


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_keeps_the_residual_stream_float32(policy):
    # As under torch.autocast: only attention and the feed-forward layers run in the compute dtype. A branch scaled
    # by a small LayerScale still moves tokens of size ~1 (a bfloat16 sum, 2^-8 apart there, would round it away),
    # and the outputs (the CLS tokens KoLeo reads) are float32.
    keras.config.set_dtype_policy(policy)
    try:
        block = TransformerBlock(16, 4, mlp_ratio=2.0, layer_scale_init=1e-3)
        x = np.random.default_rng(0).uniform(0.5, 1.0, size=(2, 5, 16)).astype("float32")
        out = block(x)
        assert keras.backend.standardize_dtype(out.dtype) == "float32"
        moved = np.abs(to_numpy(out) - x) > 0
        assert moved.mean() > 0.9, moved.mean()
        backbone = DINOv2Backbone(**TINY)
        outputs = backbone({"images": _images(2, 16, 16)})
        assert {keras.backend.standardize_dtype(v.dtype) for v in outputs.values()} == {"float32"}
        assert keras.backend.standardize_dtype(backbone.transformer_blocks[0].attn.qkv.compute_dtype) != "float32"
    finally:
        keras.config.set_dtype_policy("float32")


def test_training_with_drop_path_differs_from_inference():
    backbone = DINOv2Backbone(drop_path_rate=0.5, **TINY)
    x = _images(4, 16, 16)
    train = to_numpy(backbone({"images": x}, training=True)["prenorm"])
    infer = to_numpy(backbone({"images": x}, training=False)["prenorm"])
    assert np.abs(train - infer).max() > 1e-4


def test_intermediate_layers_end_with_the_model_output():
    backbone = DINOv2Backbone(num_register_tokens=1, **TINY)
    x = _images(2, 16, 16)
    out = backbone({"images": x})
    layers = backbone.get_intermediate_layers(x, n=2)
    assert len(layers) == 2
    np.testing.assert_allclose(to_numpy(layers[-1]["patch_tokens"]),
                               to_numpy(out["patch_tokens"]), atol=1e-5)
    np.testing.assert_allclose(to_numpy(layers[-1]["cls_token"]), to_numpy(out["cls_token"]),
                               atol=1e-5)
    raw = backbone.get_intermediate_layers(x, n=1, norm=False)[0]
    np.testing.assert_allclose(to_numpy(raw["cls_token"]), to_numpy(out["prenorm"][:, 0]),
                               atol=1e-5)
    attention = to_numpy(backbone.last_attention_weights(x))
    assert attention.shape == (2, 2, 16)
    assert (attention.sum(-1) <= 1 + 1e-5).all()


def test_position_embedding_init_std():
    # The reference's 0.02 by default; a larger std (the digits recipe) is kept in the config, so
    # a random-init comparison built from the config starts from the same distribution.
    table = lambda b: to_numpy(b.embeddings.position_embedding)  # noqa: E731
    default = DINOv2Backbone(patch_size=4, hidden_dim=64, num_layers=1, num_heads=2, image_size=64)
    assert 0.018 < table(default).std() < 0.022
    wide = DINOv2Backbone(patch_size=4, hidden_dim=64, num_layers=1, num_heads=2, image_size=64,
                          position_embedding_init_std=1.0)
    assert 0.9 < table(wide).std() < 1.1
    clone = DINOv2Backbone.from_config(wide.get_config())
    assert 0.9 < table(clone).std() < 1.1
    with pytest.raises(ValueError, match="position_embedding_init_std"):
        DINOv2Backbone(position_embedding_init_std=0.0, **TINY)


def test_config_round_trip_and_presets(tmp_path):
    backbone = DINOv2Backbone(num_register_tokens=2, ffn_type="swiglu", **TINY)
    x = _images(2, 12, 12)
    expected = to_numpy(backbone({"images": x})["prenorm"])

    clone = DINOv2Backbone.from_config(backbone.get_config())
    clone.set_weights(backbone.get_weights())
    np.testing.assert_allclose(to_numpy(clone({"images": x})["prenorm"]), expected, atol=1e-6)

    preset = str(tmp_path / "preset")
    backbone.save_to_preset(preset)
    for loader in (DINOv2Backbone.from_preset, keras_hub.models.Backbone.from_preset):
        loaded = loader(preset)
        assert isinstance(loaded, DINOv2Backbone)
        np.testing.assert_allclose(to_numpy(loaded({"images": x})["prenorm"]), expected,
                                   atol=1e-6)

    path = str(tmp_path / "model.keras")
    backbone.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(to_numpy(loaded({"images": x})["prenorm"]), expected, atol=1e-6)


def test_architecture_presets_have_the_reference_dimensions():
    dims = {"small14": (384, 12, 6), "base14": (768, 12, 12), "large14": (1024, 24, 16),
            "giant14": (1536, 40, 24)}
    for size, (dim, depth, heads) in dims.items():
        for suffix, registers in (("", 0), ("_reg4", 4)):
            config = ARCHITECTURES[f"dinov2_vit_{size}{suffix}"]["config"]
            assert (config["hidden_dim"], config["num_layers"], config["num_heads"]) == (
                dim, depth, heads)
            assert config["num_register_tokens"] == registers
            assert config["image_size"] // config["patch_size"] == 37
            assert config["ffn_type"] == ("swiglu" if size == "giant14" else "mlp")
            assert config["interpolation"] == ("registers" if registers else "original")
    assert swiglu_hidden_dim(1536, 4.0) == 4096
    small = DINOv2Backbone.from_preset("dinov2_vit_small14", load_weights=False)
    # 22.06 M parameters, as the released ViT-S/14 (37 x 37 position grid).
    assert small.count_params() == 22_056_576
    tiny = DINOv2Backbone.from_preset("dinov2_vit_tiny4", load_weights=False,
                                      drop_path_rate=0.1)
    assert tiny.drop_path_rate == 0.1
    with pytest.raises(ValueError, match="no released weights"):
        DINOv2Backbone.from_preset("dinov2_vit_tiny4")


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision(policy):
    reference = DINOv2Backbone(**TINY)
    x = _images(2, 12, 12)
    expected = to_numpy(reference({"images": x})["cls_token"])
    backbone = DINOv2Backbone(dtype=policy, **TINY)
    backbone.set_weights(reference.get_weights())
    out = backbone({"images": x})
    # The residual stream and so the outputs stay float32 (as under torch.autocast); attention runs in the policy's.
    assert keras.backend.standardize_dtype(out["cls_token"].dtype) == "float32"
    assert backbone.transformer_blocks[0].attn.compute_dtype == policy.split("_")[1]
    # Variables stay float32; position interpolation runs in float32.
    assert backbone.embeddings.position_embedding.dtype == "float32"
    assert "float32" in str(backbone.embeddings.interpolated_position_embedding(12, 12).dtype)
    got = to_numpy(ops.cast(out["cls_token"], "float32"))
    np.testing.assert_allclose(got, expected, atol=0.1)


def test_from_preset_names_the_broken_file(tmp_path):
    import pytest

    backbone = DINOv2Backbone.from_preset("dinov2_vit_tiny4", load_weights=False)
    folder = tmp_path / "preset"
    backbone.save_to_preset(str(folder))
    (folder / "model.weights.h5").unlink()
    with pytest.raises(ValueError, match="model.weights.h5"):
        DINOv2Backbone.from_preset(str(folder))
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        DINOv2Backbone.from_preset(str(folder))


def test_gradient_boundary_is_the_identity_with_the_same_gradient():
    """Each block passes its residual stream through `gradient_boundary` (a fusion
    boundary for the backward pass on JAX's CPU backend): values are exact, gradients what they
    are without it (to float32 rounding: XLA fuses the arithmetic around it differently), NaN
    included."""
    from keras_dinov2.ops import gradient_boundary

    x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype("float32")
    np.testing.assert_array_equal(ops.convert_to_numpy(gradient_boundary(x)), x)
    symbolic = keras.KerasTensor((None, 5, 8))
    assert gradient_boundary(symbolic) is symbolic
    if keras.backend.backend() != "jax":
        return
    import jax
    import jax.numpy as jnp

    def loss(v, boundary):
        y = jnp.tanh(v) * 3.0
        for _ in range(4):  # a residual chain, as in the backbone
            y = (boundary(y) if boundary else y) + jnp.sin(y) * 0.5
        return jnp.sum(y**2)

    with_boundary = jax.jit(jax.grad(lambda v: loss(v, gradient_boundary)))(x)
    without = jax.jit(jax.grad(lambda v: loss(v, None)))(x)
    np.testing.assert_allclose(np.asarray(with_boundary), np.asarray(without), rtol=1e-6, atol=1e-6)
    poisoned = x.copy()
    poisoned[0, 0, 0] = np.nan
    grad = jax.grad(lambda v: jnp.sum(gradient_boundary(v) * v))(jnp.asarray(poisoned))
    assert np.isnan(np.asarray(grad)[0, 0, 0]) and np.isfinite(np.asarray(grad)[1]).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gelu_values_and_gradient_match_the_erf_formula(dtype):
    """`ops.gelu` is the exact GELU; its gradient (on JAX and TensorFlow a rule from x alone, PyTorch's) is the
    formula's derivative."""
    import math

    from keras_dinov2.ops import gelu

    x = np.linspace(-6.0, 6.0, 97).astype("float32")
    erf = np.vectorize(math.erf)
    cdf = 0.5 * (1.0 + erf(x.astype(np.float64) / math.sqrt(2.0)))
    got = to_numpy(ops.cast(gelu(ops.cast(x, dtype)), "float32"))
    tolerance = 1e-6 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(got, x * cdf, rtol=tolerance, atol=tolerance)
    backend = keras.backend.backend()
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        grad = jax.jit(jax.grad(lambda v: jnp.sum(gelu(v).astype(jnp.float32) * 2.0)))(jnp.asarray(x, dtype))
    elif backend == "tensorflow":
        import tensorflow as tf

        v = tf.cast(tf.constant(x), dtype)
        with tf.GradientTape() as tape:
            tape.watch(v)
            total = tf.reduce_sum(tf.cast(gelu(v), tf.float32) * 2.0)
        grad = tape.gradient(total, v)
    else:
        import torch

        v = torch.tensor(x).to(getattr(torch, dtype)).requires_grad_()
        (gelu(v).float() * 2.0).sum().backward()
        grad = v.grad
    assert keras.backend.standardize_dtype(grad.dtype) == dtype
    expected = 2.0 * (cdf + x * np.exp(-0.5 * x.astype(np.float64) ** 2) / math.sqrt(2.0 * math.pi))
    np.testing.assert_allclose(to_numpy(ops.cast(grad, "float32")), expected, rtol=tolerance, atol=tolerance)


def numpy_attention(q, k, v, scale):
    """softmax(q k^T * scale) v per head, (batch, tokens, heads, dim), in float64."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def test_attention_dispatch_matches_numpy():
    """The attention the blocks call (on JAX's CPU backend a hand-laid-out formulation with its own
    gradient, on TensorFlow's CPU one that scales q, elsewhere keras.ops.dot_product_attention)
    computes softmax attention, and its gradients are those of the Keras op."""
    from keras_dinov2.ops import dot_product_attention

    rng = np.random.default_rng(1)
    q, k, v = (rng.normal(size=(2, 7, 3, 4)).astype("float32") * 2 for _ in range(3))
    out = ops.convert_to_numpy(dot_product_attention(q, k, v, scale=0.3))
    np.testing.assert_allclose(out, numpy_attention(q, k, v, 0.3), rtol=1e-5, atol=1e-5)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        from keras_dinov2.ops.tensorflow import cpu_dot_product_attention

        if not (tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU")):
            np.testing.assert_array_equal(
                out, cpu_dot_product_attention(q, k, v, 0.3).numpy())
        weights = rng.normal(size=q.shape).astype("float32")
        grads = []
        for attention in (cpu_dot_product_attention,
                          lambda q, k, v, s: ops.dot_product_attention(q, k, v, scale=s)):
            inputs = [tf.constant(t) for t in (q, k, v)]
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                loss = tf.reduce_sum(tf.sin(attention(*inputs, 0.3)) * weights)
            grads.append(tape.gradient(loss, inputs))
        for a, b in zip(*grads):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)
    if keras.backend.backend() != "jax":
        return
    import jax
    import jax.numpy as jnp

    from keras_dinov2.ops.jax import cpu_dot_product_attention

    weights = rng.normal(size=q.shape).astype("float32")

    def loss(attention):
        return lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v)) * weights)

    ours = jax.jit(
        jax.grad(loss(lambda q, k, v: cpu_dot_product_attention(q, k, v, 0.5)), (0, 1, 2))
    )
    theirs = jax.grad(
        loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=0.5)), (0, 1, 2)
    )
    for a, b in zip(ours(q, k, v), theirs(q, k, v)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(cpu_dot_product_attention(q, k, v, 0.5)),
        numpy_attention(q, k, v, 0.5),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the boundary acts on JAX only")
def test_backbone_gradients_do_not_depend_on_the_residual_boundary(monkeypatch):
    """The tiny backbone's parameter gradients with and without the boundary agree to rounding
    (XLA orders the float32 sums differently around the loop: differences up to ~2e-6 seen)."""
    import jax

    from keras_dinov2.layers import block as block_module

    backbone = DINOv2Backbone.from_preset("dinov2_vit_tiny4", load_weights=False, image_size=16)
    images = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype("float32")
    trainable = [v.value for v in backbone.trainable_variables]
    non_trainable = [v.value for v in backbone.non_trainable_variables]

    def grads():
        def loss(values):
            out, _ = backbone.stateless_call(values, non_trainable, {"images": images})
            return jax.numpy.sum(out["cls_token"] ** 2) + jax.numpy.mean(out["patch_tokens"])

        return jax.jit(jax.grad(loss))(trainable)

    with_boundary = grads()
    monkeypatch.setattr(block_module, "gradient_boundary", lambda x: x)
    without = grads()
    for a, b in zip(with_boundary, without):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_call_runs_the_layers_as_the_functional_graph_does():
    # `call` runs embeddings, blocks and norm directly (no graph walk): the Functional graph's outputs, with masks,
    # in training, and for integer images (converted to the input's float32 as Functional converts them).
    from keras.src.models.functional import Functional

    backbone = DINOv2Backbone(num_register_tokens=2, drop_path_rate=0.0, **TINY)
    rng = np.random.default_rng(3)
    images = (rng.random((2, 16, 12, 3)) * 255).astype("uint8")
    masks = ops.convert_to_tensor(rng.random((2, 12)) < 0.5)
    for inputs in ({"images": ops.convert_to_tensor(images), "masks": masks}, {"images": images.astype("float32")}):
        direct = backbone(inputs, training=True)
        graph = Functional.call(backbone, {"masks": None, **inputs}, training=True)
        assert set(direct) == set(graph)
        for key in graph:
            assert keras.backend.standardize_dtype(direct[key].dtype) == "float32"
            np.testing.assert_allclose(to_numpy(direct[key]), to_numpy(graph[key]), rtol=1e-6, atol=1e-6)
