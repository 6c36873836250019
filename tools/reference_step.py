"""Training-step parity with the official DINOv2 code: same weights, same batch, a few steps.

Builds the official `SSLMetaArch` (facebookresearch/dinov2, from a checkout given by path; it is
not a dependency of keras_dinov2) and `keras_dinov2.DINOv2Pretrainer` from the same initial
weights, feeds both the same multi-crop batch, runs a few training steps as the reference's
`train/train.py` does them (schedules written into the optimizer, forward_backward, gradient
clipping per part, AdamW step, teacher EMA) and prints, per quantity, the worst relative
difference of ours from the reference over the steps, on each Keras backend.

Two configurations:

    centering   softmax centering with the staged EMA centers, iBOT sharing the DINO head,
                no registers, position embeddings resampled as the first release (offset 0.1)
    sinkhorn    Sinkhorn-Knopp targets, a separate iBOT head (other width and prototype
                count), 4 register tokens, position embeddings resampled as the registers
                release (antialiased, no offset)

Run from the repository root:

    python tools/reference_step.py --reference-src /path/to/dinov2            # both, 3 backends
    python tools/reference_step.py --reference-src /path/to/dinov2 \\
        --write-fixtures tests/fixtures/reference_step                       # regenerate fixtures
    KERAS_BACKEND=jax python tools/reference_step.py \\
        --replay tests/fixtures/reference_step/centering.npz                  # no reference needed

See `--help` for the quantities, the relative difference, and what stands in for the parts of
the reference that need a GPU, xFormers or several processes.
"""

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench.workers import run_in_subprocess, worker_body  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("jax", "tensorflow", "torch")
FORMAT_VERSION = 1
# Denominator floor of the relative difference (an all-zero reference array compares absolutely).
TINY = 1e-12
# The replay test's bound: RTOL, or FLOAT32_FACTOR x the reference's own float32 error (its
# float32 run against its float64 run) where that is larger.
RTOL = 1e-4
FLOAT32_FACTOR = 4.0
# The bound on `key_bias_drift` (the reference's is a few thousandths).
KEY_BIAS_DRIFT_BOUND = 0.05

# The tiny setting of both configurations, named after the reference's config keys where it has
# them. The schedules are the reference's with 2-step "epochs", so that three steps cross the lr
# warm-up (0, then the peak), the end of the frozen last layer, and the teacher-temperature ramp.
COMMON = {
    "batch_size": 4,
    "patch_size": 4,
    "global_crops_size": 32,
    "local_crops_size": 16,
    "local_crops_number": 2,
    "embed_dim": 16,
    "depth": 2,
    "num_heads": 2,
    "mlp_ratio": 4,
    "num_register_tokens": 0,
    "interpolate_offset": 0.1,
    "interpolate_antialias": False,
    # LayerScale 1e-5 (the reference's training init) makes every CLS token nearly equal, and
    # KoLeo's nearest-neighbour distances then come from cancellation in float32 (~1e-6 apart):
    # a parity check must stay away from that ill-conditioning.
    "layerscale": 0.1,
    "drop_path_rate": 0.0,
    "head_hidden_dim": 32,
    "head_nlayers": 3,
    "dino_prototypes": 64,
    "dino_bottleneck": 16,
    "ibot_separate_head": False,
    "ibot_prototypes": 64,
    "ibot_bottleneck": 16,
    "centering": "centering",
    "dino_loss_weight": 1.0,
    "ibot_loss_weight": 1.0,
    "koleo_loss_weight": 0.1,
    "mask_sample_probability": 0.5,
    "mask_ratio_min_max": [0.1, 0.5],
    "epoch_length": 2,
    "epochs": 3,
    "warmup_epochs": 1,
    "freeze_last_layer_epochs": 1,
    "base_lr": 0.004,
    "min_lr": 1e-6,
    "weight_decay": 0.04,
    "weight_decay_end": 0.4,
    "momentum_teacher": 0.992,
    "final_momentum_teacher": 1.0,
    "teacher_temp": 0.07,
    "warmup_teacher_temp": 0.04,
    "warmup_teacher_temp_epochs": 2,
    "clip_grad": 3.0,
    "layerwise_decay": 0.9,
    "patch_embed_lr_mult": 0.2,
    "adamw_beta1": 0.9,
    "adamw_beta2": 0.999,
}
CONFIGS = {
    "centering": dict(COMMON),
    "sinkhorn": {
        **COMMON,
        "centering": "sinkhorn_knopp",
        "ibot_separate_head": True,
        "ibot_prototypes": 48,
        "ibot_bottleneck": 8,
        "num_register_tokens": 4,
        "interpolate_offset": 0.0,
        "interpolate_antialias": True,
        "layerscale": 1.0,
        "momentum_teacher": 0.994,
        "weight_decay_end": 0.2,
    },
}
DESCRIPTIONS = {
    "centering": "softmax centering, iBOT on the DINO head",
    "sinkhorn": "Sinkhorn-Knopp, separate iBOT head, 4 registers",
}

SCALARS = (
    "loss",
    "dino_local",
    "dino_global",
    "koleo",
    "ibot",
    "grad_norm_backbone",
    "grad_norm_dino_head",
    "grad_norm_ibot_head",
    "lr",
    "wd",
    "momentum",
    "teacher_temp",
)
CENTERS = ("dino_center", "ibot_center")
QUANTITIES = SCALARS + CENTERS + (
    "student parameters",
    "teacher parameters",
    "student updates",
)

