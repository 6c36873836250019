"""JAX train_step: stateless, with teacher, centers and step counter in the returned state."""

import warnings

import jax
import jax.numpy as jnp
from keras import StatelessScope

from keras_dinov2.trainers.host import release_host_memory


def _values(scope, variables, fallback):
    out = []
    for variable, old in zip(variables, fallback):
        new = scope.get_current_value(variable)
        out.append(old if new is None else new)
    return out


def _mapping(variables, values):
    return list(zip(variables, values))


def train_step(model, state, data):
    """One DINOv2 update on JAX: `state` = (trainable, non_trainable, optimizer, metrics).

    The teacher's pass over the whole update first (targets, centers), then one gradient per
    micro-batch, summed in order (the micro-batches' activations are never alive together),
    then one clipped optimizer step and the teacher's EMA.

    Under mixed_float16, Keras wraps the optimizer in a LossScaleOptimizer, whose `apply`
    updates its scale inside a cond that cannot run in the StatelessScope of this step. The
    step does the same dynamic loss scaling itself: gradients of the scaled loss are unscaled;
    when one is not finite, the student and the optimizer keep their values (the step counter
    included) while the centers and the teacher's EMA are still updated, as the reference's
    GradScaler step; the scale doubles after `dynamic_growth_steps` finite steps and halves
    on overflow.
    """
    trainable, non_trainable, optimizer_values, metrics_values = state
    scaler = model.optimizer if hasattr(model.optimizer, "dynamic_scale") else None
    steps = model.accumulation_steps
    base = _mapping(model.optimizer.variables, optimizer_values)

    # The teacher's targets for the whole update (the schedules read the optimizer's counter).
    with StatelessScope(state_mapping=_mapping(model.trainable_variables, trainable)
                        + _mapping(model.non_trainable_variables, non_trainable) + base) as scope:
        targets, teacher_logs = model.teacher_targets(data)
    non_trainable = _values(scope, model.non_trainable_variables, non_trainable)

    def loss_fn(trainable_values, non_trainable_values, micro, index):
        mapping = _mapping(model.trainable_variables, trainable_values)
        mapping += _mapping(model.non_trainable_variables, non_trainable_values) + base
        with StatelessScope(state_mapping=mapping) as scope:
            loss, logs = model.student_loss(micro, targets, index, training=True)
            loss = model.scale_loss(loss)
        new_non_trainable = _values(scope, model.non_trainable_variables, non_trainable_values)
        return loss, (logs, new_non_trainable)

    grads, micro_logs = None, []
    for index in range(steps):
        micro = model.micro_batch(data, index)
        (_, (logs, non_trainable)), micro_grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, non_trainable, micro, index
        )
        micro_logs.append(logs)
        grads = micro_grads if grads is None else [a + b for a, b in zip(grads, micro_grads)]
    if steps > 1:
        grads = [g / steps for g in grads]
    logs = model.merge_logs(micro_logs, teacher_logs)

    optimizer = model.optimizer
    if scaler is not None:
        if jax.default_backend() == "cpu" and not getattr(model, "_warned_float16_cpu", False):
            model._warned_float16_cpu = True
            warnings.warn(
                "mixed_float16 on JAX's CPU backend: XLA's CPU compiler cannot differentiate "
                "float16 attention (it fails with \"precision 'F16_F16_F32' is not supported by "
                "dot_general on CPU\"). mixed_float16 is meant for GPUs; on a CPU use float32 "
                "or mixed_bfloat16.",
                stacklevel=2,
            )
        optimizer_variables = list(model.optimizer.variables)
        scale_index = _index(optimizer_variables, scaler.dynamic_scale)
        counter_index = _index(optimizer_variables, scaler.step_counter)
        scale = optimizer_values[scale_index]
        grads = [g / scale.astype(g.dtype) for g in grads]
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in grads]))
        optimizer = scaler.inner_optimizer
    variables = model.trainable_variables + model.optimizer.variables
    values = list(trainable) + list(optimizer_values)
    with StatelessScope(state_mapping=_mapping(variables, values)
                        + _mapping(model.non_trainable_variables, non_trainable)) as scope:
        logs = model.apply_gradients(grads, logs, optimizer=optimizer)
    new_values = _values(scope, variables, values)
    n_t = len(trainable)
    if scaler is not None:
        # An overflow step leaves the student and the optimizer as they were (Keras'
        # LossScaleOptimizer skips it too); only the scale and its counter move.
        new_values = [jnp.where(finite, new, old) for new, old in zip(new_values, values)]
        counter = optimizer_values[counter_index]
        grow = jnp.logical_and(finite, counter == scaler.dynamic_growth_steps - 1)
        new_values[n_t + counter_index] = jnp.where(
            finite, jnp.where(grow, jnp.zeros_like(counter), counter + 1), jnp.zeros_like(counter)
        )
        new_values[n_t + scale_index] = jnp.where(
            finite, jnp.where(grow, scale * 2.0, scale), scale * 0.5
        )
    trainable, optimizer_values = new_values[:n_t], new_values[n_t:]
    # The teacher follows the student as it is now (unchanged after an overflow).
    with StatelessScope(state_mapping=_mapping(model.trainable_variables, trainable)
                        + _mapping(model.non_trainable_variables, non_trainable)) as scope:
        model.update_teacher(logs["momentum"])
    non_trainable = _values(scope, model.non_trainable_variables, non_trainable)
    return logs, (trainable, non_trainable, optimizer_values, list(metrics_values))


def _index(variables, target):
    for i, variable in enumerate(variables):
        if variable is target:
            return i
    raise ValueError(f"{target.path} is not among the optimizer's variables.")


def test_step(model, state, data):
    """The loss on a validation batch on JAX: `state` = (trainable, non_trainable, metrics)."""
    trainable, non_trainable = state[0], state[1]
    mapping = list(zip(model.trainable_variables, trainable))
    mapping += list(zip(model.non_trainable_variables, non_trainable))
    with StatelessScope(state_mapping=mapping):
        _, logs = model.compute_dinov2_loss(data, training=False, update_centers=False)
    return logs, state


def wrap_step_function(step_function):
    """Keras' jitted step, compiled ahead of its first run with host memory released in between.

    On the first call the step is lowered and compiled for that call's arguments (JAX caches the executable, so
    the call that follows runs it without compiling again), then `release_host_memory` returns the compiler's
    freed pages before the step allocates its buffers: on a CPU the peak is then the step's, not the step's on
    top of the compiler's leftovers. Steps that are not jitted (`run_eagerly`, `jit_compile=False`) pass through.
    """
    lower = getattr(step_function, "lower", None)
    if lower is None:
        return step_function
    compiled = []

    def step(state, data):
        if not compiled:
            lower(state, data).compile()
            release_host_memory()
            compiled.append(True)
        return step_function(state, data)

    return step
