"""The full DINOv2 training step on one GPU, per Keras backend: images/s, TFLOP/s, MFU, peak memory, attention kernels.

Made for GPU machines that have JAX or PyTorch but no TensorFlow (TensorFlow's wheel is too large to carry there),
so it runs in two places:

    # 1. here, with the library's real tf.data pipeline: one multi-crop batch, saved (float16 crops, ~35 MB)
    python tools/benchmark_gpu.py --write-batch /tmp/batch_large32.npz --model large --batch-size 32
    # 2. on the GPU machine: each backend in its own process, the same batch
    python tools/benchmark_gpu.py --batch /tmp/batch_large32.npz --backends jax,torch --json out.json

Each worker builds ViT-S/14 or ViT-L/14 with the reference's heads (`vitl14` / `reference_default` recipe) and crops
(2 x 224 + 8 x 98), compiles the pretrainer, and times `model.fit` over a Python generator of that batch (warm-up
steps in a first `fit`, then the timed steps in a second, ended by a device synchronization), under
`--dtype` (default mixed_bfloat16). Model FLOPs are counted as in tools/benchmark_distributed.py
(`train_step_flops`: matmul FLOPs only, 3 x student forward + teacher forward); MFU divides the measured FLOP/s by
the device's dense bf16 peak (989.4 TFLOP/s for H100/H200 SXM) or `--peak-tflops`.

Which attention kernels ran: JAX dumps the optimized HLO (XLA_FLAGS=--xla_dump_to) and the worker counts cuDNN
fused-attention custom calls (`__cudnn$fmha...`) against plain dot/softmax attention; torch profiles one step and
lists the CUDA kernels whose names say flash / memory-efficient / cuDNN attention, with the step's wall time against
the GPU's kernel time and the operators with the most host time (is the step bound by the host's dispatch?).

`--tile K` replays the batch's images K times over (a batch of 64 from a file of 32, the mask buffer rebuilt).

Where TensorFlow is missing, `keras_dinov2` (whose data package builds tf.data pipelines at import) is imported
with an inert stand-in for the `tensorflow` module, removed again afterwards; nothing in the training step calls it.
"""

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO_ROOT)