HELP_EPILOG = f"""
What is compared ("worst" is over the steps, and over the arrays for parameters):

  loss, dino_local, dino_global, koleo, ibot
                the total loss the reference back-propagates (read at its backprop_loss) and
                its parts, unweighted as keras_dinov2 logs them: the reference's
                dino_local_crops_loss and dino_global_crops_loss as they are, its displayed
                koleo_loss * 2 / koleo weight and ibot_loss * 2 (it displays both halved)
  grad_norm_*   each part's gradient norm before clipping (backbone, dino_head, ibot_head)
  lr, wd, momentum, teacher_temp
                the schedules at the step (the reference's CosineScheduler tables)
  dino_center, ibot_center
                the centers after the step's staged update (the reference folds it in at the
                start of the next step; the tool folds it in right after the step to read it)
  student parameters, teacher parameters
                every parameter of both networks and their heads after each step, in the
                reference's names and layouts (torch Linear weights are (out, in)), except
                the attention key biases (below)
  student updates
                each student parameter's change over the whole run (after the last step minus
                the initial value): stricter than the parameters, whose change is small next
                to their size. (The teacher's change, (1 - momentum) of its distance to the
                student, is below float32's resolution of its values: its parameters are
                compared, not its change.)
  key bias drift
                not a difference: the student's largest move of an attention key bias (the k
                third of a qkv bias) over the run, over the run's summed learning rate, for
                ours and (last column) the reference. The key bias has an exact gradient of 0
                (it adds the same q.b to every logit of a query's softmax) and no effect on
                the network's function: in float32 its gradient is rounding noise, which AdamW
                divides by its own size into moves of a few thousandths of the learning rate,
                different in every implementation. The replay test bounds it by {KEY_BIAS_DRIFT_BOUND:g}.

Relative difference of an array (a scalar is an array of one element), ours a, reference b:
||a - b|| / max(||b||, {TINY:g}) with L2 norms. Not the largest element: AdamW divides each
element's gradient by its own running size, so the few elements whose gradients are far smaller
than the rest of their array carry float32's relative rounding (~1e-4 of such an element)
straight into their update; the L2 norm weighs them by their size.

The reference also runs in float64 (the same code, weights, batch and schedules; its
Sinkhorn-Knopp casts to float32 itself). "ref f32/f64" is its float32 run's difference from
that float64 run: the reference's own float32 rounding, a floor for any float32 implementation.
The replay test holds each key to max({RTOL:.0e}, {FLOAT32_FACTOR:g} x the reference's own float32 error of
that key), which the fixtures carry: above {RTOL:.0e} only for updates of parameters near 1 (LayerNorm,
LayerScale and weight-norm gains, which move by a few thousand float32 steps of 1.0 here, so
that rounding each update is ~1e-4 of the move) and of AdamW updates built from nearly
cancelling gradients.

The reference is imported from --reference-src and run on the CPU, in one process:
  * torch.distributed: a gloo process group of one process (the Sinkhorn-Knopp of iBOT
    all-reduces without checking for one);
  * xFormers: absent. The layers take their own plain-torch paths (XFORMERS_DISABLED=1); the
    meta-architecture's import of xformers.ops.fmha gets a stand-in whose BlockDiagonalMask
    concatenates the head's inputs and splits its outputs (the head works row by row); the
    student backbone's nested call on [global crops, local crops] runs the two crops one after
    the other (the same arithmetic without drop path, which is 0 here);
  * FSDP: none. Gradients are clipped per part with torch.nn.utils.clip_grad_norm_ (the formula
    of FSDP's clip_grad_norm_), and the teacher's EMA runs over the parameters as
    SSLMetaArch.update_teacher does over FSDP's (which finds no FSDP module here);
  * Tensor.cuda() returns the tensor itself while forward_backward runs;
  * dinov2.data is replaced by its masking.py and collate.py (its loaders need torchvision).
The optimizer, parameter groups, schedules and their application are the reference's own
(build_optimizer, get_params_groups, build_schedulers, apply_optim_scheduler), as are the
configuration (ssl_default_config.yaml with the tiny overrides, apply_scaling_rules_to_cfg), the
batch (collate_data_and_cast and MaskingGenerator on random crops) and the initial weights
(SSLMetaArch's own initialisation under torch.manual_seed, rounded to float16 values so that the
fixtures store them exactly; the teacher starts as a copy of the student).

Requirements of the reference side (not of keras_dinov2): a checkout of facebookresearch/dinov2,
torch, omegaconf and fvcore (pip install omegaconf fvcore). Checked with dinov2 b8931f7.

Fixtures (--write-fixtures DIR): DIR/<config>.npz per configuration, with the setting (JSON),
the initial weights, the batch (keras_dinov2's batch contract), the reference's quantities at
every step, its parameters after the last step and its own float32 errors (format
{FORMAT_VERSION}). tests/test_reference_step.py replays them on each backend without the reference.
"""


# ------------------------------------------------------------------------- records (npz)


def save_record(path, record):
    """Writes a record (dict of arrays plus "meta", a JSON-able dict) as one npz.

    The arrays are packed into one flat array per dtype, with an index of (dtype, offset, shape)
    per key in the JSON header: a zip entry per key would cost more than the tiny arrays.
    """
    packed, index = {}, {}
    for key, value in sorted(record.items()):
        if key == "meta":
            continue
        value = np.asarray(value)
        dtype = value.dtype.str
        chunks = packed.setdefault(dtype, [])
        offset = sum(c.size for c in chunks)
        chunks.append(value.ravel())
        index[key] = [dtype, offset, list(value.shape)]
    header = {"meta": record["meta"], "index": index}
    arrays = {f"data{i}": np.concatenate(chunks) for i, chunks in enumerate(packed.values())}
    arrays["header"] = np.array(json.dumps(header, sort_keys=True))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez_compressed(path, **arrays)


def load_record(path):
    """Reads a record written by `save_record`; float16 arrays come back as float32."""
    with np.load(path, allow_pickle=False) as data:
        header = json.loads(str(data["header"]))
        if header["meta"].get("format") != FORMAT_VERSION:
            raise ValueError(
                f"{path}: record format {header['meta'].get('format')!r}, this tool reads "
                f"format {FORMAT_VERSION}; regenerate it with --write-fixtures."
            )
        flat = {data[name].dtype.str: data[name] for name in data.files if name != "header"}
    record = {"meta": header["meta"]}
    for key, (dtype, offset, shape) in header["index"].items():
        size = int(np.prod(shape, dtype=np.int64))
        value = flat[dtype][offset:offset + size].reshape(shape)
        record[key] = value.astype(np.float32) if value.dtype == np.float16 else value.copy()
    return record


def fixture_view(record):
    """The part of a record that goes into a fixture: parameters of the last step only, and the
    initial weights and crops in float16 (they are float16 values by construction)."""
    last = record["meta"]["steps"] - 1
    out = {"meta": {**record["meta"], "parameter_steps": [last]}}
    for key, value in record.items():
        if key == "meta":
            continue
        step = key.split("/", 2)[1] if key.startswith("float32_error/") else key.split("/")[0]
        is_parameter = "/student/" in key or "/teacher/" in key
        if is_parameter and step.startswith("step") and step != f"step{last}":
            continue
        if key.startswith("init/") or key in ("batch/global_crops", "batch/local_crops"):
            value = np.asarray(value, np.float32)
            if not np.array_equal(value.astype(np.float16).astype(np.float32), value):
                raise AssertionError(f"{key} is not made of float16 values.")
            value = value.astype(np.float16)
        out[key] = value
    return out


