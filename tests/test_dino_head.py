"""Tests of the DINO head: structure, weight normalization, precision, serialization."""

import math

import keras
import numpy as np
import pytest
from keras import ops

from keras_dinov2.layers.dino_head import DINOHead, WeightNormPrototypes

SMALL = {"num_prototypes": 32, "hidden_dim": 24, "bottleneck_dim": 8}


def _np(x):
    return np.asarray(ops.convert_to_numpy(x), dtype=np.float64)


def _inputs(seed=0, shape=(5, 12)):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _erf_gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def np_head(head, x):
    """The head's forward pass from its variables, written from the formulas."""
    x = np.asarray(x, np.float64)
    for i, layer in enumerate(head.mlp_layers):
        x = x @ _np(layer.kernel) + (_np(layer.bias) if layer.use_bias else 0.0)
        if i < len(head.mlp_layers) - 1:
            x = _erf_gelu(x)
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    v, g = _np(head.last_layer.weight_v), _np(head.last_layer.weight_g)
    return x @ (g * v / np.linalg.norm(v, axis=0))


def _randomize_g(head, seed=1):
    g = np.random.default_rng(seed).uniform(0.5, 2.0, head.num_prototypes).astype(np.float32)
    head.last_layer.weight_g.assign(g)


def test_output_shape_and_forward_matches_numpy():
    head = DINOHead(**SMALL)
    head.build((None, 12))
    x = _inputs()
    _randomize_g(head)
    out = head(x)
    assert tuple(out.shape) == (5, 32)
    np.testing.assert_allclose(_np(out), np_head(head, x), atol=1e-5)
    out3 = head(x.reshape(1, 5, 12))
    assert tuple(out3.shape) == (1, 5, 32)
    assert head.compute_output_shape((None, 7, 12)) == (None, 7, 32)


@pytest.mark.parametrize("num_layers,widths", [(1, [8]), (2, [24, 8]), (4, [24, 24, 24, 8])])
def test_mlp_structure(num_layers, widths):
    head = DINOHead(num_layers=num_layers, **SMALL)
    head.build((None, 12))
    assert [layer.units for layer in head.mlp_layers] == widths
    assert tuple(head.mlp_layers[0].kernel.shape) == (12, widths[0])
    x = _inputs()
    np.testing.assert_allclose(_np(head(x)), np_head(head, x), atol=1e-5)


def test_initialization():
    head = DINOHead(num_prototypes=512, hidden_dim=256, bottleneck_dim=64)
    head.build((None, 256))
    kernel = _np(head.mlp_layers[0].kernel)
    # The reference's trunc_normal_(std=0.02) cuts at +-2 absolute: an untruncated N(0, 0.02).
    assert 0.019 < kernel.std() < 0.021 and np.abs(kernel).max() > 0.05
    for layer in head.mlp_layers:
        assert not np.any(_np(layer.bias))
    np.testing.assert_array_equal(_np(head.last_layer.weight_g), 1.0)
    v = _np(head.last_layer.weight_v)
    assert np.abs(v).max() <= 1.0 / math.sqrt(64) and v.std() > 0.5 / math.sqrt(3 * 64)


def test_weight_norm_effective_kernel_and_scale_invariance():
    layer = WeightNormPrototypes(16)
    layer.build((None, 6))
    g = np.linspace(0.5, 2.0, 16).astype(np.float32)
    layer.weight_g.assign(g)
    v = _np(layer.weight_v)
    expected = g * v / np.linalg.norm(v, axis=0)
    np.testing.assert_allclose(_np(layer.effective_kernel()), expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(_np(layer.effective_kernel()), axis=0), g, rtol=1e-5)
    x = _inputs(shape=(3, 6))
    before = _np(layer(x))
    layer.weight_v.assign(ops.convert_to_tensor(3.7 * v.astype(np.float32)))  # direction unchanged
    np.testing.assert_allclose(_np(layer(x)), before, atol=1e-5)


