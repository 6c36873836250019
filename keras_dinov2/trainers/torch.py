"""PyTorch train_step: gradients through backward()."""

import torch


def train_step(model, data):
    """One DINOv2 step on PyTorch."""
    # Clear every trainable variable's gradient: Module.zero_grad() only reaches parameters
    # registered on modules, and a left-over gradient would be added to this step's.
    for variable in model.trainable_variables:
        variable.value.grad = None
    loss, logs = model.compute_dinov2_loss(data, training=True)
    model.scale_loss(loss).backward()
    grads = [v.value.grad for v in model.trainable_variables]
    with torch.no_grad():
        return model.apply_dinov2_update(grads, logs)


def test_step(model, data):
    """The loss on a validation batch, without any update."""
    with torch.no_grad():
        _, logs = model.compute_dinov2_loss(data, training=False, update_centers=False)
    return logs
