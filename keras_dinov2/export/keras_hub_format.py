"""Stock keras-hub `DINOV2Backbone` presets: export our backbone into one.

keras-hub's DINOV2Backbone keeps two position tables: `position_embeddings` (the stored table,
for `position_embedding_shape`) and `interpolated_position_embeddings` (the table the model
adds, for its fixed `image_shape`). On save it overwrites the stored table with a resampling
of the interpolated one, but only when the signed sum of their difference is positive, so a
trained table can be silently dropped or degraded by a down-and-up resampling. The export
avoids that path entirely: `image_shape` equals `position_embedding_shape` (the backbone's own
`image_size`), both tables hold the same trained values, and the save is checked by reading
both tables back. Reading such a preset back into our backbone is `keras_dinov2.interop`'s
`import_keras_hub_preset`.
"""

import keras
import numpy as np

from keras_dinov2.export.layout import torch_hub_tensors
from keras_dinov2.export.verify import (
    backbone_tokens,
    forward,
    keras_hub_resize_is_exact,
    probe_batch,
)


def _keras_hub():
    import keras_hub

    return keras_hub


def keras_hub_config(backbone):
    """Constructor arguments of the keras-hub `DINOV2Backbone` equivalent to `backbone`.

    Example:
    >>> keras_hub.models.DINOV2Backbone(**keras_hub_config(backbone))
    """
    if abs(float(backbone.layer_norm_epsilon) - 1e-6) > 1e-12:
        raise ValueError(
            "keras-hub's DINOV2Backbone fixes the LayerNorm epsilon at 1e-6; this backbone uses "
            f"layer_norm_epsilon={backbone.layer_norm_epsilon}, so it cannot be exported exactly."
        )
    size = int(backbone.image_size)
    return {
        "patch_size": int(backbone.patch_size),
        "num_layers": int(backbone.num_layers),
        "hidden_dim": int(backbone.hidden_dim),
        "num_heads": int(backbone.num_heads),
        # keras-hub derives the SwiGLU width from this the same way the reference does.
        "intermediate_dim": int(backbone.hidden_dim * backbone.mlp_ratio),
        "layer_scale_init_value": float(backbone.layer_scale_init or 1.0),
        "num_register_tokens": int(backbone.num_register_tokens),
        "use_mask_token": True,
        "use_swiglu_ffn": backbone.ffn_type == "swiglu",
        "dropout_rate": 0.0,
        "drop_path_rate": 0.0,
        # Equal shapes: the stored table is the table the model uses, never resampled on save.
        "image_shape": (size, size, 3),
        "position_embedding_shape": (size, size, 3),
        "antialias_in_interpolation": backbone.interpolation == "registers",
        "apply_layernorm": False,
        "data_format": "channels_last",
        "dtype": "float32",
    }


