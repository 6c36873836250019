"""Teacher targets: softmax centering with an EMA center, and Sinkhorn-Knopp balancing."""

import math

from keras import ops

from keras_dinov2.losses.checks import as_float32, check_center, check_rank, rows_mask, static_shape
from keras_dinov2.losses.replicas import SINGLE_DEVICE
from keras_dinov2.ops import max_over_rows, sum_over_rows
from keras_dinov2.ops.eager import softmax_center as ops_softmax_center
from keras_dinov2.ops.eager import update_center as ops_update_center


def softmax_center(teacher_logits, center, temperature):
    """Centered and sharpened teacher probabilities, softmax((t - center) / T), in float32.

    The reference's `softmax_center_teacher` for both the DINO (center (1, K)) and the iBOT (center (1, 1, K))
    losses; here any center holding K values broadcasts over the leading axes of the logits.

    Args:
        teacher_logits: tensor (..., K). Teacher head outputs; treated as a constant.
        center: tensor of K values, e.g. (1, K) or (1, 1, K).
        temperature: float or scalar tensor. Teacher temperature (reference schedule 0.04 -> 0.07).

    Returns:
        float32 tensor, the shape of `teacher_logits`; rows sum to 1.

    Example:
    >>> softmax_center(ops.zeros((4, 8)), ops.zeros((1, 8)), 0.04)   # uniform rows of 1/8
    """
    shape = static_shape(teacher_logits)
    check_center(center, shape)
    logits, center = as_float32(teacher_logits), as_float32(center)
    probs = ops_softmax_center(logits, center, temperature)  # PyTorch: one kernel (no gradient)
    if probs is not None:
        return probs
    logits = ops.stop_gradient(logits)
    center = ops.reshape(ops.stop_gradient(center), (-1,))
    return ops.softmax((logits - center) / temperature, axis=-1)


def sinkhorn_knopp(
    teacher_logits, temperature, num_iterations=3, valid=None, n_valid=None, reduction=None
):
    """Sinkhorn-Knopp balanced teacher assignments (the reference's three iterations), in float32.

    The reference forms Q = exp(t / T)^T (K x B), divides by its global sum, then repeats: divide each
    prototype row by its sum over the GLOBAL batch and by K; divide each sample column by its sum and by B;
    finally multiplies by B and transposes. Every one of those divisions is a rescaling, so this function runs
    the same iteration in the log domain: each division becomes the subtraction of a logsumexp, computed
    around its maximum (the per-prototype maximum over the global batch, via `reduction.max`). The result
    equals the reference's up to float rounding, but stays finite for very confident logits (the reference's
    exp overflows once t / T passes ~88, and a linear version with one global maximum subtracted underflows
    whole rows to 0 / 0). Notes:

    - Subtracting one global constant from all logits leaves the result unchanged (a common factor of Q that
      the next normalization removes). Subtracting a per-sample maximum would NOT: it rescales columns before a
      prototype normalization and changes the three-iteration result. The log domain needs neither.
    - B and K only rescale Q uniformly between normalizations, so the output does not depend on them: after
      the final sample step each valid row sums to exactly 1, and every prototype's total mass over the global
      batch is approximately (not exactly, after 3 iterations) B / K.
    - iBOT: the rows are the masked patches, padded to a static buffer. Give `valid` (or `n_valid`) and the
      padding rows take no part in any sum; they come back as all-zero rows. This plays the role of the
      reference's `n_masked_patches_tensor`, whose global sum is its B.

    Args:
        teacher_logits: tensor (rows, K). This replica's teacher head outputs; treated as a constant.
        temperature: float or scalar tensor. Teacher temperature.
        num_iterations: int, default 3 (the reference's). Must be at least 1.
        valid: optional bool or 0/1 tensor (rows,). Which rows are real (e.g. `masks_weight > 0`).
        n_valid: optional int or scalar tensor. Number of real rows, the first ones; used when `valid` is None.
        reduction: optional `CrossReplica`, default the single-device identity. Its `max` and `sum` run over
            the global batch.

    Returns:
        float32 tensor (rows, K): valid rows sum to 1, padding rows are 0.

    Example:
    >>> probs = sinkhorn_knopp(teacher_logits, temperature=0.07)          # DINO, (2B, K)
    >>> probs = sinkhorn_knopp(patch_logits, 0.07, valid=masks_weight > 0)  # iBOT, padded buffer
    """
    reduction = SINGLE_DEVICE if reduction is None else reduction
    num_iterations = int(num_iterations)
    if num_iterations < 1:
        raise ValueError(f"`num_iterations` must be at least 1, received {num_iterations}.")
    shape = check_rank("teacher_logits", teacher_logits, (2,))
    logits = ops.stop_gradient(as_float32(teacher_logits))
    mask = rows_mask("teacher_logits", valid, n_valid, ops.shape(logits)[0], shape)

    scores = logits / temperature
    if mask is not None:
        mask = ops.expand_dims(mask, -1)
        # Padding rows may hold anything; pin them to 0 so nothing overflows on them.
        scores = ops.where(mask, scores, 0.0)

    for _ in range(num_iterations):
        # Prototype step: log of each prototype's mass over the global batch (real rows only).
        excluded = ops.where(mask, scores, -math.inf) if mask is not None else scores
        peak = reduction.max(ops.expand_dims(max_over_rows(excluded), 0))
        peak = ops.where(ops.isfinite(peak), peak, 0.0)  # no real row on any replica
        mass = reduction.sum(ops.expand_dims(sum_over_rows(ops.exp(excluded - peak)), 0))
        scores = scores - (peak + ops.log(ops.maximum(mass, 1e-30)))
        # Sample step: rows are local, no collective needed.
        scores = scores - ops.logsumexp(scores, axis=-1, keepdims=True)

    probs = ops.exp(scores)
    return ops.where(mask, probs, 0.0) if mask is not None else probs


