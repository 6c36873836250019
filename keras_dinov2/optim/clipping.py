"""Gradient clipping by global norm, over all gradients or per part (backbone, each head), as the reference does,
or per parameter tensor, as DINO v1 does."""

import math
import numbers

from keras import ops

from keras_dinov2.ops import scaled_by_global_norm


def clip_by_global_norm(grads, max_norm, in_place=False):
    """Scales gradients so that their joint L2 norm is at most `max_norm`, as torch's `clip_grad_norm_`.

    norm = sqrt(sum over tensors of sum(g^2)), computed in float32; every gradient is multiplied by
    min(max_norm / (norm + 1e-6), 1). `None` entries are skipped and returned as `None`; an all-zero or empty
    list has norm 0 and is returned unscaled. A non-finite norm propagates (like torch with its default
    `error_if_nonfinite=False`).

    Args:
        grads: list of tensors or None.
        max_norm: float > 0. The reference clips at 3.0 (`optim.clip_grad`).
        in_place: bool, default False. The gradients may be scaled in place (PyTorch, as `clip_grad_norm_`): for a
            caller that no longer needs them unscaled. Elsewhere, and by default, new tensors.

    Returns:
        (list of clipped gradients in their own dtypes, float32 scalar norm before clipping).

    Example:
    >>> clipped, norm = clip_by_global_norm([ops.ones((4,)) * 3.0], 3.0)   # norm 6.0, clipped to 1.5 each
    """
    if (
        isinstance(max_norm, bool)
        or not isinstance(max_norm, numbers.Real)
        or not 0 < max_norm < math.inf
    ):
        raise ValueError(f"`max_norm` must be a finite number > 0, received {max_norm!r}.")
    present = [g for g in grads if g is not None]
    if not present:
        return list(grads), ops.zeros((), "float32")
    scaled, norm = scaled_by_global_norm(present, float(max_norm), in_place)
    scaled = iter(scaled)
    return [None if g is None else next(scaled) for g in grads], norm


def clip_by_part(grads, variables, param_groups, max_norm=3.0, in_place=False):
    """Clips the gradients of each part (backbone, each head) by its own global norm, as the reference.

    Args:
        grads: list of tensors or None, aligned with `variables`.
        variables: list of variables (the ones `param_groups` was built from).
        param_groups: `ParamGroups`. Each variable's `part` decides its clipping unit.
        max_norm: float, default 3.0.
        in_place: bool, default False. As `clip_by_global_norm`'s.

    Returns:
        (list of clipped gradients aligned with `variables`, dict {part: float32 norm before clipping}).

    Example:
    >>> grads, norms = clip_by_part(grads, model.trainable_variables, groups, 3.0)
    >>> norms["backbone"]
    """
    grads, variables = list(grads), list(variables)
    if len(grads) != len(variables):
        raise ValueError(
            f"`grads` and `variables` must have the same length, received {len(grads)} and {len(variables)}."
        )
    indices = {}
    for i, variable in enumerate(variables):
        group = param_groups.get(variable)
        if group is None:
            raise ValueError(
                f"`variables` must all be in `param_groups`, received {getattr(variable, 'path', variable)!r}."
            )
        indices.setdefault(group.part, []).append(i)
    clipped, norms = list(grads), {}
    for part, part_indices in indices.items():
        part_grads, norms[part] = clip_by_global_norm([grads[i] for i in part_indices], max_norm, in_place)
        for i, g in zip(part_indices, part_grads):
            clipped[i] = g
    return clipped, norms


def clip_per_parameter(grads, variables, param_groups, max_norm=3.0):
    """Caps each gradient tensor's own L2 norm at `max_norm`: DINO v1's `clip_gradients` (main_dino.py).

    Every gradient g is multiplied by min(max_norm / (||g|| + 1e-6), 1), its norm computed in float32. The
    returned norms are each part's global norm before clipping (for the logs, the keys of `clip_by_part`).

    Args:
        grads: list of tensors or None, aligned with `variables`.
        variables: list of variables (the ones `param_groups` was built from).
        param_groups: `ParamGroups`. Each variable's `part` names its norm in the logs.
        max_norm: float, default 3.0 (v1's `--clip_grad`).

    Returns:
        (list of clipped gradients aligned with `variables`, dict {part: float32 norm before clipping}).

    Example:
    >>> grads, norms = clip_per_parameter(grads, model.trainable_variables, groups, 3.0)
    """
    grads, variables = list(grads), list(variables)
    if len(grads) != len(variables):
        raise ValueError(
            f"`grads` and `variables` must have the same length, received {len(grads)} and {len(variables)}."
        )
    clipped, squares = [], {}
    for g, variable in zip(grads, variables):
        part = param_groups[variable].part
        if g is None:
            clipped.append(None)
            continue
        square = ops.sum(ops.square(ops.cast(g, "float32")))
        squares.setdefault(part, []).append(square)
        clipped.append(g * ops.cast(ops.minimum(max_norm / (ops.sqrt(square) + 1e-6), 1.0), g.dtype))
    norms = {part: ops.sqrt(ops.sum(ops.stack(values))) for part, values in squares.items()}
    return clipped, norms


def clip_gradients(grads, variables, param_groups, max_norm, mode="per_part", loss_scale=None, in_place=False):
    """Clipping by `mode` ("per_part": `clip_by_part`; "per_parameter": `clip_per_parameter`) of the unscaled
    gradients: under loss scaling (`loss_scale`, the LossScaleOptimizer's current scale) the gradients are unscaled,
    clipped, and handed back scaled. `in_place`: `clip_by_part` may scale the gradients in place (PyTorch).
    Returns (gradients, {part: norm before clipping})."""
    clip = {"per_part": clip_by_part, "per_parameter": clip_per_parameter}.get(mode)
    if clip is None:
        raise ValueError(f'`mode` must be "per_part" or "per_parameter", received {mode!r}.')
    if loss_scale is not None:
        loss_scale = ops.convert_to_tensor(loss_scale)
        grads = [None if g is None else g / ops.cast(loss_scale, g.dtype) for g in grads]
    grads, norms = clip(grads, variables, param_groups, max_norm,
                        **({"in_place": in_place} if clip is clip_by_part else {}))
    if loss_scale is not None:
        grads = [None if g is None else g * ops.cast(loss_scale, g.dtype) for g in grads]
    return grads, norms
