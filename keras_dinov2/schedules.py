"""Per-step schedules for DINOv2 pretraining: learning rate, weight decay, teacher momentum and temperature.

Every schedule is a `keras.optimizers.schedules.LearningRateSchedule`: `schedule(step)` builds its value from a
step tensor with `keras.ops` only, so it runs inside a compiled train step (`jax.jit`, `tf.function` with XLA,
torch) and reads the current step instead of a value frozen at trace time. It returns a float32 tensor with the
shape of `step` (a scalar for a scalar step). `schedule.value_at(step)` gives the same numbers in float64 NumPy,
for logging and tests. At a host step (a Python or NumPy integer; on PyTorch a CPU tensor: `ops.host_int`)
`schedule(step)` is `value_at(step)` rounded to float32, as the reference's float64 arrays (a dozen eager Keras ops
otherwise; the two agree within 2e-6). Schedules serialize with `keras.saving.serialize_keras_object`.

Reference: facebookresearch/dinov2 `utils/utils.py` (CosineScheduler), `train/train.py` (build_schedulers) and
`configs/ssl_default_config.yaml` (the defaults of `dinov2_schedules`); DINO v1's rules (linear lr scaling, the
teacher temperature per epoch, no zero-lr last layer) from facebookresearch/dino `main_dino.py`.
"""

import dataclasses
import math
import numbers

import keras
import numpy as np
from keras import ops

from keras_dinov2.ops import host_int

__all__ = [
    "OFFICIAL_EPOCH_LENGTH",
    "CosineSchedule",
    "FrozenStartSchedule",
    "EpochTableSchedule",
    "DINOv2Schedules",
    "scaled_learning_rate",
    "dinov2_schedules",
    "schedules_from_config",
]

# The reference counts an "epoch" as a fixed number of iterations, whatever the dataset size.
OFFICIAL_EPOCH_LENGTH = 1250

_LearningRateSchedule = keras.optimizers.schedules.LearningRateSchedule


def _host_value(schedule, step):
    """`schedule.value_at(step)` as a float32 tensor where the step is on the host at no cost, else None; the last
    step's tensor kept (a step reads the learning rate three times: the logs, Keras' optimizer, the groups)."""
    index, last = host_int(step), schedule.__dict__.get("_last_host_value")
    if index is not None and (last is None or last[0] != index):
        # A Python float with the dtype named: a third of the conversion time of a NumPy scalar on PyTorch.
        value = ops.convert_to_tensor(float(schedule.value_at(index)), "float32")
        last = schedule.__dict__["_last_host_value"] = (index, value)
    return None if index is None else last[1]


def _check_int(name, value, minimum=0):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, received {value!r}.")
    return int(value)


def _check_float(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, received {value!r}.")
    return float(value)


def _steps_from_epochs(name, epochs, steps_per_epoch):
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Real) or not 0 <= epochs < math.inf:
        raise ValueError(f"`{name}` must be a finite number >= 0, received {epochs!r}.")
    return int(round(epochs * steps_per_epoch))


