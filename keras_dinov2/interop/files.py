"""Bounded readers of the files every weight format is made of, and the one error they raise.

The readers treat every file as hostile: a configuration is size-limited before it is parsed, a
folder's files must stay inside the folder, an archive entry may not inflate far beyond its
stored size, and every malformed input raises `CheckpointError` naming the file and the reason.
"""

import contextlib
import json
import os
import re
import zipfile

import numpy as np


class CheckpointError(ValueError):
    """A weight file, folder or configuration the readers refuse, with the reason.

    Raised for every malformed input: a truncated or corrupt archive, a tensor record that
    points outside its storage, a configuration out of bounds or at odds with its tensors, a
    folder whose files lead outside it. A `ValueError`, so callers that caught the readers'
    ValueErrors keep working.

    Example:
    >>> try:
    ...     load_torch_hub_checkpoint("download.pth")
    ... except CheckpointError as error:
    ...     print(error)   # names the file, the tensor or field, and what is wrong
    """


@contextlib.contextmanager
def reading(what):
    """Turns any error of a third-party loader (keras, keras-hub, h5py) into CheckpointError.

    For loaders we do not control: whatever a malformed file makes them raise reaches the
    caller as one error type that names `what`, with the original chained as its cause.

    Example:
    >>> with reading("the preset my_preset"):
    ...     model = keras_hub.models.Backbone.from_preset("my_preset")
    """
    try:
        yield
    except CheckpointError:
        raise
    except Exception as error:
        text = str(error).strip().splitlines()
        reason = text[0][:300] if text else ""
        raise CheckpointError(f"Could not load {what}: {type(error).__name__}"
                              f"{': ' + reason if reason else ''}") from error


# Bounds on an architecture, far above every released DINOv2 (ViT-g/14: 40 blocks, width
# 1536, 37 x 37 positions). A config beyond them is refused before a model is built, so a
# hostile `num_hidden_layers=1000000` fails at once instead of allocating for minutes.
MAX_LAYERS = 256
MAX_WIDTH = 16384
MAX_PATCH_SIZE = 1024
MAX_IMAGE_SIZE = 16384
MAX_POSITIONS = 1 << 20
MAX_REGISTERS = 1024
MAX_MLP_RATIO = 64.0

_MAX_JSON_BYTES = 16 << 20


def show_name(value, limit=80):
    """A short, safe rendering of a name from a file (never the repr of a hostile object)."""
    if not isinstance(value, str):
        return f"<{type(value).__name__}>"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def show_value(value):
    """A short rendering of a configuration value for a message."""
    if isinstance(value, str):
        return show_name(value, 40)
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return repr(value) if abs(value) < 10**30 else f"<{value.bit_length()}-bit integer>"
    if isinstance(value, float):
        return repr(value)
    return f"<{type(value).__name__}>"


def is_integer(value):
    """Whether `value` is an integer (Python or NumPy), booleans excluded."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def read_json(path, max_bytes=_MAX_JSON_BYTES):
    """Reads a JSON file; a missing, oversized or broken one raises CheckpointError naming it.

    Example:
    >>> read_json("preset/config.json")["registered_name"]
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist.")
    size = os.path.getsize(path)
    if size > max_bytes:
        raise CheckpointError(f"{path} is {size} bytes; a configuration file is at most "
                              f"{max_bytes} bytes.")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}, "
                              f"column {error.colno}).") from error
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        # ValueError: an integer of more than 4300 digits; RecursionError: absurd nesting.
        raise CheckpointError(f"{path} is not valid JSON ({type(error).__name__}).") from error


def _inside(path, root):
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def folder_file(folder, name, what="file"):
    """The path of `name` inside `folder`; refuses names and links that lead out of it.

    An absolute name, a `..` component or a symbolic link resolving outside the folder is
    refused, so a crafted index cannot make the reader load another file on the machine.
    One exception: a Hugging Face cache snapshot (`.../snapshots/<revision>/`), whose files
    are links into the same repository's `blobs/` folder.

    Raises:
        CheckpointError: naming the file and where it leads.

    Example:
    >>> folder_file("dinov2-small", "model-00001-of-00002.safetensors", "shard")
    """
    if (not isinstance(name, str) or not name or "\x00" in name or os.path.isabs(name)
            or re.match(r"^[A-Za-z]:", name)
            or ".." in re.split(r"[\\/]", name)):
        raise CheckpointError(f"{folder}: the {what} {show_name(name)} is not a file name inside "
                              "the folder; refusing it.")
    path = os.path.join(folder, name)
    real, root = os.path.realpath(path), os.path.realpath(folder)
    if _inside(real, root):
        return path
    parent = os.path.dirname(root)
    if os.path.basename(parent) == "snapshots":
        blobs = os.path.join(os.path.dirname(parent), "blobs")
        if _inside(real, os.path.realpath(blobs)):
            return path
    raise CheckpointError(f"{path} leads outside {folder} (to {real}); refusing to read it.")


def read_safetensors(path):
    """The tensors of a safetensors file as NumPy arrays; an unreadable file raises CheckpointError."""
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except Exception as error:   # SafetensorError (header, offsets), OSError, unknown dtype
        raise CheckpointError(f"{path} is not a readable safetensors file ({error}).") from error


def h5_shapes(path):
    """{dataset path: shape} of every array in an HDF5 file, read without loading the arrays."""
    import h5py

    shapes = {}

    def visit(name, item):
        if isinstance(item, h5py.Dataset):
            shapes[name] = tuple(int(d) for d in item.shape)

    try:
        with h5py.File(path, "r") as f:
            f.visititems(visit)
    except Exception as error:   # OSError from HDF5, or a corrupt object header
        raise CheckpointError(f"{path} is not a readable HDF5 weights file ({error}).") from error
    return shapes


def read_npz(path):
    """The arrays of a .npz file, refusing entries that would inflate far beyond their size."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.file_size > 64 * info.compress_size + (1 << 20):
                    raise CheckpointError(f"{path}: the entry {info.filename} would inflate "
                                          f"{info.compress_size} bytes to {info.file_size}.")
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except CheckpointError:
        raise
    except Exception as error:   # BadZipFile, a bad .npy header, a truncated array
        raise CheckpointError(f"{path} is not a readable .npz file ({error}).") from error
