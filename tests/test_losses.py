"""Tests of keras_dinov2.losses against independent NumPy versions of the reference's formulas."""

import keras
import numpy as np
import pytest
from distributed_helpers import FakeCluster
from keras import ops

from keras_dinov2 import losses

ATOL = 1e-5


def _np(x):
    return np.asarray(ops.convert_to_numpy(x), dtype=np.float64)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# --- Independent NumPy versions, written from the formulas (float64) -------------------------------------


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_softmax(x):
    return np.exp(np_log_softmax(x))


def np_sinkhorn(logits, temperature, iterations=3):
    """The reference's linear-domain iteration on Q = exp(t / T)^T (K x B), literally."""
    q = np.exp(np.asarray(logits, np.float64) / temperature).T
    k, b = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(axis=1, keepdims=True) / k
        q = q / q.sum(axis=0, keepdims=True) / b
    return (q * b).T


def np_dino_ce(student, teacher, temperature=0.1):
    return -np.mean(np.sum(teacher * np_log_softmax(student / temperature), axis=-1))


def np_ibot_ce(student, teacher, weights, num_images, temperature=0.1):
    ce = np.sum(teacher * np_log_softmax(student / temperature), axis=-1)
    return -np.sum(ce * weights) / num_images


def np_koleo(x, eps=1e-8):
    x = np.asarray(x, np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)
    dots = x @ x.T
    np.fill_diagonal(dots, -1.0)
    nn = dots.argmax(axis=1)
    d = np.linalg.norm(x - x[nn] + eps, axis=-1)
    return -np.mean(np.log(d + eps))


def np_dinov2(
    s_global, t_global, s_local, s_patch, t_patch, weights, cls, n_local, temperature=0.1
):
    """The meta-architecture's bookkeeping written as explicit loops over crop pairs."""
    b = s_global.shape[0] // 2
    sg, tg = (
        [s_global[i * b : (i + 1) * b] for i in range(2)],
        [t_global[i * b : (i + 1) * b] for i in range(2)],
    )
    terms = max(2 * n_local, 1) + 2
    local = sum(
        np_dino_ce(s_local[i * b : (i + 1) * b], tg[v], temperature)
        for i in range(n_local)
        for v in range(2)
    )
    glob = np_dino_ce(sg[0], tg[1], temperature) + np_dino_ce(sg[1], tg[0], temperature)
    ibot = np_ibot_ce(s_patch, t_patch, weights, 2 * b, temperature)
    kol = np_koleo(cls[:b]) + np_koleo(cls[b:])
    return {
        "dino_local": local / terms,
        "dino_global": glob / terms,
        "ibot": ibot,
        "koleo": kol,
        "total": (local + glob) / terms + ibot + 0.1 * kol,
    }


# --- Backend helpers (backend-specific code stays inside the tests) --------------------------------------


