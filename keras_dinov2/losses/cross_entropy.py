"""The DINO (CLS token) and iBOT (masked patch) cross-entropies between student and teacher."""

from keras import ops

from keras_dinov2.losses.checks import (
    as_float32,
    check_rank,
    check_same_shape,
    same_dim,
    static_shape,
)
from keras_dinov2.ops.eager import soft_cross_entropy


def dino_cross_entropy(student_logits, teacher_probs, temperature=0.1):
    """DINO cross-entropy of one student/teacher pair: mean over rows of -sum_k t_k log_softmax(s / T)_k.

    Args:
        student_logits: tensor (..., K). Student head outputs.
        teacher_probs: tensor (..., K), same shape. Teacher targets; treated as a constant.
        temperature: float, default 0.1 (the reference's `student_temp`).

    Returns:
        float32 scalar.

    Example:
    >>> dino_cross_entropy(student_logits, softmax_center(teacher_logits, center, 0.04))
    """
    check_same_shape("student_logits", student_logits, "teacher_probs", teacher_probs)
    student_logits, targets = as_float32(student_logits), as_float32(teacher_probs)
    rows = soft_cross_entropy(student_logits, targets, temperature)  # PyTorch: one kernel
    if rows is not None:
        return ops.mean(rows)
    log_probs = ops.log_softmax(student_logits / temperature, axis=-1)
    return -ops.mean(ops.sum(ops.stop_gradient(targets) * log_probs, axis=-1))


def ibot_cross_entropy(
    student_patch_logits, teacher_patch_probs, masks_weight, num_images, temperature=0.1
):
    """iBOT cross-entropy over masked patches: -sum_i w_i sum_k t_ik log_softmax(s_i / T)_k / num_images.

    The rows are the masked patches of this replica's global crops, gathered into a buffer that may be
    padded; `masks_weight` is 1 / (masked patches in the row's image) for a real row and 0 for padding. Each
    image with masks thus weighs 1, and images without masks still count in `num_images` (the reference divides
    by the number of global-crop images, `masks.shape[0]`).

    Args:
        student_patch_logits: tensor (M, K). Student head outputs at the masked patches.
        teacher_patch_probs: tensor (M, K). Teacher targets at the same patches; treated as a constant.
        masks_weight: tensor (M,). Per-row weight, 0 for padding rows.
        num_images: int or scalar tensor. Number of global-crop images on this replica (2 x batch).
        temperature: float, default 0.1 (the reference's `student_temp`).

    Returns:
        float32 scalar.

    Example:
    >>> ibot_cross_entropy(s_patches, t_patches, masks_weight, num_images=2 * batch_size)
    """
    check_same_shape(
        "student_patch_logits", student_patch_logits, "teacher_patch_probs", teacher_patch_probs
    )
    shape = check_rank("student_patch_logits", student_patch_logits, (2,))
    wshape = static_shape(masks_weight)
    if len(wshape) != 1 or not same_dim(wshape[0], shape[0]):
        raise ValueError(
            "`masks_weight` must have one entry per masked-patch row, received "
            f"masks_weight.shape={wshape} and student_patch_logits.shape={shape}."
        )
    student_patch_logits, targets = as_float32(student_patch_logits), as_float32(teacher_patch_probs)
    weight = ops.stop_gradient(as_float32(masks_weight))
    per_patch = soft_cross_entropy(student_patch_logits, targets, temperature)  # PyTorch: one kernel
    if per_patch is None:
        log_probs = ops.log_softmax(student_patch_logits / temperature, axis=-1)
        per_patch = -ops.sum(ops.stop_gradient(targets) * log_probs, axis=-1)
    # `where`, not a product: a padding row must not turn the sum into NaN whatever it holds.
    weighted = ops.where(ops.greater(weight, 0.0), per_patch * weight, 0.0)
    return ops.sum(weighted) / as_float32(num_images)
