"""TensorFlow train_step: gradients through a GradientTape."""

import tensorflow as tf


def train_step(model, data):
    """One DINOv2 step on TensorFlow."""
    with tf.GradientTape() as tape:
        loss, logs = model.compute_dinov2_loss(data, training=True)
    grads = tape.gradient(loss, model.trainable_variables)
    return model.apply_dinov2_update(grads, logs)
