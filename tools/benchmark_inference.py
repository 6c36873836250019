"""Inference benchmark: DINOv2Backbone on each Keras backend against its peers.

Times the forward pass of one DINOv2 Vision Transformer (ViT-S/14, batch 8, 224 x 224,
float32 by default) for

1. `keras_dinov2.DINOv2Backbone` on each Keras backend (JAX, TensorFlow, PyTorch),
2. Hugging Face transformers' `Dinov2Model` (PyTorch eager under `torch.inference_mode()`;
   the baseline every ratio is taken against) and, optionally, the same under `torch.compile`,
3. keras-hub's `DINOV2Backbone` on each Keras backend,

all holding the same weights: a randomly initialized `Dinov2Model` is written once with
`save_pretrained` into a temporary folder, and every model is loaded from that folder. Each
model runs in its own fresh subprocess (KERAS_BACKEND must be set before Keras is imported,
and the peak resident memory of one model must not mix with another's).

Run from the repository root:

    python tools/benchmark_inference.py                          # ViT-S/14, batch 8, CPU or GPU
    python tools/benchmark_inference.py --repeats 5 --backends jax --peers transformers
    python tools/benchmark_inference.py --batch-size 64 --dtype mixed_bfloat16 --json out.json

Run `python tools/benchmark_inference.py --help` for what is timed and how.
"""

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
from benchmark_common import (  # noqa: E402  (tools/ is on sys.path when run)
    Skip,
    fmt,
    installed,
    load_average,
    machine_info,
    peak_rss_mb,
    run_in_subprocess,
    worker_body,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (hidden_size, num_hidden_layers, num_attention_heads, use_swiglu_ffn)
MODELS = {
    "tiny": (192, 12, 3, False),
    "small": (384, 12, 6, False),
    "base": (768, 12, 12, False),
    "large": (1024, 24, 16, False),
    "giant": (1536, 40, 24, True),
}
BACKENDS = ("jax", "tensorflow", "torch")
PEERS = ("transformers", "keras_hub", "transformers_compile")
DTYPES = ("float32", "mixed_bfloat16", "mixed_float16")
PATCH_SIZE = 14
SEED = 0

DESCRIPTION = (
    __doc__.split("\n\n")[0]
    + """

All models get the same weights (a random Hugging Face Dinov2Model written once with
save_pretrained; its image_size is --image-size, so no model resamples its position
embeddings) and the same batch of standard-normal images. Each model runs in a fresh
subprocess: it is loaded, compiled the way a user gets the fastest inference on that
backend, warmed up (--warmup calls, which include compilation), then timed over --repeats
calls, each ended by a device synchronization. The table reports the median seconds per
batch, images per second, the median CPU seconds per batch (all threads of the subprocess:
on a quiet machine about the wall time times the threads in use; when it is close to the
wall time on a multi-core CPU, the run did not get the cores it asked for), the peak
resident memory of that subprocess (ru_maxrss, read right after the timed calls), the time
of the first call (tracing and compilation included), and the largest absolute difference
between the model's output (the tokens after the final LayerNorm, CLS first) and
transformers' float32 `last_hidden_state` on the timed batch. The 1-minute load average
before and after the run is printed with the machine: above half the core count, CPU
timings are not trustworthy (thread pools that wait on each other, like PyTorch's OpenMP
pool, suffer most from a busy machine, so even the ratios shift).

How each model is run:
  jax         jax.jit of model.stateless_call(trainable, non_trainable, inputs)
              (weights are arguments, not constants), synchronized by block_until_ready.
  tensorflow  tf.function(model call, jit_compile=True) (XLA), or without XLA when
              --tf-no-xla; synchronized by tf.test.experimental.sync_devices() (on GPU).
  torch       model call under torch.inference_mode(), eager; with --torch-compile the
              same call through torch.compile (reported as "compile"; slow to compile, and
              on an H100 it was slower than eager for the Keras models). torch.cuda.synchronize
              on GPU.
  transformers  Dinov2Model(pixel_values=NCHW batch).last_hidden_state under
              torch.inference_mode(), eager, with transformers' default attention
              implementation (sdpa). The peer "transformers_compile" adds torch.compile.
Our backbone and keras-hub's always use the same method on the same backend.

Ratios: "vs HF" is the throughput of the row over transformers eager's (above 1 = faster);
"vs keras-hub" is ours over keras-hub's on the same backend and method.

Precision (--dtype): the Keras models are built with that dtype policy (weights float32,
compute in bfloat16 / float16 for the mixed policies; the images stay float32); transformers
runs under torch.autocast(device, bfloat16 / float16). The reference output the differences
are measured against is always transformers in float32 on the CPU, so under mixed precision
the column shows the mixed-precision error. On NVIDIA GPUs, "float32" is not the same for
everyone: XLA (JAX, TensorFlow) runs float32 matrix products in TF32 by default, PyTorch
does not (torch.backends.cuda.matmul.allow_tf32 is False), which shows in max|diff|.

Device (--device): "auto" uses a GPU where a backend sees one (JAX: jax.devices('gpu'),
TensorFlow: tf.config.list_physical_devices('GPU'), PyTorch: torch.cuda.is_available()), else
the CPU; "cpu" hides GPUs from every subprocess (CUDA_VISIBLE_DEVICES='', JAX_PLATFORMS=cpu);
"gpu" skips a model whose backend sees no GPU. On GPU the table adds the peak device memory
(JAX memory_stats peak_bytes_in_use, TensorFlow get_memory_info peak, PyTorch
max_memory_allocated). TensorFlow is given memory growth so its peak is meaningful; JAX keeps
its default preallocation.

A backend or peer that is not installed, or a subprocess that fails, is skipped with a
message; the rest still runs. CPU timings depend on the load of the machine: run it on a
quiet one, and compare only rows from the same run.
"""
)


# ----------------------------------------------------------------------------- parent side


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default="small",
        choices=sorted(MODELS),
        help="Architecture, patch 14: tiny (192 wide, 12 layers, 3 heads), "
        "small = ViT-S/14 (384, 12, 6), base (768, 12, 12), large (1024, 24, "
        "16), giant (1536, 40, 24, SwiGLU). Default: small.",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="Images per batch. Default: 8.")
    parser.add_argument(
        "--image-size",
        type=int,
        default=224,
        help="Square image side in pixels, a multiple of 14; also the "
        "checkpoint's image_size, so no position interpolation runs. "
        "Default: 224.",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPES,
        help="float32, or a mixed policy for the Keras models with the "
        "matching torch.autocast for transformers. Default: float32.",
    )
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help="Comma-separated Keras backends for our backbone and keras-hub's, "
        "from jax,tensorflow,torch. Default: all three.",
    )
    parser.add_argument(
        "--peers",
        default="transformers,keras_hub",
        help="Comma-separated peers: transformers (eager: the baseline of the "
        "ratios), keras_hub (on each of --backends), transformers_compile "
        "(torch.compile; slow to compile). Default: transformers,keras_hub. "
        "Pass 'none' for our backbone alone.",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=10,
        help="Timed calls per model; the median is reported. Default: 10.",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="Untimed calls before timing (the first compiles). Default: 3.",
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "gpu"),
        help="auto: a GPU where the backend sees one; cpu: hide GPUs; gpu: "
        "skip models that see none. Default: auto.",
    )
    parser.add_argument(
        "--torch-compile",
        action="store_true",
        help="Run the Keras models on the torch backend through torch.compile instead of eagerly.",
    )
    parser.add_argument(
        "--tf-no-xla",
        action="store_true",
        help="TensorFlow backend: tf.function without jit_compile.",
    )
    parser.add_argument(
        "--json", metavar="OUT", help="Also write the settings, machine and rows as JSON to OUT."
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800,
        help="Seconds before a model's subprocess is killed. Default: 1800.",
    )
    parser.add_argument(
        "--keep",
        metavar="DIR",
        help="Write the checkpoint, images and reference into DIR and keep "
        "them (default: a temporary folder, deleted at the end).",
    )
    parser.add_argument("--verbose", action="store_true", help="Show the subprocesses' own output.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    if args.image_size % PATCH_SIZE or args.image_size < PATCH_SIZE:
        parser.error(
            f"--image-size must be a positive multiple of {PATCH_SIZE}, received {args.image_size}."
        )
    for name in ("batch_size", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1.")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0.")
    args.backends = _split(args.backends, BACKENDS, "--backends", parser)
    args.peers = (
        [] if args.peers.strip() == "none" else _split(args.peers, PEERS, "--peers", parser)
    )
    return args


def _split(text, allowed, flag, parser):
    items = [item.strip().replace("-", "_") for item in text.split(",") if item.strip()]
    allowed = [a.replace("-", "_") for a in allowed]
    for item in items:
        if item not in allowed:
            parser.error(
                f"{flag}: unknown {item!r}, expected a comma-separated subset of "
                f"{','.join(allowed)}."
            )
    return items


def hf_config(model, image_size):
    hidden, layers, heads, swiglu = MODELS[model]
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "mlp_ratio": 4,
        "patch_size": PATCH_SIZE,
        "image_size": image_size,
        "num_channels": 3,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "layerscale_value": 1.0,
        "qkv_bias": True,
        "use_swiglu_ffn": swiglu,
        "use_mask_token": True,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": 0.0,
        "initializer_range": 0.02,
        "apply_layernorm": True,
    }