# ------------------------------------------------------------------------- comparison


def relative_difference(a, b):
    """||a - b|| / max(||b||, TINY), L2 norms in float64: ours `a` against the reference's `b`.

    For a scalar, |a - b| / |b|. Over an array the L2 norm rather than the largest element: a
    handful of elements with tiny gradients carry float32's relative rounding into AdamW's
    per-element update (see --help), and the largest element difference measures those
    outliers, not the implementation.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: ours {a.shape}, reference {b.shape}")
    return float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), TINY))


def _parameter_keys(record, step, network):
    prefix = f"step{step}/{network}/"
    return sorted(k[len(prefix):] for k in record if k.startswith(prefix))


def _without_key_bias(name, value, width):
    """`value` without the key third of an attention qkv bias (see `key_bias_drift`)."""
    if name.endswith("attn.qkv.bias"):
        return np.concatenate([value[:width], value[2 * width:]])
    return value


def key_bias_drift(record):
    """The student's largest move of an attention key bias over the run, over the summed lr.

    The key bias has an exact gradient of 0 (it adds the same q.b to every logit of a query's
    softmax) and no effect on the network's function; in float32 its gradient is rounding noise,
    which AdamW normalizes into moves of a small fraction of the learning rate. The parameter
    comparisons leave it out; this bounds it instead.
    """
    steps = record["meta"]["steps"]
    width = record["meta"]["settings"]["embed_dim"]
    last = record["meta"]["parameter_steps"][-1]
    total_lr = sum(float(record[f"step{t}/lr"]) for t in range(steps))
    drift = 0.0
    for name in _parameter_keys(record, last, "student"):
        if name.endswith("attn.qkv.bias"):
            move = record[f"step{last}/student/{name}"] - record[f"init/{name}"]
            drift = max(drift, float(np.max(np.abs(move[width:2 * width]))))
    return drift / max(total_lr, TINY)


def differences(reference, ours):
    """{key: relative difference of ours from the reference} over every compared key.

    Keys: "step{t}/{scalar or center}" at every step, "step{t}/{network}/{part}/{name}" for the
    parameters at the reference's stored steps, and "update/student/{part}/{name}" for each
    student parameter's change over the whole run (after the last stored step minus the initial
    value). The attention key biases are left out of the parameters (see `key_bias_drift`).
    """
    width = reference["meta"]["settings"]["embed_dim"]
    out = {}
    for step in range(reference["meta"]["steps"]):
        for quantity in SCALARS + CENTERS:
            key = f"step{step}/{quantity}"
            if key in reference:
                if key not in ours:
                    raise KeyError(f"ours has no {key}")
                out[key] = relative_difference(ours[key], reference[key])
    last = reference["meta"]["parameter_steps"][-1]
    for network in ("student", "teacher"):
        for step in reference["meta"]["parameter_steps"]:
            for name in _parameter_keys(reference, step, network):
                key = f"step{step}/{network}/{name}"
                out[key] = relative_difference(_without_key_bias(name, ours[key], width),
                                               _without_key_bias(name, reference[key], width))
    # The teacher moves by (1 - momentum) of its distance to the student, under float32's
    # resolution of its values: its updates are not compared, its parameters are.
    for name in _parameter_keys(reference, last, "student"):
        key = f"step{last}/student/{name}"
        init = reference[f"init/{name}"]
        out[f"update/student/{name}"] = relative_difference(
            _without_key_bias(name, ours[key] - init, width),
            _without_key_bias(name, reference[key] - init, width))
    return out


def quantity_of(key):
    """The reported quantity a difference key belongs to."""
    parts = key.split("/")
    if parts[0] == "update":
        return f"{parts[1]} updates"
    if len(parts) > 2:
        return f"{parts[1]} parameters"
    return parts[1]


def tolerance(record, key):
    """The bound the replay test holds `key` to: RTOL, or FLOAT32_FACTOR times the reference's own
    float32 error where that is larger (see --help)."""
    return max(RTOL, FLOAT32_FACTOR * float(record.get(f"float32_error/{key}", 0.0)))


def summarize(diffs):
    """{quantity: (worst value, where)} of a {key: value} dict."""
    worst = {}
    for key, value in diffs.items():
        quantity = quantity_of(key)
        if quantity not in worst or value > worst[quantity][0]:
            step, _, rest = key.partition("/")
            where = "whole run" if step == "update" else step.replace("step", "step ")
            if key.count("/") > 1:
                where += " " + rest.split("/", 1)[1]
            worst[quantity] = (value, where)
    return worst


def format_differences(worst, float32_error=None, quantities=None):
    float32_error = float32_error or {}
    lines = [f"  {'quantity':<22}{'ours vs ref':>12}{'ref f32/f64':>13}  worst at"]
    for quantity in QUANTITIES if quantities is None else quantities:
        if quantity in worst:
            value, where = worst[quantity]
            own = float32_error.get(quantity)
            own = "           -" if own is None else f"{own[0]:>12.1e}"
            lines.append(f"  {quantity:<22}{value:>12.1e} {own}  {where}")
    return "\n".join(lines)


# ------------------------------------------------------------------------- our side


def _how_to_torch(value, how):
    if how == "linear":
        return value.T
    if how == "conv":  # keras (kh, kw, in, out) -> torch (out, in, kh, kw)
        return value.transpose(3, 2, 0, 1)
    return value


def _to_keras(value, how):
    if how == "linear":
        return value.T
    if how == "conv":
        return value.transpose(2, 3, 1, 0)
    return value


def _head_layout(head):
    """(reference name, variable, layout) of a DINOHead, as the reference's DINOHead (no batch norm):
    mlp.0 / mlp.2 / mlp.4 are the Linear layers between the GELUs, last_layer the weight norm."""
    pairs = []
    for i, layer in enumerate(head.mlp_layers):
        pairs.append((f"mlp.{2 * i}.weight", layer.kernel, "linear"))
        pairs.append((f"mlp.{2 * i}.bias", layer.bias, "plain"))
    pairs.append(("last_layer.weight_g", head.last_layer.weight_g, "column"))
    pairs.append(("last_layer.weight_v", head.last_layer.weight_v, "linear"))
    return pairs


def _layouts(model, network):
    """{part: [(reference name, variable, layout)]} of the student or the teacher."""
    from keras_dinov2.interop import torch_hub_layout

    backbone = model.student if network == "student" else model.teacher
    heads = {"dino_head": getattr(model, f"{network}_dino_head")}
    ibot = getattr(model, f"{network}_ibot_head")
    if ibot is not heads["dino_head"]:
        heads["ibot_head"] = ibot
    parts = {"backbone": torch_hub_layout(backbone)}
    parts.update({part: _head_layout(head) for part, head in heads.items()})
    return parts


def _read(variable, how):
    import keras

    value = np.asarray(keras.ops.convert_to_numpy(variable.value), np.float32)
    if how == "column":  # weight_g: ours (K,), the reference's (K, 1)
        return value[:, None]
    return _how_to_torch(value, how)


def _write(variable, value, how):
    value = np.asarray(value, np.float32)
    if how == "column":
        value = value[:, 0]
    else:
        value = _to_keras(value, how)
    if tuple(value.shape) != tuple(variable.shape):
        raise ValueError(
            f"{variable.path}: the record holds {value.shape}, the model has {tuple(variable.shape)}"
        )
    variable.assign(value)


def our_config(settings):
    """The SSLConfig and DINOv2Backbone arguments of a setting."""
    from keras_dinov2.config import (
        CropConfig,
        DataConfig,
        HeadConfig,
        LossConfig,
        MaskingConfig,
        ModelConfig,
        OptimConfig,
        SSLConfig,
    )

    s = settings
    interpolation = {(0.1, False): "original", (0.0, True): "registers"}.get(
        (float(s["interpolate_offset"]), bool(s["interpolate_antialias"])))
    if interpolation is None:
        raise ValueError(
            "interpolate_offset / interpolate_antialias must be (0.1, False) or (0.0, True); "
            f"received ({s['interpolate_offset']}, {s['interpolate_antialias']})."
        )
    config = SSLConfig(
        batch_size=s["batch_size"],
        heads=HeadConfig(
            num_prototypes=s["dino_prototypes"],
            hidden_dim=s["head_hidden_dim"],
            bottleneck_dim=s["dino_bottleneck"],
            num_layers=s["head_nlayers"],
            ibot_separate_head=s["ibot_separate_head"],
            ibot_num_prototypes=s["ibot_prototypes"],
            ibot_bottleneck_dim=s["ibot_bottleneck"],
        ),
        loss=LossConfig(
            dino_weight=s["dino_loss_weight"],
            ibot_weight=s["ibot_loss_weight"],
            koleo_weight=s["koleo_loss_weight"],
            centering=s["centering"],
        ),
        optim=OptimConfig(
            epochs=s["epochs"],
            steps_per_epoch=s["epoch_length"],
            base_lr=s["base_lr"],
            min_lr=s["min_lr"],
            warmup_epochs=s["warmup_epochs"],
            weight_decay=s["weight_decay"],
            weight_decay_end=s["weight_decay_end"],
            momentum_teacher=s["momentum_teacher"],
            final_momentum_teacher=s["final_momentum_teacher"],
            teacher_temp=s["teacher_temp"],
            warmup_teacher_temp=s["warmup_teacher_temp"],
            warmup_teacher_temp_epochs=s["warmup_teacher_temp_epochs"],
            freeze_last_layer_epochs=s["freeze_last_layer_epochs"],
            clip_grad=s["clip_grad"],
            layer_decay=s["layerwise_decay"],
            patch_embed_lr_mult=s["patch_embed_lr_mult"],
            adamw_beta1=s["adamw_beta1"],
            adamw_beta2=s["adamw_beta2"],
        ),
        data=DataConfig(
            crops=CropConfig(
                global_crops_size=s["global_crops_size"],
                local_crops_size=s["local_crops_size"],
                local_crops_number=s["local_crops_number"],
            ),
            masking=MaskingConfig(
                mask_sample_probability=s["mask_sample_probability"],
                mask_ratio_min_max=tuple(s["mask_ratio_min_max"]),
            ),
        ),
        model=ModelConfig(
            patch_size=s["patch_size"],
            drop_path_rate=s["drop_path_rate"],
            layer_scale_init=s["layerscale"],
        ),
    )
    backbone_args = {
        "patch_size": s["patch_size"],
        "hidden_dim": s["embed_dim"],
        "num_layers": s["depth"],
        "num_heads": s["num_heads"],
        "mlp_ratio": float(s["mlp_ratio"]),
        "num_register_tokens": s["num_register_tokens"],
        "image_size": s["global_crops_size"],
        "interpolation": interpolation,
        "layer_scale_init": s["layerscale"],
        "drop_path_rate": s["drop_path_rate"],
    }
    return config, backbone_args


def build_ours(record):
    """A compiled DINOv2Pretrainer holding the record's initial weights (teacher = student)."""
    import keras_dinov2 as kd

    config, backbone_args = our_config(record["meta"]["settings"])
    backbone = kd.DINOv2Backbone(**backbone_args)
    model = kd.DINOv2Pretrainer(backbone, config)
    for network in ("student", "teacher"):
        for part, layout in _layouts(model, network).items():
            for name, variable, how in layout:
                key = f"init/{part}/{name}"
                if key not in record:
                    raise KeyError(f"the record has no {key}")
                _write(variable, record[key], how)
    model.compile()
    return model


