"""Feature distillation from a head-less teacher: the student's projected tokens regress the teacher's."""

from keras import ops

from keras_dinov2.losses.checks import as_float32, check_same_shape

FEATURE_LOSSES = ("cosine", "smooth_l1")


def standardize_tokens(tokens, eps=1e-6):
    """Each token standardized over its channels (zero mean, unit variance): the regression target.

    A released backbone's final LayerNorm has its own scale and shift per channel; standardizing removes them, so
    every token weighs the same and smooth-L1 works on one scale whatever the teacher.
    """
    x = as_float32(tokens)
    mean = ops.mean(x, axis=-1, keepdims=True)
    var = ops.mean(ops.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) / ops.sqrt(var + eps)


def token_regression(student, target, kind="cosine", beta=1.0):
    """Mean over tokens of one token-to-token distance between projected student tokens and targets.

    cosine: 1 - cos(s, t); smooth_l1: Huber-style |s - t| with quadratic zone `beta`, averaged over channels.

    Args:
        student: tensor (..., D). Projected student tokens.
        target: tensor (..., D), same shape. `standardize_tokens` of the teacher's; a constant.
        kind: "cosine" (default) or "smooth_l1".
        beta: float, default 1.0. The smooth-L1 threshold.

    Returns:
        float32 scalar.
    """
    check_same_shape("student", student, "target", target)
    s = as_float32(student)
    t = ops.stop_gradient(as_float32(target))
    if kind == "cosine":
        s_norm = ops.sqrt(ops.maximum(ops.sum(ops.square(s), axis=-1), 1e-24))
        t_norm = ops.sqrt(ops.maximum(ops.sum(ops.square(t), axis=-1), 1e-24))
        return ops.mean(1.0 - ops.sum(s * t, axis=-1) / (s_norm * t_norm))
    if kind == "smooth_l1":
        diff = ops.abs(s - t)
        per = ops.where(diff < beta, 0.5 * ops.square(diff) / beta, diff - 0.5 * beta)
        return ops.mean(per)
    raise ValueError(f"`kind` must be one of {FEATURE_LOSSES}, received {kind!r}.")


def feature_distillation_loss(student_cls, teacher_cls, student_patches, teacher_patches, kind="cosine",
                              cls_weight=1.0, patch_weight=1.0, beta=1.0):
    """cls_weight * regression(CLS) + patch_weight * regression(patch tokens), against standardized teacher tokens.

    The student's patch tokens must already be on the teacher's grid (`FeatureDistiller` resizes them).

    Args:
        student_cls: (B, D) projected student CLS tokens.
        teacher_cls: (B, D) the teacher's CLS tokens (raw; standardized here).
        student_patches: (B, N, D) projected student patch tokens on the teacher's grid.
        teacher_patches: (B, N, D) the teacher's patch tokens.
        kind, beta: as `token_regression`.
        cls_weight, patch_weight: float, default 1.0.

    Returns:
        dict of float32 scalars: "cls", "patch" (unweighted) and "total".

    Example:
    >>> feature_distillation_loss(s_cls, t_cls, s_patches, t_patches, kind="smooth_l1")["total"]
    """
    cls = token_regression(student_cls, standardize_tokens(teacher_cls), kind, beta)
    patch = token_regression(student_patches, standardize_tokens(teacher_patches), kind, beta)
    return {"cls": cls, "patch": patch, "total": cls_weight * cls + patch_weight * patch}