def random_parameter(name, shape, rng):
    """Values of a trained-looking scale, so that every parameter changes the output."""
    if name.endswith("lambda1"):  # LayerScale gammas
        return rng.uniform(0.05, 0.5, shape)
    if "norm" in name and name.endswith("weight"):  # LayerNorm scales
        return 1.0 + 0.1 * rng.standard_normal(shape)
    if name.endswith("bias"):
        return 0.02 * rng.standard_normal(shape)
    if "patch_embeddings" in name:  # fan_in = 3 * 14 * 14
        bound = 1.0 / np.sqrt(np.prod(shape[1:]))
        return rng.uniform(-bound, bound, shape)
    return np.clip(0.02 * rng.standard_normal(shape), -0.04, 0.04)


def legacy_state_shapes(config):
    """Parameter names and shapes as `Dinov2Model.save_pretrained` writes them (MLP only)."""
    d, n = config["hidden_size"], config["num_hidden_layers"]
    p, grid = config["patch_size"], config["image_size"] // config["patch_size"]
    hidden = int(d * config["mlp_ratio"])
    shapes = {
        "embeddings.cls_token": (1, 1, d),
        "embeddings.mask_token": (1, d),
        "embeddings.position_embeddings": (1, grid * grid + 1, d),
        "embeddings.patch_embeddings.projection.weight": (d, 3, p, p),
        "embeddings.patch_embeddings.projection.bias": (d,),
        "layernorm.weight": (d,),
        "layernorm.bias": (d,),
    }
    for i in range(n):
        prefix = f"encoder.layer.{i}."
        for norm in ("norm1", "norm2"):
            shapes[prefix + norm + ".weight"] = (d,)
            shapes[prefix + norm + ".bias"] = (d,)
        for proj in ("query", "key", "value"):
            shapes[prefix + f"attention.attention.{proj}.weight"] = (d, d)
            shapes[prefix + f"attention.attention.{proj}.bias"] = (d,)
        shapes[prefix + "attention.output.dense.weight"] = (d, d)
        shapes[prefix + "attention.output.dense.bias"] = (d,)
        shapes[prefix + "layer_scale1.lambda1"] = (d,)
        shapes[prefix + "layer_scale2.lambda1"] = (d,)
        shapes[prefix + "mlp.fc1.weight"] = (hidden, d)
        shapes[prefix + "mlp.fc1.bias"] = (hidden,)
        shapes[prefix + "mlp.fc2.weight"] = (d, hidden)
        shapes[prefix + "mlp.fc2.bias"] = (d,)
    return shapes