def _gradients(fn, *arrays):
    """Gradients of the scalar fn(*tensors) with respect to each input; None where no gradient flows."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        grad_fn = jax.jit(jax.grad(fn, argnums=tuple(range(len(arrays)))))
        grads = grad_fn(*[jnp.asarray(a) for a in arrays])
        return [np.asarray(g) for g in grads]
    if backend == "tensorflow":
        import tensorflow as tf

        tensors = [tf.constant(a) for a in arrays]
        with tf.GradientTape() as tape:
            for t in tensors:
                tape.watch(t)
            value = fn(*tensors)
        return [None if g is None else g.numpy() for g in tape.gradient(value, tensors)]
    if backend == "torch":
        import torch

        tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
        fn(*tensors).backward()
        return [None if t.grad is None else t.grad.numpy() for t in tensors]
    pytest.skip(f"no gradient helper for backend {backend}")


def _no_gradient(g):
    return g is None or not np.any(g)


# --- Centering ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("center_shape", [(1, 7), (1, 1, 7)])
def test_softmax_center_matches_numpy(center_shape):
    rng = _rng(1)
    t, c = _randn(rng, 5, 7), _randn(rng, *center_shape)
    out = losses.softmax_center(t, c, 0.07)
    assert tuple(out.shape) == (5, 7) and ops.convert_to_numpy(out).dtype == np.float32
    np.testing.assert_allclose(_np(out), np_softmax((t - c.reshape(-1)) / 0.07), atol=ATOL)


def test_update_center_matches_numpy_dino_and_ibot():
    rng = _rng(2)
    center, t = _randn(rng, 1, 6), _randn(rng, 8, 6)
    out = losses.update_center(center, t, momentum=0.9)
    assert tuple(out.shape) == (1, 6)
    np.testing.assert_allclose(_np(out), 0.9 * center + 0.1 * t.mean(0, keepdims=True), atol=ATOL)

    # iBOT: (1, 1, K) center, padded masked-patch buffer, plain mean over the real patches.
    center3 = _randn(rng, 1, 1, 6)
    valid = np.array([1, 1, 1, 1, 1, 0, 0, 0], bool)
    t_padded = t.copy()
    t_padded[~valid] = 1e30
    out = losses.update_center(center3, t_padded, momentum=0.8, valid=valid)
    assert tuple(out.shape) == (1, 1, 6)
    expected = 0.8 * center3 + 0.2 * t[valid].mean(0)
    np.testing.assert_allclose(_np(out), expected, atol=ATOL)


def test_staged_center_update_order():
    """Center with the old value, then fold this step's mean in: the reference's staged update."""
    rng = _rng(3)
    center = np.zeros((1, 4), np.float32)
    steps = [_randn(rng, 3, 4) for _ in range(3)]
    expected_center = np.zeros((1, 4))
    for t in steps:
        probs = losses.softmax_center(t, center, 0.05)
        np.testing.assert_allclose(_np(probs), np_softmax((t - expected_center) / 0.05), atol=ATOL)
        center = ops.convert_to_numpy(losses.update_center(center, t))
        expected_center = 0.9 * expected_center + 0.1 * t.mean(0, keepdims=True)
    np.testing.assert_allclose(center, expected_center, atol=ATOL)


# --- Sinkhorn-Knopp ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature,iterations", [(0.1, 3), (0.05, 1), (0.2, 5)])
def test_sinkhorn_matches_numpy(temperature, iterations):
    rng = _rng(4)
    t = _randn(rng, 12, 9)
    out = losses.sinkhorn_knopp(t, temperature, num_iterations=iterations)
    assert ops.convert_to_numpy(out).dtype == np.float32
    np.testing.assert_allclose(_np(out), np_sinkhorn(t, temperature, iterations), atol=ATOL)


def test_sinkhorn_matches_torch_reference_formula():
    torch = pytest.importorskip("torch")
    rng = _rng(5)
    t = _randn(rng, 10, 16)
    q = torch.exp(torch.from_numpy(t) / 0.07).t()
    k, b = q.shape
    q /= q.sum()
    for _ in range(3):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    q = (q * b).t().numpy()
    np.testing.assert_allclose(_np(losses.sinkhorn_knopp(t, 0.07)), q, atol=ATOL)


def test_sinkhorn_marginals():
    """After the final sample step rows sum to 1 exactly; prototype marginals only approach B / K."""
    rng = _rng(6)
    b, k = 32, 8
    t, temperature = _randn(rng, b, k), 0.5

    def prototype_error(probs):
        return np.abs(_np(probs).sum(0) * k / b - 1.0).max()

    out = losses.sinkhorn_knopp(t, temperature)
    np.testing.assert_allclose(_np(out).sum(-1), 1.0, atol=ATOL)
    np.testing.assert_allclose(_np(out).sum(), b, rtol=ATOL)
    error_3 = prototype_error(out)
    assert error_3 > 1e-3  # not exact after 3 iterations...
    error_1 = prototype_error(losses.sinkhorn_knopp(t, temperature, num_iterations=1))
    error_0 = prototype_error(losses.softmax_center(t, np.zeros((1, k)), temperature))
    assert error_3 < error_1 < error_0
    # ...only in the limit, which it approaches geometrically (1e-8 after 20 iterations in float64).
    assert prototype_error(losses.sinkhorn_knopp(t, temperature, num_iterations=20)) < 1e-4


def test_sinkhorn_global_shift_invariant_per_row_shift_not():
    rng = _rng(7)
    t = _randn(rng, 6, 5)
    base = _np(losses.sinkhorn_knopp(t, 0.1))
    np.testing.assert_allclose(_np(losses.sinkhorn_knopp(t + 3.0, 0.1)), base, atol=ATOL)
    t64 = t.astype(np.float64)
    np.testing.assert_allclose(np_sinkhorn(t64 - t64.max(), 0.1), np_sinkhorn(t64, 0.1), atol=1e-9)
    per_row = np_sinkhorn(t64 - t64.max(axis=1, keepdims=True), 0.1)
    assert np.abs(per_row - np_sinkhorn(t64, 0.1)).max() > 1e-3


def test_sinkhorn_confident_logits_stay_finite():
    rng = _rng(8)
    for t in (100.0 + _randn(rng, 16, 32), _randn(rng, 16, 32, scale=100.0)):
        out = _np(losses.sinkhorn_knopp(t, 0.01))
        assert np.all(np.isfinite(out))
        np.testing.assert_allclose(out.sum(-1), 1.0, atol=ATOL)
        assert out.min() >= 0.0


def test_sinkhorn_padding_rows_take_no_part():
    rng = _rng(9)
    t = _randn(rng, 7, 6)
    expected = np_sinkhorn(t, 0.1)
    padded = np.concatenate([t, np.full((3, 6), 1e4, np.float32)], axis=0)
    padded[-1, 0] = np.nan
    valid = np.arange(10) < 7
    for kwargs in ({"valid": valid}, {"valid": valid.astype(np.float32)}, {"n_valid": 7}):
        out = _np(losses.sinkhorn_knopp(padded, 0.1, **kwargs))
        np.testing.assert_allclose(out[:7], expected, atol=ATOL)
        np.testing.assert_array_equal(out[7:], 0.0)
    empty = _np(losses.sinkhorn_knopp(padded, 0.1, n_valid=0))
    np.testing.assert_array_equal(empty, 0.0)


def test_sinkhorn_over_two_replicas_equals_concatenated_batch():
    rng = _rng(10)
    t = _randn(rng, 12, 8)
    cluster = FakeCluster(2)
    shards = cluster.run(
        lambda r, x: losses.sinkhorn_knopp(x, 0.07, reduction=r), [(t[:6],), (t[6:],)]
    )
    np.testing.assert_allclose(np.concatenate(shards), np_sinkhorn(t, 0.07), atol=ATOL)

    # iBOT: each replica pads its masked-patch buffer; 4 and 2 real rows of 6.
    real = [t[:4], t[4:6]]
    buffers = [np.concatenate([r, np.full((6 - len(r), 8), 50.0, np.float32)]) for r in real]
    shards = cluster.run(
        lambda r, x, n: losses.sinkhorn_knopp(x, 0.07, n_valid=n, reduction=r),
        [(buffers[0], 4), (buffers[1], 2)],
    )
    expected = np_sinkhorn(t[:6], 0.07)
    np.testing.assert_allclose(shards[0][:4], expected[:4], atol=ATOL)
    np.testing.assert_allclose(shards[1][:2], expected[4:], atol=ATOL)
    assert not shards[0][4:].any() and not shards[1][2:].any()


def test_update_center_over_two_replicas():
    rng = _rng(11)
    center, t = _randn(rng, 1, 5), _randn(rng, 8, 5)
    cluster = FakeCluster(2)
    out = cluster.run(
        lambda r, x: losses.update_center(center, x, reduction=r), [(t[:4],), (t[4:],)]
    )
    for o in out:  # equal shards: the global-batch mean, on every replica
        np.testing.assert_allclose(o, 0.9 * center + 0.1 * t.mean(0, keepdims=True), atol=ATOL)
    # Unequal valid counts: the mean over the global batch's valid rows (not the mean of the
    # replicas' means), on every replica.
    valid = [np.array([1, 1, 1, 0], bool), np.array([1, 0, 0, 0], bool)]
    out = cluster.run(
        lambda r, x, v: losses.update_center(center, x, valid=v, reduction=r),
        [(t[:4], valid[0]), (t[4:], valid[1])],
    )
    mean = np.concatenate([t[:3], t[4:5]]).mean(0)
    assert np.abs(mean - (t[:3].mean(0) + t[4:5].mean(0)) / 2).max() > 1e-2
    for o in out:
        np.testing.assert_allclose(o, 0.9 * center + 0.1 * mean, atol=ATOL)


def test_cross_replica_defaults_to_identity():
    r = losses.CrossReplica()
    x = ops.convert_to_tensor(np.arange(3, dtype=np.float32))
    for fn in (r.sum, r.max, r.mean, r.all_gather):
        np.testing.assert_array_equal(_np(fn(x)), [0, 1, 2])
    with pytest.raises(ValueError, match="num_replicas"):
        losses.CrossReplica(num_replicas=0)


# --- Cross-entropies ---------------------------------------------------------------------------------------


def test_dino_cross_entropy_matches_numpy():
    rng = _rng(12)
    s, t = _randn(rng, 6, 10), np_softmax(_randn(rng, 6, 10) / 0.04).astype(np.float32)
    for temperature in (0.1, 0.2):
        out = losses.dino_cross_entropy(s, t, temperature)
        assert tuple(out.shape) == ()
        np.testing.assert_allclose(_np(out), np_dino_ce(s, t, temperature), atol=ATOL)


def test_ibot_cross_entropy_matches_numpy():
    rng = _rng(13)
    # 4 images: masks of 3, 1, 0 and 2 patches -> 6 real rows, padded to 8.
    counts = [3, 1, 0, 2]
    weights = np.concatenate([np.full(c, 1.0 / c) for c in counts if c] + [np.zeros(2)]).astype(
        np.float32
    )
    s, t = _randn(rng, 8, 5), np_softmax(_randn(rng, 8, 5)).astype(np.float32)
    s[-1] = np.nan  # padding rows must not leak in
    out = losses.ibot_cross_entropy(s, t, weights, num_images=4)
    expected = np_ibot_ce(s[:6], t[:6], weights[:6], 4)
    np.testing.assert_allclose(_np(out), expected, atol=ATOL)


def test_koleo_matches_numpy_and_torch():
    rng = _rng(14)
    x = _randn(rng, 9, 6)
    np.testing.assert_allclose(_np(losses.koleo(x)), np_koleo(x), atol=ATOL)
    torch = pytest.importorskip("torch")
    tx = torch.nn.functional.normalize(torch.from_numpy(x), p=2, dim=-1, eps=1e-8)
    dots = tx @ tx.t()
    dots.fill_diagonal_(-1)
    dist = torch.nn.PairwiseDistance(2, eps=1e-8)(tx, tx[dots.argmax(1)])
    np.testing.assert_allclose(
        _np(losses.koleo(x)), float(-torch.log(dist + 1e-8).mean()), atol=ATOL
    )


def test_koleo_degenerate_batches_are_finite():
    assert float(_np(losses.koleo(np.ones((1, 4), np.float32)))) == 0.0  # no neighbour: the guard
    same = np.tile(np.array([[0.3, -1.0, 2.0]], np.float32), (4, 1))
    value = float(_np(losses.koleo(same)))
    assert np.isfinite(value)
    np.testing.assert_allclose(value, np_koleo(same), rtol=1e-4)
    zeros = np.zeros((3, 4), np.float32)
    assert np.isfinite(_np(losses.koleo(zeros)))
    for x in (same, zeros):
        (grad,) = _gradients(losses.koleo, x)
        assert np.all(np.isfinite(grad))
    # An exactly antipodal pair: each row's neighbour is the other one (distance 2).
    pair = np.array([[1.0, 0.0], [-1.0, 0.0]], np.float32)
    np.testing.assert_allclose(_np(losses.koleo(pair)), -np.log(2.0), atol=1e-6)


def test_mixed_precision_inputs_compute_in_float32():
    rng = _rng(15)
    s, t = _randn(rng, 4, 8), np_softmax(_randn(rng, 4, 8)).astype(np.float32)
    for dtype in ("bfloat16", "float16"):
        sd, td = ops.cast(s, dtype), ops.cast(t, dtype)
        for out in (
            losses.dino_cross_entropy(sd, td),
            losses.sinkhorn_knopp(sd, 0.04),
            losses.softmax_center(sd, ops.zeros((1, 8), dtype), 0.04),
            losses.koleo(sd),
            losses.update_center(ops.zeros((1, 8)), sd),
        ):
            assert ops.convert_to_numpy(out).dtype == np.float32
        s_round, t_round = _np(ops.cast(sd, "float32")), _np(ops.cast(td, "float32"))
        np.testing.assert_allclose(
            _np(losses.dino_cross_entropy(sd, td)), np_dino_ce(s_round, t_round), atol=1e-4
        )


def test_mismatched_shapes_raise_value_error_naming_both():
    z = np.zeros
    with pytest.raises(ValueError, match=r"\(4, 8\).*\(4, 9\)"):
        losses.dino_cross_entropy(z((4, 8)), z((4, 9)))
    with pytest.raises(ValueError, match=r"masks_weight.shape=\(5,\).*\(6, 8\)"):
        losses.ibot_cross_entropy(z((6, 8)), z((6, 8)), z(5), 2)
    with pytest.raises(ValueError, match=r"center.shape=\(1, 7\).*\(4, 8\)"):
        losses.softmax_center(z((4, 8)), z((1, 7)), 0.1)
    with pytest.raises(ValueError, match=r"center.shape=\(1, 1, 7\).*\(4, 8\)"):
        losses.update_center(z((1, 1, 7)), z((4, 8)))
    with pytest.raises(ValueError, match=r"valid.shape=\(3,\).*\(4, 8\)"):
        losses.sinkhorn_knopp(z((4, 8)), 0.1, valid=z(3, bool))
    with pytest.raises(ValueError, match="num_iterations"):
        losses.sinkhorn_knopp(z((4, 8)), 0.1, num_iterations=0)
    with pytest.raises(ValueError, match=r"\(4, 9\).*\(4, 8\)"):
        losses.dinov2_loss(z((4, 8)), z((4, 8)), student_local_logits=z((4, 9)))
    with pytest.raises(ValueError, match=r"\(5, 8\).*\(4, 8\)"):
        losses.dinov2_loss(z((4, 8)), z((4, 8)), student_local_logits=z((6, 8))[:5])
    with pytest.raises(ValueError, match=r"student_global_cls.shape=\(6, 3\)"):
        losses.dinov2_loss(z((4, 8)), z((4, 8)), student_global_cls=z((6, 3)))


# --- The combined objective --------------------------------------------------------------------------------


def test_dinov2_loss_hand_checked_pairs():
    """B = 1, K = 2, T = 1: every pair's cross-entropy is -log of one probability."""
    log = np.log
    # Teacher global view 0 is prototype 0, view 1 is prototype 1.
    teacher = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    student_global = log(np.array([[0.75, 0.25], [0.5, 0.5]], np.float32))
    student_local = log(np.array([[0.2, 0.8], [0.9, 0.1]], np.float32))
    out = losses.dinov2_loss(student_global, teacher, student_local, student_temperature=1.0)
    terms = 2 * 2 + 2
    # Swapped: student view 0 against teacher view 1 (p=0.25), view 1 against view 0 (p=0.5).
    np.testing.assert_allclose(_np(out["dino_global"]), -(log(0.25) + log(0.5)) / terms, atol=ATOL)
    # Each local crop against both teacher views.
    np.testing.assert_allclose(
        _np(out["dino_local"]), -(log(0.2) + log(0.8) + log(0.9) + log(0.1)) / terms, atol=ATOL
    )
    np.testing.assert_allclose(
        _np(out["total"]), -log(0.25 * 0.5 * 0.2 * 0.8 * 0.9 * 0.1) / terms, atol=ATOL
    )
    assert float(_np(out["ibot"])) == 0.0 and float(_np(out["koleo"])) == 0.0

    # iBOT: image 0 has 2 masked patches, image 1 none, one padding row; KoLeo on two 2-row chunks.
    s_patch = log(np.array([[0.5, 0.5], [0.25, 0.75], [0.3, 0.7]], np.float32))
    t_patch = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], np.float32)
    weights = np.array([0.5, 0.5, 0.0], np.float32)
    cls = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0], [1.0, 1.0]], np.float32)
    out = losses.dinov2_loss(
        np.zeros((4, 2), np.float32),
        np.full((4, 2), 0.5, np.float32),
        None,
        s_patch,
        t_patch,
        weights,
        cls,
        num_images=2,
        student_temperature=1.0,
    )
    np.testing.assert_allclose(_np(out["ibot"]), -(0.5 * log(0.5) + 0.5 * log(0.75)) / 2, atol=ATOL)
    d1 = np.sqrt(2.0)  # (1, 0) and (0, 1)
    d2 = np.sqrt(2.0 - np.sqrt(2.0))  # (1, 0) and (1, 1) / sqrt(2)
    np.testing.assert_allclose(_np(out["koleo"]), -log(d1) - log(d2), atol=1e-5)
    # No local crops: the reference divides by max(0, 1) + 2 = 3.
    np.testing.assert_allclose(_np(out["dino_global"]), 2 * log(2.0) / 3, atol=ATOL)
    np.testing.assert_allclose(
        _np(out["total"]), 2 * log(2.0) / 3 + _np(out["ibot"]) + 0.1 * _np(out["koleo"]), atol=ATOL
    )