def batch_of(record):
    """The record's multi-crop batch in keras_dinov2's batch contract (see the README)."""
    return {
        "global_crops": np.asarray(record["batch/global_crops"], np.float32),
        "local_crops": np.asarray(record["batch/local_crops"], np.float32),
        "masks": np.asarray(record["batch/masks"], bool),
        "mask_indices": np.asarray(record["batch/mask_indices"], np.int32),
        "masks_weight": np.asarray(record["batch/masks_weight"], np.float32),
        "n_masked_patches": np.asarray(record["batch/n_masked_patches"], np.int32),
    }


def run_ours(record, steps=None):
    """Replays the record's steps with keras_dinov2 on the active backend; returns a record of ours."""
    import keras

    steps = record["meta"]["steps"] if steps is None else steps
    model = build_ours(record)
    batch = batch_of(record)
    out = {"meta": {**record["meta"], "backend": keras.backend.backend()}}
    out.update({k: v for k, v in record.items() if k.startswith("init/")})
    for step in range(steps):
        logs = model.train_on_batch(batch, return_dict=True)
        for quantity in SCALARS:
            if quantity in logs:
                out[f"step{step}/{quantity}"] = np.float32(logs[quantity])
        for quantity in CENTERS:
            center = getattr(model, quantity)
            out[f"step{step}/{quantity}"] = np.asarray(keras.ops.convert_to_numpy(center))
        for network in ("student", "teacher"):
            for part, layout in _layouts(model, network).items():
                for name, variable, how in layout:
                    out[f"step{step}/{network}/{part}/{name}"] = _read(variable, how)
    return out


