"""Compute ceiling: the fastest inference and training step this machine's matrix products allow.

What it measures, in one process on the JAX backend (CPU):

  FLOPs        XLA's cost analysis of the compiled programs the benchmarks time: the backbone's
               forward (benchmark_inference.py: --batch-size images of --image-size) and the
               full DINOv2Pretrainer training step (benchmark_train_step.py: --train-batch
               source images, 2 global + 8 local crops, --prototypes, drop path 0).
  GEMM rates   float32 matrix products of the shapes that carry almost all of those FLOPs (the
               four linear layers of a block at the inference batch's token count, the
               prototype layer at the training step's masked-patch rows), each timed alone
               through XLA (jax.jit) and, when torch is installed, through torch.mm, as the
               median of --repeats calls. The FLOP-weighted mean over the shapes is the rate an
               implementation would reach if everything it ran were these products.

  bound        FLOPs / GEMM rate: a lower bound on the seconds per batch (an upper bound on
               images per second) for a program that spends nothing on anything else (LayerNorm,
               GELU, softmax, attention's small batched products, the optimizer). Real programs
               stay above it; compare a goal with the bound before chasing it.

Example:
    python tools/compute_ceiling.py                       # ViT-S/14, the benchmarks' settings
    python tools/compute_ceiling.py --inference-only --json ceiling.json

Run it on an otherwise idle machine: GEMM rates on a busy one are low and the bounds loose.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench.images import source_images  # noqa: E402
from bench.machine import load_average, machine_info  # noqa: E402
from bench.timing import median_seconds  # noqa: E402

MODELS = {"tiny": "dinov2_vit_tiny4", "small": "dinov2_vit_small14", "base": "dinov2_vit_base14"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="small",
                        help="backbone preset (default: small, ViT-S/14)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="inference batch, as benchmark_inference.py (default: 8)")
    parser.add_argument("--image-size", type=int, default=224,
                        help="inference image side (default: 224)")
    parser.add_argument("--train-batch", type=int, default=4,
                        help="training step source images, as benchmark_train_step.py (default: 4)")
    parser.add_argument("--prototypes", type=int, default=65536,
                        help="prototypes of the DINO / iBOT head (default: 65536)")
    parser.add_argument("--repeats", type=int, default=15,
                        help="timed calls per matrix product, median reported (default: 15)")
    parser.add_argument("--inference-only", action="store_true",
                        help="skip compiling the training step (saves time and memory: docs/performance.md)")
    parser.add_argument("--json", metavar="OUT", help="also write the results to this file")
    args = parser.parse_args(argv)
    for name in ("batch_size", "image_size", "train_batch", "prototypes", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, "
                         f"received {getattr(args, name)}")
    return args


def gemm_rates(shapes, repeats):
    """{(m, k, n): {"xla": GFLOP/s, "torch": GFLOP/s or None}} for float32 (m, k) @ (k, n)."""
    import jax
    import numpy as np

    try:
        import torch
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    product = jax.jit(lambda a, b: a @ b)
    rates = {}
    for m, k, n in shapes:
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        flops = 2.0 * m * k * n
        # Arguments, not closure constants: XLA would fold a constant product at compile time.
        ja, jb = jax.numpy.asarray(a), jax.numpy.asarray(b)
        xla = flops / median_seconds(
            lambda ja=ja, jb=jb: product(ja, jb).block_until_ready(), repeats)
        torch_rate = None
        if torch is not None:
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            torch_rate = flops / median_seconds(lambda ta=ta, tb=tb: torch.mm(ta, tb), repeats)
        rates[(m, k, n)] = {"xla": xla / 1e9,
                            "torch": None if torch_rate is None else torch_rate / 1e9}
        print(f"  {m:>6} x {k:>5} x {n:>6}: XLA {xla / 1e9:6.1f} GFLOP/s"
              + ("" if torch_rate is None else f", torch {torch_rate / 1e9:6.1f} GFLOP/s"),
              flush=True)
    return rates


def weighted_rate(rates, which):
    """FLOP-weighted mean rate over the shapes (total FLOPs / total time), or None."""
    total_flops = total_time = 0.0
    for (m, k, n), rate in rates.items():
        if rate[which] is None:
            return None
        flops = 2.0 * m * k * n
        total_flops += flops
        total_time += flops / (rate[which] * 1e9)
    return total_flops / total_time / 1e9


def _flops(compiled):
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return float(analysis["flops"])


def inference_flops(backbone, batch, size):
    import jax
    import numpy as np

    images = np.zeros((batch, size, size, 3), "float32")
    trainable = [v.value for v in backbone.trainable_variables]
    non_trainable = [v.value for v in backbone.non_trainable_variables]

    def forward(trainable, non_trainable, images):
        return backbone.stateless_call(trainable, non_trainable, {"images": images})[0]

    return _flops(jax.jit(forward).lower(trainable, non_trainable, images).compile())


def train_step_flops(model_name, batch_size, prototypes):
    """FLOPs of the compiled JAX training step, on a batch from the library's pipeline, with
    the crops benchmark_train_step.py uses for this model."""
    import jax
    import keras
    import numpy as np
    from benchmark_train_step import MODELS as TRAIN_MODELS

    from keras_dinov2 import DINOv2Backbone, DINOv2Pretrainer, SSLConfig
    from keras_dinov2.config import DataConfig, HeadConfig, ModelConfig, OptimConfig
    from keras_dinov2.data import multicrop_dataset

    keras.utils.set_random_seed(0)
    preset = MODELS[model_name]
    config = SSLConfig(batch_size=batch_size, heads=HeadConfig(num_prototypes=prototypes),
                       optim=OptimConfig(warmup_epochs=0),
                       data=DataConfig.recipe(TRAIN_MODELS[model_name]["data"]),
                       model=ModelConfig(patch_size=TRAIN_MODELS[model_name]["patch"]))
    backbone = DINOv2Backbone.from_preset(
        preset, load_weights=False, image_size=config.data.crops.global_crops_size,
        layer_scale_init=1e-5)
    model = DINOv2Pretrainer(backbone, config)
    model.compile()
    images, _ = source_images(max(batch_size, 8))
    dataset = multicrop_dataset(images, batch_size=batch_size, config=config, seed=0)
    batch = {k: np.asarray(v) for k, v in next(iter(dataset)).items()}
    # One fit step builds the optimizer's variables (the step's state).
    model.fit(dataset.take(1), epochs=1, verbose=0)
    state = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in model.optimizer.variables],
        [v.value for v in model.metrics_variables],
    )
    compiled = jax.jit(model.train_step).lower(state, (batch,)).compile()
    masked = int(batch["mask_indices"].shape[0])
    return _flops(compiled), masked, config.data.crops, config.heads.bottleneck_dim


def main(argv=None):
    args = parse_args(argv)
    import keras

    if keras.backend.backend() != "jax":
        sys.exit(f"compute_ceiling.py needs the jax backend (KERAS_BACKEND={keras.backend.backend()}).")
    import jax

    from keras_dinov2 import DINOv2Backbone

    if jax.default_backend() != "cpu":
        print(f"Note: JAX runs on {jax.default_backend()}; the rates and bounds are that device's.")
    info = machine_info()
    print(f"CPU: {info['cpu']} ({info['cpus_usable']} usable cores), jax {info['versions']['jax']}, "
          f"torch {info['versions']['torch']}; load average before: {load_average()}")
    preset = MODELS[args.model]
    backbone = DINOv2Backbone.from_preset(preset, load_weights=False, image_size=args.image_size)
    dim, patch = backbone.hidden_dim, backbone.patch_size
    config = backbone.get_config()
    hidden = int(dim * config["mlp_ratio"])
    tokens = args.batch_size * (1 + (args.image_size // patch) ** 2)
    shapes = [(tokens, dim, 3 * dim), (tokens, dim, dim), (tokens, dim, hidden),
              (tokens, hidden, dim)]
    results = {"model": preset, "machine": info}

    flops = inference_flops(backbone, args.batch_size, args.image_size)
    step = None
    if not args.inference_only:
        step_flops, masked, crops, bottleneck = train_step_flops(args.model, args.train_batch,
                                                                  args.prototypes)
        step = {"flops": step_flops, "masked_rows": masked}
        shapes.append((masked, bottleneck, args.prototypes))
    print(f"Matrix products, float32, median of {args.repeats}:")
    rates = gemm_rates(shapes, args.repeats)
    block_rates = {s: r for s, r in list(rates.items())[:4]}
    xla, torch_rate = weighted_rate(block_rates, "xla"), weighted_rate(block_rates, "torch")
    print()
    line = (f"Inference, {preset}, batch {args.batch_size}, {args.image_size} x {args.image_size}: "
            f"{flops / 1e9:.1f} GFLOP per batch ({flops / args.batch_size / 1e9:.2f} per image)")
    print(line)
    results["inference"] = {"flops": flops, "batch_size": args.batch_size,
                            "image_size": args.image_size, "bounds": {}}
    for name, rate in (("XLA", xla), ("torch", torch_rate)):
        if rate is None:
            continue
        seconds = flops / (rate * 1e9)
        results["inference"]["bounds"][name] = {"gflops": rate, "s_per_batch": seconds,
                                                "images_per_s": args.batch_size / seconds}
        print(f"  at {name}'s block GEMM rate {rate:6.1f} GFLOP/s: >= {seconds:.3f} s per batch, "
              f"<= {args.batch_size / seconds:.1f} images/s")
    if step is not None:
        # The prototype layer's products (teacher: forward; student: forward and two backward),
        # at their own measured rate; every other FLOP at the block products' rate.
        b, m, k = args.train_batch, step["masked_rows"], args.prototypes
        teacher_rows, student_rows = 2 * b + m, (2 + crops.local_crops_number) * b + m
        head = 2.0 * bottleneck * k * (teacher_rows + 3 * student_rows)
        print(f"Training step, {preset}, {b} source images (2 x {crops.global_crops_size} + "
              f"{crops.local_crops_number} x {crops.local_crops_size} crops each), {k} "
              f"prototypes, {m} masked-patch rows: {step['flops'] / 1e9:.1f} GFLOP per step, "
              f"{head / 1e9:.1f} of them in the prototype layer")
        step["prototype_flops"] = head
        step["bounds"] = {}
        for name, key, rate in (("XLA", "xla", xla), ("torch", "torch", torch_rate)):
            if rate is None:
                continue
            head_rate = rates[(m, bottleneck, k)][key]
            seconds = (step["flops"] - head) / (rate * 1e9) + head / (head_rate * 1e9)
            step["bounds"][name] = {"s_per_step": seconds, "images_per_s": b / seconds}
            print(f"  at {name}'s rates ({rate:.1f} GFLOP/s blocks, {head_rate:.1f} prototype "
                  f"layer): >= {seconds:.2f} s per step, <= {b / seconds:.2f} source images/s")
        results["train_step"] = step
    results["gemm"] = [{"m": m, "k": k, "n": n, **r} for (m, k, n), r in rates.items()]
    print(f"Load average after: {load_average()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"Wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
