"""Our own preset format: a keras-hub preset of DINOv2Backbone, optionally with the heads.

The backbone part is keras-hub's preset layout (config.json, model.weights.h5, metadata.json),
written by `DINOv2Backbone.save_to_preset` and read by `load_backbone(folder)` (that is,
`DINOv2Backbone.from_preset(folder)`) after `check_preset_folder`. The heads part is ours:
`heads.json` (the DINOHead configurations, the input width, the variable names and shapes) and
`heads.weights.npz` (the teacher's DINO head, the iBOT head when untied, and the two centers).
The reference never published its heads; with them a later run continues pretraining without
relearning the prototypes (`restore_heads`).
"""

import json
import os

import keras
import numpy as np

from keras_dinov2.interop.checks import HEADS_CONFIG_FILE, HEADS_WEIGHTS_FILE
from keras_dinov2.interop.files import CheckpointError, read_json, read_npz
from keras_dinov2.layers.dino_head import DINOHead

HEADS_FORMAT = "keras_dinov2.heads/1"
_HEAD_ARGS = ("num_prototypes", "hidden_dim", "bottleneck_dim", "num_layers", "use_bias",
              "epsilon", "use_bn")


def _head_config(head):
    config = head.get_config()
    return {k: config[k] for k in _HEAD_ARGS}


def _suffix(path):
    # Variable paths start with the head's own name ("teacher_dino_head/mlp_0/kernel").
    return path.split("/", 1)[1] if "/" in path else path


def save_heads(folder, dino_head, ibot_head=None, dino_center=None, ibot_center=None,
               source="teacher"):
    """Writes the DINO head (and an untied iBOT head, and the centers) next to a preset.

    Args:
        folder: str. The preset folder.
        dino_head: DINOHead (built).
        ibot_head: optional DINOHead. None or the same object when the heads are tied.
        dino_center: optional array (1, K). The softmax-centering EMA center.
        ibot_center: optional array (1, 1, K_ibot).
        source: str, default "teacher". Which network the heads come from, for the record.

    Example:
    >>> save_heads("export/keras_dinov2", pretrainer.teacher_dino_head)
    """
    tied = ibot_head is None or ibot_head is dino_head
    heads = {"dino_head": dino_head} if tied else {"dino_head": dino_head, "ibot_head": ibot_head}
    arrays, description = {}, {}
    for name, head in heads.items():
        entries = []
        for i, variable in enumerate(head.weights):
            arrays[f"{name}/{i:04d}"] = np.asarray(keras.ops.convert_to_numpy(variable))
            entries.append({"name": _suffix(variable.path), "shape": list(variable.shape)})
        description[name] = {"config": _head_config(head), "variables": entries}
    for name, value in (("dino_center", dino_center), ("ibot_center", ibot_center)):
        if value is not None:
            arrays[name] = np.asarray(keras.ops.convert_to_numpy(value), dtype="float32")
    input_dim = int(dino_head.mlp_layers[0].kernel.shape[0])
    config = {
        "format": HEADS_FORMAT,
        "source": source,
        "input_dim": input_dim,
        "ibot_separate_head": not tied,
        "heads": description,
        "centers": sorted(k for k in ("dino_center", "ibot_center") if k in arrays),
    }
    with open(os.path.join(folder, HEADS_CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, HEADS_WEIGHTS_FILE), "wb") as f:
        np.savez(f, **arrays)


_HEAD_BOUNDS = {"num_prototypes": (1, 1 << 20), "hidden_dim": (1, 1 << 14),
                "bottleneck_dim": (1, 1 << 14), "num_layers": (1, 16)}


