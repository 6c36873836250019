"""Schedules: in-graph and NumPy values against a table built from the reference's CosineScheduler formula."""

import math
import re

import keras
import numpy as np
import pytest
from conftest import to_numpy
from keras import ops

from keras_dinov2.schedules import (
    CosineSchedule,
    FrozenStartSchedule,
    dinov2_schedules,
    scaled_learning_rate,
)


def reference_table(base, final, total, warmup=0, start=0.0, freeze=0):
    """The reference's schedule as a table: freeze zeros, linspace warmup (both ends), cosine over arange(n) / n."""
    n = total - warmup - freeze
    iters = np.arange(n)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / max(n, 1)))
    table = np.concatenate([np.zeros(freeze), np.linspace(start, base, warmup), cosine])
    assert len(table) == total
    return table


def reference_values(table, final, steps):
    # Past the end of the table the reference returns the final value.
    return np.array([table[s] if s < len(table) else final for s in steps])


def compiled(fn):
    """`fn` under the backend's compiler (jax.jit, tf.function with XLA); torch runs eagerly."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(fn)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True)
    return fn


CASES = [
    # base, final, total, warmup, start, freeze
    (4e-3, 1e-6, 1000, 100, 0.0, 0),  # learning rate shape
    (0.04, 0.4, 200, 0, 0.0, 0),  # weight decay: no warmup
    (1.0, 0.1, 50, 10, 0.2, 5),  # freeze, then warmup from a nonzero start
    (1.0, 0.0, 10, 1, 0.5, 0),  # a one-step warmup is just the start value
    (0.07, 0.07, 30, 30, 0.04, 0),  # teacher temperature: all warmup, then flat
    (0.07, 0.07, 0, 0, 0.04, 0),  # empty schedule: always the final value
]


@pytest.mark.parametrize("case", CASES)
def test_cosine_schedule_matches_reference_at_every_step(case):
    base, final, total, warmup, start, freeze = case
    schedule = CosineSchedule(base, final, total, warmup, start, freeze)
    steps = np.arange(total + 5)
    expected = reference_values(reference_table(*case), final, steps)

    np.testing.assert_allclose(schedule.value_at(steps), expected, rtol=1e-12, atol=1e-15)
    got = to_numpy(compiled(schedule)(ops.convert_to_tensor(steps, "int32")))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=2e-7 * max(abs(base), abs(start)))


def test_cosine_schedule_boundaries_and_scalar_steps():
    case = (4e-3, 1e-6, 125000, 12500, 0.0, 0)
    schedule = CosineSchedule(*case)
    table = reference_table(*case)
    for step in (0, 1, 12499, 12500, 12501, 60000, 124999, 125000, 200000):
        expected = table[step] if step < len(table) else 1e-6
        got = schedule(ops.convert_to_tensor(step, "int32"))
        assert tuple(ops.shape(got)) == ()
        # float32 keeps its relative precision near the end, where the value is ~1e-6.
        np.testing.assert_allclose(to_numpy(got), expected, rtol=2e-6)
        assert schedule.value_at(step) == pytest.approx(expected, rel=1e-12)
    assert schedule.value_at(0) == 0.0
    assert schedule.value_at(12499) == pytest.approx(
        4e-3, rel=1e-15
    )  # the warmup reaches base_value
    assert schedule.value_at(124999) > 1e-6  # the cosine stops one step short of final_value


def test_frozen_start_overwrites_without_shifting():
    lr = CosineSchedule(1.0, 0.0, 20, warmup_steps=5)
    table = reference_table(1.0, 0.0, 20, 5)
    table[:7] = 0.0  # as the reference does to its last-layer copy
    frozen = FrozenStartSchedule(lr, 7)
    steps = np.arange(25)
    expected = reference_values(table, 0.0, steps)
    np.testing.assert_allclose(frozen.value_at(steps), expected, atol=1e-15)
    np.testing.assert_allclose(
        to_numpy(compiled(frozen)(ops.convert_to_tensor(steps, "int32"))), expected, atol=1e-6
    )
    # Frozen past the end: the reference still returns the final value from total_steps on.
    late = FrozenStartSchedule(CosineSchedule(1.0, 0.5, 10), 20)
    assert late.value_at(9) == 0.0 and late.value_at(10) == 0.5
    assert float(to_numpy(late(ops.convert_to_tensor(12, "int32")))) == 0.5


def test_dinov2_schedules_reference_defaults():
    spe, total = 100, 1000  # 10 "epochs" of 100 steps
    s = dinov2_schedules(
        total, spe, global_batch_size=256, warmup_epochs=2, warmup_teacher_temp_epochs=3
    )
    peak = 0.004 * math.sqrt(256 / 1024)
    assert peak == pytest.approx(0.002)
    steps = np.arange(total + 3)

    lr_table = reference_table(peak, 1e-6, total, 2 * spe)
    np.testing.assert_allclose(
        s.learning_rate.value_at(steps), reference_values(lr_table, 1e-6, steps)
    )
    last_table = lr_table.copy()
    last_table[:spe] = 0.0  # freeze_last_layer_epochs=1
    np.testing.assert_allclose(
        s.last_layer_learning_rate.value_at(steps), reference_values(last_table, 1e-6, steps)
    )
    wd_table = reference_table(0.04, 0.4, total)
    np.testing.assert_allclose(
        s.weight_decay.value_at(steps), reference_values(wd_table, 0.4, steps)
    )
    mom_table = reference_table(0.992, 1.0, total)
    np.testing.assert_allclose(
        s.teacher_momentum.value_at(steps), reference_values(mom_table, 1.0, steps)
    )
    temp_table = reference_table(0.07, 0.07, 3 * spe, 3 * spe, 0.04)
    np.testing.assert_allclose(
        s.teacher_temperature.value_at(steps), reference_values(temp_table, 0.07, steps)
    )

    values = s.values(0)
    assert values == pytest.approx(
        {
            "learning_rate": 0.0,
            "last_layer_learning_rate": 0.0,
            "weight_decay": 0.04,
            "teacher_momentum": 0.992,
            "teacher_temperature": 0.04,
        }
    )
    assert s.values(3 * spe - 1)["teacher_temperature"] == pytest.approx(0.07)
    assert s.values(total)["learning_rate"] == 1e-6
    in_graph = s(ops.convert_to_tensor(150, "int32"))
    for key, value in s.values(150).items():
        np.testing.assert_allclose(to_numpy(in_graph[key]), value, rtol=2e-6)


def test_schedules_serialize_and_drive_a_keras_optimizer():
    schedule = FrozenStartSchedule(CosineSchedule(1.0, 0.1, 50, 10, 0.2, 5), 3)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert isinstance(restored, FrozenStartSchedule)
    assert restored.get_config() == schedule.get_config()
    np.testing.assert_array_equal(
        restored.value_at(np.arange(60)), schedule.value_at(np.arange(60))
    )

    optimizer = keras.optimizers.SGD(learning_rate=CosineSchedule(1.0, 0.0, 10, 2))
    variable = keras.Variable(np.zeros(2, "float32"))
    optimizer.apply([ops.ones(2)], [variable])  # step 0: lr 0
    optimizer.apply([ops.ones(2)], [variable])  # step 1: lr 1
    np.testing.assert_allclose(to_numpy(variable), [-1.0, -1.0], atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (
            {
                "base_value": 1.0,
                "final_value": 0.0,
                "total_steps": 10,
                "warmup_steps": 8,
                "freeze_steps": 3,
            },
            "freeze_steps + warmup_steps",
        ),
        ({"base_value": 1.0, "final_value": 0.0, "total_steps": -1}, "total_steps"),
        (
            {"base_value": 1.0, "final_value": 0.0, "total_steps": 10, "warmup_steps": 2.5},
            "warmup_steps",
        ),
        ({"base_value": float("nan"), "final_value": 0.0, "total_steps": 10}, "base_value"),
    ],
)
def test_cosine_schedule_rejects_bad_input(kwargs, argument):
    with pytest.raises(ValueError, match=re.escape(f"`{argument}`")):
        CosineSchedule(**kwargs)


def test_dinov2_schedules_reject_bad_input():
    with pytest.raises(ValueError, match="`warmup_epochs`.*1000 steps.*total_steps=500"):
        dinov2_schedules(500, 100, 1024)  # 10 warmup epochs do not fit
    with pytest.raises(ValueError, match="`scaling_rule`.*'linear'"):
        scaled_learning_rate(0.004, 1024, scaling_rule="linear")
    with pytest.raises(ValueError, match="`global_batch_size`.*0"):
        dinov2_schedules(1000, 100, 0, warmup_epochs=1)
    with pytest.raises(ValueError, match="`frozen_steps`"):
        FrozenStartSchedule(CosineSchedule(1.0, 0.0, 10), -1)


def test_a_host_step_takes_value_at_and_agrees_with_the_formula():
    from keras_dinov2 import ops as kd_ops

    s = dinov2_schedules(total_steps=1000, steps_per_epoch=100, global_batch_size=256, warmup_epochs=2,
                         freeze_last_layer_epochs=1)
    for step in (0, 99, 150, 999, 1003):
        expected = s.values(step)
        for given in (step, np.int64(step)):  # host integers: value_at, rounded to float32
            for key, value in s(given).items():
                assert to_numpy(value).dtype == np.float32
                assert to_numpy(value) == np.float32(expected[key]), key
        with kd_ops.plain_keras_ops():  # a tensor step, no host read: the float32 formula
            traced = s(ops.convert_to_tensor(step, "int32"))
        for key, value in traced.items():
            np.testing.assert_allclose(to_numpy(value), expected[key], rtol=2e-6, atol=1e-12)


def test_a_host_step_value_is_kept_until_the_step_changes():
    schedule = CosineSchedule(1e-3, 1e-6, total_steps=100, warmup_steps=10)
    first = schedule(12)
    assert schedule(np.int64(12)) is first  # a step reads the learning rate three times: converted once
    counter = keras.Variable(12, dtype="int64", trainable=False)
    for step in (13, 14, 12):  # an advancing counter (on PyTorch updated in place) gets each step's value
        counter.assign(step)
        expected = np.float32(schedule.value_at(step))
        assert to_numpy(schedule(step)) == expected
        # PyTorch reads the counter on the host (value_at, exactly); elsewhere it is a tensor (the float32 formula).
        np.testing.assert_allclose(to_numpy(schedule(counter)), expected,
                                   rtol=0 if keras.backend.backend() == "torch" else 2e-6)
    assert to_numpy(schedule(12)) == np.float32(schedule.value_at(12)) != np.float32(schedule.value_at(13))


def test_host_int_reads_only_host_integers():
    from keras_dinov2 import ops as kd_ops

    assert kd_ops.host_int(7) == 7 and kd_ops.host_int(np.int32(7)) == 7
    assert kd_ops.host_int(True) is None
    assert kd_ops.host_int(keras.KerasTensor((), "int32")) is None
    counter = keras.Variable(5, dtype="int64", trainable=False)
    # PyTorch dispatches eagerly: a CPU integer tensor or variable is read; a traced backend never reads one.
    expected = 5 if keras.backend.backend() == "torch" else None
    assert kd_ops.host_int(counter) == expected
    assert kd_ops.host_int(ops.convert_to_tensor(5, "int32")) == expected
    assert kd_ops.host_int(ops.convert_to_tensor(5.0, "float32")) is None
    assert kd_ops.host_int(ops.convert_to_tensor(True)) is None
    with kd_ops.plain_keras_ops():
        assert kd_ops.host_int(counter) is None
