"""Stock keras-hub `DINOV2Backbone` presets read into our DINOv2Backbone.

keras-hub builds its model from the preset (after `check_preset_folder` has checked the folder),
its variables are renamed to the torch-hub layout and copied into a DINOv2Backbone of the same
architecture through the torch-hub path, every key and shape checked.
"""

import os

import keras
import keras_hub
import numpy as np

from keras_dinov2.backbone import DINOv2Backbone
from keras_dinov2.interop.checks import KERAS_HUB_CLASS, check_preset_folder
from keras_dinov2.interop.files import CheckpointError, reading
from keras_dinov2.interop.torch_hub import assign_torch_hub_weights


def keras_hub_to_torch_hub(model):
    """keras-hub DINOV2Backbone weights -> {torch-hub key: array in torch layout}."""

    def value(variable):
        return np.asarray(keras.ops.convert_to_numpy(variable), dtype="float32")

    emb = model.embeddings
    dim = model.hidden_dim
    t = {
        "cls_token": value(emb.cls_token),
        "mask_token": (value(emb.mask_token) if model.use_mask_token
                       else np.zeros((1, dim), "float32")),
        # The stored table, for position_embedding_shape: the trained parameter.
        "pos_embed": value(emb.position_embeddings),
        "patch_embed.proj.weight": value(emb.patch_embeddings.projection.kernel).transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": value(emb.patch_embeddings.projection.bias),
    }
    if model.num_register_tokens:
        t["register_tokens"] = value(emb.register_tokens)

    def linear(layer, key):
        t[f"{key}.weight"] = value(layer.kernel).T
        t[f"{key}.bias"] = value(layer.bias)

    def norm(layer, key):
        t[f"{key}.weight"] = value(layer.gamma)
        t[f"{key}.bias"] = value(layer.beta)

    for i, layer in enumerate(model.encoder.layers):
        p = f"blocks.{i}"
        norm(layer.norm1, f"{p}.norm1")
        norm(layer.norm2, f"{p}.norm2")
        mha = layer.attention.attention
        t[f"{p}.attn.qkv.weight"] = np.concatenate(
            [value(d.kernel).reshape(dim, dim).T
             for d in (mha.query_dense, mha.key_dense, mha.value_dense)], axis=0)
        t[f"{p}.attn.qkv.bias"] = np.concatenate(
            [value(d.bias).reshape(dim) for d in (mha.query_dense, mha.key_dense, mha.value_dense)])
        t[f"{p}.attn.proj.weight"] = value(mha.output_dense.kernel).reshape(dim, dim).T
        t[f"{p}.attn.proj.bias"] = value(mha.output_dense.bias)
        t[f"{p}.ls1.gamma"] = value(layer.layer_scale1.lambda1)
        t[f"{p}.ls2.gamma"] = value(layer.layer_scale2.lambda1)
        if model.use_swiglu_ffn:
            linear(layer.mlp.weights_in, f"{p}.mlp.w12")
            linear(layer.mlp.weights_out, f"{p}.mlp.w3")
        else:
            linear(layer.mlp.fc1, f"{p}.mlp.fc1")
            linear(layer.mlp.fc2, f"{p}.mlp.fc2")
    norm(model.layernorm, "norm")
    return {k: np.ascontiguousarray(v) for k, v in t.items()}


def import_keras_hub_preset(folder, load_weights=True, **overrides):
    """Builds our DINOv2Backbone from a keras-hub DINOV2Backbone preset folder.

    Use it to continue pretraining (or to use masks and any input size) from keras-hub's
    weights. The position table taken is keras-hub's stored `position_embeddings`, for its
    `position_embedding_shape`, which becomes our `image_size`; the interpolation rule is
    "registers" when the preset resamples with antialias, else "transformers" (keras-hub's
    rules under the torch backend). Use `hf://` or `kaggle://` handles the same way.

    Args:
        folder: str. A folder (or handle) written by keras-hub's `save_to_preset`.
        load_weights: bool, default True. False builds the preset's architecture with random
            weights.
        **overrides: DINOv2Backbone constructor arguments (e.g. `drop_path_rate=0.3`).

    Returns:
        DINOv2Backbone with the preset's weights.

    Example:
    >>> backbone = import_keras_hub_preset("dinov2_keras_hub_preset")
    """
    if os.path.isdir(folder):
        config = check_preset_folder(folder)
        registered = config.get("registered_name")
        if registered != KERAS_HUB_CLASS:
            raise CheckpointError(
                f"{os.path.join(folder, 'config.json')} describes {registered!r}, not a keras-hub "
                f"DINOV2Backbone ({KERAS_HUB_CLASS!r})."
            )
    with reading(f"the keras-hub preset {folder}"):
        model = keras_hub.models.Backbone.from_preset(folder, load_weights=load_weights)
    if type(model).__name__ != "DINOV2Backbone":
        raise CheckpointError(f"{folder} holds a {type(model).__name__}, not a "
                              "DINOV2Backbone.")
    height, width = model.embeddings.position_embedding_shape
    if height != width:
        raise CheckpointError(
            f"{folder}: position_embedding_shape {model.position_embedding_shape} is not square; "
            "DINOv2 position tables are square."
        )
    config = {
        "patch_size": model.patch_size,
        "hidden_dim": model.hidden_dim,
        "num_layers": model.num_layers,
        "num_heads": model.num_heads,
        "mlp_ratio": model.intermediate_dim / model.hidden_dim,
        "ffn_type": "swiglu" if model.use_swiglu_ffn else "mlp",
        "num_register_tokens": model.num_register_tokens,
        "image_size": int(height),
        "interpolation": "registers" if model.antialias_in_interpolation else "transformers",
        "layer_scale_init": model.layer_scale_init_value,
        "layer_norm_epsilon": 1e-6,
    }
    backbone = DINOv2Backbone(**{**config, **overrides})
    if load_weights:
        assign_torch_hub_weights(backbone, keras_hub_to_torch_hub(model),
                                 source=f"keras-hub preset {folder}")
    return backbone