def read_heads_config(path):
    """Reads and checks heads.json: its structure, every head's arguments and their bounds.

    Raises:
        CheckpointError: naming the file and the first entry that is missing or out of bounds.

    Example:
    >>> read_heads_config("export/keras_dinov2/heads.json")["heads"]["dino_head"]["config"]
    """
    config = read_json(path)

    def fail(what):
        raise CheckpointError(f"{path}: {what}")

    if not isinstance(config, dict):
        fail(f"holds a {type(config).__name__}, not a JSON object.")
    if config.get("format") != HEADS_FORMAT:
        fail(f"has format {config.get('format')!r:.60}, expected {HEADS_FORMAT!r}.")
    input_dim = config.get("input_dim")
    if not isinstance(input_dim, int) or isinstance(input_dim, bool) or not 1 <= input_dim <= 1 << 14:
        fail("input_dim must be an integer in [1, 16384].")
    if not isinstance(config.get("ibot_separate_head"), bool):
        fail("ibot_separate_head must be true or false.")
    heads = config.get("heads")
    wanted = ["dino_head"] + (["ibot_head"] if config["ibot_separate_head"] else [])
    if not isinstance(heads, dict) or sorted(heads) != sorted(wanted):
        fail(f"`heads` must hold exactly {wanted}.")
    for name, entry in heads.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
            fail(f"{name} has no `config` object.")
        if not isinstance(entry.get("variables"), list) or not all(
                isinstance(v, dict) and isinstance(v.get("name"), str)
                and isinstance(v.get("shape"), list) for v in entry["variables"]):
            fail(f"{name}'s `variables` must list objects with a name and a shape.")
        arguments = entry["config"]
        if sorted(arguments) != sorted(_HEAD_ARGS):
            fail(f"{name}'s config must hold exactly {list(_HEAD_ARGS)}.")
        for field, (low, high) in _HEAD_BOUNDS.items():
            value = arguments[field]
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                fail(f"{name} {field} must be an integer in [{low}, {high}].")
        for field in ("use_bias", "use_bn"):
            if not isinstance(arguments[field], bool):
                fail(f"{name} {field} must be true or false.")
        epsilon = arguments["epsilon"]
        if not isinstance(epsilon, (int, float)) or isinstance(epsilon, bool) or not 0 < epsilon < 1:
            fail(f"{name} epsilon must be a number in (0, 1).")
    centers = config.get("centers", [])
    if not isinstance(centers, list) or not set(centers) <= {"dino_center", "ibot_center"}:
        fail("`centers` must list dino_center and/or ibot_center.")
    return config