def test_last_layer_variables_are_identifiable_and_g_trains():
    head = DINOHead(**SMALL)
    head.build((None, 12))
    last = head.last_layer_variables
    paths = [v.path.split("/", 1)[1] for v in last]  # the head's own name gets a unique suffix
    assert paths == ["last_layer/weight_v", "last_layer/weight_g"]
    assert all(v.trainable for v in last)
    others = [v for v in head.trainable_variables if "last_layer" not in v.path]
    assert len(others) == 6 and len(head.trainable_variables) == 8
    # No weight-decay exclusion by name catches g (the reference decays it): no "bias", "norm" or "gamma".
    assert not any(word in last[1].path for word in ("bias", "norm", "gamma"))


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_outputs_float32_logits(policy):
    x = _inputs()
    reference = DINOHead(**SMALL)
    reference.build((None, 12))
    _randomize_g(reference)
    head = DINOHead(dtype=policy, **SMALL)
    head.build((None, 12))
    head.set_weights(reference.get_weights())
    out = head(x)
    assert ops.convert_to_numpy(out).dtype == np.float32
    assert head.mlp_layers[0].compute_dtype == policy.split("_")[1]
    assert head.last_layer.compute_dtype == "float32"
    assert all(v.dtype == "float32" for v in head.weights)
    np.testing.assert_allclose(_np(out), _np(reference(x)), atol=0.05)
    symbolic = head(keras.Input((12,)))
    assert symbolic.dtype == "float32"


def test_get_config_round_trip_and_saving(tmp_path):
    head = DINOHead(num_layers=2, use_bias=False, epsilon=1e-6, name="ibot_head", **SMALL)
    config = head.get_config()
    for key, value in {
        "num_prototypes": 32,
        "hidden_dim": 24,
        "bottleneck_dim": 8,
        "num_layers": 2,
        "use_bias": False,
        "epsilon": 1e-6,
    }.items():
        assert config[key] == value
    clone = DINOHead.from_config(config)
    assert clone.get_config() == config

    inputs = keras.Input((12,))
    model = keras.Model(inputs, head(inputs))
    x = _inputs()
    path = str(tmp_path / "head.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(_np(restored(x)), _np(model(x)), atol=1e-6)
    assert isinstance(restored.get_layer("ibot_head"), DINOHead)


def _torch_mlp(torch, head):
    """The head's MLP as torch modules with its weights (BatchNorm1d after hidden layers with use_bn)."""
    modules = []
    for i, layer in enumerate(head.mlp_layers):
        linear = torch.nn.Linear(layer.kernel.shape[0], layer.units)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(_np(layer.kernel).T))
            linear.bias.copy_(torch.from_numpy(_np(layer.bias)))
        modules.append(linear)
        if i < len(head.mlp_layers) - 1:
            if head.use_bn:
                norm = torch.nn.BatchNorm1d(layer.units)
                with torch.no_grad():
                    norm.weight.copy_(torch.from_numpy(_np(head.bn_scales[i])))
                    norm.bias.copy_(torch.from_numpy(_np(head.bn_offsets[i])))
                modules.append(norm)
            modules.append(torch.nn.GELU())
    return torch.nn.Sequential(*modules).double()


def test_matches_torch_weight_norm_head():
    torch = pytest.importorskip("torch")
    head = DINOHead(**SMALL)
    head.build((None, 12))
    _randomize_g(head)
    mlp = _torch_mlp(torch, head)
    last = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(8, 32, bias=False).double())
    with torch.no_grad():
        last.parametrizations.weight.original0.copy_(
            torch.from_numpy(_np(head.last_layer.weight_g)).reshape(32, 1)
        )
        last.parametrizations.weight.original1.copy_(
            torch.from_numpy(_np(head.last_layer.weight_v).T)
        )
        x = _inputs()
        y = torch.nn.functional.normalize(mlp(torch.from_numpy(x).double()), dim=-1, p=2, eps=1e-12)
        expected = last(y).numpy()
    np.testing.assert_allclose(_np(head(x)), expected, atol=1e-5)


def test_batch_norm_head_matches_torch_batchnorm_in_training_mode():
    # The reference's use_bn: Linear -> BatchNorm1d -> GELU; in training BatchNorm1d normalizes with
    # the batch's mean and biased variance. Rows of weight 0 (padding) stay out of the statistics.
    torch = pytest.importorskip("torch")
    head = DINOHead(**SMALL, use_bn=True)
    head.build((None, 12))
    rng = np.random.default_rng(3)
    for variable in head.bn_scales + head.bn_offsets:
        variable.assign(rng.normal(1.0, 0.3, variable.shape).astype("float32"))
    mlp = _torch_mlp(torch, head).train()
    last = torch.nn.Linear(8, 32, bias=False).double()
    weight = _np(head.last_layer.weight_v)
    weight = weight / np.linalg.norm(weight, axis=0, keepdims=True) * _np(head.last_layer.weight_g)
    with torch.no_grad():
        last.weight.copy_(torch.from_numpy(weight.T))
    x = _inputs(shape=(7, 12))

    def expected(rows):
        with torch.no_grad():
            y = mlp(torch.from_numpy(rows).double())
            return last(torch.nn.functional.normalize(y, dim=-1, eps=1e-12)).numpy()

    np.testing.assert_allclose(_np(head(x)), expected(x), atol=1e-4)
    padded = np.concatenate([x, 100.0 * np.ones((3, 12), "float32")])
    weights = np.array([1.0] * 7 + [0.0] * 3, "float32")
    np.testing.assert_allclose(_np(head(padded, row_weights=weights))[:7], expected(x), atol=1e-4)
    assert {v.name for v in head.weights} >= {"bn_0_norm_scale", "bn_1_norm_offset"}
    assert DINOHead.from_config(head.get_config()).use_bn