def test_dinov2_loss_matches_numpy_pair_loops():
    rng = _rng(16)
    b, k, n_local, m = 3, 7, 4, 5
    s_global, s_local = _randn(rng, 2 * b, k), _randn(rng, n_local * b, k)
    t_global = np_softmax(_randn(rng, 2 * b, k) / 0.5).astype(np.float32)
    s_patch, t_patch = _randn(rng, m, k), np_softmax(_randn(rng, m, k)).astype(np.float32)
    weights = np.array([0.5, 0.5, 1.0, 1 / 3, 0.0], np.float32)
    cls = _randn(rng, 2 * b, 4)
    out = losses.dinov2_loss(s_global, t_global, s_local, s_patch, t_patch, weights, cls)
    expected = np_dinov2(s_global, t_global, s_local, s_patch, t_patch, weights, cls, n_local)
    assert set(out) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(_np(out[name]), value, atol=ATOL, err_msg=name)
    weighted = losses.dinov2_loss(
        s_global,
        t_global,
        s_local,
        s_patch,
        t_patch,
        weights,
        cls,
        dino_weight=0.5,
        ibot_weight=2.0,
        koleo_weight=0.0,
    )
    np.testing.assert_allclose(
        _np(weighted["total"]),
        0.5 * (expected["dino_local"] + expected["dino_global"]) + 2.0 * expected["ibot"],
        atol=ATOL,
    )