def write_checkpoint(folder, config, images):
    """Writes the random checkpoint; returns transformers' float32 output on `images`, or None.

    With transformers installed: a `Dinov2Model` with re-randomized parameters, written by
    `save_pretrained`, and its `last_hidden_state` on the images (the reference of the
    difference column). Without it: the same file layout written with safetensors, and no
    reference.
    """
    rng = np.random.default_rng(SEED)
    if installed("transformers") and installed("torch"):
        import torch
        from transformers import Dinov2Config, Dinov2Model

        model = Dinov2Model(Dinov2Config(**config)).eval()
        with torch.no_grad():
            for name, parameter in sorted(model.state_dict().items()):
                value = random_parameter(name, tuple(parameter.shape), rng)
                parameter.copy_(torch.from_numpy(np.asarray(value, np.float32)))
        model.save_pretrained(folder)
        with torch.inference_mode():
            pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
            return model(pixel_values=pixels).last_hidden_state.numpy()
    if config["use_swiglu_ffn"]:
        raise RuntimeError("Writing a SwiGLU checkpoint needs transformers installed.")
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    tensors = {
        name: np.asarray(random_parameter(name, shape, rng), np.float32)
        for name, shape in sorted(legacy_state_shapes(config).items())
    }
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**config, "model_type": "dinov2", "architectures": ["Dinov2Model"]}, f, indent=2)
    return None


