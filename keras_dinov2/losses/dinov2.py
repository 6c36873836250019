"""`dinov2_loss`: the weighted sum of DINO, iBOT and KoLeo as the reference's meta-architecture forms it."""

from keras import ops

from keras_dinov2.losses.checks import as_float32, check_rank, check_same_shape, same_dim
from keras_dinov2.losses.cross_entropy import dino_cross_entropy, ibot_cross_entropy
from keras_dinov2.losses.regularizers import koleo


def dinov2_loss(
    student_global_logits=None,
    teacher_global_probs=None,
    student_local_logits=None,
    student_patch_logits=None,
    teacher_patch_probs=None,
    masks_weight=None,
    student_global_cls=None,
    num_images=None,
    n_local_crops=None,
    dino_weight=1.0,
    ibot_weight=1.0,
    koleo_weight=0.1,
    student_temperature=0.1,
    reduction=None,
    koleo_groups=1,
):
    """The DINOv2 training objective of the reference meta-architecture, from the crops' outputs.

    With 2 global crops, n local crops and one DINO pair loss CE(s, t) = `dino_cross_entropy`:

        D           = 2 * n + 2                      (3 when n = 0: the reference's max(2n, 1) + 2)
        dino_local  = sum_{l < n} [CE(s_l, t_0) + CE(s_l, t_1)] / D     (each local crop vs both teacher views)
        dino_global = [CE(s_0, t_1) + CE(s_1, t_0)] / D                  (teacher views swapped)
        ibot        = ibot_cross_entropy(...)                            (masked global-crop patches)
        koleo       = koleo(cls of global crop 0) + koleo(cls of global crop 1)
        total       = dino_weight * (dino_local + dino_global) + ibot_weight * ibot + koleo_weight * koleo

    The reference computes dino_global as the mean over all 2B rows times 2, which is the same. Its iBOT term
    is multiplied by 2 (crops processed together) and by 1 / 2 (`ibot_loss_scale`), i.e. by 1; the value
    returned here is the one added to the total. The reference *displays* ibot and koleo halved (and koleo
    weighted); the parts returned here are the unweighted terms of `total`. Teacher inputs are constants.

    Rows are crop-major, as the reference's collation: global rows are [crop 0 images; crop 1 images], local
    rows [local crop 0 images; ...; local crop n-1 images]. Teacher probabilities come in the same order as
    the student's (NOT swapped); the swap happens here.

    Args:
        student_global_logits: optional tensor (2B, K). Student DINO head on the (masked) global crops' CLS.
            None switches the DINO term (and KoLeo, which lives inside it) off, as the reference's
            `do_dino`; `num_images` is then required for iBOT.
        teacher_global_probs: optional tensor (2B, K). Centered or Sinkhorn teacher probabilities of the
            global crops (with `student_global_logits`).
        student_local_logits: optional tensor (nB, K). Student DINO head on the local crops' CLS.
        student_patch_logits: optional tensor (M, K'). Student (iBOT) head on the masked patches (buffer).
        teacher_patch_probs: optional tensor (M, K'). Teacher targets for those patches.
        masks_weight: optional tensor (M,). 1 / masked patches of the row's image; 0 for padding rows.
        student_global_cls: optional tensor (2B, D). Student backbone CLS of the global crops, before the head.
        num_images: optional int. Global-crop images for iBOT; default 2B, the rows of `student_global_logits`.
        n_local_crops: optional int. Default: inferred from the static row counts.
        dino_weight: float, default 1.0.
        ibot_weight: float, default 1.0.
        koleo_weight: float, default 0.1.
        student_temperature: float, default 0.1.
        reduction: optional `CrossReplica`, default None. KoLeo's rows: with a reduction, each global
            crop's CLS rows are gathered from every replica first (global-batch KoLeo, see `koleo`);
            None keeps each replica's own rows, as the reference. The other terms are per-replica means
            whatever it is (averaging them over replicas gives the global-batch value).
        koleo_groups: int, default 1. KoLeo within this many equal row groups of each crop, averaged
            (the per-replica KoLeo of a program that holds several replicas' rows; see `koleo`).

    Returns:
        dict of float32 scalars: "dino_local", "dino_global", "ibot", "koleo" (unweighted; 0 when their inputs
        are not given) and "total".

    Example:
    >>> parts = dinov2_loss(s_global, t_global, s_local, s_patch, t_patch, masks_weight, cls_global)
    >>> parts["total"]
    """
    zero = ops.zeros((), "float32")
    if student_global_logits is None:
        if num_images is None:
            raise ValueError(
                "`num_images` is required when `student_global_logits` is None (DINO term off)."
            )
        ibot = zero
        if student_patch_logits is not None:
            ibot = ibot_cross_entropy(student_patch_logits, teacher_patch_probs, masks_weight,
                                      num_images, student_temperature)
        return {"dino_local": zero, "dino_global": zero, "ibot": ibot, "koleo": zero,
                "total": ibot_weight * ibot}
    gshape = check_rank("student_global_logits", student_global_logits, (2,))
    check_same_shape(
        "student_global_logits", student_global_logits, "teacher_global_probs", teacher_global_probs
    )
    if gshape[0] is not None and gshape[0] % 2:
        raise ValueError(
            "`student_global_logits` must hold 2 global crops of B rows each, received "
            f"student_global_logits.shape={gshape}."
        )
    num_prototypes = ops.shape(student_global_logits)[-1]
    batch = ops.shape(student_global_logits)[0] // 2

    if student_local_logits is None:
        n_local_crops = 0
    else:
        lshape = check_rank("student_local_logits", student_local_logits, (2,))
        if not same_dim(lshape[-1], gshape[-1]):
            raise ValueError(
                "Local and global logits must have the same number of prototypes, received "
                f"student_local_logits.shape={lshape} and student_global_logits.shape={gshape}."
            )
        if n_local_crops is None:
            if lshape[0] is None or gshape[0] is None:
                raise ValueError(
                    "`n_local_crops` is required when the row counts are not static, received "
                    f"student_local_logits.shape={lshape} and student_global_logits.shape={gshape}."
                )
            if gshape[0] == 0 or lshape[0] % (gshape[0] // 2):
                raise ValueError(
                    "`student_local_logits` must hold whole local crops of B rows, B = "
                    f"student_global_logits rows / 2; received student_local_logits.shape={lshape} and "
                    f"student_global_logits.shape={gshape}."
                )
            n_local_crops = lshape[0] // (gshape[0] // 2)
    n_local_crops = int(n_local_crops)
    num_terms = float(max(2 * n_local_crops, 1) + 2)

    teacher = ops.stop_gradient(as_float32(teacher_global_probs))
    teacher = ops.reshape(teacher, (2, batch, num_prototypes))

    if n_local_crops > 0:
        log_local = ops.log_softmax(as_float32(student_local_logits) / student_temperature, axis=-1)
        log_local = ops.reshape(log_local, (n_local_crops, batch, num_prototypes))
        # Both teacher views against every local crop: sum_l sum_v mean_b <t_v, log s_l> in one product.
        both_views = teacher[0] + teacher[1]
        pair_sum = -ops.sum(log_local * both_views[None]) / ops.cast(batch, "float32")
        dino_local = pair_sum / num_terms
    else:
        dino_local = zero

    swapped = ops.concatenate([teacher[1], teacher[0]], axis=0)
    dino_global = (
        2.0 * dino_cross_entropy(student_global_logits, swapped, student_temperature) / num_terms
    )

    if student_patch_logits is not None:
        if teacher_patch_probs is None or masks_weight is None:
            raise ValueError(
                "iBOT needs `student_patch_logits`, `teacher_patch_probs` and `masks_weight` together, "
                f"received teacher_patch_probs={'None' if teacher_patch_probs is None else 'a tensor'} and "
                f"masks_weight={'None' if masks_weight is None else 'a tensor'}."
            )
        images = ops.shape(student_global_logits)[0] if num_images is None else num_images
        ibot = ibot_cross_entropy(
            student_patch_logits, teacher_patch_probs, masks_weight, images, student_temperature
        )
    else:
        ibot = zero

    if student_global_cls is not None:
        cshape = check_rank("student_global_cls", student_global_cls, (2,))
        if not same_dim(cshape[0], gshape[0]):
            raise ValueError(
                "`student_global_cls` must have one row per global-crop image, received "
                f"student_global_cls.shape={cshape} and student_global_logits.shape={gshape}."
            )
        half = None if cshape[0] is None else cshape[0] // 2
        cls = as_float32(student_global_cls)
        if half is not None:
            # Static slices keep koleo's batch-of-1 guard static.
            koleo_term = (koleo(cls[:half], reduction=reduction, groups=koleo_groups)
                          + koleo(cls[half:], reduction=reduction, groups=koleo_groups))
        else:
            cls = ops.reshape(cls, (2, batch, ops.shape(cls)[-1]))
            koleo_term = (koleo(cls[0], reduction=reduction, groups=koleo_groups)
                          + koleo(cls[1], reduction=reduction, groups=koleo_groups))
    else:
        koleo_term = zero

    total = (
        dino_weight * (dino_local + dino_global) + ibot_weight * ibot + koleo_weight * koleo_term
    )
    return {
        "dino_local": dino_local,
        "dino_global": dino_global,
        "ibot": ibot,
        "koleo": koleo_term,
        "total": total,
    }