@keras.saving.register_keras_serializable(package="keras_dinov2")
class CosineSchedule(_LearningRateSchedule):
    """Frozen start, linear warmup, then half-cosine decay: the reference's CosineScheduler.

    For step s, with F = `freeze_steps`, W = `warmup_steps`, T = `total_steps` and n = T - W - F:

    - s < F: 0;
    - F <= s < F + W: linear from `start_warmup_value` (at s = F) to `base_value` (at s = F + W - 1, both
      ends included, as `np.linspace(start, base, W)`);
    - F + W <= s < T: final + (base - final) * (1 + cos(pi * i / n)) / 2 with i = s - F - W, so the cosine
      starts at `base_value` and stops one step short of `final_value`;
    - s >= T: `final_value`.

    The graph evaluates the cosine as (base - final) * sin(pi/2 * (T - s) / n)^2, the same quantity written so
    that float32 keeps full relative precision near the end, where the values are tiny (min_lr = 1e-6 under a
    base lr of 4e-3). Steps are exact in float32 up to 2^24.

    Args:
        base_value: float. Value at the end of the warmup and at the start of the cosine.
        final_value: float. Value the cosine decays to, and the value from `total_steps` on.
        total_steps: int. Length of the schedule (freeze + warmup + cosine); may be 0 (always `final_value`).
        warmup_steps: int, default 0.
        start_warmup_value: float, default 0.0. First value of the warmup.
        freeze_steps: int, default 0. Steps of value 0 before the warmup.

    Example:
    >>> lr = CosineSchedule(4e-3, 1e-6, total_steps=100 * 1250, warmup_steps=10 * 1250)
    >>> lr(ops.convert_to_tensor(12500))   # 0.004 (float32 tensor)
    >>> lr.value_at(0), lr.value_at(125000)   # (0.0, 1e-06)
    """

    def __init__(
        self,
        base_value,
        final_value,
        total_steps,
        warmup_steps=0,
        start_warmup_value=0.0,
        freeze_steps=0,
    ):
        self.base_value = _check_float("base_value", base_value)
        self.final_value = _check_float("final_value", final_value)
        self.total_steps = _check_int("total_steps", total_steps)
        self.warmup_steps = _check_int("warmup_steps", warmup_steps)
        self.start_warmup_value = _check_float("start_warmup_value", start_warmup_value)
        self.freeze_steps = _check_int("freeze_steps", freeze_steps)
        if self.freeze_steps + self.warmup_steps > self.total_steps:
            raise ValueError(
                "`freeze_steps + warmup_steps` must be at most `total_steps`, received "
                f"freeze_steps={freeze_steps}, warmup_steps={warmup_steps}, total_steps={total_steps}."
            )

    @property
    def _cosine_steps(self):
        return self.total_steps - self.warmup_steps - self.freeze_steps

    def __call__(self, step):
        value = _host_value(self, step)
        if value is not None:
            return value
        s = ops.cast(step, "float32")
        freeze, warmup, total = self.freeze_steps, self.warmup_steps, self.total_steps
        # Denominators are clamped to 1: the branch they serve is never selected when they would be 0, and
        # this keeps NaN out of the unselected side of `where`.
        warmup_slope = (self.base_value - self.start_warmup_value) / max(warmup - 1, 1)
        warm = self.start_warmup_value + warmup_slope * (s - freeze)
        half_angle = (0.5 * math.pi / max(self._cosine_steps, 1)) * (total - s)
        cosine = self.final_value + (self.base_value - self.final_value) * ops.square(
            ops.sin(half_angle)
        )
        value = ops.where(s < freeze + warmup, warm, cosine)
        value = ops.where(s < freeze, 0.0, value)
        value = ops.where(s >= total, self.final_value, value)
        return ops.cast(value, "float32")

    def value_at(self, step):
        """The schedule's value at `step` (int or integer array) in float64 NumPy, for logging and tests."""
        s = np.asarray(step, dtype=np.float64)
        freeze, warmup, total = self.freeze_steps, self.warmup_steps, self.total_steps
        warm = self.start_warmup_value + (self.base_value - self.start_warmup_value) * (
            s - freeze
        ) / max(warmup - 1, 1)
        fraction = (s - freeze - warmup) / max(self._cosine_steps, 1)
        cosine = self.final_value + 0.5 * (self.base_value - self.final_value) * (
            1.0 + np.cos(np.pi * fraction)
        )
        value = np.where(s < freeze + warmup, warm, cosine)
        value = np.where(s < freeze, 0.0, value)
        value = np.where(s >= total, self.final_value, value)
        return float(value) if value.ndim == 0 else value

    def get_config(self):
        return {
            "base_value": self.base_value,
            "final_value": self.final_value,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "start_warmup_value": self.start_warmup_value,
            "freeze_steps": self.freeze_steps,
        }


