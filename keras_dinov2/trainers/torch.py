"""PyTorch train_step: gradients through backward(); torch.distributed ranks all-reduce them."""

import torch

from keras_dinov2 import distribute
from keras_dinov2.ops.torch import variable_tensors


def train_step(model, data):
    """One DINOv2 update on PyTorch (this rank's share when torch.distributed runs several).

    The teacher's pass over the whole update first (no autograd graph), then one backward pass
    per micro-batch, accumulating into the gradients, one clipped optimizer step and the EMA.
    """
    reduction = distribute.replica_reduction()
    # Clear every trainable variable's gradient: Module.zero_grad() only reaches parameters
    # registered on modules, and a left-over gradient would be added to this step's. The list is kept per compile
    # (`update_variables`): `trainable_variables` walks every layer each time it is read.
    variables = model.update_variables()
    tensors = variable_tensors(variables)  # their Parameters, without Keras' per-read checks
    for tensor in tensors:
        tensor.grad = None
    with torch.no_grad():
        targets, teacher_logs = model.teacher_targets(data, reduction=reduction)
    steps = model.accumulation_steps
    micro_logs = []
    for index in range(steps):
        micro = model.micro_batch(data, index)
        loss, logs = model.student_loss(micro, targets, index, training=True,
                                        reduction=reduction)
        model.scale_loss(loss / steps if steps > 1 else loss).backward()
        micro_logs.append({k: v.detach() if hasattr(v, "detach") else v for k, v in logs.items()})
    logs = model.merge_logs(micro_logs, teacher_logs)
    grads = [t.grad for t in tensors]
    if reduction is not None:
        # Keras' torch backend has no DDP: average the ranks' gradients here, before clipping.
        grads = distribute.all_reduce_gradients(grads)
    with torch.no_grad():
        # The gradients are this step's own buffers: clipping scales them in place, as clip_grad_norm_ does.
        logs = model.apply_dinov2_update(grads, logs, variables=variables, in_place=True)
    if reduction is not None:
        logs = distribute.average_logs(logs)
    return logs


def test_step(model, data):
    """The loss on a validation batch, without any update."""
    reduction = distribute.replica_reduction()
    with torch.no_grad():
        _, logs = model.compute_dinov2_loss(data, training=False, update_centers=False,
                                            reduction=reduction)
    if reduction is not None:
        logs = distribute.average_logs(logs)
    return logs
