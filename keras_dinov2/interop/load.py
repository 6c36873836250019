"""`load_backbone(source)`: the one way a DINOv2Backbone is loaded, whatever holds its weights.

The command line, the exporter and `DINOv2Backbone.from_preset` all come here (from_preset through
the backbone's preset-loader registry, which this module fills when it is imported). A source is
told apart without reading it first: an architecture name, a local folder (our preset, a keras-hub
DINOV2Backbone preset, a transformers Dinov2 or ViT (DINO v1) folder, or a finished run directory), or a URI that
keras-hub's preset loader resolves (`hf://`, `kaggle://`).
"""

import difflib
import os

import keras

from keras_dinov2.backbone import ARCHITECTURES, DINOv2Backbone, register_preset_loader
from keras_dinov2.interop.checks import KERAS_HUB_CLASS, check_preset_folder
from keras_dinov2.interop.files import CheckpointError, reading
from keras_dinov2.interop.keras_hub import import_keras_hub_preset
from keras_dinov2.interop.torch_hub import backbone_from_parts, load_torch_hub_checkpoint
from keras_dinov2.interop.transformers import transformers_parts


class UnknownSourceError(ValueError):
    """A source that is no architecture name, no folder and no URI: nothing could be read from it.

    The message names the source and the closest architecture names; the command line puts the
    flag that gave the source in front of it.

    Example:
    >>> load_backbone("dinov2_vit_smal14")   # UnknownSourceError: ... did you mean dinov2_vit_small14? ...
    """


def check_source(source):
    """Refuses, in one line, a source that is no architecture name, folder or URI.

    keras-hub's own message for an unknown name is a page long; this one suggests the closest
    architecture names.

    Raises:
        UnknownSourceError: naming the source and the architectures.

    Example:
    >>> check_source("dinov2_vit_tiny")   # ... did you mean dinov2_vit_tiny4? ...
    """
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str) and (source in ARCHITECTURES or "://" in source or os.path.isdir(source)):
        return
    close = difflib.get_close_matches(source, list(ARCHITECTURES), n=2) if isinstance(source, str) else []
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise UnknownSourceError(
        f"{source!r} is not an architecture, a folder or an hf:// URI; {hint}architectures: "
        f"{', '.join(ARCHITECTURES)}."
    )


def load_architecture(name, load_weights=True, **overrides):
    """A backbone of a named architecture: random weights, or the official release's.

    With `load_weights=True` the official torch-hub checkpoint (DINOv2's, or DINO v1's for the
    `dino_vit_*` names) is downloaded once (into the Keras cache) and read by
    `load_torch_hub_checkpoint` with the architecture's arguments, so a file of the other family
    is refused with every difference named; only the architecture's own arguments and `dtype`
    are taken from `overrides` then.

    Raises:
        ValueError: the architecture has no released weights, or the download failed.

    Example:
    >>> load_architecture("dinov2_vit_small14", load_weights=False, drop_path_rate=0.1)
    """
    entry = ARCHITECTURES[name]
    if not load_weights:
        return DINOv2Backbone(**{**entry["config"], **overrides})
    if entry["weights"] is None:
        raise ValueError(
            f"The architecture preset {name!r} has no released weights; pass "
            "`load_weights=False`."
        )
    url = entry["url"]
    try:
        path = keras.utils.get_file(entry["weights"], url, cache_subdir="keras_dinov2")
    except Exception as error:
        raise ValueError(
            f"Could not download the official weights of {name!r} from {url} "
            f"({error}). Pass `load_weights=False` for random weights, or download the "
            "file yourself and use keras_dinov2.convert.load_torch_hub_checkpoint(path)."
        ) from error
    overrides = {k: v for k, v in overrides.items() if k in entry["config"] or k == "dtype"}
    return load_torch_hub_checkpoint(path, **{**entry["config"], **overrides})


def _keras_hub_loader(source, load_weights, **overrides):
    # keras-hub's Backbone.from_preset bound to our class (DINOv2Backbone.from_preset itself comes
    # here through the registry): its subclass check refuses a preset of another class.
    return super(DINOv2Backbone, DINOv2Backbone).from_preset(source, load_weights=load_weights, **overrides)


def load_folder(folder, load_weights=True, **overrides):
    """A backbone from a local folder, whichever format it holds.

    A finished run directory loads its `teacher_preset/`. The folder is checked first
    (`check_preset_folder`: every file named, the architecture checked against bounds and against
    the weights before anything is built); then config.json decides: `model_type` is a
    transformers folder (converted), keras-hub's DINOV2Backbone is imported, and our
    DINOv2Backbone goes to keras-hub's loader.

    Raises:
        CheckpointError (a ValueError): naming the missing, broken or inconsistent file.

    Example:
    >>> load_folder("runs/latest")   # its teacher_preset/
    """
    folder = os.fspath(folder)
    if os.path.isdir(os.path.join(folder, "teacher_preset")):
        folder = os.path.join(folder, "teacher_preset")
    elif not os.path.exists(os.path.join(folder, "config.json")):
        raise CheckpointError(
            f"{folder!r} is neither a preset folder (no config.json) nor a finished run directory "
            "(no teacher_preset/)."
        )
    config = check_preset_folder(folder)
    if "model_type" in config:
        return backbone_from_parts(*transformers_parts(folder, **overrides), load_weights=load_weights)
    if config.get("registered_name") == KERAS_HUB_CLASS:
        return import_keras_hub_preset(folder, load_weights=load_weights, **overrides)
    # Name the missing or broken file instead of failing deep inside keras-hub.
    with reading(f"the preset {folder}"):
        return _keras_hub_loader(folder, load_weights, **overrides)


def load_backbone(source, load_weights=True, **overrides):
    """Loads a DINOv2Backbone from any source this library reads.

    Args:
        source: str or path. An architecture name (`ARCHITECTURES`: random weights, or the
            official release downloaded), a folder (our preset, a keras-hub DINOV2Backbone
            preset, a transformers Dinov2 or ViT folder, a finished run directory) or an `hf://` /
            `kaggle://` handle of our format.
        load_weights: bool, default True. False builds the source's architecture with random
            weights.
        **overrides: DINOv2Backbone constructor arguments (e.g. `drop_path_rate=0.3`).

    Raises:
        UnknownSourceError: the source is none of these.
        CheckpointError (a ValueError): a file is missing, malformed or inconsistent (named).

    Example:
    >>> load_backbone("export/keras_hub")   # a keras-hub preset, imported
    """
    check_source(source)
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if source in ARCHITECTURES:
        return load_architecture(source, load_weights, **overrides)
    if os.path.isdir(source):
        return load_folder(source, load_weights, **overrides)
    return _keras_hub_loader(source, load_weights, **overrides)


register_preset_loader(DINOv2Backbone, load_backbone)
