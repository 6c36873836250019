"""PyTorch train_step: gradients through backward(); torch.distributed ranks all-reduce them."""

import torch

from keras_dinov2 import distribute


def train_step(model, data):
    """One DINOv2 step on PyTorch (this rank's share when torch.distributed runs several)."""
    reduction = distribute.replica_reduction()
    # Clear every trainable variable's gradient: Module.zero_grad() only reaches parameters
    # registered on modules, and a left-over gradient would be added to this step's.
    for variable in model.trainable_variables:
        variable.value.grad = None
    loss, logs = model.compute_dinov2_loss(data, training=True, reduction=reduction)
    model.scale_loss(loss).backward()
    grads = [v.value.grad for v in model.trainable_variables]
    if reduction is not None:
        # Keras' torch backend has no DDP: average the ranks' gradients here, before clipping.
        grads = distribute.all_reduce_gradients(grads)
    with torch.no_grad():
        logs = model.apply_dinov2_update(grads, logs)
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
