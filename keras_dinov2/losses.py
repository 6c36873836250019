"""The DINOv2 objectives in keras.ops: DINO and iBOT cross-entropy, centering, Sinkhorn-Knopp, KoLeo.

Everything here is backend-agnostic and computes in float32 whatever the inputs' dtype (the reference runs its
losses in float32 under mixed precision too). Teacher-side quantities are constants: every function that takes
teacher logits or probabilities applies `stop_gradient` to them.

Functions that need a statistic over the *global* batch (Sinkhorn-Knopp, the center update) take an optional
`reduction=` argument, a `CrossReplica`, which the training step binds to its backend's collective (KoLeo
takes one too, to gather the CLS rows of every replica). The default
is the single-device identity, which is also right for a JAX program that holds the global batch as one sharded
array (`keras.distribution`): XLA inserts the collectives itself there.

Reference: facebookresearch/dinov2 `loss/dino_clstoken_loss.py`, `loss/ibot_patch_loss.py`, `loss/koleo_loss.py`
and the loss bookkeeping of `train/ssl_meta_arch.py`.
"""

import math

import keras
from keras import ops

from keras_dinov2.ops import max_over_rows, sum_over_rows

__all__ = [
    "CrossReplica",
    "softmax_center",
    "sinkhorn_knopp",
    "update_center",
    "dino_cross_entropy",
    "ibot_cross_entropy",
    "koleo",
    "dinov2_loss",
]


class CrossReplica:
    """Cross-replica collectives for the objectives; the identity on one device.

    A training step that runs one program per replica (a `tf.distribute` replica context, `torch.distributed`,
    `jax.shard_map` / `pmap`) binds the callables to its collective and passes the object as `reduction=` to
    `sinkhorn_knopp` and `update_center`. Every replica must make the same calls in the same order, as with any
    collective. A JAX program that holds the global batch as one sharded array needs no binding.

    Args:
        sum_fn: callable or None, default None. All-reduce sum of a tensor over replicas (same shape out).
            None means the identity.
        max_fn: callable or None, default None. All-reduce maximum over replicas. None means the identity.
        all_gather_fn: callable or None, default None. Concatenation of every replica's tensor along axis 0,
            in replica order. None means the identity. KoLeo differentiates through it: its gradient must
            be the sum over replicas of the incoming gradient, sliced back to this replica's rows (what
            `ReplicaContext.all_gather` and `torch.distributed.nn.functional.all_gather` do).
        num_replicas: int, default 1. Number of replicas taking part.

    Example:
    >>> CrossReplica().sum(ops.ones((2,)))   # one device: [1., 1.]
    >>> # tf.distribute, inside strategy.run:
    >>> ctx = tf.distribute.get_replica_context()
    >>> r = CrossReplica(lambda x: ctx.all_reduce("sum", x), lambda x: ctx.all_reduce("max", x),
    ...                  lambda x: ctx.all_gather(x, axis=0), ctx.num_replicas_in_sync)
    """

    def __init__(self, sum_fn=None, max_fn=None, all_gather_fn=None, num_replicas=1):
        self._sum_fn = sum_fn
        self._max_fn = max_fn
        self._all_gather_fn = all_gather_fn
        self.num_replicas = int(num_replicas)
        if self.num_replicas < 1:
            raise ValueError(f"`num_replicas` must be at least 1, received {num_replicas}.")

    def sum(self, x):
        """Sum of `x` over replicas."""
        return x if self._sum_fn is None else self._sum_fn(x)

    def max(self, x):
        """Element-wise maximum of `x` over replicas."""
        return x if self._max_fn is None else self._max_fn(x)

    def mean(self, x):
        """Mean of `x` over replicas."""
        return self.sum(x) / float(self.num_replicas)

    def all_gather(self, x):
        """Every replica's `x`, concatenated along axis 0."""
        return x if self._all_gather_fn is None else self._all_gather_fn(x)


_SINGLE_DEVICE = CrossReplica()


def _float32(x):
    return ops.cast(ops.convert_to_tensor(x), "float32")


def _static_shape(x):
    if not hasattr(x, "shape"):
        x = ops.convert_to_tensor(x)
    return tuple(x.shape)


def _check_rank(name, x, ranks):
    shape = _static_shape(x)
    if len(shape) not in ranks:
        expected = " or ".join(str(r) for r in ranks)
        raise ValueError(f"`{name}` must have rank {expected}, received shape {shape}.")
    return shape


def _same_dim(a, b):
    return a is None or b is None or a == b


def _check_same_shape(name_a, a, name_b, b):
    sa, sb = _static_shape(a), _static_shape(b)
    if len(sa) != len(sb) or not all(_same_dim(x, y) for x, y in zip(sa, sb)):
        raise ValueError(
            f"`{name_a}` and `{name_b}` must have the same shape, received {name_a}.shape={sa} and "
            f"{name_b}.shape={sb}."
        )


