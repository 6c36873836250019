"""TensorFlow train_step: gradients through a GradientTape; tf.distribute replicas via the replica context."""

import tensorflow as tf

from keras_dinov2 import distribute


def cpu_dot_product_attention(query, key, value, scale):
    """softmax(q k^T * scale) v for (batch, tokens, heads, head_dim) float32 inputs, for TF on CPU.

    Keras' TensorFlow op scales the (batch, heads, tokens, tokens) logits; scaling q, a fraction
    of their size, before the product gives the same values (bitwise where the scale is a power
    of two, as for every 64-wide head) and a ViT-S/14 forward 3-4% faster under XLA on 2 cores
    (in one process, alternating calls).
    """
    logits = tf.einsum("btnh,bsnh->bnts", query * scale, key)
    return tf.einsum("bnts,bsnh->btnh", tf.nn.softmax(logits, axis=-1), value)


def cpu_function(name):
    """The CPU formulation called `name`; None where TensorFlow sees a GPU or a TPU (neither was
    measured), and for the names that have no TensorFlow formulation."""
    if tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"):
        return None
    return {"dot_product_attention": cpu_dot_product_attention}.get(name)


# Keras folds TensorFlow's int64 seeds into [0, 2**31 - 2) (`floormod`) before the stateless ops.
_TF_SEED_MODULUS = 2**31 - 2


def replica_seed(seed):
    """`trainers.replica_seed` on TensorFlow: offsets the seed by the replica's id in its sync group."""
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return seed
    context = tf.distribute.get_replica_context()
    count = context.num_replicas_in_sync
    if count < 2:
        return seed
    # Offsets spread over the seed range stay distinct after Keras' fold into int32.
    index = tf.cast(context.replica_id_in_sync_group, seed.dtype)
    offset = index * tf.cast(_TF_SEED_MODULUS // count, seed.dtype)
    return seed + tf.stack([offset, tf.zeros_like(offset)])


def _grads_already_reduced(grads_and_vars):
    return list(grads_and_vars)


def _optimizer_without_all_reduce(model):
    # Keras' TF optimizer sums the gradients over replicas inside `apply`. The step has already
    # averaged them (clipping needs the global gradients), so a second all-reduce would double
    # the communication and multiply the update by the replica count.
    inner = getattr(model.optimizer, "inner_optimizer", model.optimizer)
    if inner.__dict__.get("_all_reduce_sum_gradients") is not _grads_already_reduced:
        inner._all_reduce_sum_gradients = _grads_already_reduced


def _add(total, grads):
    if total is None:
        return list(grads)
    return [a if b is None else (b if a is None else a + b) for a, b in zip(total, grads)]


def train_step(model, data):
    """One DINOv2 update on TensorFlow (one replica's share under a tf.distribute strategy).

    The teacher's pass over the whole update first, then one tape per micro-batch, the
    gradients summed, one clipped optimizer step and the teacher's EMA.
    """
    reduction = distribute.replica_reduction()
    targets, teacher_logs = model.teacher_targets(data, reduction=reduction)
    steps = model.accumulation_steps
    grads, micro_logs = None, []
    for index in range(steps):
        micro = model.micro_batch(data, index)
        with tf.GradientTape() as tape:
            loss, logs = model.student_loss(micro, targets, index, training=True,
                                            reduction=reduction)
            loss = model.scale_loss(loss)
        grads = _add(grads, tape.gradient(loss, model.trainable_variables))
        micro_logs.append(logs)
    if steps > 1:
        grads = [None if g is None else g / steps for g in grads]
    logs = model.merge_logs(micro_logs, teacher_logs)
    if reduction is not None:
        grads = distribute.all_reduce_gradients(grads)
        _optimizer_without_all_reduce(model)
    return model.apply_dinov2_update(grads, logs)


def maybe_symbolic_build(model, keras_build, iterator=None, data_batch=None):
    """Keras' TensorFlow hook before fit / evaluate, made safe under a tf.distribute strategy.

    With a strategy, Keras averages one batch over the replicas to build the model symbolically,
    which fails on the boolean masks. The pretrainer creates its variables at construction, so
    only the optimizer may still need building, in the strategy's scope.
    """
    if getattr(model, "_distribute_strategy", None) is None:
        return keras_build(iterator=iterator, data_batch=data_batch)
    if model.optimizer is not None and not model.optimizer.built:
        with distribute._tf_scope(model.distribute_strategy):
            model.optimizer.build(model.trainable_variables)
    return None


def test_step(model, data):
    """The loss on a validation batch, without any update."""
    reduction = distribute.replica_reduction()
    _, logs = model.compute_dinov2_loss(data, training=False, update_centers=False,
                                        reduction=reduction)
    return logs