def test_dinov2_loss_gradient_reaches_student_only():
    rng = _rng(17)
    b, k, n_local, m = 2, 6, 2, 3
    inputs = [
        _randn(rng, 2 * b, k),  # student global logits
        _randn(rng, 2 * b, k),  # teacher global logits
        _randn(rng, n_local * b, k),  # student local logits
        _randn(rng, m, k),  # student patch logits
        _randn(rng, m, k),  # teacher patch logits
        _randn(rng, 2 * b, 5),  # student backbone CLS
    ]
    weights = np.array([0.5, 0.5, 1.0], np.float32)

    def objective(s_global, t_global, s_local, s_patch, t_patch, cls):
        teacher_global = losses.sinkhorn_knopp(t_global, 0.05)
        teacher_patch = losses.softmax_center(t_patch, ops.zeros((1, 1, k)), 0.05)
        return losses.dinov2_loss(
            s_global, teacher_global, s_local, s_patch, teacher_patch, weights, cls
        )["total"]

    grads = _gradients(objective, *inputs)
    for index in (0, 2, 3, 5):
        assert grads[index] is not None and np.all(np.isfinite(grads[index]))
        assert np.abs(grads[index]).max() > 0, index
    for index in (1, 4):
        assert _no_gradient(grads[index]), index


