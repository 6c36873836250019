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

import contextlib
import json
import os
import sys

import numpy as np
from bench import cli
from bench.devices import backend_gpu, device_sync, gpu_peak_mb, import_keras, torch_autocast
from bench.machine import installed, installed_backends, load_average, peak_rss_mb
from bench.report import fmt, print_footer, print_header, print_table, write_json
from bench.timing import summary, time_calls, warm_up
from bench.workers import Skip, run_all, run_benchmark, run_in_subprocess, work_folder, worker_env

# name: (hidden_size, num_hidden_layers, num_attention_heads, use_swiglu_ffn)
MODELS = {
    "tiny": (192, 12, 3, False),
    "small": (384, 12, 6, False),
    "base": (768, 12, 12, False),
    "large": (1024, 24, 16, False),
    "giant": (1536, 40, 24, True),
}
MODEL_HELP = (
    "Architecture, patch 14: tiny (192 wide, 12 layers, 3 heads), "
    "small = ViT-S/14 (384, 12, 6), base (768, 12, 12), large (1024, 24, "
    "16), giant (1536, 40, 24, SwiGLU). Default: small."
)
PEERS = ("transformers", "keras_hub", "transformers_compile")
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
              same call through torch.compile (reported as "compile"; slow to compile;
              docs/performance.md has how it compared with eager). torch.cuda.synchronize
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
    parser = cli.parser(DESCRIPTION)
    cli.add_model(parser, MODELS, MODEL_HELP)
    parser.add_argument("--batch-size", type=int, default=8, help="Images per batch. Default: 8.")
    parser.add_argument(
        "--image-size",
        type=int,
        default=224,
        help="Square image side in pixels, a multiple of 14; also the "
        "checkpoint's image_size, so no position interpolation runs. "
        "Default: 224.",
    )
    cli.add_dtype(
        parser,
        "float32, or a mixed policy for the Keras models with the matching torch.autocast for "
        "transformers. Default: float32.",
    )
    cli.add_backends(
        parser,
        "Comma-separated Keras backends for our backbone and keras-hub's, from "
        "jax,tensorflow,torch. Default: all three.",
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
    cli.add_warmup(parser, 3, "calls")
    cli.add_device(parser, "the backend", "models")
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
    cli.add_subprocess_flags(parser, "a model's subprocess", "the checkpoint, images and reference")
    args = parser.parse_args(argv)
    if args.worker:
        return args
    if args.image_size % PATCH_SIZE or args.image_size < PATCH_SIZE:
        parser.error(
            f"--image-size must be a positive multiple of {PATCH_SIZE}, received {args.image_size}."
        )
    cli.check_counts(parser, args, at_least_one=("batch_size", "repeats"))
    args.backends = cli.choose(parser, args.backends, cli.BACKENDS, "--backends")
    args.peers = cli.choose(parser, args.peers, PEERS, "--peers", none=True)
    return args


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
    """The list of run specs, and the messages of what is skipped."""
    runs, skipped = [], []
    have_hf = installed("transformers") and installed("torch")
    for peer, compiled in (("transformers", False), ("transformers_compile", True)):
        if peer not in args.peers:
            continue
        if have_hf:
            runs.append({"kind": "transformers", "backend": "torch", "compile": compiled})
        else:
            skipped.append(f"{peer}: torch or transformers is not installed.")
    have_hub = installed("keras_hub")
    for backend in installed_backends(args.backends, skipped):
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


def row_label(result):
    name = {"ours": "keras_dinov2", "keras_hub": "keras-hub", "transformers": "transformers"}
    return name[result["kind"]]


def run_label(run):
    compiled = run["kind"] == "transformers" and run["compile"]
    return f"{run['kind']} on {run['backend']}" + (" (torch.compile)" if compiled else "")


def describe(result):
    return (
        f"{result['median_s']:.4f} s/batch, {result['images_per_s']:.1f} img/s, "
        f"peak RSS {result['peak_rss_mb']:.0f} MB, max|diff| "
        f"{fmt(result.get('max_abs_diff'), '{:.1e}')}"
    )


def print_report(args, info, results, skipped):
    width = 100
    hidden, layers, heads, _ = MODELS[args.model]
    print_header(
        width,
        f"DINOv2 inference: ViT-{args.model}/14 ({hidden} wide, {layers} layers, {heads} heads), "
        f"batch {args.batch_size}, {args.image_size} x {args.image_size}, {args.dtype}, "
        f"median of {args.repeats} after {args.warmup} warm-up calls",
        info,
    )
    baseline = next((r for r in results if r["kind"] == "transformers" and not r["compile"]), None)
    hub = {(r["backend"], r["method"]): r for r in results if r["kind"] == "keras_hub"}
    on_gpu = any(r.get("gpu_peak_mb") is not None for r in results)
    header = ["model", "backend", "method", "device", "s/batch", "img/s", "vs HF", "vs k-hub"]
    header += ["CPU s/batch", "peak RSS MB"] + (["GPU peak MB"] if on_gpu else [])
    header += ["1st call s", "max|diff|"]
    rows = []
    for r in results:
        vs_hf = baseline["median_s"] / r["median_s"] if baseline else None
        peer = hub.get((r["backend"], r["method"])) if r["kind"] == "ours" else None
        vs_hub = peer["median_s"] / r["median_s"] if peer else None
        row = [row_label(r), r["backend"], r["method"], r["device"], f"{r['median_s']:.4f}"]
        row += [f"{r['images_per_s']:.1f}", fmt(vs_hf, "{:.2f}x"), fmt(vs_hub, "{:.2f}x")]
        row += [f"{r['median_cpu_s']:.3f}", f"{r['peak_rss_mb']:.0f}"]
        row += [fmt(r.get("gpu_peak_mb"), "{:.0f}")] if on_gpu else []
        row += [f"{r['first_call_s']:.2f}", fmt(r.get("max_abs_diff"), "{:.1e}")]
        rows.append(row)
        r["vs_transformers"] = vs_hf
        r["vs_keras_hub"] = vs_hub
    print_table(header, rows, width)
    print(
        "vs HF: throughput over transformers eager (>1 = faster). vs k-hub: ours over "
        "keras-hub, same backend and method.\nmax|diff|: against transformers float32 "
        "last_hidden_state on the same batch. Notes per row:"
    )
    for r in results:
        print(f"  {row_label(r)} / {r['backend']} / {r['method']}: {r['notes']}")
    print_footer(skipped, width)


def main(argv=None):
    return run_benchmark(argv, parse_args, measure, parent)


def parent(args, info):
    """The parent: every model in its own worker, then the report."""
    runs, skipped = plan(args)
    with work_folder(args.keep, "dinov2_bench_") as workdir:
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
        common = {
            "folder": folder,
            "images": images_path,
            "reference": reference_path,
            "dtype": args.dtype,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "device": args.device,
            "image_size": args.image_size,
        }

        def run_one(run, name):
            env = worker_env(run["backend"], args.device)
            spec = {**run, **common}
            return run_in_subprocess(__file__, spec, workdir, name, env, args.timeout, args.verbose)

        results, failed = run_all(runs, run_label, run_one, describe)
        skipped += failed
        info["load_after"] = load_average()
        print_report(args, info, results, skipped)
        if args.json:
            write_json(args.json, args, info, results, skipped)
    return 0


# ----------------------------------------------------------------------------- worker side


def measure(spec):
    """Loads, compiles, warms up and times one model (in a worker); returns its result row."""
    images = np.load(spec["images"])
    setup = _setup_transformers if spec["kind"] == "transformers" else _setup_keras
    call, sync, to_numpy, device, method, notes, gpu_peak = setup(spec, images)
    first, _ = warm_up(call, spec["warmup"], sync)
    timed = time_calls(call, spec["repeats"], sync)
    result = {
        "kind": spec["kind"],
        "backend": spec["backend"],
        "compile": spec["compile"],
        "method": method,
        "device": device,
        "dtype": spec["dtype"],
        "batch_size": int(images.shape[0]),
        "image_size": int(images.shape[1]),
        **summary(timed.times, timed.cpu_times, images.shape[0]),
        "first_call_s": timed.times[0] if first is None else first,
        "peak_rss_mb": peak_rss_mb(),
        "gpu_peak_mb": gpu_peak(),
        "notes": notes,
        "max_abs_diff": None,
    }
    if spec["reference"]:
        reference = np.load(spec["reference"])
        tokens = to_numpy(timed.output).astype("float32")
        result["max_abs_diff"] = float(np.max(np.abs(tokens - reference)))
        result["reference_max_abs"] = float(np.max(np.abs(reference)))
    return result


def _torch_monitor(gpu):
    """(sync, peak device memory) of a PyTorch run on `gpu` (or the CPU); the peak counts from now."""
    import torch

    if gpu:
        torch.cuda.reset_peak_memory_stats()
    return device_sync("torch", gpu), lambda: gpu_peak_mb("torch", gpu)


def _setup_transformers(spec, images):
    import torch
    import transformers
    from transformers import Dinov2Model

    gpu = backend_gpu("torch", spec["device"])
    device = "cuda" if gpu else "cpu"
    model, info = Dinov2Model.from_pretrained(spec["folder"], output_loading_info=True)
    missing = [k for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)]
    if missing:
        raise Skip(f"the checkpoint did not load cleanly: { {k: info[k] for k in missing} }")
    model = model.eval().to(device)
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)
    autocast = torch_autocast(spec["dtype"])
    forward = torch.compile(model) if spec["compile"] else model

    def call():
        with torch.inference_mode():
            context = (
                torch.autocast(device, dtype=autocast) if autocast else contextlib.nullcontext()
            )
            with context:
                return forward(pixel_values=pixels).last_hidden_state

    sync, gpu_peak = _torch_monitor(gpu)
    notes = (
        f"transformers {transformers.__version__}, attention "
        f"{model.config._attn_implementation}, {torch.get_num_threads()} torch threads"
        + (f", autocast {autocast}" if autocast else "")
    )
    method = "compile" if spec["compile"] else "eager"
    return (call, sync, lambda out: out.float().cpu().numpy(), gpu or "cpu", method, notes, gpu_peak)


