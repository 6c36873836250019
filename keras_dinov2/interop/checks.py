"""Checks of a preset folder before anything is built from it: complete, readable, consistent.

Keras presets (ours and keras-hub's DINOV2Backbone) have their config.json checked against sane
bounds and against the arrays in the weights file; transformers folders must hold their weights.
"""

import collections
import inspect
import math
import os

from keras_dinov2.backbone import DINOv2Backbone
from keras_dinov2.interop.architecture import backbone_variable_shapes, check_backbone_config
from keras_dinov2.interop.files import (
    MAX_IMAGE_SIZE,
    MAX_LAYERS,
    MAX_MLP_RATIO,
    MAX_PATCH_SIZE,
    MAX_POSITIONS,
    MAX_REGISTERS,
    MAX_WIDTH,
    CheckpointError,
    folder_file,
    h5_shapes,
    read_json,
)

OUR_CLASS = "keras_dinov2>DINOv2Backbone"
KERAS_HUB_CLASS = "keras_hub>DINOV2Backbone"
HEADS_CONFIG_FILE = "heads.json"
HEADS_WEIGHTS_FILE = "heads.weights.npz"

def check_preset_folder(folder):
    """Checks that a preset folder is complete, readable and consistent; returns its config.json.

    Recognizes keras presets (config.json with `registered_name`, weights in
    model.weights.h5 or a sharded model.weights.json) and transformers folders (config.json
    with `model_type`, weights in model.safetensors or its index). Every JSON file present is
    parsed, and the heads files must come as a pair. For our DINOv2Backbone and keras-hub's
    DINOV2Backbone the architecture in config.json is checked against sane bounds and
    against the arrays in the weights file, before any model is built from it.

    Raises:
        CheckpointError (a ValueError): naming the missing, broken or inconsistent file.

    Example:
    >>> check_preset_folder("export/keras_dinov2")["registered_name"]   # 'keras_dinov2>DINOv2Backbone'
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder!r} is not a folder: a preset is a folder holding "
                              "config.json.")
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(f"{config_path} is missing: every preset folder needs a "
                              "config.json.")
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object, found "
                              f"{type(config).__name__}.")
    for name in ("metadata.json", "image_converter.json", "preprocessor_config.json",
                 HEADS_CONFIG_FILE):
        if os.path.exists(os.path.join(folder, name)):
            read_json(os.path.join(folder, name))
    if "registered_name" in config:
        shapes = _keras_weight_shapes(folder)
        registered = config["registered_name"]
        if registered in (OUR_CLASS, KERAS_HUB_CLASS):
            arguments = config.get("config")
            if not isinstance(arguments, dict):
                raise CheckpointError(f"{config_path}: `config` must be a JSON object of "
                                      f"{registered} arguments.")
            if registered == OUR_CLASS:
                check_backbone_preset(arguments, shapes, config_path)
            else:
                check_keras_hub_preset(arguments, shapes, config_path)
    elif "model_type" in config:
        single = os.path.join(folder, "model.safetensors")
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.exists(index):
            read_json(index)
        elif not os.path.exists(single) and not os.path.exists(
                os.path.join(folder, "pytorch_model.bin")):
            raise CheckpointError(
                f"{single} is missing: the transformers folder {folder} has a config but no "
                "weights."
            )
    else:
        raise CheckpointError(
            f"{config_path} has neither `registered_name` (a keras preset) nor `model_type` "
            "(a transformers folder)."
        )
    heads_config = os.path.join(folder, HEADS_CONFIG_FILE)
    heads_weights = os.path.join(folder, HEADS_WEIGHTS_FILE)
    if os.path.exists(heads_config) != os.path.exists(heads_weights):
        missing = heads_weights if os.path.exists(heads_config) else heads_config
        raise CheckpointError(f"{missing} is missing: the heads need both {HEADS_CONFIG_FILE} "
                              f"and {HEADS_WEIGHTS_FILE}.")
    return config


def _keras_weight_shapes(folder):
    """{dataset path: shape} of every array in a keras preset's weights (single or sharded)."""
    weights = os.path.join(folder, "model.weights.h5")
    sharded = os.path.join(folder, "model.weights.json")
    if os.path.exists(sharded):
        stored = read_json(sharded)
        weight_map = stored.get("weight_map") if isinstance(stored, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{sharded} has no `weight_map` object naming the shards.")
        files = set()
        for value in weight_map.values():
            files.update(value if isinstance(value, list) else [value])
        shapes = {}
        for name in sorted(files, key=str):
            path = folder_file(folder, name, "weights shard")
            shapes.update({f"{name}:{k}": v for k, v in h5_shapes(path).items()})
        return shapes
    if not os.path.exists(weights):
        raise CheckpointError(
            f"{weights} is missing: the preset in {folder} has a config but no weights."
        )
    return h5_shapes(folder_file(folder, "model.weights.h5", "weights file"))


def _shape_list(counter):
    return ", ".join(f"{n} x {shape}" if n > 1 else str(shape)
                     for shape, n in sorted(counter.items(), key=str)[:4])


def compare_shapes(expected, shapes, where, summary):
    """Refuses a weights file whose arrays differ from what the config's architecture needs.

    Args:
        expected: collections.Counter of shapes the config needs.
        shapes: {dataset path: shape} in the file.
        where: str. The config file, for the message.
        summary: str. The config's architecture in words, for the message.
    """
    found = collections.Counter(shapes.values())
    if found == expected:
        return
    lacking, extra = expected - found, found - expected
    parts = []
    if lacking:
        parts.append(f"it lacks arrays of shape {_shape_list(lacking)}")
    if extra:
        parts.append(f"it holds arrays of shape {_shape_list(extra)} the config does not use")
    raise CheckpointError(f"{where} describes {summary}, but the weights do not match: "
                          f"{'; '.join(parts)}.")


def check_backbone_preset(arguments, shapes, where):
    """Checks our DINOv2Backbone preset config against bounds and against its weight arrays.

    Raises:
        CheckpointError: naming the field or the arrays that do not fit.
    """
    defaults = {name: p.default for name, p in
                inspect.signature(DINOv2Backbone.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    config = {**defaults, **arguments}
    check_backbone_config(config, where)
    convs = [s for s in shapes.values() if len(s) == 4]
    if len(convs) == 1:
        patch, _, _, width = convs[0]
        for field, value in (("hidden_dim", width), ("patch_size", patch)):
            if config[field] != value:
                raise CheckpointError(f"{where}: {field}={config[field]} does not match the "
                                      f"weights' patch projection {convs[0]}.")
    blocks = {path.rsplit("/attn/qkv/", 1)[0] for path in shapes if "/attn/qkv/" in path}
    if blocks and len(blocks) != config["num_layers"]:
        raise CheckpointError(f"{where}: num_layers={config['num_layers']} does not match the "
                              f"weights, which hold {len(blocks)} blocks.")
    summary = (f"a {config['num_layers']}-block backbone {config['hidden_dim']} wide "
               f"(patch {config['patch_size']}, image_size {config['image_size']}, "
               f"{config['num_register_tokens']} registers, {config['ffn_type']}, "
               f"mlp_ratio {config['mlp_ratio']})")
    compare_shapes(backbone_variable_shapes(config), shapes, where, summary)


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
