"""Hugging Face transformers format: config.json, model.safetensors, preprocessor_config.json.

The tensors are written under the names transformers itself writes on disk (the legacy
`attention.attention.query` layout, which transformers 5 renames in memory and which
keras-hub's `hf://` converter reads). The model type follows the backbone's interpolation
rule, because that rule is the only thing the two transformers classes do differently at
other input sizes:

- "transformers" without registers -> `dinov2` (`Dinov2Model`): exact at every size.
- "registers" -> `dinov2_with_registers` (`Dinov2WithRegistersModel`, zero registers allowed):
  exact at every size.
- "original" (the first release's 0.1 offset) -> `dinov2`, or `dinov2_with_registers` with
  registers: exact at the stored size only. No transformers class has that rule.
- "transformers" with registers -> `dinov2_with_registers`: exact at the stored size only.
"""

import json
import os

import numpy as np

from keras_dinov2.export.layout import torch_hub_tensors
from keras_dinov2.export.verify import (
    MODE_WORDS,
    backbone_tokens,
    forward,
    keras_hub_resize_is_exact,
    probe_batch,
    probe_sizes,
)

SAFETENSORS_FILE = "model.safetensors"


def transformers_model_type(backbone):
    """Picks the transformers model type for `backbone`.

    Returns:
        (model_type, exact, reason): whether the type reproduces the backbone at interpolated
        sizes, and why not when it does not.

    Example:
    >>> transformers_model_type(backbone)   # ("dinov2", True, "")
    """
    mode, registers = backbone.interpolation, backbone.num_register_tokens
    if mode == "registers":
        return "dinov2_with_registers", True, ""
    model_type = "dinov2_with_registers" if registers else "dinov2"
    if mode == "transformers" and not registers:
        return model_type, True, ""
    cls = "Dinov2WithRegistersModel" if registers else "Dinov2Model"
    words = MODE_WORDS["registers" if registers else "transformers"]
    return model_type, False, (
        f"the backbone resamples positions with the {MODE_WORDS[mode]}; transformers' {cls} "
        f"uses the {words}, so features match only at the stored size "
        f"{backbone.image_size} x {backbone.image_size}"
    )


def _number(value):
    value = float(value)
    return int(value) if value.is_integer() else value


def transformers_config(backbone):
    """The transformers config.json dict for `backbone`.

    Example:
    >>> transformers_config(backbone)["model_type"]   # "dinov2"
    """
    model_type, _, _ = transformers_model_type(backbone)
    config = {
        "architectures": ["Dinov2WithRegistersModel" if model_type != "dinov2" else "Dinov2Model"],
        "model_type": model_type,
        "hidden_size": int(backbone.hidden_dim),
        "num_hidden_layers": int(backbone.num_layers),
        "num_attention_heads": int(backbone.num_heads),
        "mlp_ratio": _number(backbone.mlp_ratio),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": float(backbone.layer_norm_epsilon),
        "image_size": int(backbone.image_size),
        "patch_size": int(backbone.patch_size),
        "num_channels": 3,
        "qkv_bias": True,
        "layerscale_value": float(backbone.layer_scale_init or 1.0),
        "drop_path_rate": 0.0,
        "use_swiglu_ffn": backbone.ffn_type == "swiglu",
        "apply_layernorm": True,
        "reshape_hidden_states": True,
        "dtype": "float32",
    }
    if model_type == "dinov2":
        config["use_mask_token"] = True
    else:
        config["num_register_tokens"] = int(backbone.num_register_tokens)
    return config