def test_objectives_compile_with_static_and_dynamic_shapes():
    """The pieces a train step uses, under jax.jit / tf.function (dynamic batch and XLA)."""
    rng = _rng(18)
    k = 6
    args = (
        _randn(rng, 4, k),
        _randn(rng, 4, k),
        _randn(rng, 6, k),
        _randn(rng, 5, k),
        _randn(rng, 5, k),
        np.array([0.5, 0.5, 1.0, 0.0, 0.0], np.float32),
        _randn(rng, 4, 3),
    )

    def step(s_global, t_global, s_local, s_patch, t_patch, weights, cls):
        valid = ops.greater(weights, 0.0)
        parts = losses.dinov2_loss(
            s_global,
            losses.sinkhorn_knopp(t_global, 0.05),
            s_local,
            s_patch,
            losses.sinkhorn_knopp(t_patch, 0.05, valid=valid),
            weights,
            cls,
            n_local_crops=3,
        )
        return parts["total"], losses.update_center(ops.zeros((1, 1, k)), t_patch, valid=valid)

    expected = [_np(x) for x in step(*args)]
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        compiled = [jax.jit(step)]
    elif backend == "tensorflow":
        import tensorflow as tf

        dynamic = [tf.TensorSpec((None,) + a.shape[1:], tf.float32) for a in args]
        compiled = [tf.function(step, input_signature=dynamic), tf.function(step, jit_compile=True)]
        koleo = tf.function(losses.koleo, input_signature=[tf.TensorSpec((None, 3), tf.float32)])
        assert float(koleo(args[-1][:1])) == 0.0  # the run-time guard
        np.testing.assert_allclose(_np(koleo(args[-1])), np_koleo(args[-1]), atol=ATOL)
    else:
        pytest.skip("torch runs the train step eagerly")
    for fn in compiled:
        for got, want in zip(fn(*args), expected):
            np.testing.assert_allclose(_np(got), want, atol=ATOL)
