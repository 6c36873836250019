"""Data-parallel training throughput and model FLOPs utilization (MFU) of DINOv2Pretrainer.

Times the full DINOv2 training step (teacher on the 2 global crops; student on the masked global crops and the
local crops; DINO, iBOT and KoLeo; backward; clipping; AdamW; teacher EMA) under mixed precision, data parallel
over every visible device of the chosen backend (`keras_dinov2.distribute.setup("data")`), for ViT-S/14 and
ViT-L/14 with the reference's heads and crops, and reports images per second and MFU. Next to it, in the same run,
the same step on one device with the per-replica batch (the peer): scaling efficiency = images/s on N devices /
(N x images/s on one).

Run from the repository root:

    python tools/benchmark_distributed.py                          # ViT-S/14 and ViT-L/14, jax, all devices
    python tools/benchmark_distributed.py --backend torch          # torch.distributed: one process per GPU
    python tools/benchmark_distributed.py --quick                  # tiny ViT on 4 virtual CPU devices: a smoke run
    python tools/benchmark_distributed.py --models small --batch-size 64 --peak-tflops 989 --json out.json

Without accelerators it runs on virtual CPU devices (`--cpu-devices`, default 4: XLA host devices for JAX,
logical CPU devices for TensorFlow, gloo processes for torch), whose figures only show that the distributed step
runs: the virtual devices share the same cores.

Model FLOPs (per training step, matmul FLOPs only, 2 FLOPs per multiply-add; softmax, norms and element-wise
operations are not counted, as usual for MFU). For a ViT of width D, depth L, MLP hidden width F (SwiGLU: hidden
h with a fused D -> 2h input and h -> D output), patch p and T tokens (1 CLS + R registers + n = (S / p)^2 patches
for a crop of side S), one forward pass of one crop costs

    patch embedding   2 n (3 p^2) D
    per block         2 T (3 D^2) + 2 T D^2          qkv and output projections
                      + 2 (2 T^2 D)                  q k^T and attention x v
                      + 2 T (2 D F)                  MLP (SwiGLU: 2 T (3 D h))

and a DINO head (D -> H -> H -> bottleneck b, then b -> K prototypes) costs 2 (D H + H H + H b + b K) per row.
With B images per replica, 2 global crops of side G, n_l local crops of side l, and M masked patches:

    student forward   = 2B ViT(G) + n_l B ViT(l) + (2B + n_l B) head_dino + M head_ibot
    teacher forward   = 2B ViT(G) + 2B head_dino + M head_ibot
    FLOPs per step    = 3 x student forward (forward + backward ~ 2 x forward) + teacher forward

summed over replicas; MFU = FLOPs per step / step time / (devices x peak FLOP/s per device). The peak is the
dense bf16 / fp16 tensor-core figure of a known accelerator (`PEAK_TFLOPS`), or `--peak-tflops`.
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
from bench import cli
from bench.devices import import_keras
from bench.machine import load_average
from bench.report import fmt, write_json
from bench.timing import step_timer
from bench.workers import (
    REPO_ROOT,
    run_all,
    run_benchmark,
    run_in_subprocess,
    work_folder,
    worker_env,
)

sys.path.insert(0, REPO_ROOT)

# name: architecture preset, SSL recipe (heads), data recipe (crops)
MODELS = {
    "tiny": ("dinov2_vit_tiny4", "digits", "digits"),
    "small": ("dinov2_vit_small14", "reference_default", "vit14"),
    "large": ("dinov2_vit_large14", "vitl14", "vit14"),
}
# Dense bf16 / fp16 tensor-core peak per JAX / torch / TF device, TFLOP/s (vendor data sheets). TPU v2 and v3
# show each of a chip's two cores as one device; later TPUs one device per chip.
PEAK_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("V100", 125.0),
    ("T4", 65.0),
    ("TPU v2", 22.5),
    ("TPU v3", 61.5),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),
    ("TPU v6 lite", 918.0),
    ("TPU v6e", 918.0),
]
SEED = 0


def peak_tflops(device_kind):
    """Peak dense bf16 TFLOP/s of one device from its name, or None when unknown (e.g. a CPU)."""
    for name, value in PEAK_TFLOPS:
        if name.lower() in (device_kind or "").lower():
            return value
    return None


# ----------------------------------------------------------------------------------------------- model FLOPs


def vit_forward_flops(width, depth, mlp_hidden, patch, side, registers=0, swiglu=False):
    """Matmul FLOPs of one ViT forward pass over one crop of side `side` (see the module docstring)."""
    n = (side // patch) ** 2
    t = 1 + registers + n
    embed = 2 * n * 3 * patch * patch * width
    mlp = 2 * t * 3 * width * mlp_hidden if swiglu else 2 * t * 2 * width * mlp_hidden
    block = 2 * t * 4 * width * width + 2 * 2 * t * t * width + mlp
    return embed + depth * block


def head_flops(in_dim, hidden, bottleneck, prototypes):
    """Matmul FLOPs of one DINO head row (3-layer MLP and the prototypes)."""
    return 2 * (in_dim * hidden + hidden * hidden + hidden * bottleneck + bottleneck * prototypes)


def train_step_flops(backbone_config, ssl_config, batch_size, masked_patches):
    """Model FLOPs of one training step on one replica: (total, student forward, teacher forward)."""
    c = backbone_config
    width, depth = c["hidden_dim"], c["num_layers"]
    swiglu = c.get("ffn_type") == "swiglu"
    hidden = int(width * c.get("mlp_ratio", 4.0))
    if swiglu:
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
    crops = ssl_config.data.crops
    vit = lambda side: vit_forward_flops(  # noqa: E731
        width, depth, hidden, c["patch_size"], side, c.get("num_register_tokens", 0), swiglu)
    heads = ssl_config.heads
    dino = head_flops(width, heads.hidden_dim, heads.bottleneck_dim, heads.num_prototypes)
    if heads.ibot_separate_head:
        ibot = head_flops(width, heads.hidden_dim, heads.ibot_bottleneck_dim,
                          heads.ibot_num_prototypes)
    else:
        ibot = dino
    b, n_local = batch_size, crops.local_crops_number
    global_vit = 2 * b * vit(crops.global_crops_size)
    student = (global_vit + n_local * b * vit(crops.local_crops_size)
               + (2 * b + n_local * b) * dino + masked_patches * ibot)
    teacher = global_vit + 2 * b * dino + masked_patches * ibot
    return 3 * student + teacher, student, teacher


# ----------------------------------------------------------------------------------------------- driver


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring for the FLOPs formula.",
    )
    parser.add_argument("--backend", default=os.environ.get("KERAS_BACKEND", "jax"),
                        choices=["jax", "tensorflow", "torch"])
    parser.add_argument("--models", default="small,large",
                        help="comma-separated: tiny, small (ViT-S/14), large (ViT-L/14)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per replica (default 64 for small, 32 for large on "
                             "accelerators; 2 on CPU; 8 for tiny)")
    parser.add_argument("--dtype", default=None,
                        choices=["mixed_bfloat16", "mixed_float16", "float32"],
                        help="precision policy (default mixed_bfloat16; torch/TF on GPUs "
                             "without bf16: mixed_float16)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--cpu-devices", type=int, default=4,
                        help="virtual devices when no accelerator is present (default 4)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak TFLOP/s per device for MFU (default: from the device name)")
    parser.add_argument("--peer", action=argparse.BooleanOptionalAction, default=None,
                        help="also time one device with the per-replica batch (default: yes, "
                             "except with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny ViT, 2 timed steps, no peer: a smoke run on a CPU (its duration: "
                             "docs/performance.md)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--json", default=None, help="write the results here")
    cli.add_worker_flags(parser, "show the workers' output")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.steps, args.warmup = "tiny", 2, 1
    if args.peer is None:
        args.peer = not args.quick
    return args


def _environment(spec):
    extra = {"TF_CPP_MIN_LOG_LEVEL": "3"}
    if spec["backend"] == "jax" and spec["cpu_devices"] > 1:
        count = f" --xla_force_host_platform_device_count={spec['cpu_devices']}"
        extra["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + count
    return worker_env(spec["backend"], **extra)


def main(argv=None):
    return run_benchmark(argv, parse_args, _run_worker, parent)


def parent(args, info):
    """The parent: each model on all devices (and on one: the peer), each in a worker; the report."""
    accelerated = bool(info["gpus"]) or os.path.exists("/dev/accel0") or os.path.exists(
        "/dev/vfio/0")
    runs = []
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        if model not in MODELS:
            raise SystemExit(f"error: unknown model {model!r}; choose from {sorted(MODELS)}.")
        base = {"backend": args.backend, "model": model, "steps": args.steps,
                "warmup": args.warmup, "dtype": args.dtype, "peak_tflops": args.peak_tflops,
                "batch_size": args.batch_size, "accelerated": accelerated,
                "cpu_devices": 0 if accelerated else args.cpu_devices}
        runs.append({**base, "devices": "all"})
        if args.peer:
            runs.append({**base, "devices": "one", "cpu_devices": 0})
    print(f"Machine: {info['cpu']} ({info['cpus_usable']} usable cores), GPUs: "
          f"{', '.join(info['gpus']) or 'none'}; backend {args.backend}; load "
          f"{fmt(info['load_before'], '{:.1f}')}", flush=True)
    with work_folder(None, "dinov2_dist_bench_") as workdir:

        def run_one(spec, name):
            start = time.perf_counter()
            result, reason = run_in_subprocess(__file__, spec, workdir, name, _environment(spec),
                                               args.timeout, args.verbose)
            if result is not None:
                result["wall_s"] = time.perf_counter() - start
            return result, reason

        results, skipped = run_all(runs, _label, run_one, _describe)
    info["load_after"] = load_average()
    _report(args, info, results, skipped)
    if args.json:
        write_json(args.json, args, info, results, skipped)
    return 0 if results else 1


def _label(spec):
    return f"{spec['model']} on {spec['devices']} device(s)"


def _describe(result):
    return (f"{result['describe']}: {result['median_s']:.3f} s/step, "
            f"{result['images_per_s']:.2f} img/s, MFU {fmt(result['mfu'], '{:.1%}')}")


def _report(args, info, results, skipped):
    if not results:
        print("Nothing ran:\n  " + "\n  ".join(skipped))
        return
    print()
    print(f"DINOv2 training step, data parallel, backend {args.backend}, load "
          f"{fmt(info['load_before'], '{:.1f}')} -> {fmt(info['load_after'], '{:.1f}')}")
    header = (f"{'model':<6} {'devices':>8} {'global batch':>12} {'dtype':>15} {'s/step':>8} "
              f"{'img/s':>9} {'TFLOP/step':>10} {'TFLOP/s':>8} {'peak/dev':>9} {'MFU':>7} "
              f"{'scaling':>8}")
    print(header)
    print("-" * len(header))
    peers = {r["model"]: r for r in results if r["devices_used"] == 1 and r["spec_devices"] == "one"}
    for r in results:
        peer = peers.get(r["model"])
        scaling = None
        if peer is not None and r["spec_devices"] == "all" and r["devices_used"] > 1:
            scaling = r["images_per_s"] / (r["devices_used"] * peer["images_per_s"])
        print(f"{r['model']:<6} {r['devices_used']:>8} {r['global_batch']:>12} {r['dtype']:>15} "
              f"{r['median_s']:>8.3f} {r['images_per_s']:>9.2f} {r['flops_per_step'] / 1e12:>10.3f} "
              f"{r['flops_per_step'] / r['median_s'] / 1e12:>8.3f} "
              f"{fmt(r['peak_tflops'], '{:.1f}'):>9} {fmt(r['mfu'], '{:.1%}'):>7} "
              f"{fmt(scaling, '{:.2f}'):>8}")
    devices = {r["device_kind"] for r in results}
    print(f"Devices: {', '.join(sorted(devices))}. Scaling = img/s on N devices / (N x img/s on one "
          "device with the per-replica batch).")
    if any(r["virtual"] for r in results):
        print("Virtual CPU devices share the same cores: these figures only show that the "
              "distributed step runs, not how it scales.")
    if any(r["peak_tflops"] is None for r in results):
        print("MFU needs the device's peak: pass --peak-tflops for an unknown device.")
    for line in skipped:
        print(f"skipped: {line}")


# ----------------------------------------------------------------------------------------------- worker


def _run_worker(spec):
    """Measures one spec in a worker (torch: one process per device, launched from here)."""
    return _torch_launch(spec) if spec["backend"] == "torch" else _measure(spec)


def _defaults(spec, accelerated):
    model = spec["model"]
    batch = spec["batch_size"] or (8 if model == "tiny" else
                                   (64 if model == "small" else 32) if accelerated else 2)
    dtype = spec["dtype"] or "mixed_bfloat16"
    return batch, dtype


def _one_batch(config, batch_size):
    """One per-replica multi-crop batch from the library's pipeline, on random images."""
    from keras_dinov2.data import multicrop_dataset

    rng = np.random.default_rng(SEED)
    side = max(64, config.data.crops.global_crops_size)
    images = rng.integers(0, 256, size=(batch_size, side, side, 3), dtype=np.uint8)
    dataset = multicrop_dataset(images, batch_size=batch_size, config=config, seed=SEED,
                                jit_compile=False)
    return {k: np.asarray(v) for k, v in next(iter(dataset)).items()}