# ------------------------------------------------------------------------- the reference side


class _ConcatenatedRows:
    """Stands in for xformers.ops.fmha.BlockDiagonalMask in SSLMetaArch: the student head's inputs
    (each (1, n_i, D)) are concatenated along the rows and its output split back, which is what the
    block-diagonal mask amounts to for a head that works row by row."""

    def __init__(self, sizes):
        self.sizes = sizes

    @classmethod
    def from_tensor_list(cls, tensors):
        import torch

        return cls([t.shape[1] for t in tensors]), torch.cat(tensors, dim=1)

    def split(self, tensor):
        return list(tensor.split(self.sizes, dim=1))


def _load_file(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _unavailable(name):
    def missing(*args, **kwargs):
        raise RuntimeError(f"dinov2.data.{name} is not available in tools/reference_step.py")

    return missing


@functools.cache
def import_reference(folder):
    """The official modules the step needs, imported from `folder` (see the tool's --help)."""
    folder = os.path.abspath(os.path.expanduser(folder))
    if not os.path.isfile(os.path.join(folder, "dinov2", "train", "ssl_meta_arch.py")):
        raise ValueError(
            f"--reference-src: {folder} holds no dinov2/train/ssl_meta_arch.py (expected a checkout "
            "of facebookresearch/dinov2)."
        )
    loaded = sys.modules.get("dinov2")
    if loaded is not None and not os.path.abspath(loaded.__file__).startswith(folder):
        raise ValueError(f"another dinov2 is already imported from {loaded.__file__}.")
    os.environ["XFORMERS_DISABLED"] = "1"
    if folder not in sys.path:
        sys.path.insert(0, folder)
    saved = {name: sys.modules.get(name) for name in ("xformers", "xformers.ops")}
    xformers = types.ModuleType("xformers")
    xformers.ops = types.ModuleType("xformers.ops")
    xformers.ops.fmha = types.SimpleNamespace(BlockDiagonalMask=_ConcatenatedRows)
    sys.modules["xformers"], sys.modules["xformers.ops"] = xformers, xformers.ops
    try:
        data_dir = os.path.join(folder, "dinov2", "data")
        data = types.ModuleType("dinov2.data")
        data.__path__ = [data_dir]
        sys.modules["dinov2.data"] = data
        data.collate_data_and_cast = _load_file(
            "dinov2.data.collate", os.path.join(data_dir, "collate.py")).collate_data_and_cast
        data.MaskingGenerator = _load_file(
            "dinov2.data.masking", os.path.join(data_dir, "masking.py")).MaskingGenerator
        for name in ("SamplerType", "make_data_loader", "make_dataset", "DataAugmentationDINO"):
            setattr(data, name, _unavailable(name))
        import dinov2.train.train as train_module
        from dinov2.configs import dinov2_default_config
        from dinov2.layers import MemEffAttention, NestedTensorBlock
        from dinov2.models import vision_transformer as vits
        from dinov2.train.ssl_meta_arch import SSLMetaArch
        from dinov2.utils.config import apply_scaling_rules_to_cfg
    except ImportError as error:
        raise ImportError(
            f"could not import the reference from {folder}: {error}. Its step needs torch, "
            "omegaconf and fvcore (pip install omegaconf fvcore)."
        ) from error
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    if not os.path.abspath(vits.__file__).startswith(folder):
        raise ValueError(f"dinov2 was imported from {vits.__file__}, not from {folder}.")
    return types.SimpleNamespace(
        folder=folder,
        train=train_module,
        SSLMetaArch=SSLMetaArch,
        default_config=dinov2_default_config,
        apply_scaling_rules_to_cfg=apply_scaling_rules_to_cfg,
        vits=vits,
        Block=NestedTensorBlock,
        MemEffAttention=MemEffAttention,
        collate=data.collate_data_and_cast,
        MaskingGenerator=data.MaskingGenerator,
    )


TINY_ARCH = "vit_reference_step"


def reference_config(ref, settings):
    """The reference's OmegaConf config: ssl_default_config.yaml with the setting's overrides,
    after its lr scaling rule."""
    from omegaconf import OmegaConf

    s = settings
    # The tiny ViT as the reference defines vit_small & co.; build_model looks archs up by name.
    ref.vits.__dict__[TINY_ARCH] = functools.partial(
        ref.vits.DinoVisionTransformer,
        embed_dim=s["embed_dim"],
        depth=s["depth"],
        num_heads=s["num_heads"],
        mlp_ratio=s["mlp_ratio"],
        block_fn=functools.partial(ref.Block, attn_class=ref.MemEffAttention),
    )
    head = {"head_hidden_dim": s["head_hidden_dim"], "head_nlayers": s["head_nlayers"]}
    overrides = {
        "compute_precision": {"grad_scaler": False},
        "dino": {
            "loss_weight": s["dino_loss_weight"],
            "koleo_loss_weight": s["koleo_loss_weight"],
            "head_n_prototypes": s["dino_prototypes"],
            "head_bottleneck_dim": s["dino_bottleneck"],
            **head,
        },
        "ibot": {
            "loss_weight": s["ibot_loss_weight"],
            "mask_sample_probability": s["mask_sample_probability"],
            "mask_ratio_min_max": list(s["mask_ratio_min_max"]),
            "separate_head": s["ibot_separate_head"],
            "head_n_prototypes": s["ibot_prototypes"],
            "head_bottleneck_dim": s["ibot_bottleneck"],
            **head,
        },
        "train": {
            "batch_size_per_gpu": s["batch_size"],
            "OFFICIAL_EPOCH_LENGTH": s["epoch_length"],
            "centering": s["centering"],
        },
        "student": {
            "arch": TINY_ARCH,
            "patch_size": s["patch_size"],
            "drop_path_rate": s["drop_path_rate"],
            "layerscale": s["layerscale"],
            "ffn_layer": "mlp",
            "block_chunks": 0,
            "num_register_tokens": s["num_register_tokens"],
            "interpolate_offset": s["interpolate_offset"],
            "interpolate_antialias": s["interpolate_antialias"],
        },
        "teacher": {
            "momentum_teacher": s["momentum_teacher"],
            "final_momentum_teacher": s["final_momentum_teacher"],
            "teacher_temp": s["teacher_temp"],
            "warmup_teacher_temp": s["warmup_teacher_temp"],
            "warmup_teacher_temp_epochs": s["warmup_teacher_temp_epochs"],
        },
        "optim": {
            name: s[name]
            for name in (
                "epochs", "warmup_epochs", "freeze_last_layer_epochs", "base_lr", "min_lr",
                "weight_decay", "weight_decay_end", "clip_grad", "layerwise_decay",
                "patch_embed_lr_mult", "adamw_beta1", "adamw_beta2",
            )
        },
        "crops": {
            "global_crops_size": s["global_crops_size"],
            "local_crops_size": s["local_crops_size"],
            "local_crops_number": s["local_crops_number"],
        },
    }
    cfg = OmegaConf.merge(OmegaConf.create(ref.default_config), OmegaConf.create(overrides))
    return ref.apply_scaling_rules_to_cfg(cfg)


@contextlib.contextmanager
def _single_process_group():
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError("the reference step runs in one process; torch.distributed has more.")
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _cuda_calls_stay_on_cpu(torch):
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _make_batch(ref, settings, seed):
    """Random crops (multiples of 1/32 in [-2, 2], float16 values) collated by the reference."""
    import torch

    s = settings
    b, n_local = s["batch_size"], s["local_crops_number"]
    g, loc = s["global_crops_size"], s["local_crops_size"]
    rng = np.random.RandomState(seed)
    global_crops = (rng.randint(-64, 65, size=(2 * b, g, g, 3)) / 32.0).astype(np.float32)
    local_crops = (rng.randint(-64, 65, size=(n_local * b, loc, loc, 3)) / 32.0).astype(np.float32)
    nchw_global = torch.from_numpy(global_crops.transpose(0, 3, 1, 2).copy())
    nchw_local = torch.from_numpy(local_crops.transpose(0, 3, 1, 2).copy())
    # Our crops are view-major (view 1 of every image, then view 2); the reference's samples
    # hold the views of one image, and its collate stacks them view-major again.
    samples = [
        (
            {
                "global_crops": [nchw_global[i], nchw_global[b + i]],
                "local_crops": [nchw_local[j * b + i] for j in range(n_local)],
            },
            (),
        )
        for i in range(b)
    ]
    grid = g // s["patch_size"]
    random.seed(seed)
    generator = ref.MaskingGenerator(input_size=(grid, grid), max_num_patches=0.5 * grid * grid)
    data = ref.collate(
        samples,
        mask_ratio_tuple=tuple(s["mask_ratio_min_max"]),
        mask_probability=s["mask_sample_probability"],
        dtype=torch.float32,
        n_tokens=grid * grid,
        mask_generator=generator,
    )
    if not torch.equal(data["collated_global_crops"], nchw_global):
        raise AssertionError("the reference's collate did not keep the view-major order")
    indices = data["mask_indices_list"].numpy().astype(np.int32)
    n_masked, upperbound = len(indices), int(data["upperbound"])
    ours = {
        "batch/global_crops": global_crops,
        "batch/local_crops": local_crops,
        "batch/masks": data["collated_masks"].numpy().astype(bool),
        "batch/mask_indices": np.pad(indices, (0, upperbound - n_masked)),
        "batch/masks_weight": np.pad(data["masks_weight"].numpy().astype(np.float32),
                                     (0, upperbound - n_masked)),
        "batch/n_masked_patches": np.int32(n_masked),
    }
    return data, ours


def run_reference(folder, name, steps=3, seed=0, dtype="float32"):
    """Runs `steps` steps of the official SSLMetaArch in configuration `name`; returns its record.

    `dtype="float64"` runs the same step in double precision (parameters, buffers, crops; the
    reference's Sinkhorn-Knopp still casts to float32): a yardstick for float32 rounding.
    """
    import torch

    ref = import_reference(folder)
    settings = CONFIGS[name]
    cfg = reference_config(ref, settings)
    record = {}
    with _single_process_group():
        torch.manual_seed(seed)
        model = ref.SSLMetaArch(cfg)
        with torch.no_grad():
            # float16 values: the fixtures store the initial weights exactly in half the bytes.
            for p in model.student.parameters():
                p.copy_(p.half().float())
            # prepare_for_distributed_training without its FSDP wrapping: teacher = student.
            for part in model.student.keys():
                model.teacher[part].load_state_dict(model.student[part].state_dict())
        for part in model.student.keys():
            for pname, p in model.student[part].named_parameters():
                record[f"init/{part}/{pname}"] = p.detach().numpy().copy()
        model.need_to_synchronize_fsdp_streams = False  # no CUDA streams to synchronize
        backbone = model.student.backbone

        def features_one_after_the_other(x_list, masks_list):
            return [backbone.forward_features(x, masks=m) for x, m in zip(x_list, masks_list)]

        backbone.forward_features_list = features_one_after_the_other
        back_propagated = []
        backprop = model.backprop_loss

        def recording_backprop(loss):
            back_propagated.append(float(loss.detach()))
            backprop(loss)

        model.backprop_loss = recording_backprop

        model.train()
        if dtype == "float64":
            model.double()
        optimizer = ref.train.build_optimizer(cfg, model.get_params_groups())
        (lr_schedule, wd_schedule, momentum_schedule, teacher_temp_schedule,
         last_layer_lr_schedule) = ref.train.build_schedulers(cfg)
        data, batch = _make_batch(ref, settings, seed)
        record.update(batch)
        if dtype == "float64":
            for key in ("collated_global_crops", "collated_local_crops", "masks_weight"):
                data[key] = data[key].double()
        elif dtype != "float32":
            raise ValueError(f"`dtype` must be 'float32' or 'float64'; received {dtype!r}.")
        student_params = [p for k in model.student.keys() for p in model.student[k].parameters()]
        teacher_params = [p for k in model.student.keys() for p in model.teacher[k].parameters()]
        koleo_weight = cfg.dino.koleo_loss_weight
        for it in range(steps):
            lr, wd = lr_schedule[it], wd_schedule[it]
            momentum, teacher_temp = momentum_schedule[it], teacher_temp_schedule[it]
            ref.train.apply_optim_scheduler(optimizer, lr, wd, last_layer_lr_schedule[it])
            optimizer.zero_grad(set_to_none=True)
            with _cuda_calls_stay_on_cpu(torch):
                loss_dict = model.forward_backward(data, teacher_temp=teacher_temp)
            norms = {
                part: float(torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.optim.clip_grad))
                for part, module in model.student.items()
            }
            optimizer.step()
            with torch.no_grad():  # SSLMetaArch.update_teacher over plain parameters
                torch._foreach_mul_(teacher_params, momentum)
                torch._foreach_add_(teacher_params, student_params, alpha=1 - momentum)
            values = {
                "loss": back_propagated[-1],
                "dino_local": float(loss_dict["dino_local_crops_loss"]),
                "dino_global": float(loss_dict["dino_global_crops_loss"]),
                "koleo": float(loss_dict["koleo_loss"]) * 2 / koleo_weight,
                "ibot": float(loss_dict["ibot_loss"]) * 2,
                "lr": lr,
                "wd": wd,
                "momentum": momentum,
                "teacher_temp": teacher_temp,
                "last_layer_lr": last_layer_lr_schedule[it],
            }
            values.update({f"grad_norm_{part}": norm for part, norm in norms.items()})
            for quantity, value in values.items():
                record[f"step{it}/{quantity}"] = np.float64(value)
            # The staged center update, applied now instead of at the next step's start.
            model.dino_loss.apply_center_update()
            model.ibot_patch_loss.apply_center_update()
            record[f"step{it}/dino_center"] = model.dino_loss.center.numpy().copy()
            record[f"step{it}/ibot_center"] = model.ibot_patch_loss.center.numpy().copy()
            for network in ("student", "teacher"):
                for part, module in getattr(model, network).items():
                    for pname, p in module.named_parameters():
                        record[f"step{it}/{network}/{part}/{pname}"] = p.detach().numpy().copy()
    record["meta"] = {
        "format": FORMAT_VERSION,
        "config": name,
        "description": DESCRIPTIONS[name],
        "settings": settings,
        "steps": steps,
        "seed": seed,
        "dtype": dtype,
        "parameter_steps": list(range(steps)),
        "reference_commit": _reference_commit(folder),
        "torch": torch.__version__,
        "generator": "tools/reference_step.py",
    }
    return record


