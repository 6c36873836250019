"""Distillation-step benchmark: does a distillation step cost no more than the teacher's forward plus the
student's own pretraining step?

Times, in one process on the current Keras backend (KERAS_BACKEND; Keras' default is jax), on one fixed
multi-crop batch:

  D    the train step of DistillationPretrainer(teacher, teacher_heads, [student], config) (head
       distillation: the frozen teacher and its DINO / iBOT heads on the 2 global crops, one student on
       every crop, its backward, clipping, AdamW and the student's EMA);
  T    the teacher's pass of that step alone: the model's own `teacher_targets(batch)` (teacher backbone
       forward in inference mode on the 2 global crops, its DINO and iBOT heads, Sinkhorn-Knopp or
       centering), compiled as the step is (jax.jit on JAX, tf.function on TensorFlow, eager under
       torch.no_grad() on PyTorch, as the trainers run it);
  S    the train step of DINOv2Pretrainer(student, config): the student's own pretraining step, including
       its own EMA teacher's forward (part of a pretraining step);
  F    (--features) the train step of FeatureDistiller(teacher, [student], config), and T_features, its
       own `teacher_targets(batch)` (the teacher on the global and the local crops).

and prints the median ms per step of each, T + S, and the ratio D / (T + S) (the goal: <= 1.0), with
--features also F / (T_features + S).

Run from the repository root:

    KERAS_BACKEND=jax python tools/benchmark_distill.py                  # digits recipe, tiny4 -> micro4
    KERAS_BACKEND=jax python tools/benchmark_distill.py --steps 10 --features --json distill.json
    KERAS_BACKEND=torch python tools/benchmark_distill.py --steps 5 --torch-threads 1
"""

import argparse
import dataclasses
import json
import os
import statistics
import time

import numpy as np
from bench.devices import backend_gpu
from bench.machine import load_average, machine_info, peak_rss_mb
from bench.report import fmt, print_header, print_table

WIDTH = 120
SEED = 0

DESCRIPTION = (
    __doc__
    + """
How. The config is SSLConfig.recipe(--recipe) with model.drop_path_rate = 0 (the distillation recipe's
students have no stochastic depth; S uses the same config) and --batch-size when given. The teacher is a
fresh build_backbone(--teacher, config) wrapped in a DINOv2Pretrainer(teacher, config), whose EMA teacher
backbone and teacher DINO / iBOT heads are the frozen teacher and its heads (random weights: the cost does
not depend on them). D, F and S each get their own fresh build_backbone(--student, config), so no variables
are shared between them, and each model is compile()d with its defaults. One batch is drawn from
keras_dinov2.data.multicrop_dataset(--recipe's data, seed 0) before any timing and every step trains on it
(tf.data.Dataset.from_tensors(batch).repeat()), so the input pipeline is not timed.

Timing. D, F and S: one model.fit(epochs=1, steps_per_epoch=--warmup + --steps) with a callback that takes
time.perf_counter() at on_train_batch_begin / on_train_batch_end (bench.timing.step_timer: not async-safe,
so Keras converts each step's logs to numbers, which waits for the step); the first --warmup steps (the
first compiles) are dropped. T and T_features: the compiled teacher_targets is called --warmup times, then
--steps timed calls, each waiting for its outputs (jax.block_until_ready; a device synchronization on a
GPU). They run on the trained D / F model after its fit. Every figure is the median over the timed steps.
"""
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="dinov2_vit_tiny4", help="Teacher architecture. Default: %(default)s.")
    parser.add_argument("--student", default="dinov2_vit_micro4", help="Student architecture (the teacher's patch "
                        "size). Default: %(default)s.")
    parser.add_argument("--recipe", default="digits", help="SSLConfig recipe (crops, heads, optimizer). "
                        "Default: %(default)s.")
    parser.add_argument("--batch-size", type=int, default=None, help="Source images per step. Default: the "
                        "recipe's.")
    parser.add_argument("--steps", type=int, default=20, help="Timed steps (calls for T); the median is reported. "
                        "Default: %(default)s.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps (calls for T) first; the first "
                        "compiles. Default: %(default)s.")
    parser.add_argument("--features", action="store_true", help="Also time FeatureDistiller (F) and its teacher "
                        "pass on all crops (T_features).")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads(N) on the torch "
                        "backend. Default: PyTorch's own (one per core). On a CPU that other work keeps busy, "
                        "PyTorch's OpenMP pool can stall at its barriers (seconds per step, CPU time = wall time, "
                        "see docs/performance.md); 1 avoids that.")
    parser.add_argument("--json", metavar="OUT", help="Also write the settings, machine and numbers to OUT.")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1.")
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first step compiles).")
    if args.torch_threads is not None and args.torch_threads < 1:
        parser.error("--torch-threads must be at least 1.")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1.")
    return args


# ----------------------------------------------------------------------------- setup


