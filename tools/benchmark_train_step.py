"""Training-step benchmark: DINOv2Pretrainer on each Keras backend, optionally against the reference.

Times the FULL DINOv2 training step (teacher forward on the 2 global crops, student forward on
the masked global crops and the local crops, DINO + iBOT + KoLeo losses, backward, gradient
clipping per part, AdamW with the reference's parameter groups, teacher EMA) of
`keras_dinov2.DINOv2Pretrainer` on each Keras backend (JAX, TensorFlow, PyTorch), at each
drop-path rate, and reports images/s and the peak memory of the process. With
`--reference-src DIR` the same step built from a checkout of facebookresearch/dinov2 at DIR
is timed in the same run (PyTorch eager), and every ratio is taken against it.

Run from the repository root:

    python tools/benchmark_train_step.py                      # ViT-S/14, batch 4, drop path 0 and 0.3
    python tools/benchmark_train_step.py --model tiny --steps 3          # quick smoke run
    python tools/benchmark_train_step.py --backends jax --steps 3 --warmup 1 \\
        --reference-src /path/to/dinov2 --json out.json
    python tools/benchmark_train_step.py --model tiny --backends torch --drop-path 0 --steps 10 \
        --interleave 20 --reference-src /path/to/dinov2   # torch vs the reference, one process

Run `python tools/benchmark_train_step.py --help` for what is timed and how.
"""

import contextlib
import math
import os
import statistics
import sys
import time

import numpy as np
from bench import cli
from bench.devices import (
    backend_gpu,
    device_sync,
    gpu_peak_mb,
    import_keras,
    torch_autocast,
    torch_gpu,
)
from bench.images import source_images
from bench.machine import (
    current_rss_mb,
    installed,
    installed_backends,
    load_average,
    peak_rss_mb,
    reset_peak_rss,
)
from bench.reference import load_file_module, reference_collate, reference_commit
from bench.report import fmt, print_footer, print_header, print_table, write_json
from bench.timing import Timed, step_timer, summary, time_calls, warm_up
from bench.workers import Skip, run_all, run_benchmark, run_in_subprocess, work_folder, worker_env

# name: preset, data recipe, patch, (width, depth, heads), (head hidden, bottleneck), prototypes
MODEL_FIELDS = ("preset", "data", "patch", "dims", "head", "prototypes")
MODELS = {
    name: dict(zip(MODEL_FIELDS, values))
    for name, values in {
        "tiny": ("dinov2_vit_tiny4", "digits", 4, (96, 4, 3), (512, 128), 1024),
        "small": ("dinov2_vit_small14", "vit14", 14, (384, 12, 6), (2048, 256), 65536),
        "base": ("dinov2_vit_base14", "vit14", 14, (768, 12, 12), (2048, 256), 65536),
    }.items()
}
MODEL_HELP = (
    "small = ViT-S/14 (dinov2_vit_small14) with 2 x 224 + 8 x 98 crops; base = "
    "ViT-B/14; tiny = dinov2_vit_tiny4 (96 wide, 4 layers, patch 4) with the digits "
    "recipe's 2 x 32 + 8 x 16 crops and a 512 / 128 head, for a quick smoke run. "
    "Default: small."
)
SEED = 0
# Schedules of the benchmarked run: the reference's defaults, no warm-up (so the learning rate
# is not 0 at step 0), an epoch of 1000 steps. The frozen first epoch applies on both sides
# (last layer of the head at learning rate 0), which changes no compute.
EPOCHS = 100
STEPS_PER_EPOCH = 1000
BASE_LR = 0.004
WEIGHT_DECAY = 0.04
MOMENTUM_TEACHER = 0.992
TEACHER_TEMP = 0.04  # the warm-up teacher temperature, the value at step 0
CLIP_GRAD = 3.0
LAYER_DECAY = 0.9
PATCH_EMBED_LR_MULT = 0.2
LAYER_SCALE_INIT = 1e-5
OPTIM = {
    "epochs": EPOCHS,
    "steps_per_epoch": STEPS_PER_EPOCH,
    "base_lr": BASE_LR,
    "warmup_epochs": 0,
    "weight_decay": WEIGHT_DECAY,
    "momentum_teacher": MOMENTUM_TEACHER,
    "clip_grad": CLIP_GRAD,
    "layer_decay": LAYER_DECAY,
    "patch_embed_lr_mult": PATCH_EMBED_LR_MULT,
}