def _rows_mask(name, valid, n_valid, num_rows, shape):
    """A (rows,) bool mask from `valid` or from a count `n_valid` of leading valid rows, or None."""
    if valid is not None:
        vshape = _static_shape(valid)
        if len(vshape) != 1 or not _same_dim(vshape[0], shape[0]):
            raise ValueError(
                f"`valid` must have shape (rows,) matching `{name}`, received valid.shape={vshape} and "
                f"{name}.shape={shape}."
            )
        valid = ops.convert_to_tensor(valid)
        if keras.backend.standardize_dtype(valid.dtype) == "bool":
            return valid
        return ops.greater(_float32(valid), 0.0)
    if n_valid is not None:
        # The data pipeline pads the masked-patch buffer at the end: the first n_valid rows are real.
        return ops.less(ops.arange(num_rows), ops.cast(n_valid, "int32"))
    return None


def _check_center(center, logits_shape):
    cshape = _static_shape(center)
    size = math.prod(cshape) if all(d is not None for d in cshape) else None
    num_prototypes = logits_shape[-1] if logits_shape else None
    if (
        not logits_shape
        or not cshape
        or not _same_dim(cshape[-1], num_prototypes)
        or not _same_dim(size, num_prototypes)
    ):
        raise ValueError(
            "`center` must hold one value per prototype of `teacher_logits`, received "
            f"center.shape={cshape} and teacher_logits.shape={logits_shape}."
        )


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
    shape = _static_shape(teacher_logits)
    _check_center(center, shape)
    logits = ops.stop_gradient(_float32(teacher_logits))
    center = ops.reshape(ops.stop_gradient(_float32(center)), (-1,))
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
    reduction = _SINGLE_DEVICE if reduction is None else reduction
    num_iterations = int(num_iterations)
    if num_iterations < 1:
        raise ValueError(f"`num_iterations` must be at least 1, received {num_iterations}.")
    shape = _check_rank("teacher_logits", teacher_logits, (2,))
    logits = ops.stop_gradient(_float32(teacher_logits))
    mask = _rows_mask("teacher_logits", valid, n_valid, ops.shape(logits)[0], shape)

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
    reduction = _SINGLE_DEVICE if reduction is None else reduction
    shape = _static_shape(teacher_logits)
    _check_center(center, shape)
    center = _float32(center)
    logits = ops.stop_gradient(_float32(teacher_logits))
    logits = ops.reshape(logits, (-1, ops.shape(logits)[-1]))
    rows_shape = (math.prod(shape[:-1]) if all(d is not None for d in shape[:-1]) else None,)
    mask = _rows_mask("teacher_logits", valid, None, None, rows_shape)
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
    _check_same_shape("student_logits", student_logits, "teacher_probs", teacher_probs)
    log_probs = ops.log_softmax(_float32(student_logits) / temperature, axis=-1)
    targets = ops.stop_gradient(_float32(teacher_probs))
    return -ops.mean(ops.sum(targets * log_probs, axis=-1))


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
    _check_same_shape(
        "student_patch_logits", student_patch_logits, "teacher_patch_probs", teacher_patch_probs
    )
    shape = _check_rank("student_patch_logits", student_patch_logits, (2,))
    wshape = _static_shape(masks_weight)
    if len(wshape) != 1 or not _same_dim(wshape[0], shape[0]):
        raise ValueError(
            "`masks_weight` must have one entry per masked-patch row, received "
            f"masks_weight.shape={wshape} and student_patch_logits.shape={shape}."
        )
    log_probs = ops.log_softmax(_float32(student_patch_logits) / temperature, axis=-1)
    targets = ops.stop_gradient(_float32(teacher_patch_probs))
    weight = ops.stop_gradient(_float32(masks_weight))
    per_patch = ops.sum(targets * log_probs, axis=-1)
    # `where`, not a product: a padding row must not turn the sum into NaN whatever it holds.
    weighted = ops.where(ops.greater(weight, 0.0), per_patch * weight, 0.0)
    return -ops.sum(weighted) / _float32(num_images)