@keras.saving.register_keras_serializable(package="keras_dinov2")
class FrozenStartSchedule(_LearningRateSchedule):
    """A schedule whose first `frozen_steps` values are replaced by 0: the reference's last-layer lr.

    Unlike `CosineSchedule(freeze_steps=...)`, this does not shift the wrapped schedule: it overwrites its
    start, as the reference does to the last layer's copy of the lr table (`schedule[:freeze] = 0`). Like the
    reference, steps at or past the wrapped schedule's `total_steps` (when it has one) keep its final value even
    if `frozen_steps` is larger.

    Args:
        schedule: `LearningRateSchedule` (anything with `__call__(step)`; `value_at(step)` for NumPy use).
        frozen_steps: int. Number of leading steps with value 0.

    Example:
    >>> lr = CosineSchedule(4e-3, 1e-6, total_steps=125000, warmup_steps=12500)
    >>> last_layer_lr = FrozenStartSchedule(lr, frozen_steps=1250)   # 0 for the first epoch
    """

    def __init__(self, schedule, frozen_steps):
        if isinstance(schedule, dict):
            schedule = keras.saving.deserialize_keras_object(schedule)
        if not callable(schedule):
            raise ValueError(
                f"`schedule` must be a LearningRateSchedule or callable(step), received {schedule!r}."
            )
        self.schedule = schedule
        self.frozen_steps = _check_int("frozen_steps", frozen_steps)

    @property
    def _zero_until(self):
        total = getattr(self.schedule, "total_steps", None)
        return self.frozen_steps if total is None else min(self.frozen_steps, int(total))

    def __call__(self, step):
        value = _host_value(self, step)
        if value is not None:
            return value
        value = ops.cast(self.schedule(step), "float32")
        return ops.where(ops.cast(step, "float32") < self._zero_until, 0.0, value)

    def value_at(self, step):
        """The schedule's value at `step` (int or integer array) in float64 NumPy."""
        value = np.where(np.asarray(step) < self._zero_until, 0.0, self.schedule.value_at(step))
        return float(value) if value.ndim == 0 else value

    def get_config(self):
        return {
            "schedule": keras.saving.serialize_keras_object(self.schedule),
            "frozen_steps": self.frozen_steps,
        }


@keras.saving.register_keras_serializable(package="keras_dinov2")
class EpochTableSchedule(_LearningRateSchedule):
    """A warmup table per epoch: DINO v1's teacher temperature, constant within an epoch.

    For epoch e = floor(step / `steps_per_epoch`): `linspace(start_value, final_value, warmup_epochs)[e]` while
    e < `warmup_epochs`, else `final_value` (main_dino.py's `teacher_temp_schedule`, indexed by the epoch).

    Args:
        final_value: float. The value after the warmup.
        start_value: float. The value of epoch 0.
        warmup_epochs: int >= 0. Entries of the linspace (0: `final_value` from the start).
        steps_per_epoch: int >= 1.

    Example:
    >>> EpochTableSchedule(0.07, 0.04, warmup_epochs=30, steps_per_epoch=100).value_at(150)   # epoch 1
    """

    def __init__(self, final_value, start_value, warmup_epochs, steps_per_epoch):
        self.final_value = _check_float("final_value", final_value)
        self.start_value = _check_float("start_value", start_value)
        self.warmup_epochs = _check_int("warmup_epochs", warmup_epochs)
        self.steps_per_epoch = _check_int("steps_per_epoch", steps_per_epoch, minimum=1)

    def _slope(self):
        return (self.final_value - self.start_value) / max(self.warmup_epochs - 1, 1)

    def __call__(self, step):
        value = _host_value(self, step)
        if value is not None:
            return value
        epoch = ops.floor(ops.cast(step, "float32") / float(self.steps_per_epoch))
        warm = self.start_value + self._slope() * epoch
        return ops.cast(ops.where(epoch < self.warmup_epochs, warm, self.final_value), "float32")

    def value_at(self, step):
        """The schedule's value at `step` (int or integer array) in float64 NumPy."""
        epoch = np.floor_divide(np.asarray(step), self.steps_per_epoch).astype(np.float64)
        value = np.where(epoch < self.warmup_epochs, self.start_value + self._slope() * epoch, self.final_value)
        return float(value) if value.ndim == 0 else value

    def get_config(self):
        return {"final_value": self.final_value, "start_value": self.start_value,
                "warmup_epochs": self.warmup_epochs, "steps_per_epoch": self.steps_per_epoch}


@dataclasses.dataclass(frozen=True)
class DINOv2Schedules:
    """The five per-step schedules of a DINOv2 run (see `dinov2_schedules`).

    Args:
        learning_rate: `CosineSchedule`. Base lr of every parameter group (times its lr multiplier).
        last_layer_learning_rate: `FrozenStartSchedule`. Lr of the heads' prototype layers.
        weight_decay: `CosineSchedule`. AdamW weight decay (times each group's wd multiplier).
        teacher_momentum: `CosineSchedule`. EMA momentum of the teacher.
        teacher_temperature: `CosineSchedule` (per step) or `EpochTableSchedule` (per epoch). Softmax temperature
            of the teacher's outputs.

    Example:
    >>> s = dinov2_schedules(total_steps=125000, steps_per_epoch=1250, global_batch_size=1024)
    >>> s.values(0)   # {"learning_rate": 0.0, ..., "teacher_temperature": 0.04}
    """

    learning_rate: CosineSchedule
    last_layer_learning_rate: FrozenStartSchedule
    weight_decay: CosineSchedule
    teacher_momentum: CosineSchedule
    teacher_temperature: CosineSchedule | EpochTableSchedule

    def values(self, step):
        """Every schedule's value at `step` as Python floats (NumPy evaluation), keyed by field name."""
        return {
            field.name: float(getattr(self, field.name).value_at(int(step)))
            for field in dataclasses.fields(self)
        }

    def __call__(self, step):
        """Every schedule's value at `step` as float32 tensors (in-graph evaluation), keyed by field name."""
        return {field.name: getattr(self, field.name)(step) for field in dataclasses.fields(self)}