def plan(args):
    """The list of (label, spec) to run, and the messages of what is skipped."""
    runs, skipped = [], []
    have_keras = installed("keras")
    have_hub = installed("keras_hub")
    have_hf = installed("transformers") and installed("torch")
    if "transformers" in args.peers:
        if have_hf:
            runs.append({"kind": "transformers", "backend": "torch", "compile": False})
        else:
            skipped.append("transformers: torch or transformers is not installed.")
    if "transformers_compile" in args.peers:
        if have_hf:
            runs.append({"kind": "transformers", "backend": "torch", "compile": True})
        else:
            skipped.append("transformers_compile: torch or transformers is not installed.")
    for backend in args.backends:
        if not have_keras:
            skipped.append(f"{backend}: keras is not installed.")
            continue
        module = {"jax": "jax", "tensorflow": "tensorflow", "torch": "torch"}[backend]
        if not installed(module):
            skipped.append(f"{backend}: the {module} package is not installed.")
            continue
        runs.append({"kind": "ours", "backend": backend})
        if "keras_hub" in args.peers:
            if have_hub:
                runs.append({"kind": "keras_hub", "backend": backend})
            else:
                skipped.append(f"keras-hub on {backend}: keras_hub is not installed.")
    for run in runs:
        if run["kind"] != "transformers":
            run["compile"] = (
                not args.tf_no_xla
                if run["backend"] == "tensorflow"
                else args.torch_compile
                if run["backend"] == "torch"
                else True
            )
    return runs, skipped