def koleo(features, eps=1e-8, reduction=None, groups=1):
    """KoLeo (Kozachenko-Leonenko) spreading regularizer: -mean_i log(||x_i - x_nn(i) + eps|| + eps).

    As the reference: x is L2-normalized as x / max(||x||, eps); each row's nearest neighbour is the other
    row with the largest dot product; the distance adds eps to every element of the difference (torch's
    `PairwiseDistance`), which keeps it and its gradient finite for identical rows.

    Which rows are neighbours: by default this replica's rows, as the reference. With `reduction`, the rows
    of every replica are gathered first (`reduction.all_gather`, which must pass gradients back to the
    replica that owns each row) and the loss is taken over the global batch, as DINOv3's distributed KoLeo:
    every replica then computes the same value. With `groups=g`, the rows are g equal consecutive groups
    (e.g. the replicas of a JAX program that holds the global batch) and the loss is the mean over groups
    of each group's own KoLeo, which is the reference's per-replica KoLeo averaged over replicas.

    Differences, both in degenerate cases only: the self-similarity is masked with -2 (below any cosine)
    instead of -1, so an exactly antipodal pair cannot pick itself by a tie; and fewer than 2 rows (per
    group) have no neighbour, so the result is 0 (the reference would report the constant
    -log(eps * (sqrt(D) + 1)) with a zero gradient).

    Args:
        features: tensor (N, D). The student backbone's CLS tokens of one global crop (before the head).
        eps: float, default 1e-8.
        reduction: optional `CrossReplica`, default None (this replica's rows only). Gather the rows of
            every replica before finding neighbours.
        groups: int, default 1. Number of equal row groups that each get their own KoLeo (averaged).

    Returns:
        float32 scalar.

    Example:
    >>> koleo(backbone_out["cls_token"])
    >>> koleo(cls, reduction=CrossReplica(all_gather_fn=..., num_replicas=8))   # global batch
    """
    _check_rank("features", features, (2,))
    groups = int(groups)
    if groups < 1:
        raise ValueError(f"`groups` must be at least 1, received {groups}.")
    x = _float32(features)
    if reduction is not None:
        x = reduction.all_gather(x)
    shape = _static_shape(x)
    if groups > 1:
        return _grouped_koleo(x, shape, eps, groups)
    if shape[0] is not None and shape[0] < 2:
        return ops.zeros((), "float32")
    # sqrt(max(|x|^2, eps^2)) == max(|x|, eps), with a finite gradient at x = 0.
    x = x / ops.sqrt(ops.maximum(ops.sum(ops.square(x), axis=-1, keepdims=True), eps * eps))
    dots = ops.matmul(x, ops.transpose(x))
    index = ops.arange(ops.shape(x)[0])
    dots = ops.where(ops.equal(index[:, None], index[None, :]), -2.0, dots)
    neighbour = ops.take(x, ops.argmax(dots, axis=-1), axis=0)
    distance = ops.sqrt(ops.sum(ops.square(x - neighbour + eps), axis=-1))
    loss = -ops.mean(ops.log(distance + eps))
    if shape[0] is None:
        # Dynamic batch: the same guard at run time (the unguarded value is finite, so `where` is safe).
        loss = ops.where(ops.greater(ops.shape(x)[0], 1), loss, 0.0)
    return loss


def _grouped_koleo(x, shape, eps, groups):
    """KoLeo within each of `groups` equal consecutive row groups of x (N, D), averaged over groups."""
    rows, dim = shape
    if rows is None or rows % groups:
        raise ValueError(
            f"`features` must split into {groups} equal groups of rows, received features.shape={shape}."
        )
    per_group = rows // groups
    if per_group < 2:
        return ops.zeros((), "float32")
    x = x / ops.sqrt(ops.maximum(ops.sum(ops.square(x), axis=-1, keepdims=True), eps * eps))
    grouped = ops.reshape(x, (groups, per_group, dim))
    dots = ops.matmul(grouped, ops.transpose(grouped, (0, 2, 1)))
    index = ops.arange(per_group)
    dots = ops.where(ops.equal(index[:, None], index[None, :])[None], -2.0, dots)
    nearest = ops.argmax(dots, axis=-1) + ops.arange(groups)[:, None] * per_group
    neighbour = ops.take(x, ops.reshape(nearest, (-1,)), axis=0)
    distance = ops.sqrt(ops.sum(ops.square(x - neighbour + eps), axis=-1))
    # Equal groups: the mean over all rows is the mean over groups of each group's mean.
    return -ops.mean(ops.log(distance + eps))


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
    gshape = _check_rank("student_global_logits", student_global_logits, (2,))
    _check_same_shape(
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
        lshape = _check_rank("student_local_logits", student_local_logits, (2,))
        if not _same_dim(lshape[-1], gshape[-1]):
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

    teacher = ops.stop_gradient(_float32(teacher_global_probs))
    teacher = ops.reshape(teacher, (2, batch, num_prototypes))

    if n_local_crops > 0:
        log_local = ops.log_softmax(_float32(student_local_logits) / student_temperature, axis=-1)
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
        cshape = _check_rank("student_global_cls", student_global_cls, (2,))
        if not _same_dim(cshape[0], gshape[0]):
            raise ValueError(
                "`student_global_cls` must have one row per global-crop image, received "
                f"student_global_cls.shape={cshape} and student_global_logits.shape={gshape}."
            )
        half = None if cshape[0] is None else cshape[0] // 2
        cls = _float32(student_global_cls)
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
