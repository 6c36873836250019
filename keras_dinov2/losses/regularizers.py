"""KoLeo: the Kozachenko-Leonenko differential-entropy regularizer on the student's CLS features."""

from keras import ops

from keras_dinov2.losses.checks import as_float32, check_rank, static_shape
from keras_dinov2.ops.eager import koleo as koleo_kernel


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
    check_rank("features", features, (2,))
    groups = int(groups)
    if groups < 1:
        raise ValueError(f"`groups` must be at least 1, received {groups}.")
    x = as_float32(features)
    if reduction is not None:
        x = reduction.all_gather(x)
    shape = static_shape(x)
    if groups > 1:
        return _grouped_koleo(x, shape, eps, groups)
    if shape[0] is not None and shape[0] < 2:
        return ops.zeros((), "float32")
    loss = None if shape[0] is None else koleo_kernel(x, eps)  # PyTorch: the reference's calls
    if loss is not None:
        return loss
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