def run_worker(spec, args, workdir, index):
    """Runs one model in a fresh subprocess; returns its result dict or a reason to skip."""
    env = dict(os.environ)
    env["KERAS_BACKEND"] = spec["backend"]
    env["PYTHONPATH"] = os.pathsep.join(
        [REPO_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["JAX_PLATFORMS"] = "cpu"
    return run_in_subprocess(__file__, spec, workdir, index, env, args.timeout, args.verbose)


def row_label(result):
    name = {"ours": "keras_dinov2", "keras_hub": "keras-hub", "transformers": "transformers"}
    return name[result["kind"]]


def print_report(args, info, results, skipped):
    width = 100
    print("\n" + "=" * width)
    print(
        f"DINOv2 inference: ViT-{args.model}/14 ({MODELS[args.model][0]} wide, "
        f"{MODELS[args.model][1]} layers, {MODELS[args.model][2]} heads), batch "
        f"{args.batch_size}, {args.image_size} x {args.image_size}, {args.dtype}, "
        f"median of {args.repeats} after {args.warmup} warm-up calls"
    )
    usable = f", {info['cpus_usable']} usable" if info["cpus_usable"] else ""
    print(
        f"CPU: {info['cpu']} ({info['cpu_count']} logical cores{usable}), "
        f"{fmt(info['memory_gb'], '{} GB')} RAM"
    )
    if info["gpus"]:
        print("GPU: " + "; ".join(info["gpus"]))
    print(
        "Python "
        + info["python"]
        + ", "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    )
    if info.get("load_before") is not None and info.get("load_after") is not None:
        print(
            f"Load average (1 min) before: {info['load_before']:.2f}, after: "
            f"{info['load_after']:.2f} on {info['cpu_count']} cores"
            + (
                "  <-- busy machine: CPU timings are not reliable"
                if max(info["load_before"], info["load_after"]) > 0.5 * info["cpu_count"]
                else ""
            )
        )
    if info["env"]:
        print("Environment: " + ", ".join(f"{k}={v}" for k, v in info["env"].items()))
    baseline = next((r for r in results if r["kind"] == "transformers" and not r["compile"]), None)
    hub = {(r["backend"], r["method"]): r for r in results if r["kind"] == "keras_hub"}
    on_gpu = any(r.get("gpu_peak_mb") is not None for r in results)
    header = [
        "model",
        "backend",
        "method",
        "device",
        "s/batch",
        "img/s",
        "vs HF",
        "vs k-hub",
        "CPU s/batch",
        "peak RSS MB",
    ]
    header += ["GPU peak MB"] if on_gpu else []
    header += ["1st call s", "max|diff|"]
    rows = []
    for r in results:
        vs_hf = baseline["median_s"] / r["median_s"] if baseline else None
        peer = hub.get((r["backend"], r["method"])) if r["kind"] == "ours" else None
        vs_hub = peer["median_s"] / r["median_s"] if peer else None
        row = [
            row_label(r),
            r["backend"],
            r["method"],
            r["device"],
            f"{r['median_s']:.4f}",
            f"{r['images_per_s']:.1f}",
            fmt(vs_hf, "{:.2f}x"),
            fmt(vs_hub, "{:.2f}x"),
            f"{r['median_cpu_s']:.3f}",
            f"{r['peak_rss_mb']:.0f}",
        ]
        row += [fmt(r.get("gpu_peak_mb"), "{:.0f}")] if on_gpu else []
        row += [f"{r['first_call_s']:.2f}", fmt(r.get("max_abs_diff"), "{:.1e}")]
        rows.append(row)
        r["vs_transformers"] = vs_hf
        r["vs_keras_hub"] = vs_hub
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    print("-" * width)
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))
    print("-" * width)
    print(
        "vs HF: throughput over transformers eager (>1 = faster). vs k-hub: ours over "
        "keras-hub, same backend and method.\nmax|diff|: against transformers float32 "
        "last_hidden_state on the same batch. Notes per row:"
    )
    for r in results:
        print(f"  {row_label(r)} / {r['backend']} / {r['method']}: {r['notes']}")
    for message in skipped:
        print(f"  skipped: {message}")
    print("=" * width)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)
    info = machine_info()
    info["load_before"] = load_average()
    runs, skipped = plan(args)
    workdir = args.keep or tempfile.mkdtemp(prefix="dinov2_bench_")
    os.makedirs(workdir, exist_ok=True)
    try:
        folder = os.path.join(workdir, "checkpoint")
        images = (
            np.random.default_rng(SEED + 1)
            .standard_normal((args.batch_size, args.image_size, args.image_size, 3))
            .astype("float32")
        )
        images_path = os.path.join(workdir, "images.npy")
        np.save(images_path, images)
        print(
            f"Writing a random ViT-{args.model}/14 transformers checkpoint to {folder} ...",
            flush=True,
        )
        reference = write_checkpoint(folder, hf_config(args.model, args.image_size), images)
        reference_path = None
        if reference is None:
            skipped.append("output check: transformers is not installed, no reference.")
        else:
            reference_path = os.path.join(workdir, "reference.npy")
            np.save(reference_path, reference)
        results = []
        for index, run in enumerate(runs):
            spec = {
                **run,
                "folder": folder,
                "images": images_path,
                "reference": reference_path,
                "dtype": args.dtype,
                "warmup": args.warmup,
                "repeats": args.repeats,
                "device": args.device,
                "image_size": args.image_size,
            }
            label = f"{run['kind']} on {run['backend']}" + (
                " (torch.compile)" if run["kind"] == "transformers" and run["compile"] else ""
            )
            print(f"[{index + 1}/{len(runs)}] {label} ...", flush=True)
            result, reason = run_worker(spec, args, workdir, index)
            if result is None:
                print(f"    skipped: {reason}", flush=True)
                skipped.append(f"{label}: {reason}")
                continue
            print(
                f"    {result['median_s']:.4f} s/batch, {result['images_per_s']:.1f} img/s, "
                f"peak RSS {result['peak_rss_mb']:.0f} MB, max|diff| "
                f"{fmt(result.get('max_abs_diff'), '{:.1e}')}",
                flush=True,
            )
            results.append(result)
        info["load_after"] = load_average()
        print_report(args, info, results, skipped)
        if args.json:
            with open(args.json, "w") as f:
                settings = {k: v for k, v in vars(args).items() if k != "worker"}
                json.dump(
                    {"settings": settings, "machine": info, "results": results, "skipped": skipped},
                    f,
                    indent=2,
                )
            print(f"Wrote {args.json}")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