DESCRIPTION = (
    __doc__.split("\n\n")[0]
    + """

What is measured. One multi-crop batch is built once, before any timing, by
keras_dinov2.data.multicrop_dataset (the library's own augmentation and iBOT masking) from
--batch-size 256 x 256 crops of scikit-learn's two sample photographs (or smooth synthetic
images when scikit-learn is missing), converted to NumPy and saved. Each implementation then
runs in its own fresh subprocess (KERAS_BACKEND must be set before Keras is imported, and the
peak resident memory of one must not mix with another's) and trains on that same batch over
and over, so the input pipeline is not timed:

  keras_dinov2  DINOv2Backbone.from_preset(<model>, load_weights=False, image_size=<global
                crop>, drop_path_rate=R, layer_scale_init=1e-5, dtype=--dtype), DINOv2Pretrainer
                with SSLConfig(batch_size, HeadConfig(num_prototypes), OptimConfig(warmup_epochs=
                0), model=ModelConfig(patch, drop_path_rate=R)), model.compile() (the default:
                JAX jit; TensorFlow tf.function, with XLA only where Keras' jit_compile="auto"
                picks it, i.e. not on a CPU-only machine, or with --tf-xla; PyTorch eager), and model.fit on
                tf.data.Dataset.from_tensors(batch).repeat(). --warmup steps run in a first fit()
                call (the first step compiles); the timed steps run in a second fit() call.
  reference     (--reference-src DIR) facebookresearch/dinov2 imported from DIR at run time:
                vit_small / vit_base (patch_size, img_size=<global crop>, init_values=1e-5,
                block_chunks=0, drop_path_rate=R) as student and teacher, DINOHead, DINOLoss,
                iBOTPatchLoss, KoLeoLoss, MaskingGenerator + collate_data_and_cast (masks from
                the reference's own generator, on the same crops), AdamW over
                get_params_groups_with_decay + fuse_params_groups (foreach), the scheduled
                lr / wd / last-layer lr set as apply_optim_scheduler does, clip_grad_norm_ per
                student part, and the foreach EMA of update_teacher. The step follows
                SSLMetaArch.forward_backward with "centering" and the shared DINO / iBOT head
                (the library defaults), PyTorch eager. SSLMetaArch itself cannot be imported
                without xFormers, so this tool runs its step body with the plain-PyTorch
                fallbacks the reference's own layers take when xFormers is missing (the tool
                sets XFORMERS_DISABLED=1): the student backbone is called on the global and the
                local crops separately (the nested-tensor path of forward_features_list needs
                xFormers), attention is torch's scaled_dot_product_attention, and the three
                head inputs are concatenated with torch.cat instead of xFormers'
                BlockDiagonalMask (the head is per token: same result). Crops stay float32 on
                the CPU (the reference's loader casts them to float16 for its GPU runs).

Timing: a Keras callback takes the wall and CPU time between on_train_batch_begin and
on_train_batch_end of each timed step; it is not async-safe, so Keras converts each step's logs
to Python numbers before calling it, which waits for the step to finish on JAX and on GPUs (on
a GPU the callback also synchronizes the device). The table gives the median s/step over
--steps timed steps, images/s = --batch-size / that median (source images, each giving 2 global
+ 8 local crops), "fit s/step" = the wall time of the whole timed fit() divided by --steps
(callback and data overhead included), the median CPU seconds per step (all threads of the
subprocess: about the wall time times the cores in use on a quiet machine), the time of the
first step (tracing and compilation included), and the loss of the last step (same
configuration everywhere, so the values should be close: at initialization about log(prototypes)
for the two DINO terms together, about half that for iBOT (half of the global crops are
masked), plus KoLeo). The reference runs the same warm-up and timed steps.

Memory: "peak RSS" is the peak resident set size of the subprocess (ru_maxrss) read after the
timed steps: interpreter, imported frameworks, both models, optimizer state, activations and
compilation caches together. "import RSS" is the peak after the imports alone (on every Keras
backend importing keras_hub imports TensorFlow), "end RSS" the resident size after the timed
steps (VmRSS): a peak far above it was transient (compilation, or a buffer freed since). The
notes give the peak after the imports, after building the models, after the warm-up and at the
end, and (on Linux, where /proc/self/clear_refs resets the peak after the warm-up) the peak of the
timed steps alone, which leaves out what compiling the step held; on JAX the size of the live arrays
after the steps. On GPU the table adds the peak device memory (JAX memory_stats peak_bytes_in_use,
TensorFlow get_memory_info peak, PyTorch max_memory_allocated).

Ratios: "vs ref" is the throughput of the row over the reference's at the same drop-path
rate (above 1 = faster); "mem vs ref" its peak RSS over the reference's. Without the
reference both are taken against the JAX row of the same rate. The 1-minute load average
before and after the run is printed with the machine (the value after includes this run's own
subprocesses): above half the core count before the run, CPU timings are not trustworthy.

Precision (--dtype): the Keras backbone (and so the heads) use that dtype policy; the
reference runs its forward passes under torch.autocast(device, bfloat16 / float16), without a
gradient scaler.

Device (--device): "auto" uses a GPU where a backend sees one, else the CPU; "cpu" hides GPUs
from every subprocess (CUDA_VISIBLE_DEVICES='', JAX_PLATFORMS=cpu); "gpu" skips an
implementation whose framework sees no GPU. A backend that is not installed, or a subprocess
that fails, is skipped with a message; the rest still runs.
"""
)


# ----------------------------------------------------------------------------- parent side