def _reference_commit(folder):
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "-C", folder, "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0:
            return out.stdout.strip()
    return None


# ------------------------------------------------------------------------- command line
# Shared with tools/reference_step_v1.py: a tool is a module with DESCRIPTION, HELP_EPILOG, CONFIGS, DESCRIPTIONS,
# QUANTITIES, REFERENCE_NAME (the repository), REFERENCE_MARKER (a file a checkout holds), SEED_HELP,
# check_reference_src(folder) -> error message or None, run_reference, replay and differences.

DESCRIPTION = "Compare training steps of keras_dinov2 with the official DINOv2 code."
REFERENCE_NAME = "facebookresearch/dinov2"
REFERENCE_MARKER = os.path.join("dinov2", "train", "ssl_meta_arch.py")
SEED_HELP = "weights, crops and masks. Default: 0."


def check_reference_src(folder):
    """None when `folder` looks like a checkout of the tool's reference, else what is wrong."""
    if not os.path.isfile(os.path.join(folder, REFERENCE_MARKER)):
        return f"{folder} holds no {REFERENCE_MARKER} (expected a checkout of {REFERENCE_NAME})."
    return None


def replay(path):
    """Replays a stored record on the active backend: (its record, ours, {key: difference})."""
    reference = load_record(path)
    ours = run_ours(reference)
    return reference, ours, differences(reference, ours)


