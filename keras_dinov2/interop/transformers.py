"""Hugging Face transformers folders: `Dinov2Model`, `Dinov2WithRegistersModel` and `ViTModel` (DINO v1).

`config.json` is mapped to DINOv2Backbone arguments and checked; the weights (`model.safetensors`,
a sharded safetensors index, or `pytorch_model.bin`) are renamed to the torch-hub layout, with
the query, key and value projections fused, and copied through the torch-hub path. A `vit`
folder (facebook/dino-vits16 and the other DINO v1 conversions) becomes a backbone without
LayerScale or registers, with a zero mask token; its pooler, if any, is not part of the backbone.
"""

import os
import re

import numpy as np

from keras_dinov2.interop.architecture import (
    check_backbone_config,
    check_config_against_tensors,
    tensor_architecture,
)
from keras_dinov2.interop.files import (
    MAX_IMAGE_SIZE,
    MAX_MLP_RATIO,
    CheckpointError,
    folder_file,
    is_integer,
    read_json,
    read_safetensors,
    show_name,
    show_value,
)
from keras_dinov2.interop.torch_file import read_torch_state_dict
from keras_dinov2.interop.torch_hub import backbone_from_parts, complete_dino_v1

_HF_RENAMES = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.register_tokens$", "register_tokens"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale(\d)\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_in\.", r"blocks.\1.mlp.w12."),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_out\.", r"blocks.\1.mlp.w3."),
    (r"^encoder\.layer\.(\d+)\.(norm1|norm2|mlp\.fc1|mlp\.fc2)\.", r"blocks.\1.\2."),
    (r"^layernorm\.", "norm."),
    # ViTModel (DINO v1's conversions): the same blocks under BERT-style names.
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
]

_HF_QKV = re.compile(
    r"^encoder\.layer\.(\d+)\.attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)$"
)


