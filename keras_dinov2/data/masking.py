"""iBOT block masking in TensorFlow graph ops, with static output shapes.

Two pieces, following the reference (dinov2/data/masking.py and dinov2/data/collate.py):

- `block_masks`: fill each image's patch grid with random rectangles until it holds its target count of masked
  patches (or no block fits any more). All images of a batch advance together in one `tf.while_loop`: one loop
  round places at most one block per image, so there is no Python loop per image and no `py_function`.
- `sample_masks`: the collate step. Stratified targets for the first int(n * probability) images, none for the rest,
  shuffled; returns the boolean masks plus a fixed-size padded buffer of masked-patch indices and weights for the
  iBOT loss, so every batch has the same shapes and XLA compiles once.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_dinov2.config import MaskingConfig
from keras_dinov2.data.mask_budget import mask_buffer_size, mask_strata

__all__ = ["block_masks", "sample_masks", "mask_buffer_size", "mask_strata"]

# Distinct stream tags so the draws of one seed never overlap.
_TARGET_STREAM = 1
_SHUFFLE_STREAM = 2
_BLOCK_STREAM = 3


def _fold(seed, value):
    return tf.random.experimental.stateless_fold_in(seed, tf.cast(value, tf.int32))


def block_masks(
    targets, grid_size, seed, config: MaskingConfig | None = None, max_blocks: int | None = None
):
    """Fill each image's (gh, gw) patch grid with random blocks up to its target number of masked patches.

    The reference's MaskingGenerator, vectorized over images. Per block: area ~ U(min_block_patches,
    min(remaining, max_block_ratio * N)), aspect ratio log-uniform in (min_aspect, max_aspect), h = round(sqrt(area
    * aspect)), w = round(sqrt(area / aspect)), top-left uniform among positions that fit; the block is accepted
    when h < gh, w < gw (strict, as in the reference) and it adds between 1 and min(remaining, max) new patches.
    Up to `max_attempts` tries per block; an image stops at its target or after a round that added nothing, so a
    mask may fall short of its target but never exceeds it.

    Args:
        targets: int tensor (n,). Masked patches wanted per image (0 means no mask).
        grid_size: (int, int). Patch grid (gh, gw).
        seed: int tensor of shape (2,). Stateless random seed.
        config: MaskingConfig or None, default None (reference defaults).
        max_blocks: int or None, default None. Stop after this many blocks per image (None: until the target is
            met or a round adds nothing, as the reference does); 1 shows the shape of single blocks.

    Returns:
        bool tensor (n, gh, gw), True where a patch is masked.

    Example:
        >>> m = block_masks(tf.constant([10, 0]), (8, 8), tf.constant([0, 1]))
        >>> m.shape, int(tf.reduce_sum(tf.cast(m[1], tf.int32)))
        (TensorShape([2, 8, 8]), 0)
    """
    config = config or MaskingConfig()
    gh, gw = (int(v) for v in grid_size)
    num_patches = gh * gw
    seed = tf.convert_to_tensor(seed)
    targets = tf.cast(tf.convert_to_tensor(targets), tf.int32)
    n = tf.shape(targets)[0]
    # The reference computes 0.5 * N as a float; the comparisons below are in float32 too.
    max_block = float(config.max_block_ratio * num_patches)
    min_area = float(config.min_block_patches)
    log_low, log_high = (float(np.log(a)) for a in config.aspect_range)
    attempts = config.max_attempts
    rows = tf.range(gh)[None, None, :, None]
    cols = tf.range(gw)[None, None, None, :]

    def round_body(step, mask, count, active):
        # A failed try leaves the mask untouched, so the tries of one round can all be drawn and tested against
        # the same mask at once; the first acceptable one is the block the sequential loop would place.
        cap = tf.minimum(tf.cast(targets - count, tf.float32), max_block)[:, None]  # (n, 1)
        u = tf.random.stateless_uniform([n, attempts, 4], _fold(seed, step), dtype=tf.float32)
        # Python's random.uniform(a, b) = a + (b - a) * U also when b < a, which happens once fewer than
        # min_block_patches remain: the area is then drawn between the remainder and min_block_patches.
        area = min_area + (cap - min_area) * u[..., 0]
        aspect = tf.exp(log_low + (log_high - log_low) * u[..., 1])
        h = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
        w = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
        fits = (h < gh) & (w < gw)
        top = tf.cast(tf.floor(u[..., 2] * tf.cast(gh - h + 1, tf.float32)), tf.int32)
        left = tf.cast(tf.floor(u[..., 3] * tf.cast(gw - w + 1, tf.float32)), tf.int32)
        top = tf.minimum(top, tf.maximum(gh - h, 0))  # guards U -> 1.0 rounding
        left = tf.minimum(left, tf.maximum(gw - w, 0))
        top, left, h, w = (v[:, :, None, None] for v in (top, left, h, w))
        boxes = (
            (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
        )  # (n, tries, gh, gw)
        new = tf.reduce_sum(tf.cast(boxes & ~mask[:, None], tf.int32), axis=[2, 3])
        ok = fits & (new > 0) & (tf.cast(new, tf.float32) <= cap) & active[:, None]
        first = tf.argmax(tf.cast(ok, tf.int32), axis=1, output_type=tf.int32)
        accepted = tf.reduce_any(ok, axis=1)
        box = tf.gather(boxes, first, axis=1, batch_dims=1)
        mask = mask | (box & accepted[:, None, None])
        added = tf.where(accepted, tf.gather(new, first, axis=1, batch_dims=1), 0)
        count = count + added
        active = active & accepted & (count < targets)
        return step + 1, mask, count, active

    _, mask, _, _ = tf.while_loop(
        lambda step, mask, count, active: tf.reduce_any(active),
        round_body,
        (
            tf.constant(0, tf.int32),
            tf.zeros([n, gh, gw], tf.bool),
            tf.zeros([n], tf.int32),
            targets > 0,
        ),
        # Every round that continues adds at least one patch.
        maximum_iterations=num_patches if max_blocks is None else min(int(max_blocks), num_patches),
    )
    return mask


def sample_masks(num_images: int, grid_size, seed, config: MaskingConfig | None = None):
    """Draw the iBOT masks of one batch of global-crop images, with fixed-size outputs.

    The reference's collate: the first int(num_images * mask_sample_probability) images get stratified targets
    int(N * U(p_i, p_i+1)), p = linspace(*mask_ratio_min_max, count + 1), the others none; `block_masks` fills
    them; the image order is then shuffled.

    Args:
        num_images: int. Global-crop images (2 * batch size), the rows of the masks.
        grid_size: (int, int). Patch grid (gh, gw) of a global crop; N = gh * gw.
        seed: int tensor of shape (2,). Stateless random seed.
        config: MaskingConfig or None, default None (reference defaults).

    Returns:
        dict with
        - "masks": bool (num_images, N), True = patch replaced by the mask token in the student.
        - "mask_indices": int32 (M,), flat indices into the (num_images * N) patch rows of the masked patches in
          row-major order, then padding entries equal to 0 (a valid row). M = `mask_buffer_size(...)`.
        - "masks_weight": float32 (M,), 1 / (masked patches in that image) for real entries, 0 for padding, so
          the weights of each masked image sum to 1.
        - "n_masked_patches": int32 scalar, the number of real entries of `mask_indices`.

    Example:
        >>> out = sample_masks(4, (16, 16), tf.constant([0, 3]))
        >>> out["masks"].shape, out["mask_indices"].shape
        (TensorShape([4, 256]), TensorShape([204]))
    """
    config = config or MaskingConfig()
    gh, gw = (int(v) for v in grid_size)
    num_patches = gh * gw
    num_images = int(num_images)
    seed = tf.convert_to_tensor(seed)
    low, high = mask_strata(num_images, num_patches, config)
    num_masked = len(high)
    buffer_size = mask_buffer_size(num_images, num_patches, config)

    ratios = np.linspace(*config.mask_ratio_min_max, num_masked + 1)
    u = tf.random.stateless_uniform([num_masked], _fold(seed, _TARGET_STREAM), dtype=tf.float64)
    drawn = tf.floor(num_patches * (ratios[:-1] + (ratios[1:] - ratios[:-1]) * u))
    stratified = tf.clip_by_value(
        tf.cast(drawn, tf.int32), low.astype(np.int32), high.astype(np.int32)
    )
    targets = tf.concat([stratified, tf.zeros([num_images - num_masked], tf.int32)], axis=0)

    masks = block_masks(targets, (gh, gw), _fold(seed, _BLOCK_STREAM), config)
    order = tf.argsort(tf.random.stateless_uniform([num_images], _fold(seed, _SHUFFLE_STREAM)))
    masks = tf.reshape(tf.gather(masks, order), [num_images, num_patches])

    flat = tf.reshape(masks, [-1])
    indices = tf.cast(tf.where(flat)[:, 0], tf.int32)
    count = tf.shape(indices)[0]
    per_image = tf.reduce_sum(tf.cast(masks, tf.float32), axis=1)
    weights = 1.0 / tf.maximum(tf.gather(per_image, indices // num_patches), 1.0)
    pad = (
        buffer_size - count
    )  # >= 0: each image's count is at most its stratum's bound (see mask_buffer_size)
    mask_indices = tf.concat([indices, tf.zeros([pad], tf.int32)], axis=0)
    masks_weight = tf.concat([weights, tf.zeros([pad], tf.float32)], axis=0)
    mask_indices = tf.ensure_shape(mask_indices, [buffer_size])
    masks_weight = tf.ensure_shape(masks_weight, [buffer_size])
    return {
        "masks": tf.ensure_shape(masks, [num_images, num_patches]),
        "mask_indices": mask_indices,
        "masks_weight": masks_weight,
        "n_masked_patches": count,
    }
