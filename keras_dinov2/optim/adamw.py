"""DINOv2AdamW: torch's AdamW, with each variable's group multipliers applied to its update."""

import math
import numbers
import operator

import keras
from keras import ops

from keras_dinov2 import ops as ops_kernels
from keras_dinov2.optim.groups import ParamGroup, ParamGroups

LearningRateSchedule = keras.optimizers.schedules.LearningRateSchedule


def _check_rate(name, value, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, LearningRateSchedule):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
        raise ValueError(
            f"`{name}` must be a finite number >= 0 or a LearningRateSchedule"
            + (" or None" if allow_none else "")
            + f", received {value!r}."
        )
    return float(value)


def _at_step(value, step):
    if isinstance(value, LearningRateSchedule):
        return ops.cast(value(step), "float32")
    return ops.convert_to_tensor(value, "float32")


def _bias_correction(beta, step):
    """1 - beta^step without float32 cancellation: 1 - 0.999 is off by 1.3e-5 in float32, -expm1 is not.

    torch evaluates it in Python float64; this keeps DINOv2AdamW within float32 rounding of torch's steps.
    """
    if beta == 0.0:
        return ops.ones_like(step)
    return -ops.expm1(step * math.log(beta))


@keras.saving.register_keras_serializable(package="keras_dinov2")
class DINOv2AdamW(keras.optimizers.Optimizer):
    """AdamW with the reference's per-variable lr / weight-decay multipliers and last-layer lr schedule.

    For a variable in group g at step t (`optimizer.iterations`, 0 at the first update):

        lr = (last_layer_learning_rate(t) if g.is_last_layer else learning_rate(t)) * g.lr_multiplier
        wd = weight_decay(t) * g.wd_multiplier
        m = beta_1 m + (1 - beta_1) grad;  v = beta_2 v + (1 - beta_2) grad^2
        param = param * (1 - lr wd) - lr / (1 - beta_1^(t+1)) * m / (sqrt(v / (1 - beta_2^(t+1))) + epsilon)

    which is torch.optim.AdamW's update (epsilon added after the bias correction, decay scaled by the group's
    lr) with the schedules the reference writes into each param group before the step. The multiplier scales
    the whole update, not the gradient. A variable with lr 0 (the last layer in the first epoch) does not move,
    but its moments still accumulate, as in the reference.

    With `frozen_last_layer_steps` = F > 0 (DINO v1, which sets the last layer's gradients to None in its first
    epoch), the last-layer variables' gradients are dropped for t < F: their moments, their values and their
    weight decay stay untouched, and their own step count (torch keeps one per parameter, started at its first
    gradient) is t + 1 - F from then on, in the bias corrections.

    The schedules are evaluated inside the update from the step variable, so one compiled train step serves
    the whole run on every backend, including JAX's `stateless_apply`. On PyTorch (eager) each group of variables
    with equal multipliers is updated in one multi-tensor call (`keras_dinov2.ops.multi_tensor_adamw`, the schedules
    read once per step as Python floats), the same values within float32 rounding. With `param_groups=None` every
    variable gets multipliers 1 (a plain AdamW); with groups, every variable the optimizer is built on must be
    in them (a `ValueError` lists the others). `exclude_from_weight_decay()` is honoured on top of the groups.

    Args:
        learning_rate: float or `LearningRateSchedule`, default 0.001. Base lr (multiplied per group).
        weight_decay: float or `LearningRateSchedule`, default 0.04. Base weight decay (multiplied per group).
        last_layer_learning_rate: float, `LearningRateSchedule` or None, default None. Lr of the last-layer
            groups; None uses `learning_rate`.
        param_groups: `ParamGroups`, dict {path: ParamGroup fields} or None, default None.
        beta_1: float, default 0.9.
        beta_2: float, default 0.999.
        epsilon: float, default 1e-8 (torch's AdamW default; Keras's AdamW uses 1e-7).
        frozen_last_layer_steps: int, default 0. Leading steps whose last-layer gradients are dropped.
        name: str, default "dinov2_adamw".
        **kwargs: other `keras.optimizers.Optimizer` arguments (e.g. `gradient_accumulation_steps`,
            `loss_scale_factor`). Its own `weight_decay` mechanism is not used.

    Example:
    >>> s = dinov2_schedules(total_steps=125000, steps_per_epoch=1250, global_batch_size=1024)
    >>> optimizer = DINOv2AdamW.from_schedules(s, param_groups(backbone, heads=[dino_head]))
    >>> optimizer.apply(grads, variables)
    """

    def __init__(
        self,
        learning_rate=0.001,
        weight_decay=0.04,
        last_layer_learning_rate=None,
        param_groups=None,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-8,
        frozen_last_layer_steps=0,
        name="dinov2_adamw",
        **kwargs,
    ):
        if isinstance(learning_rate, numbers.Real) and not isinstance(learning_rate, bool):
            learning_rate = float(learning_rate)
        super().__init__(learning_rate=learning_rate, weight_decay=None, name=name, **kwargs)
        self.base_weight_decay = _check_rate("weight_decay", weight_decay)
        self.last_layer_learning_rate = _check_rate(
            "last_layer_learning_rate", last_layer_learning_rate, allow_none=True
        )
        if isinstance(param_groups, dict):
            param_groups = ParamGroups.from_config(param_groups)
        if param_groups is not None and not isinstance(param_groups, ParamGroups):
            raise ValueError(
                "`param_groups` must be a ParamGroups (from `param_groups()`), a dict of its config or None, "
                f"received {type(param_groups).__name__}."
            )
        self.param_groups = param_groups
        for arg, value in (("beta_1", beta_1), ("beta_2", beta_2)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
                raise ValueError(f"`{arg}` must be in [0, 1), received {value!r}.")
        if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not epsilon > 0:
            raise ValueError(f"`epsilon` must be a number > 0, received {epsilon!r}.")
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = float(epsilon)
        frozen = frozen_last_layer_steps
        if isinstance(frozen, bool) or not isinstance(frozen, numbers.Integral) or frozen < 0:
            raise ValueError(f"`frozen_last_layer_steps` must be an integer >= 0, received {frozen!r}.")
        self.frozen_last_layer_steps = int(frozen)

    @classmethod
    def from_schedules(cls, schedules, param_groups=None, **kwargs):
        """An optimizer reading the lr, last-layer lr and weight decay of a `DINOv2Schedules`."""
        return cls(
            learning_rate=schedules.learning_rate,
            weight_decay=schedules.weight_decay,
            last_layer_learning_rate=schedules.last_layer_learning_rate,
            param_groups=param_groups,
            **kwargs,
        )

    def build(self, var_list):
        if self.built:
            return
        multipliers, missing = [], []
        for variable in var_list:
            if self.param_groups is None:
                group = ParamGroup("all", "all", 0, 1.0, 1.0, False)
            else:
                group = self.param_groups.get(variable)
                if group is None:
                    missing.append(getattr(variable, "path", repr(variable)))
                    continue
            wd_multiplier = group.wd_multiplier if self._use_weight_decay(variable) else 0.0
            multipliers.append((group.lr_multiplier, wd_multiplier, group.is_last_layer))
        if missing:
            raise ValueError(
                "Every variable given to DINOv2AdamW must be in its `param_groups`; received "
                f"{len(missing)} that are not: {missing[:10]}"
                + (" ..." if len(missing) > 10 else "")
                + ". Build the groups from the same student backbone and heads whose variables are trained."
            )
        super().build(var_list)
        # A tuple of plain floats: the multipliers are trace-time constants, not tracked state.
        self._multipliers = tuple(multipliers)
        self._momentums, self._velocities = self.add_optimizer_variables(
            var_list, ["momentum", "velocity"]
        )

    def current_hyperparameters(self):
        """(learning rate, last-layer learning rate, weight decay) at the current step, float32 tensors."""
        step = self.iterations
        if isinstance(self._learning_rate, LearningRateSchedule):
            learning_rate = _at_step(self._learning_rate, step)
        else:
            learning_rate = ops.cast(self._get_current_learning_rate(), "float32")
        if self.last_layer_learning_rate is None:
            last_layer_learning_rate = learning_rate
        else:
            last_layer_learning_rate = _at_step(self.last_layer_learning_rate, step)
        return learning_rate, last_layer_learning_rate, _at_step(self.base_weight_decay, step)

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        # Evaluate the schedules once per step, not once per variable, and hand them to `update_step`
        # through its `learning_rate` argument, which every backend (tf.distribute included) forwards.
        hyper = self.current_hyperparameters()
        if not self._multi_tensor_update(grads, trainable_variables, hyper):
            super()._backend_update_step(grads, trainable_variables, ops.stack(hyper))

    def _multi_tensor_update(self, grads, variables, hyper):
        """The update of each group of variables with the same (lr multiplier, wd multiplier, last layer) in one
        `multi_tensor_adamw` call, as the reference's fused param groups: PyTorch only (False elsewhere).

        The same values as `update_step` within float32 rounding (bias corrections and the lr products in Python
        floats, as torch's AdamW computes them).
        """
        if not ops_kernels.has_multi_tensor_adamw():
            return False
        # Host reads of the schedules and the step, once per update.
        lr, last_layer_lr, weight_decay = (float(x) for x in hyper)
        iterations = ops_kernels.host_int(self.iterations)
        iterations = int(ops.convert_to_numpy(self.iterations)) if iterations is None else iterations
        for (lr_multiplier, wd_multiplier, is_last_layer), positions, group_variables, momentums, velocities in (
                self._group_plan(variables)):
            step = iterations + 1
            if is_last_layer and self.frozen_last_layer_steps > 0:
                if iterations < self.frozen_last_layer_steps:
                    continue  # dropped gradients: moments, values and decay untouched
                step -= self.frozen_last_layer_steps
            group_lr = (last_layer_lr if is_last_layer else lr) * lr_multiplier
            ops_kernels.multi_tensor_adamw(
                group_variables, [grads[i] for i in positions], momentums, velocities,
                group_lr, weight_decay * wd_multiplier, step, self.beta_1, self.beta_2, self.epsilon,
            )
        return True

    def _group_plan(self, variables):
        """The variables by group: [(multipliers, positions in `variables`, variables, momentums, velocities)], kept
        for the last list of variables (an eager step passes the same variables each time: ~50 us a step)."""
        kept = self.__dict__.get("_kept_group_plan")
        if kept is not None and len(kept[0]) == len(variables) and all(map(operator.is_, kept[0], variables)):
            return kept[1]
        groups = {}
        for position, variable in enumerate(variables):
            index = self._get_variable_index(variable)
            groups.setdefault(self._multipliers[index], []).append((position, variable, index))
        plan = [(key, [p for p, _, _ in members], [v for _, v, _ in members],
                 [self._momentums[i] for _, _, i in members], [self._velocities[i] for _, _, i in members])
                for key, members in groups.items()]
        # Past Keras' attribute tracking (a cache of existing variables, not new state).
        object.__setattr__(self, "_kept_group_plan", (tuple(variables), plan))
        return plan

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        lr_multiplier, wd_multiplier, is_last_layer = self._multipliers[index]
        dtype = variable.dtype
        hyper = ops.cast(learning_rate, dtype)
        if len(hyper.shape) == 0:  # called directly with a plain learning rate
            lr, weight_decay = (
                hyper,
                ops.cast(_at_step(self.base_weight_decay, self.iterations), dtype),
            )
        else:
            lr, weight_decay = hyper[1 if is_last_layer else 0], hyper[2]
        lr = lr * lr_multiplier
        weight_decay = weight_decay * wd_multiplier
        gradient = ops.cast(gradient, dtype)
        step = ops.cast(self.iterations + 1, dtype)
        freezable = is_last_layer and self.frozen_last_layer_steps > 0
        if freezable:
            # The variable's own step count starts at its first kept gradient (clamped while dropped).
            step = ops.maximum(step - float(self.frozen_last_layer_steps), 1.0)
        bias_correction_1 = _bias_correction(self.beta_1, step)
        bias_correction_2 = _bias_correction(self.beta_2, step)

        m = self._momentums[index]
        v = self._velocities[index]
        new_m = m + (1.0 - self.beta_1) * (gradient - m)
        new_v = self.beta_2 * v + (1.0 - self.beta_2) * ops.square(gradient)
        denominator = ops.sqrt(new_v) / ops.sqrt(bias_correction_2) + self.epsilon
        update = (lr / bias_correction_1) * new_m / denominator
        new_variable = variable * (1.0 - lr * weight_decay) - update
        if freezable:
            keep = self.iterations < self.frozen_last_layer_steps
            # Tensors of the variables: JAX's stateless step refuses a Variable inside `where`.
            old_m, old_v, old_variable = (ops.convert_to_tensor(x) for x in (m, v, variable))
            new_m, new_v = ops.where(keep, old_m, new_m), ops.where(keep, old_v, new_v)
            new_variable = ops.where(keep, old_variable, new_variable)
        self.assign(m, new_m)
        self.assign(v, new_v)
        self.assign(variable, new_variable)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "weight_decay": keras.saving.serialize_keras_object(self.base_weight_decay),
                "last_layer_learning_rate": keras.saving.serialize_keras_object(
                    self.last_layer_learning_rate
                ),
                "param_groups": None
                if self.param_groups is None
                else self.param_groups.to_config(),
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "frozen_last_layer_steps": self.frozen_last_layer_steps,
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for key in ("weight_decay", "last_layer_learning_rate"):
            if isinstance(config.get(key), dict):
                config[key] = keras.saving.deserialize_keras_object(
                    config[key], custom_objects=custom_objects
                )
        return super().from_config(config, custom_objects=custom_objects)