def _heads_split(kernel_t, heads):
    """(out, in) Linear weight -> keras MultiHeadAttention (in, heads, head_dim) kernel."""
    out_dim, in_dim = kernel_t.shape
    return kernel_t.T.reshape(in_dim, heads, out_dim // heads)


def to_keras_hub(backbone):
    """Builds a keras-hub `DINOV2Backbone` holding `backbone`'s weights.

    Args:
        backbone: DINOv2Backbone.

    Returns:
        keras_hub.models.DINOV2Backbone at `image_shape = (image_size, image_size, 3)`.

    Example:
    >>> hub_backbone = to_keras_hub(backbone)
    >>> hub_backbone({"images": images})   # (B, 1 + R + N, D), after the final norm
    """
    keras_hub = _keras_hub()
    t = torch_hub_tensors(backbone, layer_scale_ones=True)
    model = keras_hub.models.DINOV2Backbone(**keras_hub_config(backbone))
    heads, dim = backbone.num_heads, backbone.hidden_dim
    emb = model.embeddings
    emb.cls_token.assign(t["cls_token"])
    emb.mask_token.assign(t["mask_token"])
    emb.position_embeddings.assign(t["pos_embed"])
    emb.interpolated_position_embeddings.assign(t["pos_embed"])
    if backbone.num_register_tokens:
        emb.register_tokens.assign(t["register_tokens"])
    emb.patch_embeddings.projection.kernel.assign(t["patch_embed.proj.weight"].transpose(2, 3, 1, 0))
    emb.patch_embeddings.projection.bias.assign(t["patch_embed.proj.bias"])

    def linear(layer, key):
        layer.kernel.assign(t[f"{key}.weight"].T)
        layer.bias.assign(t[f"{key}.bias"])

    def norm(layer, key):
        layer.gamma.assign(t[f"{key}.weight"])
        layer.beta.assign(t[f"{key}.bias"])

    for i, layer in enumerate(model.encoder.layers):
        p = f"blocks.{i}"
        norm(layer.norm1, f"{p}.norm1")
        norm(layer.norm2, f"{p}.norm2")
        mha = layer.attention.attention
        qkv_w, qkv_b = t[f"{p}.attn.qkv.weight"], t[f"{p}.attn.qkv.bias"]
        for part, dense in enumerate((mha.query_dense, mha.key_dense, mha.value_dense)):
            rows = slice(part * dim, (part + 1) * dim)
            dense.kernel.assign(_heads_split(qkv_w[rows], heads))
            dense.bias.assign(qkv_b[rows].reshape(heads, dim // heads))
        mha.output_dense.kernel.assign(t[f"{p}.attn.proj.weight"].T.reshape(heads, dim // heads, dim))
        mha.output_dense.bias.assign(t[f"{p}.attn.proj.bias"])
        layer.layer_scale1.lambda1.assign(t[f"{p}.ls1.gamma"])
        layer.layer_scale2.lambda1.assign(t[f"{p}.ls2.gamma"])
        if backbone.ffn_type == "swiglu":
            linear(layer.mlp.weights_in, f"{p}.mlp.w12")
            linear(layer.mlp.weights_out, f"{p}.mlp.w3")
        else:
            linear(layer.mlp.fc1, f"{p}.mlp.fc1")
            linear(layer.mlp.fc2, f"{p}.mlp.fc2")
    norm(model.layernorm, "norm")
    return model


def image_converter(image_size, mean, std):
    """keras-hub `DINOV2ImageConverter`: resize to `image_size`, then (x / 255 - mean) / std."""
    keras_hub = _keras_hub()
    return keras_hub.layers.DINOV2ImageConverter(
        image_size=(int(image_size), int(image_size)),
        scale=[1.0 / (255.0 * s) for s in std],
        offset=[-m / s for m, s in zip(mean, std)],
        interpolation="bicubic",
        antialias=True,
        crop_to_aspect_ratio=True,
    )


def save_keras_hub_preset(backbone, out_dir, mean, std):
    """Writes a keras-hub DINOV2Backbone preset (and its image converter) for `backbone`.

    The folder holds config.json, model.weights.h5, metadata.json and image_converter.json;
    `keras_hub.models.Backbone.from_preset(out_dir)` loads it with keras-hub alone. The saved
    position table is read back and compared bit for bit with the source's.

    Example:
    >>> save_keras_hub_preset(backbone, "export/keras_hub", IMAGENET_MEAN, IMAGENET_STD)
    """
    model = to_keras_hub(backbone)
    model.save_to_preset(out_dir)
    image_converter(backbone.image_size, mean, std).save_to_preset(out_dir)
    return model


def verify_keras_hub_preset(out_dir, backbone, verifier, target="keras-hub preset"):
    """Loads `out_dir` with keras-hub and compares it with `backbone` at both probe sizes.

    Also checks that both position tables keras-hub restored equal the source's exactly
    (the save path that can drop trained values).
    """
    from keras_dinov2.export.verify import ExportVerificationError, probe_sizes

    keras_hub = _keras_hub()
    loaded = keras_hub.models.Backbone.from_preset(out_dir)
    if type(loaded).__name__ != "DINOV2Backbone":
        raise ExportVerificationError(
            f"{out_dir} loads as {type(loaded).__name__}, not keras-hub's DINOV2Backbone."
        )
    table = np.asarray(keras.ops.convert_to_numpy(backbone.embeddings.position_embedding))
    for name in ("position_embeddings", "interpolated_position_embeddings"):
        stored = np.asarray(keras.ops.convert_to_numpy(getattr(loaded.embeddings, name)))
        if stored.shape != table.shape or not np.array_equal(stored, table):
            raise ExportVerificationError(
                f"keras-hub restored `{name}` from {out_dir} with other values than the "
                "trained position table: the export would lose trained position embeddings."
            )
    native, other = probe_sizes(backbone)
    _compare_keras_hub(loaded, backbone, native, True, verifier, target)
    resized = keras_hub.models.Backbone.from_preset(out_dir, image_shape=(other, other, 3))
    exact, why = keras_hub_resize_is_exact(
        backbone.interpolation, resized.antialias_in_interpolation)
    _compare_keras_hub(resized, backbone, other, False, verifier, target, exact, why)
    return loaded


def _compare_keras_hub(model, backbone, size, native, verifier, target, exact=True, note=""):
    images = probe_batch(size)
    got = forward(model, {"images": images})
    verifier.compare(target, size, native, got, backbone_tokens(backbone, images), exact, note)