def _build(spec, dist, batch_size, dtype):
    import keras

    from keras_dinov2 import DINOv2Backbone, DINOv2Pretrainer, SSLConfig
    from keras_dinov2.backbone import ARCHITECTURES

    preset, recipe, _ = MODELS[spec["model"]]
    config = SSLConfig.recipe(recipe)
    config.batch_size = batch_size
    config.optim.warmup_epochs = 0
    config.model.drop_path_rate = 0.0 if spec["model"] == "tiny" else config.model.drop_path_rate
    keras.utils.set_random_seed(SEED)
    with dist.scope():
        backbone = DINOv2Backbone.from_preset(
            preset, load_weights=False, image_size=config.data.crops.global_crops_size,
            drop_path_rate=config.model.drop_path_rate, dtype=dtype)
        model = DINOv2Pretrainer(backbone, config, steps_per_epoch=1000)
        model.compile(global_batch_size=dist.global_batch_size(batch_size))
    dist.prepare(model)
    return model, config, ARCHITECTURES[preset]["config"]


def _device_kind(backend):
    if backend == "jax":
        import jax

        return jax.devices()[0].device_kind
    if backend == "torch":
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    import tensorflow as tf

    for kind in ("TPU", "GPU"):
        devices = tf.config.list_physical_devices(kind)
        if devices:
            details = tf.config.experimental.get_device_details(devices[0])
            return details.get("device_name", kind)
    return "cpu"