def parse_args(argv=None):
    parser = cli.parser(DESCRIPTION)
    cli.add_model(parser, MODELS, MODEL_HELP)
    parser.add_argument(
        "--batch-size", type=int, default=4, help="Source images per step. Default: 4."
    )
    parser.add_argument(
        "--prototypes",
        type=int,
        default=None,
        help="Prototypes of the DINO head (shared with iBOT). Default: 65536 (1024 for tiny).",
    )
    parser.add_argument(
        "--drop-path",
        type=float,
        nargs="+",
        default=[0.0, 0.3],
        help="Student drop-path rates (of the last block; linear ramp from 0, as "
        "vit_small(drop_path_rate=R)). Default: 0 0.3.",
    )
    cli.add_dtype(
        parser,
        "Keras dtype policy of the backbone and heads; torch.autocast for the reference. "
        "Default: float32.",
    )
    cli.add_backends(
        parser,
        "Comma-separated Keras backends from jax,tensorflow,torch, or 'none' for the reference "
        "alone. Default: all three.",
    )
    parser.add_argument(
        "--steps", type=int, default=5, help="Timed steps; the median is reported. Default: 5."
    )
    cli.add_warmup(parser, 1, "steps")
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="Run every implementation this many times, alternating (the reference, then each backend, then again): "
             "each round's ratios are against that round's reference row, and the report adds each implementation's "
             "median ratio over the rounds. This machine's speed drifts over minutes; ratios of alternated rounds are "
             "the ones to trust. Default: 1.",
    )
    parser.add_argument(
        "--reference-src",
        metavar="DIR",
        help="A checkout of facebookresearch/dinov2 (the folder holding the dinov2 "
        "package): also time its step, in PyTorch eager; ratios are then taken against it.",
    )
    parser.add_argument(
        "--interleave", type=int, default=0, metavar="N",
        help="With --reference-src and --backends torch: build the reference and the torch backend in ONE process and "
             "alternate N blocks of --steps steps each (the reference's block, then ours); report each block's "
             "median step and the median of the blocks' ratios. This machine's speed changes by up to 2x within "
             "seconds, which separate processes (even --rounds) see as noise; alternating blocks in one process gives "
             "both the same machine. The first --drop-path rate only; no memory figures. Default: 0 (off).",
    )
    cli.add_device(parser, "the framework", "implementations")
    parser.add_argument(
        "--tf-xla", action="store_true",
        help="TensorFlow: compile the step with XLA (model.compile(jit_compile=True)), which Keras does not choose on "
             "a CPU-only machine. Default: Keras' choice.",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch.set_num_threads(N) in the PyTorch processes (the reference and the torch "
        "backend). Default: PyTorch's own (one per core). On a machine that other work keeps "
        "busy, PyTorch's OpenMP pool with one thread per core can stall at its barriers (CPU "
        "time = wall time; see docs/performance.md); 1 avoids that.",
    )
    cli.add_subprocess_flags(parser, "a subprocess", "the batch and the per-run files")
    args = parser.parse_args(argv)
    if args.worker:
        return args
    cli.check_counts(parser, args, at_least_one=("batch_size", "steps", "rounds"))
    if args.torch_threads is not None and args.torch_threads < 1:
        parser.error("--torch-threads must be at least 1.")
    if args.prototypes is None:
        args.prototypes = MODELS[args.model]["prototypes"]
    if args.prototypes < 1:
        parser.error("--prototypes must be at least 1.")
    for rate in args.drop_path:
        if not 0.0 <= rate < 1.0:
            parser.error(f"--drop-path rates must be in [0, 1), received {rate}.")
    args.backends = cli.choose(parser, args.backends, cli.BACKENDS, "--backends", none=True)
    if args.reference_src:
        args.reference_src = os.path.abspath(os.path.expanduser(args.reference_src))
        if not os.path.isdir(os.path.join(args.reference_src, "dinov2")):
            parser.error(
                f"--reference-src: {args.reference_src} holds no dinov2 package folder (expected "
                "a checkout of facebookresearch/dinov2)."
            )
    if not args.backends and not args.reference_src:
        parser.error("nothing to run: --backends none and no --reference-src.")
    if args.interleave < 0:
        parser.error("--interleave must be at least 0.")
    if args.interleave and (args.backends != ["torch"] or not args.reference_src):
        parser.error("--interleave needs --backends torch and --reference-src (both run in one PyTorch process).")
    return args


def plan(args):
    """The list of run specs, and the messages of what is skipped."""
    runs, skipped = [], []
    backends = installed_backends(args.backends, skipped)
    reference = bool(args.reference_src)
    if reference and not installed("torch"):
        skipped.append("reference: torch is not installed.")
        reference = False
    for rate in args.drop_path:
        if reference:
            runs.append({"kind": "reference", "backend": "torch", "drop_path": rate})
        for backend in backends:
            runs.append({"kind": "ours", "backend": backend, "drop_path": rate})
    if getattr(args, "interleave", 0):
        return [{"kind": "interleaved", "backend": "torch", "drop_path": args.drop_path[0],
                 "interleave": args.interleave}], skipped
    rounds = max(int(getattr(args, "rounds", 1)), 1)
    return [{**run, "round": index} for index in range(rounds) for run in runs], skipped


def run_worker(spec, args, workdir, name):
    """Runs one spec in a fresh subprocess; returns its result dict or a reason to skip."""
    env = worker_env(spec["backend"], args.device, XFORMERS_DISABLED="1")
    return run_in_subprocess(__file__, spec, workdir, name, env, args.timeout, args.verbose)


def row_label(result):
    return "reference" if result["kind"] == "reference" else "keras_dinov2"


def run_label(run):
    round_ = f", round {run['round'] + 1}" if run.get("round") else ""
    if run["kind"] == "reference":
        return f"reference (PyTorch eager), drop path {run['drop_path']:g}{round_}"
    return f"keras_dinov2 on {run['backend']}, drop path {run['drop_path']:g}{round_}"


def _key(result):
    """A result's baseline key: its round and drop-path rate."""
    return result.get("round", 0), result["drop_path"]


def describe(result):
    return (
        f"{result['median_s']:.3f} s/step, {result['images_per_s']:.3f} img/s, peak "
        f"RSS {result['peak_rss_mb']:.0f} MB, first step {result['first_step_s']:.1f} s, "
        f"loss {fmt(result.get('loss'), '{:.4f}')}"
    )


def _baselines(results):
    """Per (round, drop-path rate): the reference row, else the JAX row; and what it is."""
    out = {}
    for key in sorted({_key(r) for r in results}):
        rows = [r for r in results if _key(r) == key]
        ref = next((r for r in rows if r["kind"] == "reference"), None)
        jax_row = next((r for r in rows if r["kind"] == "ours" and r["backend"] == "jax"), None)
        out[key] = ref or jax_row
    kind = "reference" if any(r["kind"] == "reference" for r in results) else "JAX"
    return out, kind


def print_report(args, info, results, skipped):
    width = 110
    model = MODELS[args.model]
    g, local, n_local = info["crops"]
    extra = []
    if info.get("reference_src"):
        commit = info.get("reference_commit")
        extra.append(f"Reference: {info['reference_src']}" + (f" at {commit}" if commit else ""))
    print_header(
        width,
        f"DINOv2 training step: {model['preset']} ({model['dims'][0]} wide, {model['dims'][1]} "
        f"layers, {model['dims'][2]} heads, patch {model['patch']}), batch {args.batch_size} "
        f"source images (2 x {g} + {n_local} x {local} crops), {args.prototypes} prototypes, "
        f"{args.dtype}; median of {args.steps} steps after {args.warmup} warm-up",
        info,
        extra,
        own_load_included=True,
    )
    baselines, kind = _baselines(results)
    short = "ref" if kind == "reference" else "jax"
    on_gpu = any(r.get("gpu_peak_mb") is not None for r in results)
    header = ["impl", "backend", "method", "device", "drop", "s/step", "img/s", f"vs {short}"]
    header += ["fit s/step", "CPU s/step", "peak RSS MB", f"mem vs {short}", "import RSS MB"]
    header += ["end RSS MB"] + (["GPU peak MB"] if on_gpu else []) + ["1st step s", "loss"]
    rows = []
    for r in results:
        base = baselines.get(_key(r))
        speed = base["median_s"] / r["median_s"] if base else None
        memory = r["peak_rss_mb"] / base["peak_rss_mb"] if base else None
        r["speedup_vs_baseline"] = speed
        r["memory_vs_baseline"] = memory
        r["baseline"] = kind
        row = [row_label(r) + (f" {r['round'] + 1}" if r.get("round") else ""), r["backend"], r["method"],
               r["device"], f"{r['drop_path']:g}"]
        row += [f"{r['median_s']:.3f}", f"{r['images_per_s']:.3f}", fmt(speed, "{:.2f}x")]
        row += [f"{r['fit_s_per_step']:.3f}", f"{r['median_cpu_s']:.2f}", f"{r['peak_rss_mb']:.0f}"]
        row += [fmt(memory, "{:.2f}x"), fmt(r.get("import_rss_mb"), "{:.0f}")]
        row += [fmt(r.get("end_rss_mb"), "{:.0f}")]
        row += [fmt(r.get("gpu_peak_mb"), "{:.0f}")] if on_gpu else []
        row += [f"{r['first_step_s']:.1f}", fmt(r.get("loss"), "{:.4f}")]
        rows.append(row)
    print_table(header, rows, width)
    print(
        f"vs {kind}: throughput over the {kind} row at the same drop path (>1 = faster); mem "
        f"vs {kind}: peak RSS over its.\nimg/s: source images per second (batch / median "
        "s/step); fit s/step: whole timed fit() / steps. Notes per row:"
    )
    for r in results:
        spread = max(r["times_s"]) / min(r["times_s"])
        print(
            f"  {row_label(r)} / {r['backend']} / drop {r['drop_path']:g}: {r['notes']}; "
            f"steps {', '.join(f'{t:.2f}' for t in r['times_s'])} s; peak RSS MB after "
            f"imports / build / warm-up / timed steps: {fmt(r.get('import_rss_mb'), '{:.0f}')} / "
            f"{fmt(r.get('built_peak_rss_mb'), '{:.0f}')} / "
            f"{fmt(r.get('warm_peak_rss_mb'), '{:.0f}')} / {r['peak_rss_mb']:.0f}"
            + (f" (the timed steps alone: {r['steps_peak_rss_mb']:.0f})" if r.get("steps_peak_rss_mb") else "")
            + (f"  <-- unsteady (slowest / fastest {spread:.1f})" if spread > 1.5 else "")
        )
    _print_loss_terms(results, baselines)
    _print_rounds(results, kind)
    if kind == "reference":
        _print_goal(results, baselines)
    print_footer(skipped, width)


def _print_rounds(results, kind):
    """With --rounds > 1: each implementation's ratios to the baseline, one per round, and their medians."""
    if len({r.get("round", 0) for r in results}) < 2:
        return
    print(f"Alternated rounds (each against its round's {kind} row; median over the rounds):")
    for key in sorted({(r["kind"], r["backend"], r["drop_path"]) for r in results}):
        rows = [r for r in results if (r["kind"], r["backend"], r["drop_path"]) == key]
        speeds = [r["speedup_vs_baseline"] for r in rows if r.get("speedup_vs_baseline")]
        memory = [r["memory_vs_baseline"] for r in rows if r.get("memory_vs_baseline")]
        if not speeds or all(s == 1.0 for s in speeds):
            continue
        print(f"  {row_label(rows[0])} / {key[1]} / drop {key[2]:g}: speed "
              f"{', '.join(f'{s:.2f}x' for s in speeds)} -> median {float(np.median(speeds)):.2f}x; memory median "
              f"{float(np.median(memory)):.2f}x")


def _print_loss_terms(results, baselines):
    """The last step's loss terms per row (KoLeo unweighted), and each one's difference from the baseline's: which
    term a loss gap comes from (the reference's masks are its own generator's, so iBOT differs a little anyway)."""
    rows = [r for r in results if r.get("loss_terms")]
    if not rows:
        return
    print("Loss terms of the last step (KoLeo before its weight 0.1; in brackets: minus the baseline's):")
    for r in rows:
        base = (baselines.get(_key(r)) or {}).get("loss_terms") or {}
        parts = []
        for name, value in r["loss_terms"].items():
            diff = f" ({value - base[name]:+.4f})" if name in base and base is not r["loss_terms"] else ""
            parts.append(f"{name} {value:.4f}{diff}")
        print(f"  {row_label(r)} / {r['backend']} / drop {r['drop_path']:g}: " + ", ".join(parts))


def _print_goal(results, baselines):
    """Whether JAX reaches the goal against the reference at each drop-path rate."""
    for (round_, rate), base in sorted(baselines.items()):
        ours = next(
            (
                r
                for r in results
                if r["kind"] == "ours" and r["backend"] == "jax" and _key(r) == (round_, rate)
            ),
            None,
        )
        if ours is None or base is None or base is ours:
            continue
        met = ours["speedup_vs_baseline"] >= 1.25 and ours["memory_vs_baseline"] <= 1.0
        print(
            f"  goal at drop path {rate:g} (JAX >= 1.25x the reference's img/s with no more "
            f"peak RSS): {ours['speedup_vs_baseline']:.2f}x, memory "
            f"{ours['memory_vs_baseline']:.2f}x -> {'met' if met else 'NOT met'}"
        )


def main(argv=None):
    return run_benchmark(argv, parse_args, _run_spec, parent)


def parent(args, info):
    """The parent: the batch, then each implementation at each rate in its own worker; the report."""
    if args.reference_src:
        info["reference_src"] = args.reference_src
        info["reference_commit"] = reference_commit(args.reference_src)
    runs, skipped = plan(args)
    common = {
        "model": args.model,
        "batch_size": args.batch_size,
        "prototypes": args.prototypes,
        "dtype": args.dtype,
        "steps": args.steps,
        "warmup": args.warmup,
        "device": args.device,
        "reference_src": args.reference_src,
        "torch_threads": args.torch_threads,
        "tf_xla": args.tf_xla,
    }
    with work_folder(args.keep, "dinov2_train_bench_") as workdir:
        print(
            f"Building one multi-crop batch of {args.batch_size} images ({args.model} crops) ...",
            flush=True,
        )
        batch_spec = {**common, "kind": "batch", "backend": "tensorflow"}
        batch_spec["batch"] = os.path.join(workdir, "batch.npz")
        made, reason = run_worker(batch_spec, args, workdir, "batch")
        if made is None:
            print(f"Could not build the batch: {reason}")
            return 1
        info["crops"] = made["crops"]
        print(
            f"    global {made['shapes']['global_crops']}, local {made['shapes']['local_crops']}, "
            f"{made['n_masked_patches']} masked patches (buffer {made['shapes']['mask_indices']}), "
            f"images: {made['images']}",
            flush=True,
        )
        shared = {**common, "batch": batch_spec["batch"], "geometry": made["geometry"]}

        def run_one(run, name):
            result, reason = run_worker({**shared, **run}, args, workdir, name)
            if result is not None:
                result["round"] = run.get("round", 0)
            return result, reason

        if args.interleave:
            result, reason = run_one(runs[0], "interleaved")
            if result is None:
                print(f"The interleaved run failed: {reason}")
                return 1
            _print_interleaved(args, result)
            if args.json:
                write_json(args.json, args, info, [result], skipped)
            return 0
        results, failed = run_all(runs, run_label, run_one, describe)
        skipped += failed
        info["load_after"] = load_average()
        if results:
            print_report(args, info, results, skipped)
        else:
            print("Nothing ran:\n  " + "\n  ".join(skipped))
        if args.json:
            write_json(args.json, args, info, results, skipped)
    return 0 if results else 1


# ----------------------------------------------------------------------------- worker side


def _run_spec(spec):
    """Runs one spec (the batch, or one implementation at one rate) in a worker."""
    if spec["kind"] == "batch":
        return _make_batch(spec)
    if spec["kind"] == "reference":
        return _measure_reference(spec)
    if spec["kind"] == "interleaved":
        return _measure_interleaved(spec)
    return _measure_keras(spec)


def _data_config(spec):
    from keras_dinov2.config import DataConfig

    return DataConfig.recipe(MODELS[spec["model"]]["data"])


def _make_batch(spec):
    """Builds one multi-crop batch with the library's pipeline and saves it as NumPy."""
    from keras_dinov2.data import multicrop_dataset

    config = _data_config(spec)
    images, what = source_images(max(spec["batch_size"], 8))
    patch = MODELS[spec["model"]]["patch"]
    dataset = multicrop_dataset(images, batch_size=spec["batch_size"], config=config, patch_size=patch, seed=SEED)
    batch = {k: np.asarray(v) for k, v in next(iter(dataset)).items()}
    np.savez(spec["batch"], **batch)
    return {
        "shapes": {k: list(v.shape) for k, v in batch.items()},
        "n_masked_patches": int(batch["n_masked_patches"]),
        "crops": [
            config.crops.global_crops_size,
            config.crops.local_crops_size,
            config.crops.local_crops_number,
        ],
        # What the reference's worker needs, so that it imports neither keras_dinov2 nor
        # (through keras_hub) TensorFlow, which would inflate its memory.
        "geometry": {
            "global_crops_size": config.crops.global_crops_size,
            "patch_size": patch,
            "mask_ratio_min_max": list(config.masking.mask_ratio_min_max),
            "mask_sample_probability": config.masking.mask_sample_probability,
        },
        "images": f"{images.shape[0]} x {images.shape[1]} x {images.shape[2]} {what}",
    }


def _load_batch(spec):
    """The multi-crop batch the parent had built, as a dict of NumPy arrays."""
    with np.load(spec["batch"]) as data:
        return {k: data[k] for k in data.files}


def _finish(spec, timed, first, loss, memory, device, method, notes, terms=None):
    """The result row of one implementation at one rate, from its timed steps."""
    return {
        "kind": spec["kind"],
        "backend": spec["backend"],
        "drop_path": spec["drop_path"],
        "method": method,
        "device": device,
        "dtype": spec["dtype"],
        "batch_size": spec["batch_size"],
        "prototypes": spec["prototypes"],
        **summary(timed.times, timed.cpu_times, spec["batch_size"]),
        "fit_s_per_step": timed.seconds / len(timed.times),
        "first_step_s": first,
        "loss": loss,
        "loss_terms": terms or {},
        # The process's peak: the warm-up's (compilation included) or the timed steps' since the reset.
        "peak_rss_mb": max(memory["warm"], peak_rss_mb()) if memory.get("reset") else peak_rss_mb(),
        "steps_peak_rss_mb": peak_rss_mb() if memory.get("reset") else None,
        "import_rss_mb": memory["import"],
        "built_peak_rss_mb": memory["built"],
        "warm_peak_rss_mb": memory["warm"],
        "end_rss_mb": current_rss_mb(),
        "notes": notes,
    }


# --------------------------------------------------------------------- keras_dinov2 worker


def _build_keras(spec):
    """(keras, model, batch, memory) for a Keras run: the pretrainer compiled, the batch as NumPy arrays."""
    keras = import_keras(spec["backend"])

    from keras_dinov2 import DINOv2Backbone, DINOv2Pretrainer, SSLConfig
    from keras_dinov2.config import HeadConfig, ModelConfig, OptimConfig

    memory = {"import": peak_rss_mb()}
    model_info = MODELS[spec["model"]]
    data_config = _data_config(spec)
    rate = spec["drop_path"]
    keras.utils.set_random_seed(SEED)
    backbone = DINOv2Backbone.from_preset(
        model_info["preset"],
        load_weights=False,
        image_size=data_config.crops.global_crops_size,
        drop_path_rate=rate,
        layer_scale_init=LAYER_SCALE_INIT,
        dtype=spec["dtype"],
    )
    hidden, bottleneck = model_info["head"]
    heads = HeadConfig(
        num_prototypes=spec["prototypes"], hidden_dim=hidden, bottleneck_dim=bottleneck
    )
    optim = OptimConfig(**OPTIM)
    model_config = ModelConfig(patch_size=model_info["patch"], drop_path_rate=rate, layer_scale_init=LAYER_SCALE_INIT)
    config = SSLConfig(batch_size=spec["batch_size"], heads=heads, optim=optim, data=data_config, model=model_config)
    model = DINOv2Pretrainer(backbone, config, steps_per_epoch=STEPS_PER_EPOCH)
    model.compile(**({"jit_compile": True} if spec.get("tf_xla") and spec["backend"] == "tensorflow" else {}))
    batch = _load_batch(spec)
    memory["built"] = peak_rss_mb()
    return keras, model, batch, memory


def _measure_keras(spec):
    backend = spec["backend"]
    gpu = backend_gpu(backend, spec["device"], spec.get("torch_threads"))
    keras, model, batch, memory = _build_keras(spec)
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensors(batch).repeat()
    sync = device_sync(backend, gpu)
    timer = step_timer(sync)

    warm_start = time.perf_counter()
    if spec["warmup"]:
        model.fit(dataset, epochs=1, steps_per_epoch=spec["warmup"], verbose=0, callbacks=[timer])
        sync()
    first = timer.times[0] if timer.times else None
    warm_wall = time.perf_counter() - warm_start
    memory["warm"] = peak_rss_mb()
    memory["reset"] = reset_peak_rss()  # the timed steps' own peak from here
    timer.reset()
    start = time.perf_counter()
    model.fit(dataset, epochs=1, steps_per_epoch=spec["steps"], verbose=0, callbacks=[timer])
    sync()
    timed = Timed(timer.times, timer.cpu_times, None, time.perf_counter() - start)
    if first is None:
        first = timer.times[0]
    jit = getattr(model, "jit_compile", None)
    method = {"jax": "jit", "tensorflow": "xla" if jit else "graph", "torch": "eager"}[backend]
    notes = (
        f"keras {keras.__version__}, jit_compile={jit}, {len(model.trainable_variables)} "
        f"trainable variables ({_count(model.trainable_variables) / 1e6:.1f} M), warm-up fit "
        f"{warm_wall:.1f} s"
    )
    if backend == "torch":
        import torch

        notes += f", torch threads: {torch.get_num_threads()}"
    if backend == "jax":
        import jax

        live = sum(a.nbytes for a in jax.live_arrays())
        notes += f", live JAX arrays after the steps {live / 2**20:.0f} MB"
    if os.environ.get("XLA_FLAGS"):
        notes += f", XLA_FLAGS={os.environ['XLA_FLAGS']}"
    result = _finish(spec, timed, first, timer.last_loss, memory, gpu or "cpu", method, notes, timer.last_terms)
    result["gpu_peak_mb"] = gpu_peak_mb(backend, gpu)
    return result


def _measure_interleaved(spec):
    """The torch backend's step (`model.train_step` on the batch's tensors, after a warm-up `fit`) and the
    reference's in one process, in alternated blocks of `steps` steps: each block's median step of each."""
    gpu = torch_gpu(spec["device"], spec.get("torch_threads"))
    keras, model, batch, _ = _build_keras(spec)
    import tensorflow as tf

    model.fit(tf.data.Dataset.from_tensors(batch).repeat(), epochs=1, steps_per_epoch=max(spec["warmup"], 1),
              verbose=0)
    tensors = {key: keras.ops.convert_to_tensor(value) for key, value in batch.items()}

    def ours():
        return model.train_step(tensors)["loss"]

    reference = _build_reference(spec, gpu).step
    sync = device_sync("torch", gpu)
    warm_up(reference, max(spec["warmup"], 1), sync)
    blocks = []
    for _ in range(spec["interleave"]):
        times = [statistics.median(time_calls(call, spec["steps"], sync).times) for call in (reference, ours)]
        blocks.append({"reference_s": times[0], "ours_s": times[1]})
    return {"blocks": blocks, "device": gpu or "cpu"}


def _print_interleaved(args, result):
    blocks = result["blocks"]
    ratios = [b["reference_s"] / b["ours_s"] for b in blocks]
    print(f"Interleaved in one process ({result['device']}), {len(blocks)} blocks of {args.steps} steps, median step "
          f"per block (reference / torch backend, ms):")
    print("  " + ", ".join(f"{b['reference_s'] * 1e3:.1f}/{b['ours_s'] * 1e3:.1f}" for b in blocks))
    print(f"  speed of the torch backend against the reference, per block: "
          f"{', '.join(f'{r:.3f}' for r in ratios)}")
    print(f"  median {statistics.median(ratios):.3f}x (>1 = faster), median steps: reference "
          f"{statistics.median([b['reference_s'] for b in blocks]) * 1e3:.2f} ms, torch backend "
          f"{statistics.median([b['ours_s'] for b in blocks]) * 1e3:.2f} ms")


def _count(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


# ------------------------------------------------------------------------ reference worker


def _import_reference(folder):
    """The reference's pieces, imported from `folder`; raises Skip naming what is missing."""
    import warnings

    os.environ.setdefault("XFORMERS_DISABLED", "1")
    sys.path.insert(0, folder)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from dinov2.layers import DINOHead, MemEffAttention, NestedTensorBlock
            from dinov2.layers import attention as attention_module
            from dinov2.layers import block as block_module
            from dinov2.loss import DINOLoss, KoLeoLoss, iBOTPatchLoss
            from dinov2.models import vision_transformer as vits
            from dinov2.utils.param_groups import (
                fuse_params_groups,
                get_params_groups_with_decay,
            )
    except Exception as error:  # an import error names the missing dependency
        raise Skip(
            f"could not import the reference's model, loss and param-group modules from "
            f"{folder}: {type(error).__name__}: {error}"
        ) from error
    module_file = getattr(vits, "__file__", "") or ""
    if not os.path.abspath(module_file).startswith(os.path.abspath(folder)):
        raise Skip(f"dinov2 was imported from {module_file}, not from {folder}.")
    data = os.path.join(folder, "dinov2", "data")
    try:
        # dinov2.data's __init__ imports its loaders (torchvision, ...): load the two files
        # that the step's inputs need on their own.
        masking = load_file_module("_reference_masking", os.path.join(data, "masking.py"))
        collate = load_file_module("_reference_collate", os.path.join(data, "collate.py"))
    except Exception as error:
        raise Skip(
            f"could not load dinov2/data/masking.py and collate.py: {type(error).__name__}: {error}"
        ) from error
    fallbacks = []
    if not getattr(attention_module, "XFORMERS_AVAILABLE", False):
        fallbacks.append("attention: torch scaled_dot_product_attention (no xFormers)")
    if not getattr(block_module, "XFORMERS_AVAILABLE", False):
        fallbacks.append("blocks: plain-torch stochastic depth, no nested tensors")
    return {
        "vits": vits,
        "Block": NestedTensorBlock,
        "MemEffAttention": MemEffAttention,
        "DINOHead": DINOHead,
        "DINOLoss": DINOLoss,
        "iBOTPatchLoss": iBOTPatchLoss,
        "KoLeoLoss": KoLeoLoss,
        "MaskingGenerator": masking.MaskingGenerator,
        "collate": collate.collate_data_and_cast,
        "get_params_groups_with_decay": get_params_groups_with_decay,
        "fuse_params_groups": fuse_params_groups,
        "fallbacks": fallbacks,
    }


def _reference_backbone(ref, spec, image_size, drop_path_rate):
    from functools import partial

    vits = ref["vits"]
    kwargs = {
        "img_size": image_size,
        "init_values": LAYER_SCALE_INIT,
        "block_chunks": 0,
        "drop_path_rate": drop_path_rate,
    }
    if spec["model"] == "small":
        return vits.vit_small(patch_size=14, **kwargs)
    if spec["model"] == "base":
        return vits.vit_base(patch_size=14, **kwargs)
    width, depth, heads = MODELS["tiny"]["dims"]
    return vits.DinoVisionTransformer(
        patch_size=MODELS["tiny"]["patch"],
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        mlp_ratio=4,
        block_fn=partial(ref["Block"], attn_class=ref["MemEffAttention"]),
        **kwargs,
    )


def _reference_inputs(ref, spec, batch, device):
    """The reference's collated batch from our crops (NHWC, view-major) and its own masks."""
    import random

    import torch

    random.seed(SEED)
    torch.manual_seed(SEED)
    b = spec["batch_size"]
    global_crops = torch.from_numpy(batch["global_crops"].transpose(0, 3, 1, 2).copy())
    local_crops = torch.from_numpy(batch["local_crops"].transpose(0, 3, 1, 2).copy())
    n_local = local_crops.shape[0] // b
    samples = [
        (
            {
                "global_crops": [global_crops[i], global_crops[b + i]],
                "local_crops": [local_crops[j * b + i] for j in range(n_local)],
            },
            None,
        )
        for i in range(b)
    ]
    geometry = spec["geometry"]
    grid = geometry["global_crops_size"] // geometry["patch_size"]
    # The ratios are the reference's defaults, which are also MaskingConfig's.
    collate = reference_collate(
        ref["collate"],
        ref["MaskingGenerator"],
        grid,
        geometry["mask_ratio_min_max"],
        geometry["mask_sample_probability"],
    )
    data = collate(samples)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in data.items()}, n_local


def _build_reference(spec, gpu):
    """The reference's training step on `spec`'s batch: a namespace with `step` (one update, returns the loss),
    `terms` (the last step's loss terms), `memory` and what the notes report."""
    import types

    import torch
    from torch import nn

    ref = _import_reference(spec["reference_src"])
    memory = {"import": peak_rss_mb()}
    device = "cuda" if gpu else "cpu"
    torch.manual_seed(SEED)
    model_info = MODELS[spec["model"]]
    rate = spec["drop_path"]
    image_size = spec["geometry"]["global_crops_size"]
    hidden, bottleneck = model_info["head"]
    width = model_info["dims"][0]
    prototypes = spec["prototypes"]

    def head():
        return ref["DINOHead"](
            in_dim=width,
            out_dim=prototypes,
            hidden_dim=hidden,
            bottleneck_dim=bottleneck,
            nlayers=3,
        )

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated
        student = nn.ModuleDict(
            {
                "backbone": _reference_backbone(ref, spec, image_size, rate),
                "dino_head": head(),
            }
        )
        teacher = nn.ModuleDict(
            {"backbone": _reference_backbone(ref, spec, image_size, 0.0), "dino_head": head()}
        )
    for key in student.keys():  # prepare_for_distributed_training: teacher = student
        teacher[key].load_state_dict(student[key].state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    student.to(device).train()
    teacher.to(device).eval()
    dino_loss = ref["DINOLoss"](prototypes).to(device)
    ibot_loss = ref["iBOTPatchLoss"](prototypes).to(device)
    koleo_loss = ref["KoLeoLoss"]().to(device)

    # SSLMetaArch.get_params_groups and build_optimizer; apply_optim_scheduler at step 0.
    groups = []
    for module in student.values():
        fused = ref["fuse_params_groups"](
            ref["get_params_groups_with_decay"](
                model=module, lr_decay_rate=LAYER_DECAY, patch_embed_lr_mult=PATCH_EMBED_LR_MULT
            )
        )
        for group in fused:
            group["foreach"] = True
            groups.append(group)
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999))
    lr = BASE_LR * math.sqrt(spec["batch_size"] / 1024.0)
    last_layer_lr = 0.0  # frozen first epoch
    for group in optimizer.param_groups:
        group["weight_decay"] = WEIGHT_DECAY * group["wd_multiplier"]
        group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"]
    student_params = [p for k in student.keys() for p in student[k].parameters()]
    teacher_params = [p for k in student.keys() for p in teacher[k].parameters()]

    batch = _load_batch(spec)
    data, n_local_crops = _reference_inputs(ref, spec, batch, device)
    memory["built"] = peak_rss_mb()
    autocast_dtype = torch_autocast(spec["dtype"])

    def autocast():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device, dtype=autocast_dtype)

    terms = {}  # the last forward_backward's loss terms

    def forward_backward(teacher_temp):
        # SSLMetaArch.forward_backward, "centering", shared DINO / iBOT head, no xFormers.
        n_global_crops = 2
        global_crops = data["collated_global_crops"]
        local_crops = data["collated_local_crops"]
        masks = data["collated_masks"]
        mask_indices_list = data["mask_indices_list"]
        n_masked_patches = mask_indices_list.shape[0]
        upperbound = data["upperbound"]
        masks_weight = data["masks_weight"]
        n_local_crops_loss_terms = max(n_local_crops * n_global_crops, 1)
        n_global_crops_loss_terms = (n_global_crops - 1) * n_global_crops
        ibot_loss_scale = 1.0 / n_global_crops

        with torch.no_grad(), autocast():
            out = teacher["backbone"](global_crops, is_training=True)
            cls_tokens = out["x_norm_clstoken"].chunk(n_global_crops)
            cls_tokens = torch.cat((cls_tokens[1], cls_tokens[0]))
            patch_tokens = out["x_norm_patchtokens"]
            dim = patch_tokens.shape[-1]
            n_cls = cls_tokens.shape[0]
            buffer = patch_tokens.new_zeros(upperbound + n_cls, dim)
            buffer[:n_cls].copy_(cls_tokens)
            torch.index_select(
                patch_tokens.flatten(0, 1),
                dim=0,
                index=mask_indices_list,
                out=buffer[n_cls : n_cls + n_masked_patches],
            )
            after_head = teacher["dino_head"](buffer)
            teacher_cls_after_head = after_head[:n_cls]
            teacher_patch_after_head = after_head[n_cls : n_cls + n_masked_patches]
            teacher_dino = dino_loss.softmax_center_teacher(
                teacher_cls_after_head, teacher_temp=teacher_temp
            ).view(n_global_crops, -1, *teacher_cls_after_head.shape[1:])
            dino_loss.update_center(teacher_cls_after_head)
            teacher_patch_after_head = teacher_patch_after_head.unsqueeze(0)
            teacher_ibot = ibot_loss.softmax_center_teacher(
                teacher_patch_after_head[:, :n_masked_patches], teacher_temp=teacher_temp
            ).squeeze(0)
            ibot_loss.update_center(teacher_patch_after_head[:n_masked_patches])

        with autocast():
            # The reference calls backbone([global, local], masks=[masks, None]) (nested
            # tensors, xFormers only); the same blocks on each list element separately:
            student_global = student["backbone"](global_crops, masks=masks, is_training=True)
            student_local = student["backbone"](local_crops, is_training=True)
            local_cls = student_local["x_norm_clstoken"]
            global_cls = student_global["x_norm_clstoken"]
            patch_tokens = student_global["x_norm_patchtokens"]
            buffer = patch_tokens.new_zeros(upperbound, patch_tokens.shape[-1])
            buffer[:n_masked_patches].copy_(
                torch.index_select(patch_tokens.flatten(0, 1), dim=0, index=mask_indices_list)
            )
            # BlockDiagonalMask.from_tensor_list + split around one head call: a torch.cat.
            sizes = [local_cls.shape[0], global_cls.shape[0], buffer.shape[0]]
            outputs = student["dino_head"](torch.cat([local_cls, global_cls, buffer])).split(sizes)
            local_after_head, global_after_head, patch_after_head = outputs
            patch_after_head = patch_after_head[:n_masked_patches]

            loss = 0
            dino_local = dino_loss(
                student_output_list=local_after_head.chunk(n_local_crops),
                teacher_out_softmaxed_centered_list=teacher_dino,
            ) / (n_global_crops_loss_terms + n_local_crops_loss_terms)
            loss += dino_local
            dino_global = (
                dino_loss(
                    student_output_list=[global_after_head],
                    teacher_out_softmaxed_centered_list=[teacher_dino.flatten(0, 1)],
                )
                * 2
                / (n_global_crops_loss_terms + n_local_crops_loss_terms)
            )
            loss += dino_global
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.cuda.amp.autocast is deprecated
                koleo = 0.1 * sum(koleo_loss(p) for p in global_cls.chunk(2))
            loss += koleo
            ibot = (
                ibot_loss.forward_masked(
                    patch_after_head,
                    teacher_ibot,
                    student_masks_flat=masks,
                    n_masked_patches=n_masked_patches,
                    masks_weight=masks_weight,
                )
                * 2
                * ibot_loss_scale
            )
            loss += ibot
        # As the library's logs give them: KoLeo before its weight 0.1 (the others enter the loss with weight 1).
        terms.update(dino_local=dino_local, dino_global=dino_global, ibot=ibot, koleo=koleo / 0.1)
        loss.backward()
        return loss

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = forward_backward(TEACHER_TEMP)
        for module in student.values():
            torch.nn.utils.clip_grad_norm_(module.parameters(), CLIP_GRAD)
        optimizer.step()
        with torch.no_grad():  # update_teacher
            torch._foreach_mul_(teacher_params, MOMENTUM_TEACHER)
            torch._foreach_add_(teacher_params, student_params, alpha=1 - MOMENTUM_TEACHER)
        return loss

    return types.SimpleNamespace(step=step, terms=terms, memory=memory, ref=ref, optimizer=optimizer, data=data,
                                 student_params=student_params, autocast_dtype=autocast_dtype)


