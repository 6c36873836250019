"""Official torch-hub `.pth` state dicts, and the torch-hub layout every other format goes through.

`torch_hub_layout` pairs every DINOv2Backbone variable with its key in the reference's state
dict; every reader renames its tensors to those keys and copies them in with
`assign_torch_hub_weights`, every key and shape checked. DINO v1's state dicts share the layout
less the mask token and the LayerScale gammas, and are recognized by that.
"""

import os
import re

import numpy as np

from keras_dinov2.backbone import DINOv2Backbone
from keras_dinov2.interop.architecture import (
    check_backbone_config,
    check_config_against_tensors,
    tensor_architecture,
)
from keras_dinov2.interop.files import MAX_LAYERS, CheckpointError
from keras_dinov2.interop.torch_file import read_torch_state_dict
from keras_dinov2.layers.feedforward import swiglu_hidden_dim


def _normalize_torch_hub_keys(tensors):
    """Drops wrapper prefixes and the block-chunk level of chunked checkpoints."""
    out = {}
    for key, value in tensors.items():
        for prefix in ("module.", "backbone.", "teacher.backbone.", "student.backbone."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        match = re.match(r"blocks\.(\d{1,6})\.(\d{1,6})\.(.*)", key)
        if match:
            key = f"blocks.{match.group(2)}.{match.group(3)}"
        out[key] = value
    return out


def _infer_torch_hub_config(arch):
    dim, hidden = arch["hidden_dim"], arch["ffn_hidden"]
    if arch["ffn_type"] == "swiglu":
        ratio = 4.0 if swiglu_hidden_dim(dim, 4.0) == hidden else hidden * 1.5 / dim
    else:
        ratio = hidden / dim
    registers = arch["num_register_tokens"]
    return {
        "patch_size": arch["patch_size"],
        "hidden_dim": dim,
        "num_layers": arch["num_layers"],
        "num_heads": max(dim // 64, 1),
        "mlp_ratio": float(ratio),
        "ffn_type": arch["ffn_type"],
        "num_register_tokens": registers,
        "image_size": arch["grid"] * arch["patch_size"],
        "interpolation": "registers" if registers else "original",
        "layer_scale_init": 1.0 if arch["layer_scale"] else None,
        # Only a new training run from these weights would draw a CLS token; v1 drew it at 0.02.
        "cls_token_init_std": 0.02 if arch["family"] == "dino_v1" else 1e-6,
    }


def complete_dino_v1(tensors, arch):
    """Adds the zero mask token a DINO v1 state dict lacks (v1 never masks patches).

    DINOv2Backbone always holds a mask token (iBOT masking, the Dinov2 export formats); a zero
    one that no input uses leaves every output of the v1 model unchanged.

    Args:
        tensors: dict of torch-hub-named arrays, changed in place.
        arch: dict from `tensor_architecture(tensors, ...)`.

    Example:
    >>> complete_dino_v1(tensors, tensor_architecture(tensors, "dino_deitsmall16_pretrain.pth"))
    """
    if arch["family"] == "dino_v1" and "mask_token" not in tensors:
        tensors["mask_token"] = np.zeros((1, arch["hidden_dim"]), "float32")


def _linear(prefix):
    return [(f"{prefix}.weight", "kernel", "linear"), (f"{prefix}.bias", "bias", "plain")]


def _norm(prefix):
    return [(f"{prefix}.weight", "gamma", "plain"), (f"{prefix}.bias", "beta", "plain")]


def torch_hub_layout(backbone):
    """Pairs each backbone variable with its torch-hub key and the transform it needs.

    Returns:
        list of (key, variable, how): `how` is "linear" (a Dense kernel, the transpose of a
        torch Linear weight), "conv" (the patch projection, torch's (out, in, kh, kw) order
        against Keras' (kh, kw, in, out)) or "plain" (the same array).

    Example:
    >>> [key for key, _, _ in torch_hub_layout(backbone)][:3]   # cls_token, mask_token, pos_embed
    """
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
    layout = torch_hub_layout(backbone)
    for key, variable, how in layout:
        if key not in tensors:
            raise CheckpointError(f"The {source} has no tensor {key!r}, which the backbone needs.")
        value = np.asarray(tensors[key])
        if value.dtype.kind not in "fiub":
            raise CheckpointError(f"The {source}'s {key!r} holds {value.dtype} values, not real "
                                  "numbers.")
        value = value.astype("float32", copy=False)
        expected = _torch_shape(tuple(variable.shape), how)
        if tuple(value.shape) != expected:
            raise CheckpointError(
                f"Shape mismatch for {key!r} in the {source}: it holds {tuple(value.shape)}, "
                f"the backbone expects {expected}."
            )
        value = _to_keras(value, how)
        variable.assign(value)
    used = {key for key, _, _ in layout}
    unused = sorted(k for k in tensors if k not in used)
    if unused:
        raise CheckpointError(
            f"The {source} has tensors the backbone does not use, first {unused[0]!r} "
            f"({len(unused)} in all). Check the architecture overrides."
        )


def load_torch_hub_checkpoint(path, **overrides):
    """Builds a DINOv2Backbone from an official torch-hub `.pth` state dict.

    The architecture is read from the tensor shapes: width from the CLS token, patch size
    from the patch projection, depth from the block indices, heads = width / 64 (as every
    released model), SwiGLU from `mlp.w12` keys, registers from `register_tokens`, the base
    grid from the position table, and the interpolation rule of the release ("registers"
    with registers, "original" without). A state dict with neither mask token nor LayerScale
    gammas is DINO v1's (`dino_deitsmall16_pretrain.pth` and the other v1 releases): it loads
    without LayerScale, with a zero mask token, and with v1's CLS-token init for any further
    training. Keyword arguments override any of it (for example `drop_path_rate=0.3` to
    continue pretraining, or `dtype="mixed_bfloat16"`). The result is checked against the
    tensors before the model is built: a DINOv2 architecture forced on a v1 file (or the
    reverse) is refused with every field that differs named.

    Args:
        path: str. A `dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth` or DINO v1
            `dino_{deitsmall,vitbase}{16,8}_pretrain.pth` file, or any state dict in that
            layout (prefixes `module.`, `backbone.`, `teacher.backbone.` are dropped).
        **overrides: DINOv2Backbone constructor arguments.

    Returns:
        DINOv2Backbone with the checkpoint's weights.

    Raises:
        CheckpointError: the file is malformed, or the overrides do not fit its tensors.

    Example:
    >>> backbone = load_torch_hub_checkpoint("dinov2_vits14_pretrain.pth")
    """
    return backbone_from_parts(*torch_hub_parts(path, **overrides))


def backbone_from_parts(config, tensors, where, load_weights=True):
    """Builds a DINOv2Backbone from a reader's checked (config, tensors, where) and copies the tensors in.

    Args:
        config: dict of DINOv2Backbone arguments, checked against the tensors.
        tensors: dict of torch-hub-named arrays.
        where: str. The source, for messages.
        load_weights: bool, default True. False keeps the random initial weights.

    Example:
    >>> backbone = backbone_from_parts(*torch_hub_parts("dinov2_vits14_pretrain.pth"))
    """
    backbone = DINOv2Backbone(**config)
    if load_weights:
        assign_torch_hub_weights(backbone, tensors, source=where)
    return backbone


def torch_hub_parts(path, **overrides):
    """Everything `load_torch_hub_checkpoint` reads and checks, short of building the model.

    Returns:
        (config, tensors, where): checked DINOv2Backbone arguments, the torch-hub-named
        tensors, and the source's name for messages. `DINOv2Backbone(**config)` followed by
        `assign_torch_hub_weights(backbone, tensors, where)` completes the load.
    """
    where = f"checkpoint {os.path.basename(os.fspath(path))}"
    tensors = _normalize_torch_hub_keys(read_torch_state_dict(path))
    arch = tensor_architecture(tensors, where)
    if arch["num_layers"] > MAX_LAYERS:
        raise CheckpointError(f"{where}: the tensors hold {arch['num_layers']} blocks; at most "
                              f"{MAX_LAYERS} are supported.")
    config = {**_infer_torch_hub_config(arch), **overrides}
    check_backbone_config(config, where)
    check_config_against_tensors(config, arch, where)
    complete_dino_v1(tensors, arch)
    return config, tensors, where
