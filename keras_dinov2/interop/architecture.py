"""A backbone's architecture: what torch-hub-named tensors show, what a config says, whether they agree.

Every reader checks a configuration against sane bounds and against the tensors present before a
model is built, so a hostile `num_hidden_layers=1000000` fails at once instead of allocating for
minutes.
"""

import collections
import math
import re

from keras_dinov2.interop.files import (
    MAX_IMAGE_SIZE,
    MAX_LAYERS,
    MAX_MLP_RATIO,
    MAX_PATCH_SIZE,
    MAX_POSITIONS,
    MAX_REGISTERS,
    MAX_WIDTH,
    CheckpointError,
    is_integer,
    show_name,
    show_value,
)
from keras_dinov2.layers.feedforward import swiglu_hidden_dim
from keras_dinov2.layers.interpolation import INTERPOLATION_MODES


def tensor_architecture(tensors, where):
    """Reads the architecture off torch-hub-named tensors, checking their ranks and shapes.

    Returns a dict: hidden_dim, patch_size, grid (side of the position grid), registers,
    num_layers, ffn_type, ffn_hidden (hidden width of the feed-forward, per SwiGLU half),
    layer_scale (bool), mask_token (bool) and family: "dino_v1" for DINO v1's layout (no
    LayerScale gammas, no mask token, no registers), else "dinov2". An empty `register_tokens`
    (1, 0, D) is dropped from `tensors`.
    """
    def need(key, rank):
        if key not in tensors:
            raise CheckpointError(f"{where} has no tensor {key!r}: not a DINOv2 state dict.")
        value = tensors[key]
        if value.ndim != rank:
            raise CheckpointError(f"{where}: {key!r} has shape {value.shape}, expected "
                                  f"{rank} dimensions.")
        return value

    for key, value in tensors.items():
        if value.dtype.kind not in "fiub":
            raise CheckpointError(f"{where}: {show_name(key)} holds {value.dtype} values, not real "
                                  "numbers.")
    cls = need("cls_token", 3)
    dim = int(cls.shape[2])
    if cls.shape[:2] != (1, 1) or dim < 1:
        raise CheckpointError(f"{where}: 'cls_token' has shape {cls.shape}, expected (1, 1, D).")
    kernel = need("patch_embed.proj.weight", 4)
    patch = int(kernel.shape[2])
    if kernel.shape != (dim, 3, patch, patch) or patch < 1:
        raise CheckpointError(
            f"{where}: 'patch_embed.proj.weight' has shape {kernel.shape}, expected "
            f"({dim}, 3, p, p) for the width {dim} of 'cls_token'."
        )
    pos = need("pos_embed", 3)
    positions = int(pos.shape[1]) - 1
    grid = math.isqrt(max(positions, 0))
    if pos.shape[0] != 1 or pos.shape[2] != dim or grid < 1 or grid * grid != positions:
        raise CheckpointError(
            f"{where}: 'pos_embed' has shape {pos.shape}, expected (1, 1 + M * M, {dim}) for a "
            "square grid of M x M patches."
        )
    registers = 0
    if "register_tokens" in tensors:
        tokens = need("register_tokens", 3)
        if tokens.shape[0] != 1 or tokens.shape[2] != dim:
            raise CheckpointError(f"{where}: 'register_tokens' has shape {tokens.shape}, "
                                  f"expected (1, R, {dim}).")
        registers = int(tokens.shape[1])
        if not registers:
            # Written for a model without registers (an empty (1, 0, D) table): nothing to load.
            del tensors["register_tokens"]
    found = {int(m.group(1)) for k in tensors if (m := re.match(r"blocks\.(\d{1,6})\.", k))}
    if not found:
        raise CheckpointError(f"{where}: no `blocks.{{i}}` tensors; not a DINOv2 state dict.")
    missing = sorted(set(range(max(found) + 1)) - found)
    if missing:
        raise CheckpointError(
            f"{where}: the tensors name blocks up to blocks.{max(found)} but blocks.{missing[0]} "
            f"is absent ({len(missing)} missing); the block indices must run from 0."
        )
    depth = max(found) + 1
    if "blocks.0.mlp.w12.weight" in tensors:
        w12 = need("blocks.0.mlp.w12.weight", 2)
        ffn, hidden = "swiglu", int(w12.shape[0]) // 2
        if w12.shape[0] % 2:
            raise CheckpointError(f"{where}: 'blocks.0.mlp.w12.weight' has shape {w12.shape}; "
                                  "its rows must be the two SwiGLU halves.")
    elif "blocks.0.mlp.fc1.weight" in tensors:
        ffn, hidden = "mlp", int(need("blocks.0.mlp.fc1.weight", 2).shape[0])
    else:
        raise CheckpointError(f"{where}: block 0 has neither 'mlp.fc1' nor 'mlp.w12' weights.")
    layer_scale, mask_token = "blocks.0.ls1.gamma" in tensors, "mask_token" in tensors
    return {
        "hidden_dim": dim,
        "patch_size": patch,
        "grid": grid,
        "num_register_tokens": registers,
        "num_layers": depth,
        "ffn_type": ffn,
        "ffn_hidden": hidden,
        "layer_scale": layer_scale,
        "mask_token": mask_token,
        "family": "dinov2" if layer_scale or mask_token or registers else "dino_v1",
    }