def _measure(spec, rank_setup=None):
    backend = spec["backend"]
    if backend == "tensorflow" and spec["cpu_devices"] > 1:
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * spec["cpu_devices"])
    import_keras(backend)
    import tensorflow as tf

    from keras_dinov2 import distribute

    if rank_setup is not None:
        dist = rank_setup
    elif spec["devices"] == "one":
        dist = distribute.setup("none")
    else:
        dist = distribute.setup("data")
    batch_size, dtype = _defaults(spec, spec["accelerated"])
    model, config, arch = _build(spec, dist, batch_size, dtype)
    batch = _one_batch(config, batch_size)
    steps = spec["warmup"] + spec["steps"]
    if dist.strategy is not None:
        dataset = dist.strategy.distribute_datasets_from_function(
            lambda context: tf.data.Dataset.from_tensors(batch).repeat())
    elif backend == "jax" and dist.mode != "none":
        stacked = distribute.stack_batches([batch] * dist.local_replicas)
        dataset = tf.data.Dataset.from_tensors(stacked).repeat()
    else:
        dataset = tf.data.Dataset.from_tensors(batch).repeat()
    timer = step_timer()
    model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[timer])
    times = timer.intervals()
    timed = [float(t) for t in times[spec["warmup"]:]]
    median = statistics.median(timed)
    replicas = dist.num_replicas
    devices = replicas * dist.model_axis_size
    flops, student, teacher = train_step_flops(arch, config, batch_size,
                                               int(batch["n_masked_patches"]))
    flops *= replicas
    kind = _device_kind(backend)
    peak = spec["peak_tflops"] or peak_tflops(kind)
    mfu = None if peak is None else flops / median / (devices * peak * 1e12)
    return {
        "model": spec["model"],
        "backend": backend,
        "spec_devices": spec["devices"],
        "devices_used": devices,
        "virtual": spec["cpu_devices"] > 1 or (backend == "torch" and kind == "cpu"
                                               and replicas > 1),
        "describe": dist.describe(),
        "device_kind": kind,
        "dtype": dtype,
        "batch_per_replica": batch_size,
        "global_batch": batch_size * replicas,
        "first_step_s": float(times[0]),
        "times_s": timed,
        "median_s": median,
        "images_per_s": batch_size * replicas / median,
        "flops_per_step": flops,
        "student_forward_flops_per_replica": student,
        "teacher_forward_flops_per_replica": teacher,
        "peak_tflops": peak,
        "mfu": mfu,
        "loss": timer.last_loss,
    }


def _torch_launch(spec):
    import socket

    import torch
    import torch.multiprocessing as mp

    if spec["devices"] == "one":
        return _measure(spec)
    world = torch.cuda.device_count() if torch.cuda.is_available() else spec["cpu_devices"]
    if world < 2:
        return _measure({**spec, "devices": "one"})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = spec["result"] + ".rank0"
    mp.spawn(_torch_rank, args=(world, port, spec, out), nprocs=world, join=True)
    with open(out) as f:
        return json.load(f)


def _torch_rank(rank, world, port, spec, out):
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from keras_dinov2 import distribute

    dist = distribute.setup("data")
    result = _measure(spec, rank_setup=dist)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
