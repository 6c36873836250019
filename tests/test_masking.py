"""iBOT block masking: the TF generator against an independent NumPy version of the reference algorithm."""

import math

import numpy as np
import pytest
import tensorflow as tf

from keras_dinov2.config import MaskingConfig, SSLConfig
from keras_dinov2.data import block_masks, mask_buffer_size, mask_strata, sample_masks

# Masks are sampled by TensorFlow ops on every backend: one job runs them (see conftest).
pytestmark = pytest.mark.once

# ----------------------------------------------------------------------------------------------------------------------
# NumPy rendering of the reference algorithm (dinov2/data/masking.py + collate.py), written from its description:
# used only as a statistical yardstick for the vectorized TensorFlow version.


def numpy_block_mask(rng, grid, target, max_block, min_area=4, aspect=(0.3, 1 / 0.3), attempts=10):
    gh, gw = grid
    mask = np.zeros(grid, bool)
    count = 0
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    while count < target:
        cap = min(target - count, max_block)
        added = 0
        for _ in range(attempts):
            area = (
                min_area + (cap - min_area) * rng.random()
            )  # Python's uniform(a, b), also for b < a
            ratio = math.exp(rng.uniform(log_lo, log_hi))
            h = int(round(math.sqrt(area * ratio)))
            w = int(round(math.sqrt(area / ratio)))
            if h < gh and w < gw:
                top = rng.integers(0, gh - h + 1)
                left = rng.integers(0, gw - w + 1)
                window = mask[top : top + h, left : left + w]
                new = h * w - int(window.sum())
                if 0 < new <= cap:
                    window[...] = True
                    added = new
            if added:
                break
        if not added:
            break
        count += added
    return mask


def numpy_collate_counts(rng, num_images, grid, probability=0.5, ratios=(0.1, 0.5)):
    n = grid[0] * grid[1]
    num_masked = int(num_images * probability)
    p = np.linspace(*ratios, num_masked + 1)
    counts = [
        numpy_block_mask(rng, grid, int(n * rng.uniform(p[i], p[i + 1])), 0.5 * n).sum()
        for i in range(num_masked)
    ]
    return np.array(counts + [0] * (num_images - num_masked))


block_masks_fn = tf.function(block_masks, reduce_retracing=True)


def tf_counts(targets, grid, seed, **kwargs):
    masks = block_masks_fn(
        tf.constant(targets, tf.int32), grid, tf.constant(seed, tf.int64), **kwargs
    )
    return masks.numpy()


# ----------------------------------------------------------------------------------------------------------------------


def test_buffer_size_is_reference_upper_bound():
    # 2B = 4 images, N = 256: masked strata p = (0.1, 0.3, 0.5) -> int(256 * 0.3) + int(256 * 0.5) = 76 + 128.
    assert mask_buffer_size(4, 256) == 204
    low, high = mask_strata(4, 256)
    assert low.tolist() == [25, 76] and high.tolist() == [76, 128]
    # digits recipe, batch 8: 16 images, 8 masked, N = 64; exact ratios such as 0.25 * 64 = 16 are not truncated.
    assert mask_strata(16, 64)[1].tolist() == [9, 12, 16, 19, 22, 25, 28, 32]
    assert mask_buffer_size(16, 64) == 163
    # The digits recipe (24 px, patch 4: N = 36), batch 8: 5 + 7 + 9 + 10 + 12 + 14 + 16 + 18.
    digits = SSLConfig.recipe("digits")
    assert mask_buffer_size(16, digits.num_patches, digits.data.masking) == 91
    assert mask_buffer_size(4, 256, MaskingConfig(mask_sample_probability=0.0)) == 1


def test_block_masks_respect_targets():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 33, size=256)
    targets[:16] = 0
    masks = tf_counts(targets, (8, 8), [3, 4])
    counts = masks.reshape(len(targets), -1).sum(1)
    assert masks.shape == (256, 8, 8)
    assert np.all(counts <= targets), "the generator never exceeds a target"
    assert np.all(counts[:16] == 0)
    # Falls short only rarely: most masks hit their target exactly (reference behaviour).
    assert np.mean(counts[16:] == targets[16:]) > 0.6
    assert np.mean(counts[16:] / np.maximum(targets[16:], 1)) > 0.85


def _feasible(h, w, cap, aspect=(0.3, 1 / 0.3), min_area=4.0):
    """Whether some (area, ratio) the reference can draw rounds to an h x w block (a small LP in log space)."""
    from scipy.optimize import linprog

    lo_a, hi_a = sorted((min_area, cap))
    # variables p = log(area * ratio), q = log(area / ratio): bounds from the rounding of h and w
    bounds = [
        (2 * math.log(h - 0.5 + 1e-9), 2 * math.log(h + 0.5)),
        (2 * math.log(max(w - 0.5, 1e-9)), 2 * math.log(w + 0.5)),
    ]
    # log area = (p + q) / 2 in [log lo_a, log hi_a]; log ratio = (p - q) / 2 in [log aspect_lo, log aspect_hi]
    a_ub = [[0.5, 0.5], [-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5]]
    b_ub = [
        math.log(hi_a) + 1e-9,
        -math.log(lo_a) + 1e-9,
        math.log(aspect[1]) + 1e-9,
        -math.log(aspect[0]) + 1e-9,
    ]
    return linprog([0, 0], A_ub=a_ub, b_ub=b_ub, bounds=bounds).status == 0