def ffn_hidden(config):
    """The hidden width of a config's feed-forward (per SwiGLU half for "swiglu")."""
    dim, ratio = config["hidden_dim"], config["mlp_ratio"]
    if config["ffn_type"] == "swiglu":
        return swiglu_hidden_dim(dim, ratio)
    return int(dim * ratio)


# Constructor arguments a config may carry, with their type and bounds.
_INT_FIELDS = {
    "patch_size": (1, MAX_PATCH_SIZE),
    "hidden_dim": (1, MAX_WIDTH),
    "num_layers": (1, MAX_LAYERS),
    "num_heads": (1, MAX_WIDTH),
    "num_register_tokens": (0, MAX_REGISTERS),
    "image_size": (1, MAX_IMAGE_SIZE),
}
_FLOAT_FIELDS = {
    "mlp_ratio": (0.0, MAX_MLP_RATIO),
    "layer_norm_epsilon": (0.0, 1.0),
    "position_embedding_init_std": (0.0, 10.0),
    "cls_token_init_std": (0.0, 10.0),
}


def check_backbone_config(config, where, names=None):
    """Checks DINOv2Backbone constructor arguments against their types and sane bounds.

    Only the fields present are checked, so it serves a full config and a few overrides.

    Args:
        config: dict of DINOv2Backbone arguments.
        where: str. Names the file or source in the message.
        names: optional dict, our field name -> the name the source uses (e.g.
            "num_layers" -> "num_hidden_layers" for transformers), for the message.

    Raises:
        CheckpointError: naming the field, the value and the allowed range.

    Example:
    >>> check_backbone_config({"num_layers": 1000000}, "config.json")   # raises
    """
    names = names or {}

    def fail(field, value, expected):
        raise CheckpointError(f"{where}: {names.get(field, field)}={show_value(value)} is out of "
                              f"bounds; expected {expected}.")

    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: the configuration is a {type(config).__name__}, "
                              "not a JSON object.")
    for field, (low, high) in _INT_FIELDS.items():
        if field in config:
            value = config[field]
            if not is_integer(value) or not low <= value <= high:
                fail(field, value, f"an integer in [{low}, {high}]")
    for field, (low, high) in _FLOAT_FIELDS.items():
        if field in config:
            value = config[field]
            if (not isinstance(value, (int, float)) or isinstance(value, bool)
                    or not math.isfinite(value) or not low < value <= high):
                fail(field, value, f"a number in ({low}, {high}]")
    if "layer_scale_init" in config and config["layer_scale_init"] is not None:
        value = config["layer_scale_init"]
        if (not isinstance(value, (int, float)) or isinstance(value, bool)
                or not math.isfinite(value)):
            fail("layer_scale_init", value, "a finite number or null")
    if "drop_path_rate" in config:
        value = config["drop_path_rate"]
        if (not isinstance(value, (int, float)) or isinstance(value, bool)
                or not 0.0 <= value < 1.0):
            fail("drop_path_rate", value, "a number in [0, 1)")
    if "ffn_type" in config and config["ffn_type"] not in ("mlp", "swiglu"):
        fail("ffn_type", config["ffn_type"], "'mlp' or 'swiglu'")
    if "interpolation" in config and config["interpolation"] not in INTERPOLATION_MODES:
        fail("interpolation", config["interpolation"], f"one of {INTERPOLATION_MODES}")
    for field in ("drop_path_uniform", "subset_drop_path"):
        if field in config and not isinstance(config[field], bool):
            fail(field, config[field], "true or false")
    if "hidden_dim" in config and "num_heads" in config:
        if config["hidden_dim"] % config["num_heads"]:
            raise CheckpointError(
                f"{where}: {names.get('num_heads', 'num_heads')}={config['num_heads']} does not "
                f"divide {names.get('hidden_dim', 'hidden_dim')}={config['hidden_dim']}."
            )
    if "image_size" in config and "patch_size" in config:
        size, patch = config["image_size"], config["patch_size"]
        if patch > size or size % patch or (size // patch) ** 2 > MAX_POSITIONS:
            raise CheckpointError(
                f"{where}: {names.get('image_size', 'image_size')}={size} must be a multiple of "
                f"{names.get('patch_size', 'patch_size')}={patch} with at most "
                f"{MAX_POSITIONS} patches."
            )


def check_config_against_tensors(config, arch, where, names=None):
    """Checks a full DINOv2Backbone config against the architecture its tensors show.

    Every field that disagrees is named in the one message, and when the tensors are of the
    other family (a DINO v1 state dict given a DINOv2 architecture, or the reverse) the message
    says so: patch size, LayerScale gammas and position grid differ together then.

    Args:
        config: dict of DINOv2Backbone arguments (already within bounds).
        arch: dict from the tensors (`tensor_architecture`).
        where: str. Names the source in the message.
        names: optional dict, our field name -> the source's field name.

    Raises:
        CheckpointError: naming each field that disagrees, its value, and what the tensors hold.

    Example:
    >>> v2 = ARCHITECTURES["dinov2_vit_small14"]["config"]
    >>> check_config_against_tensors(v2, tensor_architecture(v1_tensors, "x.pth"), "x.pth")
    CheckpointError: x.pth: patch_size=14 does not match the tensors, which hold a 16 x 16 ...
    """
    names = names or {}
    problems = []

    def fail(field, says):
        value = config[field]
        if field == "ffn_type" and names.get(field) == "use_swiglu_ffn":
            value = value == "swiglu"
        shown = f"{names.get(field, field)}={show_value(value)}"
        problems.append(f"{shown} does not match the tensors, which {says}")

    if config["hidden_dim"] != arch["hidden_dim"]:
        fail("hidden_dim", f"are {arch['hidden_dim']} wide")
    if config["num_layers"] != arch["num_layers"]:
        fail("num_layers", f"hold {arch['num_layers']} blocks")
    if config["patch_size"] != arch["patch_size"]:
        fail("patch_size", f"hold a {arch['patch_size']} x {arch['patch_size']} patch "
                           "projection")
    if config.get("num_register_tokens", 0) != arch["num_register_tokens"]:
        fail("num_register_tokens", f"hold {arch['num_register_tokens']} register tokens")
    if config["image_size"] // config["patch_size"] != arch["grid"]:
        fail("image_size", f"hold a {arch['grid']} x {arch['grid']} position grid "
                           f"({arch['grid'] * arch['patch_size']} pixels)")
    if config.get("ffn_type", "mlp") != arch["ffn_type"]:
        fail("ffn_type", f"hold a {arch['ffn_type']} feed-forward")
    if ffn_hidden({"mlp_ratio": 4.0, "ffn_type": "mlp", **config}) != arch["ffn_hidden"]:
        fail("mlp_ratio", f"hold a feed-forward {arch['ffn_hidden']} wide")
    layer_scale = config.get("layer_scale_init", 1e-5) is not None
    if layer_scale != arch["layer_scale"]:
        fail("layer_scale_init", "have " + ("" if arch["layer_scale"] else "no ") +
             "LayerScale gammas (blocks.N.ls1.gamma, ls2.gamma)")
    if not problems:
        return
    message = f"{where}: {'; '.join(problems)}."
    family = arch.get("family")
    if family == "dino_v1" and layer_scale:
        message += (" The tensors are a DINO v1 backbone (no LayerScale, no mask token; patch "
                    "16 or 8 at 224 px), the configuration a DINOv2 one: load the file without "
                    "overrides, or as a dino_vit_* architecture.")
    elif family == "dinov2" and not layer_scale and arch["layer_scale"]:
        message += (" The tensors are a DINOv2 backbone (LayerScale gammas, a mask token), the "
                    "configuration a DINO v1 one (no LayerScale): load the file without "
                    "overrides, or as a dinov2_vit_* architecture.")
    raise CheckpointError(message)


def backbone_variable_shapes(config):
    """The shapes of a DINOv2Backbone's variables, from its config, without building it.

    Lets a reader compare a preset's config with the arrays in its weights file before a
    model is built (a config claiming a million blocks fails here, at no cost).

    Args:
        config: dict of DINOv2Backbone arguments, within bounds (`check_backbone_config`).

    Returns:
        collections.Counter mapping each shape to how many variables have it.

    Example:
    >>> backbone_variable_shapes({"hidden_dim": 384, ...})[(384, 1152)]   # one qkv per block
    """
    dim, patch = config["hidden_dim"], config["patch_size"]
    grid = config["image_size"] // patch
    registers = config.get("num_register_tokens", 0)
    hidden = ffn_hidden(config)
    shapes = collections.Counter([(1, 1, dim), (1, dim), (1, grid * grid + 1, dim),
                                  (patch, patch, 3, dim), (dim,), (dim,), (dim,)])
    if registers:
        shapes[(1, registers, dim)] += 1
    block = [(dim,)] * 4 + [(dim, 3 * dim), (3 * dim,), (dim, dim), (dim,)]
    if config.get("ffn_type", "mlp") == "swiglu":
        block += [(dim, 2 * hidden), (2 * hidden,), (hidden, dim), (dim,)]
    else:
        block += [(dim, hidden), (hidden,), (hidden, dim), (dim,)]
    if config.get("layer_scale_init", 1e-5) is not None:
        block += [(dim,), (dim,)]
    for shape, count in collections.Counter(block).items():
        shapes[shape] += count * config["num_layers"]
    return shapes
