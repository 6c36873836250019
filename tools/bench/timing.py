"""Timing loops: warm-up calls, timed calls with wall and CPU seconds, and their summary.

The CPU seconds (all threads of the process, `time.process_time`) tell contention apart from
slowness: on a quiet machine they are about the wall time times the threads in use; close to
the wall time on a multi-core CPU, the run did not get the cores it asked for.
"""

import statistics
import time
from typing import Any, NamedTuple

# The DINOv2 pretrainer's loss terms, as its logs name them (their weighted sum is "loss").
LOSS_TERMS = ("dino_local", "dino_global", "ibot", "koleo")


class Timed(NamedTuple):
    """What `time_calls` measured."""

    times: list  # wall seconds of each call
    cpu_times: list  # CPU seconds (all threads) of each call
    output: Any  # the last call's output
    seconds: float  # wall seconds of the whole loop


def warm_up(call, count, sync=None):
    """Calls `call` `count` times; returns (seconds of the first call or None, seconds of all).

    `sync(output)`, when given, waits for each call's output (a device synchronization).
    """
    first = None
    start_all = time.perf_counter()
    for i in range(count):
        start = time.perf_counter()
        output = call()
        if sync is not None:
            sync(output)
        if i == 0:
            first = time.perf_counter() - start
    return first, time.perf_counter() - start_all


def time_calls(call, repeats, sync=None):
    """Times `repeats` calls of `call`, each ended by `sync(output)` when given."""
    times, cpu_times, output = [], [], None
    start_all = time.perf_counter()
    for _ in range(repeats):
        cpu_start = time.process_time()
        start = time.perf_counter()
        output = call()
        if sync is not None:
            sync(output)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return Timed(times, cpu_times, output, time.perf_counter() - start_all)


def median_seconds(call, repeats, warmup=2):
    """The median wall seconds of `repeats` calls after `warmup` untimed ones."""
    warm_up(call, warmup)
    return statistics.median(time_calls(call, repeats).times)


def summary(times, cpu_times, items):
    """The per-call statistics every result row carries; `items` is the work of one call."""
    median = statistics.median(times)
    return {
        "times_s": times,
        "median_s": median,
        "min_s": min(times),
        "cpu_times_s": cpu_times,
        "median_cpu_s": statistics.median(cpu_times),
        "images_per_s": items / median,
    }


def step_timer(sync=None):
    """A Keras callback that times every training step of `fit()`.

    For each step it keeps the wall and CPU seconds from on_train_batch_begin to
    on_train_batch_end (`times`, `cpu_times`), the moment each step ended (`ends`, with the
    moment fit() began as `train_begin`: `intervals()` gives the seconds between them) and the
    last step's loss. It is not async-safe on purpose: Keras then converts each step's logs to
    Python numbers before calling on_train_batch_end, which waits for the step (JAX dispatches
    it asynchronously). `sync()`, when given, also waits for the device at the end of a step.
    """
    import keras

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.reset()

        def reset(self):
            self.times, self.cpu_times, self.ends, self.last_loss = [], [], [], None
            self.last_terms = {}  # the last step's loss terms (logs other than "loss" named in LOSS_TERMS)
            self.train_begin = self._start = self._cpu = None

        def intervals(self):
            """Seconds from the start of fit() to the end of the first step, then between steps."""
            moments = [self.train_begin] + self.ends
            return [b - a for a, b in zip(moments, moments[1:])]

        def on_train_begin(self, logs=None):
            self.train_begin = time.perf_counter()

        def on_train_batch_begin(self, batch, logs=None):
            self._cpu = time.process_time()
            self._start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            if sync is not None:
                sync()
            end = time.perf_counter()
            self.times.append(end - self._start)
            self.cpu_times.append(time.process_time() - self._cpu)
            self.ends.append(end)
            if logs and "loss" in logs:
                self.last_loss = float(logs["loss"])
                self.last_terms = {k: float(logs[k]) for k in LOSS_TERMS if k in logs}

    return StepTimer()