def exported_head_config(folder):
    """The `HeadConfig` fields of the heads exported in `folder`, or None when it has no heads.

    A run that continues pretraining from such an export must build heads of these sizes
    before `restore_heads` can copy them in.

    Example:
    >>> exported_head_config("export/keras_dinov2")["num_prototypes"]
    65536
    """
    path = os.path.join(os.fspath(folder), HEADS_CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    config = read_heads_config(path)
    dino = config["heads"]["dino_head"]["config"]
    out = {
        "num_prototypes": dino["num_prototypes"],
        "hidden_dim": dino["hidden_dim"],
        "bottleneck_dim": dino["bottleneck_dim"],
        "num_layers": dino["num_layers"],
        "ibot_separate_head": config["ibot_separate_head"],
        "use_bn": dino["use_bn"],
    }
    if out["ibot_separate_head"]:
        ibot = config["heads"]["ibot_head"]["config"]
        if (ibot["hidden_dim"], ibot["num_layers"]) != (dino["hidden_dim"], dino["num_layers"]):
            raise CheckpointError(
                f"{path}: the iBOT head's MLP ({ibot['hidden_dim']} wide, {ibot['num_layers']} "
                "layers) differs from the DINO head's; HeadConfig gives both the same MLP."
            )
        out["ibot_num_prototypes"] = ibot["num_prototypes"]
        out["ibot_bottleneck_dim"] = ibot["bottleneck_dim"]
    return out


def _head_size(arguments, input_dim):
    """The number of weights a DINOHead of these arguments holds, at least (its Dense kernels)."""
    hidden, bottleneck = arguments["hidden_dim"], arguments["bottleneck_dim"]
    widths = [input_dim] + [hidden] * (arguments["num_layers"] - 1) + [bottleneck]
    mlp = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    return mlp + bottleneck * arguments["num_prototypes"]


def load_heads(folder):
    """Loads the heads written by `save_heads` (or `export(..., heads=True)`).

    Returns:
        dict: "dino_head" (DINOHead), "ibot_head" (a second DINOHead when untied, else the
        same object), "ibot_separate_head" (bool), and "dino_center" / "ibot_center" (arrays)
        when saved.

    Raises:
        CheckpointError (a ValueError): naming the missing or broken file, or the first
            variable that does not fit.

    Example:
    >>> heads = load_heads("export/keras_dinov2")
    >>> heads["dino_head"](cls_tokens)   # prototype logits
    """
    config_path = os.path.join(folder, HEADS_CONFIG_FILE)
    weights_path = os.path.join(folder, HEADS_WEIGHTS_FILE)
    if not os.path.exists(config_path):
        raise CheckpointError(f"{config_path} is missing: this preset was exported without "
                              "heads (export with heads=True / --heads).")
    config = read_heads_config(config_path)
    if not os.path.exists(weights_path):
        raise CheckpointError(f"{weights_path} is missing: {config_path} has no weights "
                              "beside it.")
    data = read_npz(weights_path)
    stored = sum(int(v.size) for v in data.values())
    out = {"ibot_separate_head": config["ibot_separate_head"]}
    for name, entry in config["heads"].items():
        # The file must hold the weights the config describes before a head is built from it.
        needed = _head_size(entry["config"], config["input_dim"])
        if needed > stored:
            raise CheckpointError(f"{config_path}: {name} needs {needed} weights, "
                                  f"{weights_path} holds {stored} in all.")
        head = DINOHead(**entry["config"], name=name)
        head.build((None, config["input_dim"]))
        if len(head.weights) != len(entry["variables"]):
            raise CheckpointError(f"{config_path}: {name} lists {len(entry['variables'])} "
                                  f"variables, the head has {len(head.weights)}.")
        for i, (variable, listed) in enumerate(zip(head.weights, entry["variables"])):
            key = f"{name}/{i:04d}"
            if key not in data:
                raise CheckpointError(f"{weights_path} lacks {key} ({listed['name']!r:.60}).")
            value = data[key]
            if (_suffix(variable.path) != listed["name"]
                    or tuple(value.shape) != tuple(variable.shape)
                    or value.dtype.kind not in "fiub"):
                raise CheckpointError(
                    f"{weights_path}: {name} variable {i} is {listed['name']!r:.60} "
                    f"{tuple(value.shape)} {value.dtype}, the head expects "
                    f"{_suffix(variable.path)!r} {tuple(variable.shape)}."
                )
            variable.assign(value.astype("float32"))
        out[name] = head
    for name in config.get("centers", []):
        if name not in data or data[name].dtype.kind not in "fiub":
            raise CheckpointError(f"{weights_path} lacks the {name} that {config_path} lists.")
        out[name] = np.asarray(data[name], dtype="float32")
    out.setdefault("ibot_head", out["dino_head"])
    return out


def restore_heads(pretrainer, folder):
    """Copies exported heads (and centers) into a DINOv2Pretrainer's student and teacher.

    Continue pretraining from an export: build the backbone with
    `DINOv2Backbone.from_preset(folder, drop_path_rate=...)`, the pretrainer with the same
    head sizes as the exported run, then call this before `fit`.

    Raises:
        ValueError: when the pretrainer's heads differ in shape or in tying from the export.

    Example:
    >>> model = DINOv2Pretrainer(DINOv2Backbone.from_preset(folder), config)
    >>> restore_heads(model, folder)
    """
    heads = load_heads(folder)
    separate = pretrainer.student_ibot_head is not pretrainer.student_dino_head
    if separate != heads["ibot_separate_head"]:
        raise ValueError(
            f"The export in {folder} has {'untied' if heads['ibot_separate_head'] else 'tied'} "
            f"DINO and iBOT heads, the pretrainer's config.heads.ibot_separate_head is {separate}."
        )
    pairs = [("dino_head", pretrainer.student_dino_head, pretrainer.teacher_dino_head)]
    if separate:
        pairs.append(("ibot_head", pretrainer.student_ibot_head, pretrainer.teacher_ibot_head))
    for name, student, teacher in pairs:
        source = heads[name]
        for target in (student, teacher):
            if [tuple(v.shape) for v in target.weights] != [tuple(v.shape) for v in source.weights]:
                raise ValueError(
                    f"The exported {name} ({_head_config(source)}) does not fit the "
                    f"pretrainer's ({_head_config(target)}): match config.heads to the export."
                )
            for v, s in zip(target.weights, source.weights):
                v.assign(keras.ops.convert_to_numpy(s))
    for name, variable in (("dino_center", pretrainer.dino_center),
                           ("ibot_center", pretrainer.ibot_center)):
        if name in heads and tuple(heads[name].shape) == tuple(variable.shape):
            variable.assign(heads[name])
    return heads