def over_tolerance(record, diffs):
    """{key: (difference, tolerance)} of the keys whose difference exceeds `tolerance`."""
    bounds = {key: tolerance(record, key) for key in diffs}
    return {key: (value, bounds[key]) for key, value in diffs.items() if value > bounds[key]}


def _replay_worker(spec):
    """Worker body: our side on this process's backend against a record file (`spec["tool"]`'s replay)."""
    sys.path.insert(0, REPO_ROOT)
    import keras

    tool = _load_tool(spec["tool"])
    record, ours, diffs = tool.replay(spec["record"])
    return {
        "backend": keras.backend.backend(),
        "worst": {k: list(v) for k, v in summarize(diffs).items()},
        "over": {k: list(v) for k, v in over_tolerance(record, diffs).items()},
        "key_bias_drift": key_bias_drift(ours),
    }


def _load_tool(path):
    name = os.path.splitext(os.path.basename(path))[0]
    return sys.modules.get(name) or importlib.import_module(name)


def _float32_error_summary(record):
    errors = {k[len("float32_error/"):]: float(v) for k, v in record.items()
              if k.startswith("float32_error/")}
    return summarize(errors)


def parse_args(argv, tool=None):
    tool = tool or sys.modules[__name__]
    names = ", ".join(tool.CONFIGS)
    parser = argparse.ArgumentParser(description=tool.DESCRIPTION, epilog=tool.HELP_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-src", metavar="DIR",
                        help=f"a checkout of {tool.REFERENCE_NAME} (the folder holding "
                        f"{tool.REFERENCE_MARKER}).")
    parser.add_argument("--replay", metavar="NPZ",
                        help="compare the active backend (KERAS_BACKEND) against a stored record "
                        "instead of running the reference.")
    parser.add_argument("--configs", default=",".join(tool.CONFIGS),
                        help=f"comma-separated, of {names}. Default: all.")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="comma-separated Keras backends to compare, each in its own "
                        "process. Default: jax,tensorflow,torch.")
    parser.add_argument("--steps", type=int, default=3, help="training steps. Default: 3.")
    parser.add_argument("--seed", type=int, default=0, help=tool.SEED_HELP)
    parser.add_argument("--write-fixtures", metavar="DIR",
                        help="also write DIR/<config>.npz (last step's parameters only).")
    parser.add_argument("--json", metavar="FILE", help="write the differences as JSON.")
    parser.add_argument("--timeout", type=float, default=900,
                        help="seconds per backend process. Default: 900.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    if bool(args.reference_src) == bool(args.replay):
        parser.error("give exactly one of --reference-src DIR and --replay NPZ.")
    args.configs = [c for c in args.configs.split(",") if c]
    for name in args.configs:
        if name not in tool.CONFIGS:
            parser.error(f"--configs: unknown configuration {name!r}; known: {names}.")
    args.backends = [b for b in args.backends.split(",") if b]
    for backend in args.backends:
        if backend not in BACKENDS:
            parser.error(f"--backends: unknown backend {backend!r}; known: {', '.join(BACKENDS)}.")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1; received {args.steps}.")
    if args.write_fixtures and not args.reference_src:
        parser.error("--write-fixtures needs --reference-src.")
    if args.reference_src:
        args.reference_src = os.path.abspath(os.path.expanduser(args.reference_src))
        problem = tool.check_reference_src(args.reference_src)
        if problem:
            parser.error(f"--reference-src: {problem}")
    if args.replay and not os.path.isfile(args.replay):
        parser.error(f"--replay: no file {args.replay}.")
    return args


def _print_over(over):
    for key, (value, bound) in sorted(over.items()):
        print(f"    OVER TOLERANCE {key}: {value:.2e} > {bound:.2e}")


def _replay_and_print(tool, args):
    sys.path.insert(0, REPO_ROOT)
    import keras

    record, ours, diffs = tool.replay(args.replay)
    meta = record["meta"]
    label = tool.REFERENCE_NAME.split("/")[-1]
    print(f"{args.replay}: {meta['config']} ({meta['description']}), {meta['steps']} steps, "
          f"keras_dinov2 on {keras.backend.backend()} against {label} "
          f"{meta.get('reference_commit') or '?'} (float32)")
    print(format_differences(summarize(diffs), _float32_error_summary(record), tool.QUANTITIES))
    drift = key_bias_drift(ours)
    print(f"  {'key bias drift':<22}{drift:>12.1e}{key_bias_drift(record):>13.1e}  "
          "(not a difference: max key-bias move / summed lr, ours and the reference)")
    over = over_tolerance(record, diffs)
    if drift > KEY_BIAS_DRIFT_BOUND:
        over["key_bias_drift"] = (drift, KEY_BIAS_DRIFT_BOUND)
    _print_over(over)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"differences": diffs, "over": over}, f, indent=2)
    return 1 if over else 0


