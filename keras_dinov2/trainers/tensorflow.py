"""TensorFlow train_step: gradients through a GradientTape; tf.distribute replicas via the replica context."""

import tensorflow as tf

from keras_dinov2 import distribute
from keras_dinov2.distribute.tensorflow import strategy_scope
from keras_dinov2.trainers import host


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
        with strategy_scope(model.distribute_strategy):
            model.optimizer.build(model.trainable_variables)
    return None


def prepare_train_function(model):
    """Builds the optimizer's variables before Keras traces the train step.

    Without a strategy Keras leaves the optimizer to be built inside the first trace of the step; a `tf.function`
    that creates variables while tracing is traced a second time, and keeps what both traces made. Built here,
    eagerly, the step is traced once: ViT-S/14 on a 2-core CPU with XLA, the first call 74 -> 57 s, resident memory
    between steps 2,875 -> 2,643 MB and the step's peak 4,768 -> 4,534 MB. Under a strategy
    `maybe_symbolic_build` has already built it in the strategy's scope.
    """
    optimizer = model.optimizer
    if optimizer is not None and not optimizer.built and getattr(model, "_distribute_strategy", None) is None:
        optimizer.build(model.trainable_variables)


# Seconds between two releases of host memory during the first call of the train (or test) function.
FIRST_CALL_RELEASE_EVERY = 1.0


def wrap_made_function(model, function):
    """Keras' train (or test) function, handing host memory back during its first call and after it.

    The first call traces the step, optimizes the graph and, with `jit_compile=True`, compiles it with XLA, then
    runs it; the C allocator keeps the pages all that freed, beside the step's own buffers and every later step's.
    During that call `host.releasing_host_memory` returns them every `FIRST_CALL_RELEASE_EVERY` seconds, and once
    after it. ViT-S/14 with XLA on a 2-core CPU: resident memory between steps 3,468 -> 2,851 MB with the release
    after the call; the first call's peak 5,158 -> 4,654 MB with the releases during it (the step's own: ~4,520 MB).
    Only the first call: trimming after every step would cost ~5% of a graph-mode step (the trim itself and the
    pages faulted back in) for ~0.8 GB less at its peak. An eager model (`run_eagerly`) keeps the function.
    """
    if model.run_eagerly:
        return function
    pending = [True]

    def run(iterator):
        if not pending:
            return function(iterator)
        pending.clear()
        with host.releasing_host_memory(FIRST_CALL_RELEASE_EVERY):
            return function(iterator)

    return run


def test_step(model, data):
    """The loss on a validation batch, without any update."""
    reduction = distribute.replica_reduction()
    _, logs = model.compute_dinov2_loss(data, training=False, update_centers=False,
                                        reduction=reduction)
    return logs