# ----------------------------------------------------------------------------- worker side


def worker(spec_path):
    """Loads, compiles, warms up and times one model; writes the result JSON."""
    return worker_body(spec_path, _measure)


def _time_calls(call, sync, warmup, repeats):
    """Wall seconds of each timed call, the first call's seconds, the last output, CPU seconds.

    The CPU seconds (all threads of this process, `time.process_time`) tell contention apart
    from slowness: on a quiet machine they are about the wall time times the threads used.
    """
    first = None
    output = None
    for i in range(warmup):
        start = time.perf_counter()
        output = sync(call())
        if i == 0:
            first = time.perf_counter() - start
    times, cpu_times = [], []
    for _ in range(repeats):
        cpu_start = time.process_time()
        start = time.perf_counter()
        output = sync(call())
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    if first is None:
        first = times[0]
    return times, first, output, cpu_times


def _measure(spec):
    images = np.load(spec["images"])
    if spec["kind"] == "transformers":
        setup = _setup_transformers(spec, images)
    else:
        setup = _setup_keras(spec, images)
    call, sync, to_numpy, device, method, notes, gpu_peak = setup
    times, first, output, cpu_times = _time_calls(call, sync, spec["warmup"], spec["repeats"])
    peak_rss = peak_rss_mb()
    gpu_peak_mb = gpu_peak()
    result = {
        "kind": spec["kind"],
        "backend": spec["backend"],
        "compile": spec["compile"],
        "method": method,
        "device": device,
        "dtype": spec["dtype"],
        "batch_size": int(images.shape[0]),
        "image_size": int(images.shape[1]),
        "times_s": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "cpu_times_s": cpu_times,
        "median_cpu_s": statistics.median(cpu_times),
        "images_per_s": images.shape[0] / statistics.median(times),
        "first_call_s": first,
        "peak_rss_mb": peak_rss,
        "gpu_peak_mb": gpu_peak_mb,
        "notes": notes,
        "max_abs_diff": None,
    }
    if spec["reference"]:
        reference = np.load(spec["reference"])
        tokens = to_numpy(output).astype("float32")
        result["max_abs_diff"] = float(np.max(np.abs(tokens - reference)))
        result["reference_max_abs"] = float(np.max(np.abs(reference)))
    return result


def _torch_device(spec):
    import torch

    if spec["device"] != "cpu" and torch.cuda.is_available():
        return "cuda"
    if spec["device"] == "gpu":
        raise Skip("PyTorch sees no GPU (torch.cuda.is_available() is False).")
    return "cpu"


def _setup_transformers(spec, images):
    import torch
    import transformers
    from transformers import Dinov2Model

    device = _torch_device(spec)
    model, info = Dinov2Model.from_pretrained(spec["folder"], output_loading_info=True)
    missing = [k for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)]
    if missing:
        raise Skip(f"the checkpoint did not load cleanly: { {k: info[k] for k in missing} }")
    model = model.eval().to(device)
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)
    autocast = {"mixed_bfloat16": torch.bfloat16, "mixed_float16": torch.float16}.get(spec["dtype"])
    forward = torch.compile(model) if spec["compile"] else model

    def call():
        with torch.inference_mode():
            context = (
                torch.autocast(device, dtype=autocast) if autocast else contextlib.nullcontext()
            )
            with context:
                return forward(pixel_values=pixels).last_hidden_state

    sync, gpu_peak = _torch_sync_and_peak(device)
    notes = (
        f"transformers {transformers.__version__}, attention "
        f"{model.config._attn_implementation}, {torch.get_num_threads()} torch threads"
        + (f", autocast {autocast}" if autocast else "")
    )
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    method = "compile" if spec["compile"] else "eager"
    return (call, sync, lambda out: out.float().cpu().numpy(), device_name, method, notes, gpu_peak)


def _torch_sync_and_peak(device):
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

        def sync(output):
            torch.cuda.synchronize()
            return output

        return sync, lambda: torch.cuda.max_memory_allocated() / 2**20
    return (lambda output: output), (lambda: None)