def main(argv=None, tool=None):
    """The command line of this tool, or of `tool` (a module laid out as this one: see above)."""
    tool = tool or sys.modules[__name__]
    args = parse_args(sys.argv[1:] if argv is None else argv, tool)
    if args.worker:
        return worker_body(args.worker, _replay_worker)
    if args.replay:
        return _replay_and_print(tool, args)

    label = tool.REFERENCE_NAME.split("/")[-1]
    workdir = tempfile.mkdtemp(prefix=f"{label}_reference_step_")
    results, own_errors, failures = {}, {}, []
    try:
        for name in args.configs:
            print(f"Reference: {name} ({tool.DESCRIPTIONS[name]}), {args.steps} steps, float32 and "
                  "float64 ...", flush=True)
            record = tool.run_reference(args.reference_src, name, steps=args.steps, seed=args.seed)
            exact = tool.run_reference(args.reference_src, name, steps=args.steps, seed=args.seed,
                                       dtype="float64")
            for key, value in tool.differences(exact, record).items():
                record[f"float32_error/{key}"] = np.float64(value)
            own_errors[name] = _float32_error_summary(record)
            own_errors[name]["key bias drift"] = (key_bias_drift(record), "whole run")
            path = os.path.join(workdir, f"{name}.npz")
            save_record(path, record)
            if args.write_fixtures:
                fixture = os.path.join(args.write_fixtures, f"{name}.npz")
                save_record(fixture, fixture_view(record))
                print(f"    wrote {fixture} ({os.path.getsize(fixture) / 1024:.0f} KiB)")
            results[name] = {}
            for backend in args.backends:
                env = dict(os.environ, KERAS_BACKEND=backend)
                env["PYTHONPATH"] = os.pathsep.join(
                    [REPO_ROOT, os.path.dirname(os.path.abspath(__file__))]
                    + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
                result, reason = run_in_subprocess(
                    os.path.abspath(__file__), {"record": path, "tool": os.path.abspath(tool.__file__)},
                    workdir, f"{name}_{backend}", env, args.timeout, verbose=False)
                if result is None:
                    print(f"    {backend}: failed: {reason}", flush=True)
                    failures.append(f"{name} on {backend}: did not run")
                    continue
                results[name][backend] = {k: tuple(v) for k, v in result["worst"].items()}
                drift = result["key_bias_drift"]
                results[name][backend]["key bias drift"] = (drift, "whole run")
                print(f"    {backend}: done", flush=True)
                _print_over(result["over"])
                failures += [f"{name} on {backend}: {k}" for k in result["over"]]
                if drift > KEY_BIAS_DRIFT_BOUND:
                    failures.append(f"{name} on {backend}: key bias drift {drift:.2e}")
        commit = _reference_commit(os.path.abspath(args.reference_src))
        print(f"\nWorst relative difference, ||ours - ref|| / ||ref|| per array, over "
              f"{args.steps} steps; reference {label} {commit or '?'} on the CPU in float32. "
              "'ref f32/f64': the reference's float32 run against its float64 run.")
        for name, per_backend in results.items():
            backends = list(per_backend)
            print(f"\n{name} ({tool.DESCRIPTIONS[name]})")
            print(f"  {'quantity':<22}" + "".join(f"{b:>12}" for b in backends)
                  + f"{'ref f32/f64':>13}  worst at")
            for quantity in tool.QUANTITIES + ("key bias drift",):
                row = [per_backend[b].get(quantity) for b in backends]
                if all(r is None for r in row):
                    continue
                cells = "".join("           -" if r is None else f"{r[0]:>12.1e}" for r in row)
                own = own_errors[name].get(quantity)
                cells += "            -" if own is None else f"{own[0]:>13.1e}"
                worst = max((r for r in row if r is not None), key=lambda r: r[0])
                print(f"  {quantity:<22}{cells}  {worst[1]}")
        print("\nAll within tolerance." if not failures
              else "\nFailures:\n  " + "\n  ".join(failures))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"results": {n: {b: {q: list(v) for q, v in r.items()}
                                           for b, r in pb.items()} for n, pb in results.items()},
                           "reference_float32_error": {n: {q: list(v) for q, v in e.items()}
                                                       for n, e in own_errors.items()},
                           "failures": failures}, f, indent=2)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