def make_config(args):
    from keras_dinov2.config import SSLConfig

    config = SSLConfig.recipe(args.recipe)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, drop_path_rate=0.0))
    if args.batch_size is not None:
        config = dataclasses.replace(config, batch_size=args.batch_size)
    return config


def one_batch(config):
    """One multi-crop batch of the recipe's data pipeline, as NumPy arrays."""
    from keras_dinov2.data import multicrop_dataset

    # The bundled digits need no download; another --recipe crops them at its own sizes.
    data = multicrop_dataset("digits", config.batch_size, config.data, patch_size=config.model.patch_size,
                             seed=SEED, repeat=True)
    return {key: np.asarray(value) for key, value in next(iter(data)).items()}


def teacher_and_heads(args, config):
    """A frozen teacher backbone and its DINO / iBOT heads, as `keras_dinov2.run.load_teacher` gives them."""
    from keras_dinov2.backbone import build_backbone
    from keras_dinov2.pretrainer import DINOv2Pretrainer

    owner = DINOv2Pretrainer(build_backbone(args.teacher, config), config)
    return owner.teacher, {"dino_head": owner.teacher_dino_head, "ibot_head": owner.teacher_ibot_head}


# ----------------------------------------------------------------------------- timing


def time_fit(model, batch, args, sync):
    """Median and details of `model`'s train step, timed in one fit() on the fixed batch."""
    import tensorflow as tf
    from bench.timing import step_timer

    data = tf.data.Dataset.from_tensors(batch).repeat()
    timer = step_timer(sync)
    start = time.perf_counter()
    model.fit(data, epochs=1, steps_per_epoch=args.warmup + args.steps, verbose=0, callbacks=[timer])
    total = time.perf_counter() - start
    times = timer.times[args.warmup:]
    return row(times, timer.cpu_times[args.warmup:], timer.times[0], loss=timer.last_loss, fit_s=total)


def row(times, cpu_times, first_s, loss=None, fit_s=None):
    return {
        "median_ms": 1000 * statistics.median(times),
        "min_ms": 1000 * min(times),
        "max_ms": 1000 * max(times),
        "median_cpu_ms": 1000 * statistics.median(cpu_times),
        "first_s": first_s,
        "times_ms": [1000 * t for t in times],
        "loss": loss,
        "fit_s": fit_s,
    }


def targets_call(model, batch, backend, gpu):
    """(call, sync): `call()` runs the model's own `teacher_targets(batch)` compiled as its train step is."""
    import keras

    if backend == "jax":
        import jax
        from keras import StatelessScope

        variables, seen = [], set()
        for variable in list(model.variables) + list(model.optimizer.variables):
            if id(variable) not in seen:
                seen.add(id(variable))
                variables.append(variable)
        values = [variable.value for variable in variables]
        data = {key: jax.numpy.asarray(value) for key, value in batch.items()}

        @jax.jit
        def run(values, data):
            # Stateless, as keras_dinov2.trainers.jax runs it inside the step (center updates are dropped).
            with StatelessScope(state_mapping=list(zip(variables, values))):
                out = model.teacher_targets(data)
            return [x for x in jax.tree_util.tree_leaves(out) if isinstance(x, jax.Array)]

        return (lambda: run(values, data)), jax.block_until_ready
    if backend == "tensorflow":
        import tensorflow as tf

        data = {key: tf.constant(value) for key, value in batch.items()}

        @tf.function(jit_compile=bool(model.jit_compile), reduce_retracing=True)
        def run(data):
            out = model.teacher_targets(data)
            return [x for x in tf.nest.flatten(out) if isinstance(x, tf.Tensor | tf.Variable)]

        def sync(output):
            if gpu:
                tf.test.experimental.sync_devices()
            return output

        return (lambda: run(data)), sync
    import torch

    data = {key: keras.ops.convert_to_tensor(value) for key, value in batch.items()}

    def call():
        with torch.no_grad():  # as keras_dinov2.trainers.torch runs it
            return model.teacher_targets(data)

    def sync(output):
        if gpu:
            torch.cuda.synchronize()
        return output

    return call, sync


def time_targets(model, batch, args, backend, gpu):
    from bench.timing import time_calls, warm_up

    call, sync = targets_call(model, batch, backend, gpu)
    first, _ = warm_up(call, args.warmup, sync)
    timed = time_calls(call, args.steps, sync)
    return row(timed.times, timed.cpu_times, first)


def step_sync(backend, gpu):
    from bench.devices import device_sync

    sync = device_sync(backend, gpu)
    return (lambda: sync()) if gpu else None


# ----------------------------------------------------------------------------- report


ROWS = (
    ("D", "DistillationPretrainer step (frozen teacher + heads, 1 student)"),
    ("F", "FeatureDistiller step (frozen teacher, 1 student)"),
    ("T", "D's teacher_targets: teacher on 2 global crops + heads + centering"),
    ("T_features", "F's teacher_targets: teacher on global + local crops"),
    ("S", "the student's DINOv2Pretrainer step (with its own EMA teacher)"),
)