def test_single_blocks_have_reference_shapes():
    grid = (14, 14)
    rng = np.random.default_rng(1)
    targets = rng.integers(1, 99, size=400)
    masks = tf_counts(targets, grid, [5, 6], max_blocks=1)
    shapes = set()
    for mask, target in zip(masks, targets):
        rows, cols = np.nonzero(mask)
        if rows.size == 0:
            # ten failed tries: likely only for tiny targets, where few of the drawn blocks are small enough
            assert target < 4
            continue
        h, w = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert h * w == rows.size, "a single block is a filled rectangle"
        assert h < grid[0] and w < grid[1]
        assert h * w <= target
        shapes.add((int(h), int(w), float(min(target, 0.5 * 196))))
    for h, w, cap in shapes:
        assert _feasible(h, w, cap), (h, w, cap)
    aspects = [h / w for h, w, _ in shapes]
    assert min(aspects) < 0.5 and max(aspects) > 2.0, "both orientations occur"
    # With at least 4 patches to go, area >= 4 before rounding, so a block has at least 3 patches (e.g. 1 x 3);
    # smaller targets draw the area between the target and 4, as Python's uniform(4, smaller) does.
    assert min(h * w for h, w, cap in shapes if cap >= 4) >= 3
    assert min(h * w for h, w, cap in shapes if cap < 4) == 1


def _close(ours, reference, slack=0.0):
    se = math.sqrt(np.var(ours) / len(ours) + np.var(reference) / len(reference))
    return abs(np.mean(ours) - np.mean(reference)) <= 4 * se + slack


@pytest.mark.parametrize("grid", [(8, 8), (16, 16)])
def test_distributions_match_numpy_reference(grid):
    n = grid[0] * grid[1]
    rng = np.random.default_rng(2)
    samples = 300
    for fraction in (0.1, 0.3, 0.5):
        target = int(n * fraction)
        reference = np.stack([numpy_block_mask(rng, grid, target, 0.5 * n) for _ in range(samples)])
        ours = tf_counts(np.full(samples, target), grid, [7, target])
        # masked count (mostly the target; sometimes short), and the spread of the blocks (rows / columns touched)
        for statistic in (
            lambda m: m.reshape(samples, -1).sum(1),
            lambda m: m.any(2).sum(1),
            lambda m: m.any(1).sum(1),
        ):
            assert _close(statistic(ours), statistic(reference), slack=0.05), (grid, target)
        hit_ours, hit_ref = (
            np.mean(ours.reshape(samples, -1).sum(1) == target),
            np.mean(reference.reshape(samples, -1).sum(1) == target),
        )
        assert abs(hit_ours - hit_ref) < 0.1


def test_collate_totals_match_numpy_reference():
    grid = (8, 8)
    rng = np.random.default_rng(3)
    reference = np.array([numpy_collate_counts(rng, 8, grid).sum() for _ in range(300)])
    fn = tf.function(lambda s: sample_masks(8, grid, s)["n_masked_patches"])
    ours = np.array([int(fn(tf.constant([11, i], tf.int64))) for i in range(300)])
    assert _close(ours, reference), (ours.mean(), reference.mean())


def test_sample_masks_structure():
    num_images, grid = 16, (8, 8)
    n = 64
    config = MaskingConfig()
    fn = tf.function(lambda s: sample_masks(num_images, grid, s, config))
    buffer = mask_buffer_size(num_images, n, config)
    low, high = mask_strata(num_images, n, config)
    bounds = np.sort(np.concatenate([high, np.zeros(num_images - len(high), int)]))[::-1]
    first_rows = []
    for i in range(40):
        out = {k: v.numpy() for k, v in fn(tf.constant([i, 1], tf.int64)).items()}
        masks = out["masks"]
        assert masks.shape == (num_images, n) and masks.dtype == bool
        assert out["mask_indices"].shape == (buffer,) and out["mask_indices"].dtype == np.int32
        assert out["masks_weight"].shape == (buffer,) and out["masks_weight"].dtype == np.float32
        counts = masks.sum(1)
        # Half of the images carry no mask; the masked ones stay within their strata's upper bounds (the k-th
        # largest count never exceeds the k-th largest bound: the generator cannot overshoot a target).
        assert np.sum(counts == 0) >= num_images - len(high)
        assert np.all(np.sort(counts)[::-1] <= bounds)
        total = int(out["n_masked_patches"])
        assert total == counts.sum() <= buffer
        np.testing.assert_array_equal(
            out["mask_indices"][:total], np.flatnonzero(masks.reshape(-1))
        )
        assert np.all(out["mask_indices"][total:] == 0)
        assert np.all(out["masks_weight"][total:] == 0)
        weights = out["masks_weight"][:total]
        rows = out["mask_indices"][:total] // n
        per_image = np.bincount(rows, weights=weights, minlength=num_images)
        np.testing.assert_allclose(per_image[counts > 0], 1.0, rtol=1e-5)
        np.testing.assert_allclose(weights, 1.0 / counts[rows], rtol=1e-6)
        first_rows.append(counts[0] > 0)
    # The masked images are shuffled: row 0 is sometimes masked, sometimes not.
    assert 0 < np.mean(first_rows) < 1


def test_sample_masks_is_seeded():
    fn = tf.function(lambda s: sample_masks(8, (6, 6), s)["masks"])
    a = fn(tf.constant([1, 2], tf.int64)).numpy()
    b = fn(tf.constant([1, 2], tf.int64)).numpy()
    c = fn(tf.constant([1, 3], tf.int64)).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_no_masking_probability():
    out = sample_masks(
        6, (4, 4), tf.constant([0, 0], tf.int64), MaskingConfig(mask_sample_probability=0.0)
    )
    assert not out["masks"].numpy().any()
    assert int(out["n_masked_patches"]) == 0
    assert out["mask_indices"].shape == (1,)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mask_ratio_min_max": (0.6, 0.2)},
        {"mask_sample_probability": 1.5},
        {"min_aspect": 0},
        {"max_attempts": 0},
    ],
)
def test_masking_config_validation(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        MaskingConfig(**kwargs)