def transformers_tensors(backbone):
    """{transformers on-disk name: float32 array} for `backbone`.

    Example:
    >>> transformers_tensors(backbone)["encoder.layer.0.attention.attention.query.weight"].shape
    """
    t = torch_hub_tensors(backbone, layer_scale_ones=True)
    dim = backbone.hidden_dim
    out = {
        "embeddings.cls_token": t["cls_token"],
        "embeddings.mask_token": t["mask_token"],
        "embeddings.position_embeddings": t["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": t["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": t["patch_embed.proj.bias"],
        "layernorm.weight": t["norm.weight"],
        "layernorm.bias": t["norm.bias"],
    }
    if "register_tokens" in t:
        # Without registers nothing is written: an empty (1, 0, D) tensor is no weight, and
        # transformers' Dinov2WithRegistersModel starts from that same empty table.
        out["embeddings.register_tokens"] = t["register_tokens"]
    swiglu = backbone.ffn_type == "swiglu"
    for i in range(backbone.num_layers):
        src, dst = f"blocks.{i}", f"encoder.layer.{i}"
        for kind in ("weight", "bias"):
            qkv = t[f"{src}.attn.qkv.{kind}"]
            for part, name in enumerate(("query", "key", "value")):
                out[f"{dst}.attention.attention.{name}.{kind}"] = qkv[part * dim:(part + 1) * dim]
            out[f"{dst}.attention.output.dense.{kind}"] = t[f"{src}.attn.proj.{kind}"]
            for name in ("norm1", "norm2"):
                out[f"{dst}.{name}.{kind}"] = t[f"{src}.{name}.{kind}"]
            pairs = ((("w12", "weights_in"), ("w3", "weights_out")) if swiglu
                     else (("fc1", "fc1"), ("fc2", "fc2")))
            for ours, theirs in pairs:
                out[f"{dst}.mlp.{theirs}.{kind}"] = t[f"{src}.mlp.{ours}.{kind}"]
        out[f"{dst}.layer_scale1.lambda1"] = t[f"{src}.ls1.gamma"]
        out[f"{dst}.layer_scale2.lambda1"] = t[f"{src}.ls2.gamma"]
    return {k: np.ascontiguousarray(v, dtype="float32") for k, v in out.items()}


def preprocessor_config(image_size, mean, std):
    """transformers' image processor for the model: resize, center crop, rescale, normalize."""
    return {
        "image_processor_type": "BitImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        # The reference's evaluation transform: resize to 256 / 224 of the crop, center crop.
        "size": {"shortest_edge": int(round(image_size * 256 / 224))},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": int(image_size), "width": int(image_size)},
        "do_rescale": True,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": True,
        "image_mean": [float(m) for m in mean],
        "image_std": [float(s) for s in std],
    }


def save_transformers(backbone, out_dir, mean, std):
    """Writes `backbone` as a transformers Dinov2Model / Dinov2WithRegistersModel folder.

    `transformers.AutoModel.from_pretrained(out_dir)` and keras-hub's
    `Backbone.from_preset(out_dir)` (its transformers converter) load the result.

    Example:
    >>> save_transformers(backbone, "export/transformers", IMAGENET_MEAN, IMAGENET_STD)
    """
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(transformers_config(backbone), f, indent=2)
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump(preprocessor_config(backbone.image_size, mean, std), f, indent=2)
    save_file(transformers_tensors(backbone), os.path.join(out_dir, SAFETENSORS_FILE),
              metadata={"format": "pt"})


def transformers_available():
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def verify_transformers(out_dir, backbone, verifier):
    """Loads `out_dir` with transformers (torch) and with keras-hub; compares both to `backbone`.

    Returns:
        list of str: what could not be checked (transformers or torch missing).
    """
    skipped = []
    native, other = probe_sizes(backbone)
    model_type, exact, why = transformers_model_type(backbone)
    if transformers_available():
        import torch
        import transformers

        model = transformers.AutoModel.from_pretrained(out_dir).eval()
        for size, is_native in ((native, True), (other, False)):
            images = probe_batch(size)
            pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
            with torch.no_grad():
                got = model(pixel_values=pixels).last_hidden_state.numpy()
            verifier.compare(f"transformers {type(model).__name__}", size, is_native, got,
                             backbone_tokens(backbone, images),
                             exact=is_native or exact, note="" if is_native else why)
    else:
        skipped.append("transformers (torch or transformers not installed)")

    import keras_hub

    loaded = keras_hub.models.Backbone.from_preset(out_dir)
    resized = keras_hub.models.Backbone.from_preset(out_dir, image_shape=(other, other, 3))
    kh_exact, kh_why = keras_hub_resize_is_exact(backbone.interpolation,
                                                 model_type != "dinov2")
    for model, size, is_native in ((loaded, native, True), (resized, other, False)):
        images = probe_batch(size)
        got = forward(model, {"images": images})
        verifier.compare("keras-hub from the transformers dir", size, is_native, got,
                         backbone_tokens(backbone, images), exact=is_native or kh_exact,
                         note="" if is_native else kh_why)
    return skipped
