"""Load official DINOv2 weights: torch-hub `.pth` state dicts and Hugging Face folders.

Both readers work under any Keras backend and without torch: `.pth` files are read from
their zip archive with an unpickler that only rebuilds tensors (no arbitrary objects), and
Hugging Face folders through safetensors. Every tensor is first renamed to the torch-hub
layout, then copied into a `DINOv2Backbone` with its shape checked.
"""

import json
import os
import pickle
import re
import zipfile

import numpy as np

from keras_dinov2.backbone import DINOv2Backbone
from keras_dinov2.layers.embeddings import grid_side
from keras_dinov2.layers.feedforward import swiglu_hidden_dim

# Storage classes a state dict may name, with their element types.
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name):
        self.dtype = _STORAGE_DTYPES[name]


def _rebuild_tensor(storage, offset, size, stride, *unused):
    """Rebuilds a tensor as a NumPy view of its storage (torch._utils._rebuild_tensor_v2)."""
    itemsize = storage.dtype.itemsize
    if not size:
        return storage[offset].copy()
    strides = tuple(s * itemsize for s in stride)
    return np.lib.stride_tricks.as_strided(storage[offset:], tuple(size), strides).copy()


def _rebuild_parameter(data, requires_grad=None, hooks=None, *unused):
    return data


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict, refusing every global that is not a tensor part."""

    def __init__(self, file, archive, prefix):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(
            f"Refusing to load {module}.{name}: a DINOv2 checkpoint holds only tensors."
        )

    def persistent_load(self, pid):
        # ("storage", storage_type, key, location, numel)
        _, storage_type, key, _, _ = pid
        raw = self._archive.read(f"{self._prefix}/data/{key}")
        if storage_type.dtype == "bfloat16":
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            return bits.view(np.float32)
        return np.frombuffer(raw, dtype=np.dtype(storage_type.dtype).newbyteorder("<"))


def read_torch_state_dict(path):
    """Reads a `torch.save` state dict (zip format) into a dict of NumPy arrays, without torch.

    Args:
        path: str. A `.pth` / `.bin` file written by `torch.save(state_dict, path)`.

    Returns:
        dict mapping parameter names to NumPy arrays (bfloat16 tensors become float32).

    Example:
    >>> tensors = read_torch_state_dict("dinov2_vits14_pretrain.pth")
    >>> tensors["pos_embed"].shape   # (1, 1370, 384)
    """
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path!r} is not a zip-format torch checkpoint (torch >= 1.6 writes that format)."
        )
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if not pickles:
            raise ValueError(f"{path!r} has no data.pkl: not a torch checkpoint.")
        prefix = pickles[0][: -len("/data.pkl")]
        with archive.open(pickles[0]) as file:
            state = _StateDictUnpickler(file, archive, prefix).load()
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"{path!r} does not hold a state dict.")
    return {k: np.asarray(v) for k, v in state.items()}


def _normalize_torch_hub_keys(tensors):
    """Drops wrapper prefixes and the block-chunk level of chunked checkpoints."""
    out = {}
    for key, value in tensors.items():
        for prefix in ("module.", "backbone.", "teacher.backbone.", "student.backbone."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        match = re.match(r"blocks\.(\d+)\.(\d+)\.(.*)", key)
        if match:
            key = f"blocks.{match.group(2)}.{match.group(3)}"
        out[key] = value
    return out


def _infer_torch_hub_config(tensors):
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if key not in tensors:
            raise ValueError(f"Not a DINOv2 state dict: the key {key!r} is missing.")
    dim = int(tensors["cls_token"].shape[-1])
    patch = int(tensors["patch_embed.proj.weight"].shape[-1])
    blocks = {int(m.group(1)) for k in tensors if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        raise ValueError("Not a DINOv2 state dict: no `blocks.{i}` keys.")
    swiglu = "blocks.0.mlp.w12.weight" in tensors
    if swiglu:
        hidden = tensors["blocks.0.mlp.w12.weight"].shape[0] // 2
        ratio = 4.0 if swiglu_hidden_dim(dim, 4.0) == hidden else hidden * 1.5 / dim
    else:
        ratio = tensors["blocks.0.mlp.fc1.weight"].shape[0] / dim
    registers = int(tensors["register_tokens"].shape[1]) if "register_tokens" in tensors else 0
    return {
        "patch_size": patch,
        "hidden_dim": dim,
        "num_layers": max(blocks) + 1,
        "num_heads": max(dim // 64, 1),
        "mlp_ratio": float(ratio),
        "ffn_type": "swiglu" if swiglu else "mlp",
        "num_register_tokens": registers,
        "image_size": grid_side(tensors["pos_embed"].shape[1]) * patch,
        "interpolation": "registers" if registers else "original",
        "layer_scale_init": 1.0 if "blocks.0.ls1.gamma" in tensors else None,
    }


def _linear(prefix):
    return [(f"{prefix}.weight", "kernel", "linear"), (f"{prefix}.bias", "bias", "plain")]


def _norm(prefix):
    return [(f"{prefix}.weight", "gamma", "plain"), (f"{prefix}.bias", "beta", "plain")]


def _torch_hub_layout(backbone):
    """Pairs each backbone variable with its torch-hub key and the transform it needs."""
    emb = backbone.embeddings
    pairs = [
        ("cls_token", emb.cls_token, "plain"),
        ("mask_token", emb.mask_token, "plain"),
        ("pos_embed", emb.position_embedding, "plain"),
        ("patch_embed.proj.weight", emb.patch_embedding.projection.kernel, "conv"),
        ("patch_embed.proj.bias", emb.patch_embedding.projection.bias, "plain"),
    ]
    if backbone.num_register_tokens:
        pairs.append(("register_tokens", emb.register_tokens, "plain"))

    def add(layer, specs):
        for key, attr, how in specs:
            pairs.append((key, getattr(layer, attr), how))

    for i, block in enumerate(backbone.transformer_blocks):
        p = f"blocks.{i}"
        add(block.norm1, _norm(f"{p}.norm1"))
        add(block.attn.qkv, _linear(f"{p}.attn.qkv"))
        add(block.attn.proj, _linear(f"{p}.attn.proj"))
        add(block.norm2, _norm(f"{p}.norm2"))
        if block.ffn_type == "mlp":
            add(block.mlp.fc1, _linear(f"{p}.mlp.fc1"))
            add(block.mlp.fc2, _linear(f"{p}.mlp.fc2"))
        else:
            add(block.mlp.w12, _linear(f"{p}.mlp.w12"))
            add(block.mlp.w3, _linear(f"{p}.mlp.w3"))
        if block.ls1 is not None:
            pairs.append((f"{p}.ls1.gamma", block.ls1.gamma, "plain"))
            pairs.append((f"{p}.ls2.gamma", block.ls2.gamma, "plain"))
    add(backbone.norm, _norm("norm"))
    return pairs


def _to_keras(value, how):
    if how == "linear":
        return value.T
    if how == "conv":
        return value.transpose(2, 3, 1, 0)
    return value


def _torch_shape(keras_shape, how):
    if how == "linear":
        return keras_shape[::-1]
    if how == "conv":
        kh, kw, cin, cout = keras_shape
        return (cout, cin, kh, kw)
    return keras_shape


def assign_torch_hub_weights(backbone, tensors, source="checkpoint"):
    """Copies torch-hub-named tensors into `backbone`, checking every key and shape.

    Args:
        backbone: DINOv2Backbone.
        tensors: dict of NumPy arrays named as in the reference's state dict.
        source: str, default "checkpoint". Named in error messages.

    Example:
    >>> assign_torch_hub_weights(backbone, read_torch_state_dict(path))
    """
    layout = _torch_hub_layout(backbone)
    for key, variable, how in layout:
        if key not in tensors:
            raise ValueError(f"The {source} has no tensor {key!r}, which the backbone needs.")
        value = np.asarray(tensors[key], dtype="float32")
        expected = _torch_shape(tuple(variable.shape), how)
        if tuple(value.shape) != expected:
            raise ValueError(
                f"Shape mismatch for {key!r} in the {source}: it holds {tuple(value.shape)}, "
                f"the backbone expects {expected}."
            )
        value = _to_keras(value, how)
        variable.assign(value)
    used = {key for key, _, _ in layout}
    unused = sorted(k for k in tensors if k not in used)
    if unused:
        raise ValueError(
            f"The {source} has tensors the backbone does not use, first {unused[0]!r} "
            f"({len(unused)} in all). Check the architecture overrides."
        )


def load_torch_hub_checkpoint(path, **overrides):
    """Builds a DINOv2Backbone from an official torch-hub `.pth` state dict.

    The architecture is read from the tensor shapes: width from the CLS token, patch size
    from the patch projection, depth from the block indices, heads = width / 64 (as every
    released model), SwiGLU from `mlp.w12` keys, registers from `register_tokens`, the base
    grid from the position table, and the interpolation rule of the release ("registers"
    with registers, "original" without). Keyword arguments override any of it (for example
    `drop_path_rate=0.3` to continue pretraining, or `dtype="mixed_bfloat16"`).

    Args:
        path: str. A `dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth` file or any state dict in
            that layout (prefixes `module.`, `backbone.`, `teacher.backbone.` are dropped).
        **overrides: DINOv2Backbone constructor arguments.

    Returns:
        DINOv2Backbone with the checkpoint's weights.

    Example:
    >>> backbone = load_torch_hub_checkpoint("dinov2_vits14_pretrain.pth")
    """
    tensors = _normalize_torch_hub_keys(read_torch_state_dict(path))
    config = {**_infer_torch_hub_config(tensors), **overrides}
    backbone = DINOv2Backbone(**config)
    assign_torch_hub_weights(backbone, tensors, source=f"checkpoint {os.path.basename(path)}")
    return backbone


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
]

_HF_QKV = re.compile(
    r"^encoder\.layer\.(\d+)\.attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)$"
)


def _hf_to_torch_hub(tensors):
    """Renames a transformers Dinov2 state dict to the torch-hub layout (qkv fused)."""
    out, qkv = {}, {}
    for key, value in tensors.items():
        for prefix in ("dinov2.", "model."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
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
        if any(p is None for p in parts):
            raise ValueError(f"Layer {layer} lacks one of its query, key or value {kind}s.")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = np.concatenate(parts, axis=0)
    return out


def _read_hf_tensors(folder):
    from safetensors.numpy import load_file

    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(single):
        return load_file(single)
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        tensors = {}
        for name in files:
            tensors.update(load_file(os.path.join(folder, name)))
        return tensors
    binary = os.path.join(folder, "pytorch_model.bin")
    if os.path.exists(binary):
        return read_torch_state_dict(binary)
    raise ValueError(
        f"{folder!r} has no model.safetensors, model.safetensors.index.json or "
        "pytorch_model.bin."
    )


def transformers_config_to_backbone_config(hf_config):
    """Maps a transformers Dinov2 / Dinov2WithRegisters config dict to constructor arguments.

    Example:
    >>> transformers_config_to_backbone_config(json.load(open("config.json")))
    """
    model_type = hf_config.get("model_type")
    if model_type not in ("dinov2", "dinov2_with_registers"):
        raise ValueError(
            "Expected a config with model_type 'dinov2' or 'dinov2_with_registers', received "
            f"{model_type!r}."
        )
    if hf_config.get("hidden_act", "gelu") != "gelu" and not hf_config.get("use_swiglu_ffn"):
        raise ValueError(f"Unsupported hidden_act {hf_config['hidden_act']!r}; expected 'gelu'.")
    registers = int(hf_config.get("num_register_tokens", 0) or 0)
    # transformers' defaults where a key is absent (Dinov2WithRegistersConfig uses patch 16).
    default_patch = 16 if model_type == "dinov2_with_registers" else 14
    return {
        "patch_size": int(hf_config.get("patch_size", default_patch)),
        "hidden_dim": int(hf_config.get("hidden_size", 768)),
        "num_layers": int(hf_config.get("num_hidden_layers", 12)),
        "num_heads": int(hf_config.get("num_attention_heads", 12)),
        "mlp_ratio": float(hf_config.get("mlp_ratio", 4)),
        "ffn_type": "swiglu" if hf_config.get("use_swiglu_ffn", False) else "mlp",
        "num_register_tokens": registers,
        "image_size": int(hf_config.get("image_size", 224)),
        "interpolation": "registers" if model_type == "dinov2_with_registers" else "transformers",
        "layer_scale_init": float(hf_config.get("layerscale_value", 1.0)),
        "layer_norm_epsilon": float(hf_config.get("layer_norm_eps", 1e-6)),
    }


def load_transformers_checkpoint(folder, **overrides):
    """Builds a DINOv2Backbone from a Hugging Face `Dinov2Model` or `Dinov2WithRegistersModel`.

    Reads `config.json` and the weights (`model.safetensors`, a sharded safetensors index, or
    `pytorch_model.bin`). The interpolation rule follows the port: "transformers" for
    `dinov2` (no 0.1 offset, no antialias: at interpolated sizes this differs from the
    official first release) and "registers" for `dinov2_with_registers`.

    Args:
        folder: str. A folder written by `save_pretrained`.
        **overrides: DINOv2Backbone constructor arguments.

    Example:
    >>> backbone = load_transformers_checkpoint("dinov2-small")
    """
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise ValueError(f"{folder!r} has no config.json: not a transformers checkpoint folder.")
    with open(config_path) as f:
        hf_config = json.load(f)
    config = {**transformers_config_to_backbone_config(hf_config), **overrides}
    tensors = _hf_to_torch_hub(_read_hf_tensors(folder))
    backbone = DINOv2Backbone(**config)
    assign_torch_hub_weights(backbone, tensors, source=f"transformers checkpoint {folder}")
    return backbone