def update_center(center, teacher_logits, momentum=0.9, valid=None, reduction=None):
    """The EMA of the teacher's mean logits: momentum * center + (1 - momentum) * batch mean, in float32.

    The reference stages this update: the mean of THIS step's raw teacher logits is folded into the center at
    the start of the NEXT centering. A training step gets the same order by centering with the current value
    first and assigning the returned value afterwards:

        probs = softmax_center(t, center.value, T); center.assign(update_center(center.value, t))

    The batch mean is the mean over the (valid) rows of the global batch: the sum over replicas of each
    replica's sum over its rows, divided by the global row count, so N replicas update the center as one
    device with the global batch. For DINO (equal rows per replica) this is the reference's rule. For iBOT
    it differs on purpose from the reference on several GPUs, which averages each rank's mean over its
    masked patches: that weighs a patch by how many others were masked on its rank, so the center would
    depend on how the global batch is split. Without any valid row the batch mean is 0 (the reference
    would produce NaN).

    Args:
        center: tensor holding K values, (1, K) for DINO or (1, 1, K) for iBOT. The result has its shape.
        teacher_logits: tensor (..., K). Raw teacher head outputs (before centering); leading axes are rows.
        momentum: float, default 0.9 (the reference's `center_momentum`).
        valid: optional bool or 0/1 tensor (rows,), e.g. `masks_weight > 0` for a padded masked-patch buffer.
            Rows are weighted equally, as the reference's plain mean over masked patches.
        reduction: optional `CrossReplica`, default the single-device identity.

    Returns:
        float32 tensor of the shape of `center`.

    Example:
    >>> new_center = update_center(ops.zeros((1, 8)), teacher_logits)   # 0.1 * mean over rows
    """
    reduction = SINGLE_DEVICE if reduction is None else reduction
    shape = static_shape(teacher_logits)
    check_center(center, shape)
    center, logits = as_float32(center), as_float32(teacher_logits)
    rows_shape = (math.prod(shape[:-1]) if all(d is not None for d in shape[:-1]) else None,)
    mask = rows_mask("teacher_logits", valid, None, None, rows_shape)
    updated = ops_update_center(center, logits, momentum, mask, reduction)  # PyTorch: one kernel (no gradient)
    if updated is not None:
        return updated
    logits = ops.reshape(ops.stop_gradient(logits), (-1, ops.shape(logits)[-1]))
    if mask is None:
        local_mean = sum_over_rows(logits) / ops.cast(ops.shape(logits)[0], "float32")
        batch_mean = reduction.mean(local_mean)
    else:
        # The row count travels with the sums: one collective for both.
        count = ops.reshape(ops.sum(ops.cast(mask, "float32")), (1,))
        total = reduction.sum(ops.concatenate(
            [sum_over_rows(ops.where(ops.expand_dims(mask, -1), logits, 0.0)), count], axis=0))
        batch_mean = total[:-1] / ops.maximum(total[-1], 1.0)
    return momentum * center + (1.0 - momentum) * ops.reshape(batch_mean, ops.shape(center))
