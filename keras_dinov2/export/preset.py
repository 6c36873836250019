"""Our own preset format: a keras-hub preset of DINOv2Backbone, optionally with the heads.

The backbone part is keras-hub's preset layout (config.json, model.weights.h5,
metadata.json), loaded by `keras_dinov2.DINOv2Backbone.from_preset(folder)`. The heads part is
ours: `heads.json` (the DINOHead configurations, the input width, the variable names and
shapes) and `heads.weights.npz` (the teacher's DINO head, the iBOT head when untied, and the
two centers). The reference never published its heads; with them a later run continues
pretraining without relearning the prototypes (`restore_heads`).
"""

import json
import os

import keras
import numpy as np

HEADS_CONFIG_FILE = "heads.json"
HEADS_WEIGHTS_FILE = "heads.weights.npz"
HEADS_FORMAT = "keras_dinov2.heads/1"
_HEAD_ARGS = ("num_prototypes", "hidden_dim", "bottleneck_dim", "num_layers", "use_bias",
              "epsilon", "use_bn")


def read_json(path):
    """Reads a JSON file; a missing or broken one raises ValueError naming the file.

    Example:
    >>> read_json("preset/config.json")["registered_name"]
    """
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist.")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        where = (f" ({error.msg} at line {error.lineno}, column {error.colno})"
                 if isinstance(error, json.JSONDecodeError) else "")
        raise ValueError(f"{path} is not valid JSON{where}.") from error


def check_preset_folder(folder):
    """Checks that a preset folder is complete and readable; returns its config.json.

    Recognizes keras presets (config.json with `registered_name`, weights in
    model.weights.h5 or a sharded model.weights.json) and transformers folders (config.json
    with `model_type`, weights in model.safetensors or its index). Every JSON file present is
    parsed, and the heads files must come as a pair.

    Raises:
        ValueError: naming the missing or broken file.

    Example:
    >>> check_preset_folder("export/keras_dinov2")["registered_name"]   # 'keras_dinov2>DINOv2Backbone'
    """
    if not os.path.isdir(folder):
        raise ValueError(f"{folder!r} is not a folder: a preset is a folder holding config.json.")
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise ValueError(f"{config_path} is missing: every preset folder needs a config.json.")
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, found {type(config).__name__}.")
    for name in ("metadata.json", "image_converter.json", "preprocessor_config.json",
                 HEADS_CONFIG_FILE):
        if os.path.exists(os.path.join(folder, name)):
            read_json(os.path.join(folder, name))
    if "registered_name" in config:
        weights = os.path.join(folder, "model.weights.h5")
        sharded = os.path.join(folder, "model.weights.json")
        if os.path.exists(sharded):
            read_json(sharded)
        elif not os.path.exists(weights):
            raise ValueError(
                f"{weights} is missing: the preset in {folder} has a config but no weights."
            )
        else:
            _check_h5(weights)
    elif "model_type" in config:
        single = os.path.join(folder, "model.safetensors")
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.exists(index):
            read_json(index)
        elif not os.path.exists(single):
            raise ValueError(
                f"{single} is missing: the transformers folder {folder} has a config but no "
                "weights."
            )
    else:
        raise ValueError(
            f"{config_path} has neither `registered_name` (a keras preset) nor `model_type` "
            "(a transformers folder)."
        )
    heads_config = os.path.join(folder, HEADS_CONFIG_FILE)
    heads_weights = os.path.join(folder, HEADS_WEIGHTS_FILE)
    if os.path.exists(heads_config) != os.path.exists(heads_weights):
        missing = heads_weights if os.path.exists(heads_config) else heads_config
        raise ValueError(f"{missing} is missing: the heads need both {HEADS_CONFIG_FILE} and "
                         f"{HEADS_WEIGHTS_FILE}.")
    return config


def _check_h5(path):
    import h5py

    try:
        with h5py.File(path, "r"):
            pass
    except OSError as error:
        raise ValueError(f"{path} is not a readable HDF5 weights file ({error}).") from error


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
    config = read_json(path)
    dino = config["heads"]["dino_head"]["config"]
    out = {
        "num_prototypes": int(dino["num_prototypes"]),
        "hidden_dim": int(dino["hidden_dim"]),
        "bottleneck_dim": int(dino["bottleneck_dim"]),
        "num_layers": int(dino["num_layers"]),
        "ibot_separate_head": bool(config["ibot_separate_head"]),
        "use_bn": bool(dino.get("use_bn", False)),
    }
    if out["ibot_separate_head"]:
        ibot = config["heads"]["ibot_head"]["config"]
        if (ibot["hidden_dim"], ibot["num_layers"]) != (dino["hidden_dim"], dino["num_layers"]):
            raise ValueError(
                f"{path}: the iBOT head's MLP ({ibot['hidden_dim']} wide, {ibot['num_layers']} layers) "
                f"differs from the DINO head's; HeadConfig gives both the same MLP."
            )
        out["ibot_num_prototypes"] = int(ibot["num_prototypes"])
        out["ibot_bottleneck_dim"] = int(ibot["bottleneck_dim"])
    return out


def load_heads(folder):
    """Loads the heads written by `save_heads` (or `export(..., heads=True)`).

    Returns:
        dict: "dino_head" (DINOHead), "ibot_head" (a second DINOHead when untied, else the
        same object), "ibot_separate_head" (bool), and "dino_center" / "ibot_center" (arrays)
        when saved.

    Raises:
        ValueError: naming the missing or broken file, or the first variable that does not fit.

    Example:
    >>> heads = load_heads("export/keras_dinov2")
    >>> heads["dino_head"](cls_tokens)   # prototype logits
    """
    from keras_dinov2.layers.dino_head import DINOHead

    config_path = os.path.join(folder, HEADS_CONFIG_FILE)
    weights_path = os.path.join(folder, HEADS_WEIGHTS_FILE)
    if not os.path.exists(config_path):
        raise ValueError(f"{config_path} is missing: this preset was exported without heads "
                         "(export with heads=True / --heads).")
    config = read_json(config_path)
    if config.get("format") != HEADS_FORMAT:
        raise ValueError(f"{config_path} has format {config.get('format')!r}, expected "
                         f"{HEADS_FORMAT!r}.")
    if not os.path.exists(weights_path):
        raise ValueError(f"{weights_path} is missing: {config_path} has no weights beside it.")
    try:
        data = np.load(weights_path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"{weights_path} is not a readable .npz file ({error}).") from error
    out = {"ibot_separate_head": bool(config["ibot_separate_head"])}
    with data:
        for name, entry in config["heads"].items():
            head = DINOHead(**entry["config"], name=name)
            head.build((None, int(config["input_dim"])))
            if len(head.weights) != len(entry["variables"]):
                raise ValueError(f"{config_path}: {name} lists {len(entry['variables'])} "
                                 f"variables, the head has {len(head.weights)}.")
            for i, (variable, stored) in enumerate(zip(head.weights, entry["variables"])):
                key = f"{name}/{i:04d}"
                if key not in data:
                    raise ValueError(f"{weights_path} lacks {key} ({stored['name']}).")
                value = data[key]
                if (_suffix(variable.path) != stored["name"]
                        or tuple(value.shape) != tuple(variable.shape)):
                    raise ValueError(
                        f"{weights_path}: {name} variable {i} is {stored['name']!r} "
                        f"{tuple(value.shape)}, the head expects {_suffix(variable.path)!r} "
                        f"{tuple(variable.shape)}."
                    )
                variable.assign(value)
            out[name] = head
        for name in config.get("centers", []):
            out[name] = np.asarray(data[name])
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