MODELS = {  # name: architecture preset, SSL recipe (heads and crops)
    "tiny": ("dinov2_vit_tiny4", "digits"),
    "small": ("dinov2_vit_small14", "reference_default"),
    "large": ("dinov2_vit_large14", "vitl14"),
}
FLOAT_KEYS = ("global_crops", "local_crops")  # stored as float16 (normalized pixels)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--write-batch", metavar="NPZ", help="write one multi-crop batch here and stop (needs TF)")
    p.add_argument("--batch", metavar="NPZ", help="the batch written by --write-batch")
    p.add_argument("--model", default="large", choices=sorted(MODELS))
    p.add_argument("--batch-size", type=int, default=32, help="images per batch for --write-batch")
    p.add_argument("--tile", type=int, default=1,
                   help="replay the batch's images this many times over (a larger batch from one file: the "
                        "files travel to the GPU machine, and a ViT-L/14 batch of 64 would be ~70 MB)")
    p.add_argument("--backends", default="jax,torch", help="comma-separated: jax, torch, tensorflow")
    p.add_argument("--dtype", default="mixed_bfloat16",
                   choices=["mixed_bfloat16", "mixed_float16", "float32"])
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation) first")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak (default: from its name)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per backend")
    p.add_argument("--json", help="write all results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- the batch


def _config(model):
    from keras_dinov2 import SSLConfig

    preset, recipe = MODELS[model]
    config = SSLConfig.recipe(recipe)
    config.optim.warmup_epochs = 0
    return preset, config


def write_batch(path, model, batch_size):
    os.environ.setdefault("KERAS_BACKEND", "jax")
    from benchmark_distributed import _one_batch

    _, config = _config(model)
    config.batch_size = batch_size
    batch = _one_batch(config, batch_size)
    arrays = {k: (np.asarray(v, np.float16) if k in FLOAT_KEYS else np.asarray(v)) for k, v in batch.items()}
    np.savez(path, model=np.asarray(model), **arrays)
    print(f"wrote {path}: " + ", ".join(f"{k} {v.shape} {v.dtype}" for k, v in arrays.items()))


def read_batch(path):
    with np.load(path) as f:
        model = str(f["model"])
        batch = {k: (f[k].astype(np.float32) if k in FLOAT_KEYS else f[k]) for k in f.files if k != "model"}
    return model, batch


def tile_batch(batch, times):
    """The batch with each view's images repeated `times` times (view-major order kept) and the iBOT mask buffer
    rebuilt from the tiled masks: flat indices of the masked patches, 1 / (masked patches of that image), padding
    with zeros to mask_buffer_size(2 * batch size) or the count, whichever is larger."""
    if times == 1:
        return batch
    from keras_dinov2.data.mask_budget import mask_buffer_size

    out = dict(batch)
    for key in ("global_crops", "local_crops", "masks"):
        if key in batch:
            views = batch[key].reshape(-1, batch["global_crops"].shape[0] // 2, *batch[key].shape[1:])
            out[key] = np.concatenate([views] * times, axis=1).reshape(-1, *batch[key].shape[1:])
    masks = out["masks"]
    num_images, num_patches = masks.shape
    indices = np.flatnonzero(masks.reshape(-1)).astype(np.int32)
    per_image = masks.sum(axis=1).astype(np.float32)
    weights = 1.0 / np.maximum(per_image[indices // num_patches], 1.0)
    size = max(mask_buffer_size(num_images, num_patches), len(indices))
    out["mask_indices"] = np.concatenate([indices, np.zeros(size - len(indices), np.int32)])
    out["masks_weight"] = np.concatenate([weights, np.zeros(size - len(indices), np.float32)]).astype(np.float32)
    out["n_masked_patches"] = np.asarray(len(indices), np.int32)
    return out


# ----------------------------------------------------------------------------------------------- worker


def _import_library():
    """keras_dinov2, with a stand-in `tensorflow` module while importing it when TensorFlow is missing."""
    import keras  # noqa: F401  (before any stand-in: Keras and keras-hub probe for TensorFlow)
    import keras_hub  # noqa: F401

    try:
        import tensorflow  # noqa: F401

        stubbed = False
    except ImportError:
        stubbed = True

        class Inert(types.ModuleType):
            def __getattr__(self, name):
                return Inert(name)

            def __call__(self, *args, **kwargs):  # decorators return what they wrap
                return args[0] if len(args) == 1 and callable(args[0]) else Inert("call")

        sys.modules["tensorflow"] = Inert("tensorflow")
    try:
        import keras_dinov2
    finally:
        if stubbed:
            del sys.modules["tensorflow"]
    return keras_dinov2, stubbed


def _attention_jax(dump):
    files = glob.glob(os.path.join(dump, "*after_optimizations.txt"))
    text = "".join(open(f).read() for f in files)
    fused = len(re.findall(r'custom_call_target="__cudnn\$fmha[^"]*"', text))
    targets = sorted(set(re.findall(r'custom_call_target="(__cudnn\$fmha[^"]*)"', text)))
    return {"hlo_modules": len(files), "cudnn_fmha_calls": fused, "cudnn_fmha_targets": targets}


def _profile_torch(step):
    """One profiled step: the attention kernels that ran, the step's wall time against the time the GPU spent in
    kernels (far below the wall time: the host's Python and Keras dispatch, not the GPU, sets the pace), and the
    operators with the most host time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    names, kernels_us, by_ops_us, ops, calls = {}, 0.0, 0.0, [], 0
    for event in prof.key_averages():
        name = event.key
        device = getattr(event, "self_device_time_total", None)
        device = getattr(event, "self_cuda_time_total", 0.0) if device is None else device
        if "CUDA" in str(getattr(event, "device_type", "")):
            kernels_us += device  # the kernels themselves
        else:
            by_ops_us += device  # the same kernels, charged to the operators that launched them
        if re.search(r"flash|fmha|efficient_attention|cudnn.*att|attention", name, re.I) and device:
            names[name[:120]] = names.get(name[:120], 0) + event.count
        if name.startswith("aten::") or name.startswith("torch"):
            calls += event.count
            ops.append((event.self_cpu_time_total, event.count, name))
    ops.sort(reverse=True)
    return {"attention_kernels": names, "profiled_step_s": wall, "gpu_kernel_s": max(kernels_us, by_ops_us) / 1e6,
            "host_op_calls": calls,
            "top_host_ops": [{"op": n, "calls": c, "self_cpu_ms": round(t / 1e3, 1)} for t, c, n in ops[:15]]}


def worker(spec):
    backend = spec["backend"]
    import keras
    from benchmark_distributed import peak_tflops, train_step_flops

    lib, stubbed = _import_library()
    from keras_dinov2.backbone import ARCHITECTURES

    model_name, batch = read_batch(spec["batch"])
    batch = tile_batch(batch, spec.get("tile", 1))
    preset, config = _config(model_name)
    batch_size = int(batch["global_crops"].shape[0]) // 2
    config.batch_size = batch_size
    keras.utils.set_random_seed(0)
    backbone = lib.DINOv2Backbone.from_preset(
        preset, load_weights=False, image_size=config.data.crops.global_crops_size,
        drop_path_rate=config.model.drop_path_rate, dtype=spec["dtype"])
    model = lib.DINOv2Pretrainer(backbone, config, steps_per_epoch=1000)
    model.compile(global_batch_size=batch_size)

    def batches():
        while True:
            yield (batch,)

    if backend == "jax":
        import jax

        device = jax.devices()[0]
        kind = device.device_kind

        def sync():
            jax.block_until_ready([v.value for v in model.trainable_variables[:1]])
            jax.effects_barrier()
    else:
        import torch

        kind = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"

        def sync():
            if torch.cuda.is_available():
                torch.cuda.synchronize()

    print(f"[{backend}] built; warm-up ({spec['warmup']} steps, compilation) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    model.fit(batches(), epochs=1, steps_per_epoch=spec["warmup"], verbose=0)
    sync()
    warmup_s = time.perf_counter() - start
    print(f"[{backend}] warm-up {warmup_s:.1f} s; timing {spec['steps']} steps", file=sys.stderr, flush=True)
    start = time.perf_counter()
    history = model.fit(batches(), epochs=1, steps_per_epoch=spec["steps"], verbose=0)
    sync()
    step_s = (time.perf_counter() - start) / spec["steps"]
    arch = ARCHITECTURES[preset]["config"]
    flops, student, teacher = train_step_flops(arch, config, batch_size, int(batch["n_masked_patches"]))
    peak = spec["peak_tflops"] or peak_tflops(kind)
    result = {
        "backend": backend, "model": model_name, "device": kind, "dtype": spec["dtype"],
        "batch_size": batch_size, "warmup_steps": spec["warmup"], "warmup_s": warmup_s,
        "timed_steps": spec["steps"], "step_s": step_s, "images_per_s": batch_size / step_s,
        "flops_per_step": flops, "tflops_per_s": flops / step_s / 1e12, "peak_tflops": peak,
        "mfu": None if peak is None else flops / step_s / (peak * 1e12),
        "loss": float(np.asarray(history.history["loss"][-1])) if "loss" in history.history else None,
        "tensorflow_stand_in": stubbed,
    }
    if backend == "jax":
        result["peak_memory_bytes"] = (device.memory_stats() or {}).get("peak_bytes_in_use")
        result.update(_attention_jax(spec["dump"]))
    elif backend == "torch":
        import torch

        if torch.cuda.is_available():
            result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
            result.update(_profile_torch(
                lambda: model.fit(batches(), epochs=1, steps_per_epoch=1, verbose=0)))
    return result


# ----------------------------------------------------------------------------------------------- parent


def run_backend(args, backend, workdir):
    spec = {"backend": backend, "batch": os.path.abspath(args.batch), "dtype": args.dtype,
            "tile": args.tile, "warmup": args.warmup, "steps": args.steps, "peak_tflops": args.peak_tflops,
            "dump": os.path.join(workdir, f"hlo_{backend}")}
    spec_path = os.path.join(workdir, f"{backend}.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    if backend == "jax":
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_dump_to={spec['dump']}"
                            " --xla_dump_hlo_as_text").strip()
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", spec_path], env=env,
                              capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired as timeout:
        tail = (timeout.stderr or b"")[-1500:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return None, f"{backend}: over {args.timeout:.0f} s; its last words:\n{tail}"
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:]), None
    return None, f"{backend}: exit {proc.returncode}\n" + proc.stderr[-3000:]


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        with open(args.worker) as f:
            spec = json.load(f)
        print("RESULT " + json.dumps(worker(spec)), flush=True)
        return 0
    if args.write_batch:
        write_batch(args.write_batch, args.model, args.batch_size)
        return 0
    if not args.batch:
        raise SystemExit("error: pass --batch NPZ (written by --write-batch) or --write-batch NPZ.")
    results, failures = [], []
    with tempfile.TemporaryDirectory(prefix="dinov2_gpu_bench_") as workdir:
        for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
            result, failure = run_backend(args, backend, workdir)
            if result is not None:
                results.append(result)
                print(json.dumps(result), flush=True)
            else:
                failures.append(failure)
                print("FAILED " + failure, flush=True)
            if args.json:  # after every backend: a later one that runs out of time loses nothing before it
                with open(args.json, "w") as f:
                    json.dump({"results": results, "failures": failures}, f, indent=1)
    header = (f"{'backend':<8} {'model':<6} {'batch':>5} {'s/step':>7} {'img/s':>8} {'TFLOP/s':>8} {'MFU':>6} "
              f"{'peak GB':>8}")
    print(header)
    for r in results:
        mem = r.get("peak_memory_bytes")
        print(f"{r['backend']:<8} {r['model']:<6} {r['batch_size']:>5} {r['step_s']:>7.3f} {r['images_per_s']:>8.1f} "
              f"{r['tflops_per_s']:>8.1f} {(r['mfu'] or 0):>6.1%} {(mem or 0) / 1e9:>8.2f}")
    jax_r = next((r for r in results if r["backend"] == "jax"), None)
    for r in results:
        if jax_r and r is not jax_r:
            print(f"{r['backend']} / jax images/s: {r['images_per_s'] / jax_r['images_per_s']:.2f}x")
    for r in results:
        if "gpu_kernel_s" in r:
            print(f"{r['backend']}: one profiled step {r['profiled_step_s']:.3f} s, "
                  f"GPU kernels {r['gpu_kernel_s']:.3f} s, "
                  f"{r['host_op_calls']} operator calls; "
                  "most host time: " + ", ".join(f"{o['op']} {o['self_cpu_ms']} ms" for o in r["top_host_ops"][:6]))
    return 0 if results and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