def _setup_keras(spec, images):
    backend = spec["backend"]
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if spec["device"] == "gpu" and not gpus:
            raise Skip("TensorFlow sees no GPU.")
        for gpu in gpus:
            with contextlib.suppress(RuntimeError):
                tf.config.experimental.set_memory_growth(gpu, True)
    if backend == "jax":
        import jax

        if spec["device"] == "gpu" and not _jax_gpus():
            raise Skip("JAX sees no GPU (jax.devices('gpu') is empty).")
        del jax
    import keras

    if keras.backend.backend() != backend:
        raise Skip(f"Keras started with backend {keras.backend.backend()!r}, not {backend!r}.")
    keras.config.set_dtype_policy(spec["dtype"])
    size = spec["image_size"]
    if spec["kind"] == "ours":
        from keras_dinov2.interop import load_transformers_checkpoint

        model = load_transformers_checkpoint(spec["folder"], dtype=spec["dtype"])

        def select(out):
            return out["cls_token"], out["patch_tokens"]

        def tokens(out):
            cls, patches = (np.asarray(keras.ops.convert_to_numpy(t)) for t in out)
            return np.concatenate([cls[:, None], patches], axis=1)
    else:
        import keras_hub

        model = keras_hub.models.Backbone.from_preset(
            spec["folder"], image_shape=(size, size, 3), dtype=spec["dtype"]
        )
        if type(model).__name__ != "DINOV2Backbone":
            raise Skip(f"keras-hub loaded a {type(model).__name__}, not a DINOV2Backbone.")

        def select(out):
            return out

        def tokens(out):
            return np.asarray(keras.ops.convert_to_numpy(out))

    notes = f"keras {keras.__version__}, dtype policy {model.dtype_policy.name}"
    builder = {"jax": _jax_runner, "tensorflow": _tf_runner, "torch": _torch_runner}[backend]
    call, sync, device, method, more, gpu_peak = builder(model, select, images, spec)
    return call, sync, tokens, device, method, notes + more, gpu_peak


def _jax_gpus():
    import jax

    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


def _jax_runner(model, select, images, spec):
    import jax

    device = jax.devices()[0]
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    @jax.jit
    def infer(trainable, non_trainable, images):
        out, _ = model.stateless_call(trainable, non_trainable, {"images": images}, training=False)
        return select(out)

    x = jax.device_put(images, device)

    def call():
        return infer(trainable, non_trainable, x)

    def peak():
        stats = device.memory_stats() if device.platform == "gpu" else None
        return stats["peak_bytes_in_use"] / 2**20 if stats else None

    notes = f", jax {jax.__version__}, jax.jit(stateless_call)"
    if os.environ.get("XLA_FLAGS"):
        notes += f", XLA_FLAGS={os.environ['XLA_FLAGS']}"
    name = f"{device.platform}:{getattr(device, 'device_kind', '')}".rstrip(":")
    return (
        call,
        jax.block_until_ready,
        name if device.platform != "cpu" else "cpu",
        "jit",
        notes,
        peak,
    )


def _tf_runner(model, select, images, spec):
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    xla = spec["compile"]

    @tf.function(jit_compile=xla)
    def infer(images):
        return select(model({"images": images}, training=False))

    x = tf.constant(images)
    if gpus:
        with tf.device("/GPU:0"):
            x = tf.identity(x)

    def call():
        return infer(x)

    def sync(output):
        if gpus:
            tf.test.experimental.sync_devices()
        return output

    def peak():
        return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20 if gpus else None

    name = "cpu"
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        name = details.get("device_name", "gpu")
    notes = (
        f", tensorflow {tf.__version__}, tf.function(jit_compile={xla}), "
        f"{tf.config.threading.get_intra_op_parallelism_threads() or 'default'} "
        "intra-op threads"
    )
    return call, sync, name, "xla" if xla else "graph", notes, peak


def _torch_runner(model, select, images, spec):
    import torch

    device = _torch_device(spec)
    x = torch.from_numpy(images).to(device)

    def forward(x):
        return select(model({"images": x}, training=False))

    if spec["compile"]:
        forward = torch.compile(forward)

    def call():
        with torch.inference_mode():
            return forward(x)

    sync, peak = _torch_sync_and_peak(device)
    notes = (
        f", torch {torch.__version__}, {'torch.compile' if spec['compile'] else 'eager'} "
        f"under inference_mode, {torch.get_num_threads()} torch threads"
    )
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return call, sync, name, "compile" if spec["compile"] else "eager", notes, peak


if __name__ == "__main__":
    sys.exit(main())