def print_report(args, info, config, numbers, ratios, params):
    crops = config.data.crops
    print_header(
        WIDTH,
        f"Distillation step vs teacher forward + student pretraining step: {args.teacher} -> {args.student}, "
        f"recipe {args.recipe}, batch {config.batch_size} (2 x {crops.global_crops_size} + "
        f"{crops.local_crops_number} x {crops.local_crops_size} crops); median of {args.steps} steps after "
        f"{args.warmup} warm-up",
        info,
        [f"Backend: {info['backend']}" + (f" on GPU {info['backend_gpu']}" if info["backend_gpu"] else " on CPU")
         + (f" ({info['torch_threads']} torch threads)" if info["torch_threads"] else "")
         + f"; parameters: teacher {params['teacher']:,}, student {params['student']:,}"],
        own_load_included=True,
    )
    header = ["", "what", "ms/step", "min ms", "max ms", "CPU ms", "1st call s", "loss"]
    rows = []
    for key, what in ROWS:
        if key not in numbers:
            continue
        r = numbers[key]
        rows.append([key, what, f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f}", f"{r['max_ms']:.1f}",
                     f"{r['median_cpu_ms']:.1f}", f"{r['first_s']:.1f}", fmt(r["loss"], "{:.4f}")])
    for name, (teacher, _) in (("T + S", ("T", "D")), ("T_features + S", ("T_features", "F"))):
        if teacher in numbers:
            total = numbers[teacher]["median_ms"] + numbers["S"]["median_ms"]
            rows.append([name, "teacher pass + student's pretraining step", f"{total:.1f}", "", "", "", "", ""])
    print_table(header, rows, WIDTH)
    for name, ratio in ratios.items():
        print(f"  {name} = {ratio:.3f}  (goal <= 1.0: {'met' if ratio <= 1.0 else 'NOT met'})")
    print("  ms/step, min, max, CPU ms: over the timed steps (CPU ms: all threads of the process); 1st call s: "
          "the first step or call,\n  compilation included. T / T_features are timed on the trained D / F model.")
    print(f"  peak RSS of the process: {info['peak_rss_mb']:.0f} MB; total time {info['total_s']:.0f} s")
    print("=" * WIDTH)


# ----------------------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    backend = os.environ.get("KERAS_BACKEND", "jax")
    load_before = load_average()
    # Before Keras is imported (TensorFlow's memory growth, torch's threads).
    gpu = backend_gpu(backend, "auto", torch_threads=args.torch_threads)
    import keras

    from keras_dinov2.backbone import build_backbone
    from keras_dinov2.pretrainer import DINOv2Pretrainer, DistillationPretrainer, FeatureDistiller

    backend = keras.backend.backend()
    threads = None
    if backend == "torch":
        import torch

        threads = torch.get_num_threads()
    config = make_config(args)
    batch = one_batch(config)
    sync = step_sync(backend, gpu)

    keras.utils.set_random_seed(SEED)
    teacher, heads = teacher_and_heads(args, config)
    numbers = {}

    student = build_backbone(args.student, config)
    params = {"teacher": teacher.count_params(), "student": student.count_params()}
    distill = DistillationPretrainer(teacher, heads, [student], config)
    distill.compile()
    print(f"D: timing {args.warmup} + {args.steps} distillation steps ...", flush=True)
    numbers["D"] = time_fit(distill, batch, args, sync)
    print("T: timing the teacher pass ...", flush=True)
    numbers["T"] = time_targets(distill, batch, args, backend, gpu)

    if args.features:
        features = FeatureDistiller(teacher, [build_backbone(args.student, config)], config)
        features.compile()
        print(f"F: timing {args.warmup} + {args.steps} feature distillation steps ...", flush=True)
        numbers["F"] = time_fit(features, batch, args, sync)
        print("T_features: timing the teacher pass on all crops ...", flush=True)
        numbers["T_features"] = time_targets(features, batch, args, backend, gpu)

    pretrain = DINOv2Pretrainer(build_backbone(args.student, config), config)
    pretrain.compile()
    print(f"S: timing {args.warmup} + {args.steps} student pretraining steps ...", flush=True)
    numbers["S"] = time_fit(pretrain, batch, args, sync)

    s = numbers["S"]["median_ms"]
    ratios = {"D / (T + S)": numbers["D"]["median_ms"] / (numbers["T"]["median_ms"] + s)}
    if args.features:
        ratios["F / (T_features + S)"] = numbers["F"]["median_ms"] / (numbers["T_features"]["median_ms"] + s)

    info = machine_info()
    info.update(backend=backend, backend_gpu=gpu, torch_threads=threads, load_before=load_before,
                load_after=load_average(), peak_rss_mb=peak_rss_mb(), total_s=time.perf_counter() - start)
    print_report(args, info, config, numbers, ratios, params)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "batch_size": config.batch_size, "parameters": params,
                       "machine": info, "numbers": numbers, "ratios": ratios}, f, indent=2)
        print(f"Wrote {args.json}")


if __name__ == "__main__":
    main()