def scaled_learning_rate(base_lr, global_batch_size, scaling_rule="sqrt_wrt_1024"):
    """The peak learning rate for a global batch size under the reference's scaling rule.

    Reference: `lr = base_lr * sqrt(global_batch_size / 1024)` ("sqrt_wrt_1024", the only rule it implements);
    DINO v1's main_dino.py: `lr = base_lr * global_batch_size / 256` ("linear_wrt_256").

    Args:
        base_lr: float. Learning rate for a global batch of 1024 (the reference's `optim.base_lr`, 0.004), or of
            256 under "linear_wrt_256" (v1's `--lr`, 0.0005).
        global_batch_size: int. Images per optimizer step, summed over all replicas.
        scaling_rule: str or None, default "sqrt_wrt_1024". "linear_wrt_256" for v1; None returns `base_lr`.

    Example:
    >>> scaled_learning_rate(0.004, 256)   # 0.002
    """
    base_lr = _check_float("base_lr", base_lr)
    global_batch_size = _check_int("global_batch_size", global_batch_size, minimum=1)
    if scaling_rule is None:
        return base_lr
    if scaling_rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(global_batch_size / 1024.0)
    if scaling_rule == "linear_wrt_256":
        return base_lr * global_batch_size / 256.0
    raise ValueError(f'`scaling_rule` must be "sqrt_wrt_1024", "linear_wrt_256" or None, received {scaling_rule!r}.')