def _measure_reference(spec):
    if not spec.get("reference_src"):
        raise Skip("no --reference-src given.")
    gpu = torch_gpu(spec["device"], spec.get("torch_threads"))
    import torch

    built = _build_reference(spec, gpu)
    step, terms, memory, ref, optimizer = built.step, built.terms, built.memory, built.ref, built.optimizer
    data, student_params, autocast_dtype = built.data, built.student_params, built.autocast_dtype
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    sync = device_sync("torch", gpu)
    first, warm_wall = warm_up(step, spec["warmup"], sync)
    memory["warm"] = peak_rss_mb()
    memory["reset"] = reset_peak_rss()  # the timed steps' own peak from here
    timed = time_calls(step, spec["steps"], sync)
    if first is None:
        first = timed.times[0]
    n_params = sum(p.numel() for p in student_params)
    notes = (
        f"torch {torch.__version__}, eager, torch threads: {torch.get_num_threads()}, "
        f"{len(student_params)} student tensors ({n_params / 1e6:.1f} M), "
        f"{len(optimizer.param_groups)} AdamW groups, {data['mask_indices_list'].shape[0]} masked "
        f"patches (upper bound {data['upperbound']}), warm-up {warm_wall:.1f} s"
        + (f", autocast {autocast_dtype}" if autocast_dtype else "")
        + ("; " + "; ".join(ref["fallbacks"]) if ref["fallbacks"] else "")
    )
    loss = float(timed.output)
    terms = {k: float(v) for k, v in terms.items()}  # the last step's, read once the timing is done
    result = _finish(spec, timed, first, loss, memory, gpu or "cpu", "eager", notes, terms)
    if "tensorflow" in sys.modules:
        notes += "; TensorFlow got imported, which inflates the peak RSS"
        result["notes"] = notes
    result["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20 if gpu else None
    return result


if __name__ == "__main__":
    sys.exit(main())
