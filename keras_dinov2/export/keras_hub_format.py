"""Stock keras-hub `DINOV2Backbone` presets: export our backbone into one, and import one.

keras-hub's DINOV2Backbone keeps two position tables: `position_embeddings` (the stored table,
for `position_embedding_shape`) and `interpolated_position_embeddings` (the table the model
adds, for its fixed `image_shape`). On save it overwrites the stored table with a resampling
of the interpolated one, but only when the signed sum of their difference is positive, so a
trained table can be silently dropped or degraded by a down-and-up resampling. The export
avoids that path entirely: `image_shape` equals `position_embedding_shape` (the backbone's own
`image_size`), both tables hold the same trained values, and the save is checked by reading
both tables back.
"""

import collections
import math
import os

import keras
import numpy as np

from keras_dinov2.convert import (
    MAX_IMAGE_SIZE,
    MAX_LAYERS,
    MAX_MLP_RATIO,
    MAX_PATCH_SIZE,
    MAX_POSITIONS,
    MAX_REGISTERS,
    MAX_WIDTH,
    CheckpointError,
    reading,
)
from keras_dinov2.export.layout import torch_hub_tensors
from keras_dinov2.export.preset import KERAS_HUB_CLASS, compare_shapes
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


def _keras_hub_grid(shape, patch, data_format, field, where):
    if not isinstance(shape, (list, tuple)) or len(shape) not in (2, 3):
        raise CheckpointError(f"{where}: {field} must be a list [height, width(, 3)], "
                              f"received a {type(shape).__name__}.")
    if len(shape) == 3 and data_format == "channels_first":
        shape = shape[1:]
    sides = shape[:2]
    if not all(isinstance(v, int) and not isinstance(v, bool) and patch <= v <= MAX_IMAGE_SIZE
               for v in sides):
        raise CheckpointError(f"{where}: {field}={list(shape)} must hold two integers in "
                              f"[patch_size={patch}, {MAX_IMAGE_SIZE}].")
    if (sides[0] // patch) * (sides[1] // patch) > MAX_POSITIONS:
        raise CheckpointError(f"{where}: {field}={list(shape)} makes more than {MAX_POSITIONS} "
                              "patches.")
    return sides[0] // patch, sides[1] // patch


def check_keras_hub_preset(config, shapes, where):
    """Checks a keras-hub DINOV2Backbone config against bounds and against its weight arrays.

    Runs before keras-hub builds anything from the config, so a hostile `num_layers` or
    `image_shape` fails at once with the field named.

    Args:
        config: dict. The `config` entry of the preset's config.json.
        shapes: {dataset path: shape} of model.weights.h5.
        where: str. The config file, for the message.

    Raises:
        CheckpointError: naming the field and what is allowed, or the arrays that differ.
    """
    def integer(field, low, high, default=None):
        value = config.get(field, default)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            shown = value if isinstance(value, (int, float, type(None))) else type(value).__name__
            raise CheckpointError(f"{where}: {field}={shown!r:.40} is out of bounds; expected an "
                                  f"integer in [{low}, {high}].")
        return value

    def flag(field, default):
        value = config.get(field, default)
        if not isinstance(value, bool):
            raise CheckpointError(f"{where}: {field} must be true or false.")
        return value

    patch = integer("patch_size", 1, MAX_PATCH_SIZE)
    depth = integer("num_layers", 1, MAX_LAYERS)
    dim = integer("hidden_dim", 1, MAX_WIDTH)
    heads = integer("num_heads", 1, dim)
    if dim % heads:
        raise CheckpointError(f"{where}: num_heads={heads} does not divide hidden_dim={dim}.")
    hidden = integer("intermediate_dim", 1, int(dim * MAX_MLP_RATIO))
    registers = integer("num_register_tokens", 0, MAX_REGISTERS, 0)
    mask, swiglu = flag("use_mask_token", True), flag("use_swiglu_ffn", False)
    for field in ("antialias_in_interpolation", "apply_layernorm"):
        flag(field, False)
    for field in ("dropout_rate", "drop_path_rate"):
        value = config.get(field, 0.0)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
            raise CheckpointError(f"{where}: {field} must be a number in [0, 1).")
    scale = config.get("layer_scale_init_value", 1.0)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise CheckpointError(f"{where}: layer_scale_init_value must be a finite number.")
    data_format = config.get("data_format")
    if data_format not in (None, "channels_last", "channels_first"):
        raise CheckpointError(f"{where}: data_format must be 'channels_last' or "
                              "'channels_first'.")
    image = _keras_hub_grid(config.get("image_shape", [224, 224, 3]), patch, data_format,
                            "image_shape", where)
    table = _keras_hub_grid(config.get("position_embedding_shape", [518, 518, 3]), patch,
                            data_format, "position_embedding_shape", where)
    if image[0] != image[1]:
        raise CheckpointError(f"{where}: image_shape must be square.")
    convs = [s for s in shapes.values() if len(s) == 4]
    if len(convs) == 1 and (convs[0][0], convs[0][3]) != (patch, dim):
        raise CheckpointError(f"{where}: patch_size={patch}, hidden_dim={dim} do not match the "
                              f"weights' patch projection {convs[0]}.")
    blocks = {p.split("/attention/", 1)[0] for p in shapes if "/query_dense/" in p}
    if blocks and len(blocks) != depth:
        raise CheckpointError(f"{where}: num_layers={depth} does not match the weights, which "
                              f"hold {len(blocks)} blocks.")
    expected = keras_hub_variable_shapes(
        patch=patch, depth=depth, dim=dim, heads=heads, hidden=hidden, registers=registers,
        mask=mask, swiglu=swiglu, image_grid=image, table_grid=table)
    summary = (f"a keras-hub DINOV2Backbone of {depth} layers, {dim} wide (patch {patch}, "
               f"{registers} registers, intermediate_dim {hidden})")
    compare_shapes(expected, shapes, where, summary)


def keras_hub_variable_shapes(patch, depth, dim, heads, hidden, registers, mask, swiglu,
                              image_grid, table_grid):
    """The shapes of keras-hub DINOV2Backbone's variables, without building it.

    Returns:
        collections.Counter mapping each shape to how many variables have it.
    """
    head_dim = dim // heads
    shapes = collections.Counter([
        (1, 1, dim), (1, table_grid[0] * table_grid[1] + 1, dim),
        (1, image_grid[0] * image_grid[1] + 1, dim), (patch, patch, 3, dim), (dim,),
        (dim,), (dim,)])
    if mask:
        shapes[(1, dim)] += 1
    if registers:
        shapes[(1, registers, dim)] += 1
    block = [(dim,)] * 6 + [(dim, heads, head_dim)] * 3 + [(heads, head_dim)] * 3
    block += [(heads, head_dim, dim), (dim,)]
    if swiglu:
        half = (int(hidden * 2 / 3) + 7) // 8 * 8
        block += [(dim, 2 * half), (2 * half,), (half, dim), (dim,)]
    else:
        block += [(dim, hidden), (hidden,), (hidden, dim), (dim,)]
    for shape, count in collections.Counter(block).items():
        shapes[shape] += count * depth
    return shapes


def import_keras_hub_preset(folder, **overrides):
    """Builds our DINOv2Backbone from a keras-hub DINOV2Backbone preset folder.

    Use it to continue pretraining (or to use masks and any input size) from keras-hub's
    weights. The position table taken is keras-hub's stored `position_embeddings`, for its
    `position_embedding_shape`, which becomes our `image_size`; the interpolation rule is
    "registers" when the preset resamples with antialias, else "transformers" (keras-hub's
    rules under the torch backend). Use `hf://` or `kaggle://` handles the same way.

    Args:
        folder: str. A folder (or handle) written by keras-hub's `save_to_preset`.
        **overrides: DINOv2Backbone constructor arguments (e.g. `drop_path_rate=0.3`).

    Returns:
        DINOv2Backbone with the preset's weights.

    Example:
    >>> backbone = import_keras_hub_preset("dinov2_keras_hub_preset")
    """
    from keras_dinov2.backbone import DINOv2Backbone
    from keras_dinov2.convert import assign_torch_hub_weights
    from keras_dinov2.export.preset import check_preset_folder

    if os.path.isdir(folder):
        config = check_preset_folder(folder)
        registered = config.get("registered_name")
        if registered != KERAS_HUB_CLASS:
            raise CheckpointError(
                f"{os.path.join(folder, 'config.json')} describes {registered!r}, not a keras-hub "
                f"DINOV2Backbone ({KERAS_HUB_CLASS!r})."
            )
    keras_hub = _keras_hub()
    with reading(f"the keras-hub preset {folder}"):
        model = keras_hub.models.Backbone.from_preset(folder)
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
    tensors = keras_hub_to_torch_hub(model)
    backbone = DINOv2Backbone(**{**config, **overrides})
    assign_torch_hub_weights(backbone, tensors, source=f"keras-hub preset {folder}")
    return backbone

