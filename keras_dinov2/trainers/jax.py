"""JAX train_step: stateless, with teacher, centers and step counter in the returned state."""

import jax
from keras import StatelessScope


def _values(scope, variables, fallback):
    out = []
    for variable, old in zip(variables, fallback):
        new = scope.get_current_value(variable)
        out.append(old if new is None else new)
    return out


def train_step(model, state, data):
    """One DINOv2 step on JAX: `state` = (trainable, non_trainable, optimizer, metrics)."""
    if hasattr(model.optimizer, "dynamic_scale"):
        # Keras' LossScaleOptimizer updates its scale inside a cond, which cannot run in the
        # StatelessScope this step uses for the shared update code.
        raise ValueError(
            "mixed_float16 (loss scaling) is not supported by DINOv2Pretrainer on the JAX "
            "backend; use the mixed_bfloat16 policy, which needs no loss scaling."
        )
    trainable, non_trainable, optimizer_values, metrics_values = state

    def loss_fn(trainable_values, non_trainable_values):
        mapping = list(zip(model.trainable_variables, trainable_values))
        mapping += list(zip(model.non_trainable_variables, non_trainable_values))
        # The schedules read the optimizer's step counter in the forward pass.
        mapping += list(zip(model.optimizer.variables, optimizer_values))
        with StatelessScope(state_mapping=mapping) as scope:
            loss, logs = model.compute_dinov2_loss(data, training=True)
            loss = model.scale_loss(loss)
        new_non_trainable = _values(scope, model.non_trainable_variables, non_trainable_values)
        return loss, (logs, new_non_trainable)

    (_, (logs, non_trainable)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        trainable, non_trainable
    )
    variables = (
        model.trainable_variables
        + model.non_trainable_variables
        + model.optimizer.variables
        + model.metrics_variables
    )
    values = trainable + non_trainable + optimizer_values + metrics_values
    with StatelessScope(state_mapping=list(zip(variables, values))) as scope:
        logs = model.apply_dinov2_update(grads, logs)
    n_t, n_nt, n_o = (
        len(trainable), len(non_trainable), len(optimizer_values)
    )
    new_values = _values(scope, variables, values)
    state = (
        new_values[:n_t],
        new_values[n_t : n_t + n_nt],
        new_values[n_t + n_nt : n_t + n_nt + n_o],
        new_values[n_t + n_nt + n_o :],
    )
    return logs, state


def test_step(model, state, data):
    """The loss on a validation batch on JAX: `state` = (trainable, non_trainable, metrics)."""
    trainable, non_trainable = state[0], state[1]
    mapping = list(zip(model.trainable_variables, trainable))
    mapping += list(zip(model.non_trainable_variables, non_trainable))
    with StatelessScope(state_mapping=mapping):
        _, logs = model.compute_dinov2_loss(data, training=False, update_centers=False)
    return logs, state