def test_invalid_arguments():
    with pytest.raises(ValueError, match="num_layers"):
        DINOHead(num_layers=0)
    with pytest.raises(ValueError, match="num_prototypes"):
        DINOHead(num_prototypes=0)


def test_row_reductions_and_weight_normalized_kernel_match_numpy():
    """The reductions over rows and the weight-normalized kernel that the heads and losses call (on
    JAX's CPU backend loops over the rows with hand-written gradients, elsewhere keras.ops) give
    NumPy's values, and on JAX the gradients of the plain formulas."""
    from keras_dinov2.ops import max_over_rows, sum_over_rows, weight_normalized_kernel

    rng = np.random.default_rng(3)
    x = rng.normal(size=(37, 11)).astype("float32")
    np.testing.assert_allclose(_np(sum_over_rows(x)), x.sum(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_np(max_over_rows(x)), x.max(0))
    v = rng.normal(size=(9, 13)).astype("float32")
    v[:, 4] = 0.0  # an all-zero column: the floor keeps it finite (0)
    g = rng.uniform(0.5, 2.0, size=(13,)).astype("float32")
    expected = v * g / np.sqrt(np.maximum((v.astype(np.float64) ** 2).sum(0), 1e-24))
    np.testing.assert_allclose(_np(weight_normalized_kernel(v, g, 1e-24)), expected, rtol=1e-5, atol=1e-6)
    if keras.backend.backend() != "jax":
        return
    import jax
    import jax.numpy as jnp

    weights = rng.normal(size=v.shape).astype("float32")

    def plain(v, g):
        return v * (g / jnp.sqrt(jnp.maximum(jnp.sum(v * v, axis=0), 1e-24)))

    def loss(kernel):
        return lambda v, g: jnp.sum(jnp.sin(kernel(v, g)) * weights)

    ours = jax.jit(jax.grad(loss(lambda v, g: weight_normalized_kernel(v, g, 1e-24)), (0, 1)))(v, g)
    theirs = jax.grad(loss(plain), (0, 1))(v, g)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    row_weights = rng.normal(size=(11,)).astype("float32")
    grad = jax.jit(jax.grad(lambda x: jnp.sum(jnp.cos(sum_over_rows(x)) * row_weights)))(x)
    np.testing.assert_allclose(
        np.asarray(grad), np.broadcast_to(-np.sin(x.sum(0)) * row_weights, x.shape), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("use_bn", [False, True])
def test_run_heads_calls_a_head_once_over_its_parts_unless_it_has_batch_norm(use_bn, monkeypatch):
    # The reference's one head call on [local CLS; global CLS; masked patches] where ops run eagerly (PyTorch): each
    # part's logits are its rows' (a head without batch norm treats rows alone); with batch norm every part keeps
    # its own call and statistics, and so does every call on a compiling backend.
    from keras_dinov2.ops import eager_dispatch
    from keras_dinov2.pretrainer.heads import run_heads

    head = DINOHead(**SMALL, use_bn=use_bn)
    other = DINOHead(**SMALL, name="other")
    for layer in (head, other):
        layer.build((None, 12))
    _randomize_g(head)
    parts = [_inputs(1, (3, 12)), _inputs(2, (4, 12)), _inputs(3, (6, 12))]
    weights = np.array([1, 1, 1, 1, 0, 0], bool)
    expected = [head(parts[0]), head(parts[1]), other(parts[2]), head(parts[2], row_weights=weights)]
    calls = []
    for layer in (head, other):
        original = layer.call
        monkeypatch.setattr(layer, "call", lambda x, *a, _f=original, **k: calls.append(x.shape[0]) or _f(x, *a, **k))
    got = run_heads([(head, parts[0], None), (head, parts[1], None), (other, parts[2], None),
                     (head, parts[2], weights)])
    assert sorted(calls) == ([6, 13] if eager_dispatch() and not use_bn else [3, 4, 6, 6])
    for a, b in zip(got, expected):
        assert tuple(a.shape) == tuple(b.shape)
        np.testing.assert_allclose(_np(a), _np(b), rtol=1e-5, atol=1e-6)
    if not use_bn:
        np.testing.assert_allclose(_np(got[0]), np_head(head, parts[0]), atol=1e-5)