def _hf_to_torch_hub(tensors, where="the transformers checkpoint"):
    """Renames a transformers Dinov2 state dict to the torch-hub layout (qkv fused)."""
    out, qkv = {}, {}
    for key, value in tensors.items():
        for prefix in ("dinov2.", "vit.", "model."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        # transformers 5 names a ViT's blocks `layers.N` in memory; its files keep `encoder.layer.N`.
        key = re.sub(r"^layers\.(\d+)\.", r"encoder.layer.\1.", key)
        match = _HF_QKV.match(key)
        if match:
            layer, long_name, short_name, kind = match.groups()
            part = "qkv".index((long_name or short_name)[0])
            qkv.setdefault((layer, kind), [None, None, None])[part] = value
            continue
        for pattern, replacement in _HF_RENAMES:
            new, count = re.subn(pattern, replacement, key)
            if count:
                out[new] = value
                break
        else:
            out[key] = value
    for (layer, kind), parts in qkv.items():
        kinds = "weights" if kind == "weight" else "biases"
        if any(p is None for p in parts):
            raise CheckpointError(f"{where}: layer {layer} lacks one of its query, key or value "
                                  f"{kinds}.")
        rank = 2 if kind == "weight" else 1
        if any(p.ndim != rank or p.shape != parts[0].shape for p in parts):
            raise CheckpointError(
                f"{where}: layer {layer}'s query, key and value {kinds} have shapes "
                f"{[p.shape for p in parts]}; expected three equal {rank}-d shapes."
            )
        out[f"blocks.{layer}.attn.qkv.{kind}"] = np.concatenate(parts, axis=0)
    return out


def _read_hf_tensors(folder):
    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(single):
        return read_safetensors(folder_file(folder, "model.safetensors", "weights file"))
    if os.path.exists(index):
        stored = read_json(folder_file(folder, "model.safetensors.index.json", "index"))
        weight_map = stored.get("weight_map") if isinstance(stored, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no `weight_map` object naming the shards.")
        shards = {}
        for tensor, name in weight_map.items():
            path = folder_file(folder, name, f"shard of {show_name(tensor)}")
            shards.setdefault(path, []).append(tensor)
        tensors = {}
        for path in sorted(shards):
            shard = read_safetensors(path)
            for key in shard:
                if key in tensors:
                    raise CheckpointError(f"{index}: tensor {show_name(key)} is stored in two shards.")
            absent = [t for t in shards[path] if t not in shard]
            if absent:
                raise CheckpointError(f"{index} places {show_name(absent[0])} in {path}, which lacks "
                                      "it.")
            tensors.update(shard)
        return tensors
    binary = os.path.join(folder, "pytorch_model.bin")
    if os.path.exists(binary):
        return read_torch_state_dict(folder_file(folder, "pytorch_model.bin", "weights file"))
    raise CheckpointError(
        f"{folder!r} has no model.safetensors, model.safetensors.index.json or "
        "pytorch_model.bin."
    )


# Our constructor argument -> transformers' config key, for messages.
_HF_NAMES = {
    "patch_size": "patch_size",
    "hidden_dim": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "mlp_ratio": "mlp_ratio",
    "ffn_type": "use_swiglu_ffn",
    "num_register_tokens": "num_register_tokens",
    "image_size": "image_size",
    "layer_scale_init": "layerscale_value",
    "layer_norm_epsilon": "layer_norm_eps",
}


def transformers_config_to_backbone_config(hf_config, where="config.json"):
    """Maps a transformers Dinov2 / Dinov2WithRegisters config dict to constructor arguments.

    Every field is checked for its type and bounds (`check_backbone_config`); the image size
    is kept as transformers reads it (its position grid is `image_size // patch_size`).

    Raises:
        CheckpointError: naming the field, the value and what is allowed.

    Example:
    >>> transformers_config_to_backbone_config(json.load(open("config.json")))
    """
    if not isinstance(hf_config, dict):
        raise CheckpointError(f"{where} holds a {type(hf_config).__name__}, not a JSON object.")
    model_type = hf_config.get("model_type")
    if model_type == "vit":
        return vit_config_to_backbone_config(hf_config, where)
    if model_type not in ("dinov2", "dinov2_with_registers"):
        raise CheckpointError(
            f"{where}: expected model_type 'dinov2', 'dinov2_with_registers' or 'vit', received "
            f"{show_name(model_type)}."
        )
    swiglu = hf_config.get("use_swiglu_ffn", False)
    if not isinstance(swiglu, bool):
        raise CheckpointError(f"{where}: use_swiglu_ffn={show_name(swiglu)} must be true or false.")
    act = hf_config.get("hidden_act", "gelu")
    if act != "gelu" and not swiglu:
        raise CheckpointError(f"{where}: unsupported hidden_act {show_name(act)}; expected 'gelu'.")
    # transformers' defaults where a key is absent (Dinov2WithRegistersConfig uses patch 16).
    default_patch = 16 if model_type == "dinov2_with_registers" else 14
    registers = hf_config.get("num_register_tokens", 0)
    config = {
        "patch_size": hf_config.get("patch_size", default_patch),
        "hidden_dim": hf_config.get("hidden_size", 768),
        "num_layers": hf_config.get("num_hidden_layers", 12),
        "num_heads": hf_config.get("num_attention_heads", 12),
        "mlp_ratio": hf_config.get("mlp_ratio", 4),
        "ffn_type": "swiglu" if swiglu else "mlp",
        "num_register_tokens": 0 if registers is None else registers,
        "image_size": hf_config.get("image_size", 224),
        "interpolation": "registers" if model_type == "dinov2_with_registers" else "transformers",
        "layer_scale_init": hf_config.get("layerscale_value", 1.0),
        "layer_norm_epsilon": hf_config.get("layer_norm_eps", 1e-6),
    }
    # transformers accepts an image size that is not a multiple of the patch: check the
    # rest first, then round the size down to the grid it actually uses.
    check_backbone_config({k: v for k, v in config.items() if k != "image_size"}, where,
                          _HF_NAMES)
    config["image_size"] = _grid_image_size(config, where)
    if config["layer_scale_init"] is None:
        raise CheckpointError(f"{where}: layerscale_value=None is out of bounds; expected a "
                              "finite number.")
    config["mlp_ratio"] = float(config["mlp_ratio"])
    config["layer_scale_init"] = float(config["layer_scale_init"])
    config["layer_norm_epsilon"] = float(config["layer_norm_epsilon"])
    check_backbone_config(config, where, _HF_NAMES)
    return config


def _grid_image_size(config, where):
    size, patch = config["image_size"], config["patch_size"]
    if not is_integer(size) or not patch <= size <= MAX_IMAGE_SIZE:
        raise CheckpointError(f"{where}: image_size={show_value(size)} is out of bounds; expected an "
                              f"integer in [patch_size={patch}, {MAX_IMAGE_SIZE}].")
    return size // patch * patch


# Our constructor argument -> ViTConfig's key, for messages (its other fields are fixed by the layout).
_VIT_NAMES = {field: _HF_NAMES[field] for field in
              ("patch_size", "hidden_dim", "num_layers", "num_heads", "image_size", "layer_norm_epsilon")}


def vit_config_to_backbone_config(hf_config, where="config.json"):
    """Maps a transformers ViT config dict (DINO v1's conversions) to constructor arguments.

    DINO v1's VisionTransformer: GELU MLP, qkv biases, no LayerScale, no registers, its CLS
    token drawn at 0.02 for further training. The position table is resampled by v1's own rule
    ("original": scale factor with the 0.1 offset, no antialias), which the official v1 models
    use; transformers' ViTModel (`interpolate_pos_encoding=True`) resamples to the output size
    instead ("transformers" here), so the two differ at interpolated sizes. Pass
    `interpolation="transformers"` to reproduce transformers.

    Raises:
        CheckpointError: naming the field, the value and what is allowed.

    Example:
    >>> vit_config_to_backbone_config(json.load(open("dino-vits16/config.json")))["patch_size"]   # 16
    """
    if not isinstance(hf_config, dict):
        raise CheckpointError(f"{where} holds a {type(hf_config).__name__}, not a JSON object.")
    act = hf_config.get("hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"{where}: unsupported hidden_act {show_name(act)}; expected 'gelu'.")
    for field, expected in (("qkv_bias", True), ("num_channels", 3)):
        value = hf_config.get(field, expected)
        if value is not expected and not (is_integer(value) and value == expected):
            raise CheckpointError(f"{where}: {field}={show_value(value)} is not supported; DINO v1's "
                                  f"ViT (and DINOv2Backbone) has {field}={expected!r}.")
    dim = hf_config.get("hidden_size", 768)
    intermediate = hf_config.get("intermediate_size", 3072)
    check_backbone_config({"hidden_dim": dim}, where, _VIT_NAMES)
    if not is_integer(intermediate) or not 1 <= intermediate <= dim * MAX_MLP_RATIO:
        raise CheckpointError(f"{where}: intermediate_size={show_value(intermediate)} is out of "
                              f"bounds; expected an integer in [1, {int(dim * MAX_MLP_RATIO)}].")
    ratio = intermediate / dim
    if int(dim * ratio) != intermediate:   # a ratio whose product rounds below the width
        ratio = (intermediate + 0.5) / dim
    config = {
        "patch_size": hf_config.get("patch_size", 16),
        "hidden_dim": dim,
        "num_layers": hf_config.get("num_hidden_layers", 12),
        "num_heads": hf_config.get("num_attention_heads", 12),
        "mlp_ratio": float(ratio),
        "ffn_type": "mlp",
        "num_register_tokens": 0,
        "image_size": hf_config.get("image_size", 224),
        "interpolation": "original",
        "layer_scale_init": None,
        "cls_token_init_std": 0.02,
        # ViTConfig's default; every DINO v1 folder stores its 1e-6.
        "layer_norm_epsilon": hf_config.get("layer_norm_eps", 1e-12),
    }
    check_backbone_config({k: v for k, v in config.items() if k != "image_size"}, where,
                          _VIT_NAMES)
    config["image_size"] = _grid_image_size(config, where)
    config["layer_norm_epsilon"] = float(config["layer_norm_epsilon"])
    check_backbone_config(config, where, _VIT_NAMES)
    return config


def _check_family(model_type, tensors, where):
    """Refuses a config.json whose model_type names the other layout than its tensors hold."""
    def first(*marks):
        return next((k for mark in marks for k in sorted(tensors) if mark in k), None)

    vit, dinov2 = first("layernorm_before", ".intermediate.dense."), first("layer_scale", ".norm1.")
    if model_type == "vit" and dinov2 and not vit:
        raise CheckpointError(
            f"{where}: model_type 'vit' (a ViTModel, DINO v1's layout) does not match the tensors, "
            f"which are a Dinov2Model's ({show_name(dinov2)}: LayerScale and norm1 names); expected "
            "model_type 'dinov2' or 'dinov2_with_registers' for them.")
    if model_type != "vit" and vit and not dinov2:
        raise CheckpointError(
            f"{where}: model_type {show_name(model_type)} does not match the tensors, which are a "
            f"ViTModel's ({show_name(vit)}: DINO v1's layout, no LayerScale); expected model_type "
            "'vit' for them.")


def _vit_to_torch_hub(tensors, where):
    """Renames a ViTModel state dict; the pooler is dropped and a zero mask token stands in."""
    tensors = {k: v for k, v in tensors.items()
               if not re.match(r"^(?:vit\.|model\.)?pooler\.", k)}
    out = _hf_to_torch_hub(tensors, where)
    mask = out.get("mask_token")
    if mask is not None and mask.ndim == 3 and mask.shape[:2] == (1, 1):
        out["mask_token"] = mask.reshape(1, -1)   # ViTModel(use_mask_token=True) keeps (1, 1, D)
    return out


def load_transformers_checkpoint(folder, **overrides):
    """Builds a DINOv2Backbone from a Hugging Face `Dinov2Model`, `Dinov2WithRegistersModel` or `ViTModel`.

    Reads `config.json` and the weights (`model.safetensors`, a sharded safetensors index, or
    `pytorch_model.bin`). The interpolation rule follows the port: "transformers" for
    `dinov2` (no 0.1 offset, no antialias: at interpolated sizes this differs from the
    official first release) and "registers" for `dinov2_with_registers`. A `vit` folder
    (DINO v1: facebook/dino-vits16, -vits8, -vitb16, -vitb8) keeps v1's own rule instead
    ("original", as the official v1 model; see `vit_config_to_backbone_config`). The config is
    checked against the tensors (depth, width, heads, registers, patch, position grid, and a
    model_type naming the other layout) before the model is built. An empty
    `register_tokens` tensor is accepted.

    Args:
        folder: str. A folder written by `save_pretrained`.
        **overrides: DINOv2Backbone constructor arguments.

    Raises:
        CheckpointError: a missing, malformed or inconsistent file, named in the message.

    Example:
    >>> backbone = load_transformers_checkpoint("dinov2-small")
    """
    return backbone_from_parts(*transformers_parts(folder, **overrides))


def transformers_parts(folder, **overrides):
    """Everything `load_transformers_checkpoint` reads and checks, short of building the model.

    Returns:
        (config, tensors, where), as `torch_hub_parts`.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder!r} is not a folder: a transformers checkpoint is a "
                              "folder holding config.json and the weights.")
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(f"{folder!r} has no config.json: not a transformers checkpoint "
                              "folder.")
    hf_config = read_json(folder_file(folder, "config.json", "config"))
    where = f"transformers checkpoint {folder}"
    vit = isinstance(hf_config, dict) and hf_config.get("model_type") == "vit"
    if vit:
        # The tensors first: a Dinov2 folder labelled 'vit' is named as such, not by a missing key.
        raw = _read_hf_tensors(folder)
        _check_family("vit", raw, config_path)
    config = transformers_config_to_backbone_config(hf_config, config_path)
    if not vit:
        raw = _read_hf_tensors(folder)
        _check_family(hf_config.get("model_type"), raw, config_path)
    tensors = _vit_to_torch_hub(raw, where) if vit else _hf_to_torch_hub(raw, where)
    arch = tensor_architecture(tensors, where)
    names = _VIT_NAMES if vit else _HF_NAMES
    check_config_against_tensors(config, arch, config_path, names)
    config = {**config, **overrides}
    if overrides:
        check_backbone_config(config, "the overrides")
        check_config_against_tensors(config, arch, "the overrides")
    complete_dino_v1(tensors, arch)
    return config, tensors, where