def dinov2_schedules(
    total_steps,
    steps_per_epoch,
    global_batch_size,
    base_lr=0.004,
    min_lr=1e-6,
    warmup_epochs=10,
    weight_decay=0.04,
    weight_decay_end=0.4,
    momentum_teacher=0.992,
    final_momentum_teacher=1.0,
    teacher_temp=0.07,
    warmup_teacher_temp=0.04,
    warmup_teacher_temp_epochs=30,
    freeze_last_layer_epochs=1,
    scaling_rule="sqrt_wrt_1024",
    teacher_temp_per_epoch=False,
    freeze_last_layer_mode="zero_lr",
):
    """The reference's five schedules (build_schedulers), for a run of `total_steps` optimizer steps.

    - learning rate: linear warmup from 0 over `warmup_epochs`, then cosine to `min_lr`, peaking at
      `base_lr * sqrt(global_batch_size / 1024)`;
    - last-layer learning rate: the same, but 0 during the first `freeze_last_layer_epochs`;
    - weight decay: cosine from `weight_decay` to `weight_decay_end`, no warmup;
    - teacher momentum: cosine from `momentum_teacher` to `final_momentum_teacher`, no warmup;
    - teacher temperature: linear from `warmup_teacher_temp` to `teacher_temp` over
      `warmup_teacher_temp_epochs`, then constant (the reference builds it as a cosine with equal ends whose
      length is the warmup, so the linear ramp includes both ends and the constant comes from "past the end").

    An "epoch" is `steps_per_epoch` steps (the reference's OFFICIAL_EPOCH_LENGTH is 1250, whatever the dataset
    size). Epoch counts may be fractional (useful for short runs) and are rounded to whole steps.

    Args:
        total_steps: int. Optimizer steps in the run (the reference's epochs * 1250).
        steps_per_epoch: int. Steps in one "epoch".
        global_batch_size: int. Images per optimizer step over all replicas (for the lr scaling rule).
        base_lr: float, default 0.004. Lr for a global batch of 1024.
        min_lr: float, default 1e-6.
        warmup_epochs: float, default 10.
        weight_decay: float, default 0.04.
        weight_decay_end: float, default 0.4.
        momentum_teacher: float, default 0.992.
        final_momentum_teacher: float, default 1.0.
        teacher_temp: float, default 0.07.
        warmup_teacher_temp: float, default 0.04.
        warmup_teacher_temp_epochs: float, default 30.
        freeze_last_layer_epochs: float, default 1.
        scaling_rule: str or None, default "sqrt_wrt_1024". None uses `base_lr` as the peak lr.
        teacher_temp_per_epoch: bool, default False. True: the temperature is `EpochTableSchedule` (DINO v1), the
            warmup epochs rounded to whole epochs.
        freeze_last_layer_mode: str, default "zero_lr". "drop_grad" (DINO v1): the last layer's lr is the lr
            itself, since the optimizer drops its gradients instead (`DINOv2AdamW(frozen_last_layer_steps=...)`).

    Returns:
        `DINOv2Schedules`.

    Example:
    >>> s = dinov2_schedules(total_steps=100 * 1250, steps_per_epoch=1250, global_batch_size=1024)
    >>> s.learning_rate.value_at(12500), s.teacher_temperature.value_at(40000)   # (0.004, 0.07)
    """
    total_steps = _check_int("total_steps", total_steps, minimum=1)
    steps_per_epoch = _check_int("steps_per_epoch", steps_per_epoch, minimum=1)
    peak_lr = scaled_learning_rate(base_lr, global_batch_size, scaling_rule)
    warmup_steps = _steps_from_epochs("warmup_epochs", warmup_epochs, steps_per_epoch)
    if warmup_steps > total_steps:
        raise ValueError(
            f"`warmup_epochs` * `steps_per_epoch` ({warmup_steps} steps) must be at most `total_steps`, "
            f"received warmup_epochs={warmup_epochs}, steps_per_epoch={steps_per_epoch}, "
            f"total_steps={total_steps}. Lower `warmup_epochs` for a short run."
        )
    temp_steps = _steps_from_epochs(
        "warmup_teacher_temp_epochs", warmup_teacher_temp_epochs, steps_per_epoch
    )
    frozen_steps = _steps_from_epochs(
        "freeze_last_layer_epochs", freeze_last_layer_epochs, steps_per_epoch
    )
    if freeze_last_layer_mode not in ("zero_lr", "drop_grad"):
        raise ValueError('`freeze_last_layer_mode` must be "zero_lr" or "drop_grad", '
                         f"received {freeze_last_layer_mode!r}.")
    learning_rate = CosineSchedule(peak_lr, min_lr, total_steps, warmup_steps=warmup_steps)
    if teacher_temp_per_epoch:
        temperature = EpochTableSchedule(teacher_temp, warmup_teacher_temp,
                                         int(round(warmup_teacher_temp_epochs)), steps_per_epoch)
    else:
        temperature = CosineSchedule(teacher_temp, teacher_temp, temp_steps, warmup_steps=temp_steps,
                                     start_warmup_value=warmup_teacher_temp)
    return DINOv2Schedules(
        learning_rate=learning_rate,
        last_layer_learning_rate=FrozenStartSchedule(
            learning_rate, frozen_steps if freeze_last_layer_mode == "zero_lr" else 0),
        weight_decay=CosineSchedule(weight_decay, weight_decay_end, total_steps),
        teacher_momentum=CosineSchedule(momentum_teacher, final_momentum_teacher, total_steps),
        teacher_temperature=temperature,
    )


def schedules_from_config(optim, total_steps, steps_per_epoch, global_batch_size):
    """`dinov2_schedules` with every setting taken from an `OptimConfig` (or anything with its fields)."""
    return dinov2_schedules(
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        global_batch_size=global_batch_size,
        base_lr=optim.base_lr,
        min_lr=optim.min_lr,
        warmup_epochs=optim.warmup_epochs,
        weight_decay=optim.weight_decay,
        weight_decay_end=optim.weight_decay_end,
        momentum_teacher=optim.momentum_teacher,
        final_momentum_teacher=optim.final_momentum_teacher,
        teacher_temp=optim.teacher_temp,
        warmup_teacher_temp=optim.warmup_teacher_temp,
        warmup_teacher_temp_epochs=optim.warmup_teacher_temp_epochs,
        freeze_last_layer_epochs=optim.freeze_last_layer_epochs,
        scaling_rule=getattr(optim, "lr_scaling", "sqrt_wrt_1024"),
        teacher_temp_per_epoch=getattr(optim, "teacher_temp_per_epoch", False),
        freeze_last_layer_mode=getattr(optim, "freeze_last_layer_mode", "zero_lr"),
    )
