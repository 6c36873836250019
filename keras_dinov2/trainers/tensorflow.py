"""TensorFlow train_step: gradients through a GradientTape."""

import tensorflow as tf


def train_step(model, data):
    """One DINOv2 step on TensorFlow."""
    with tf.GradientTape() as tape:
        loss, logs = model.compute_dinov2_loss(data, training=True)
        loss = model.scale_loss(loss)
    grads = tape.gradient(loss, model.trainable_variables)
    return model.apply_dinov2_update(grads, logs)


def test_step(model, data):
    """The loss on a validation batch, without any update."""
    _, logs = model.compute_dinov2_loss(data, training=False, update_centers=False)
    return logs