def _setup_keras(spec, images):
    backend = spec["backend"]
    gpu = backend_gpu(backend, spec["device"])
    keras = import_keras(backend)
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
    call, sync, device, method, more, gpu_peak = builder(model, select, images, spec, gpu)
    return call, sync, tokens, device, method, notes + more, gpu_peak


def _jax_runner(model, select, images, spec, gpu):
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
        lambda: gpu_peak_mb("jax", gpu),
    )


def _tf_runner(model, select, images, spec, gpu):
    import tensorflow as tf

    xla = spec["compile"]

    @tf.function(jit_compile=xla)
    def infer(images):
        return select(model({"images": images}, training=False))

    x = tf.constant(images)
    if gpu:
        with tf.device("/GPU:0"):
            x = tf.identity(x)

    def call():
        return infer(x)

    notes = (
        f", tensorflow {tf.__version__}, tf.function(jit_compile={xla}), "
        f"{tf.config.threading.get_intra_op_parallelism_threads() or 'default'} "
        "intra-op threads"
    )
    peak = lambda: gpu_peak_mb("tensorflow", gpu)  # noqa: E731
    return call, device_sync("tensorflow", gpu), gpu or "cpu", "xla" if xla else "graph", notes, peak


def _torch_runner(model, select, images, spec, gpu):
    import torch

    x = torch.from_numpy(images).to("cuda" if gpu else "cpu")

    def forward(x):
        return select(model({"images": x}, training=False))

    if spec["compile"]:
        forward = torch.compile(forward)

    def call():
        with torch.inference_mode():
            return forward(x)

    sync, peak = _torch_monitor(gpu)
    notes = (
        f", torch {torch.__version__}, {'torch.compile' if spec['compile'] else 'eager'} "
        f"under inference_mode, {torch.get_num_threads()} torch threads"
    )
    return call, sync, gpu or "cpu", "compile" if spec["compile"] else "eager", notes, peak


if __name__ == "__main__":
    sys.exit(main())
