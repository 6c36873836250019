"""Load official DINOv2 weights: torch-hub `.pth` state dicts and Hugging Face folders.

Both readers work under any Keras backend and without torch: `.pth` files are read from
their zip archive with an unpickler that only rebuilds tensors (no arbitrary objects), and
Hugging Face folders through safetensors. Every tensor is first renamed to the torch-hub
layout, then copied into a `DINOv2Backbone` with its shape checked.

The readers treat every file as hostile: each tensor record of a pickled state dict is
checked against its storage before any view of it is made, a configuration is checked
against sane bounds and against the tensors present before a model is built, and a folder's
files must stay inside the folder. Every malformed input raises `CheckpointError`.
"""

import collections
import contextlib
import io
import json
import math
import os
import pickle
import pickletools
import re
import zipfile

import numpy as np

from keras_dinov2.backbone import DINOv2Backbone
from keras_dinov2.layers.feedforward import swiglu_hidden_dim
from keras_dinov2.layers.interpolation import INTERPOLATION_MODES


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

_MAX_PICKLE_BYTES = 64 << 20   # data.pkl of ViT-g/14 is ~40 kB: only the records, no data
_MAX_JSON_BYTES = 16 << 20
_MAX_RANK = 8
_MAX_DIM = 1 << 40
_MAX_INFLATION = 64            # a compressed archive entry may expand at most this much


def _show(value, limit=80):
    """A short, safe rendering of a name from a file (never the repr of a hostile object)."""
    if not isinstance(value, str):
        return f"<{type(value).__name__}>"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _value(value):
    """A short rendering of a configuration value for a message."""
    if isinstance(value, str):
        return _show(value, 40)
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return repr(value) if abs(value) < 10**30 else f"<{value.bit_length()}-bit integer>"
    if isinstance(value, float):
        return repr(value)
    return f"<{type(value).__name__}>"


def _is_int(value):
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


# ----------------------------------------------------------------------------------------
# torch.save archives (.pth, pytorch_model.bin), read without torch
# ----------------------------------------------------------------------------------------

# Storage classes a state dict may name, with their element types.
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


def _no_state(self, state):
    raise pickle.UnpicklingError(f"a {type(self).__name__} takes no pickled state")


class _StorageType:
    """A storage class named by the pickle (`torch.FloatStorage`): only its element type."""

    __slots__ = ("name", "dtype")
    __setstate__ = _no_state

    def __init__(self, name):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]

    def raw_dtype(self, byteorder):
        """The NumPy type of the stored bytes (bfloat16 is read as its 16 bits)."""
        if self.dtype == "bfloat16":
            return np.dtype(np.uint16).newbyteorder(byteorder)
        return np.dtype(self.dtype).newbyteorder(byteorder)


class _StorageRef:
    """A persistent reference to the bytes of one archive entry, with the claimed size."""

    __slots__ = ("key", "storage_type", "numel")
    __setstate__ = _no_state

    def __init__(self, key, storage_type, numel):
        self.key, self.storage_type, self.numel = key, storage_type, numel


class _TensorRecord:
    """What a pickled tensor claims: storage, offset, shape and strides. Checked before use."""

    __slots__ = ("storage", "offset", "size", "stride")
    __setstate__ = _no_state

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class _Rebuild:
    """Stands in for torch's tensor rebuild functions: records the arguments, reads nothing.

    A fresh object per reference, so a pickle cannot leave state on shared functions.
    """

    __slots__ = ("kind",)
    __setstate__ = _no_state

    def __init__(self, kind):
        self.kind = kind

    def __call__(self, *args):
        if self.kind == "parameter":
            # _rebuild_parameter(data, requires_grad, backward_hooks)
            if not 1 <= len(args) <= 4 or not isinstance(args[0], _TensorRecord):
                raise pickle.UnpicklingError("_rebuild_parameter without a tensor")
            return args[0]
        # _rebuild_tensor(storage, offset, size, stride) and
        # _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])
        if len(args) < 4 or len(args) > 7:
            raise pickle.UnpicklingError(f"a tensor rebuild with {len(args)} arguments")
        return _TensorRecord(*args[:4])


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict, refusing every global that is not a tensor part."""

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _Rebuild("tensor")
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _Rebuild("parameter")
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(
            f"Refusing to load {_show(module)}.{_show(name)}: a DINOv2 checkpoint holds only "
            "tensors."
        )

    def persistent_load(self, pid):
        # ("storage", storage_type, key, location, numel), as torch.save writes it.
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError("a persistent id that is not a storage record")
        _, storage_type, key, _, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError("a storage record without a storage type")
        if not isinstance(key, str) or not re.fullmatch(r"[0-9A-Za-z_]{1,64}", key):
            raise pickle.UnpicklingError(f"a storage key {_show(key)} that is not a plain name")
        if not _is_int(numel) or not 0 <= numel <= _MAX_DIM:
            raise pickle.UnpicklingError(f"storage {key} claims {_show(numel)} elements")
        return _StorageRef(key, storage_type, int(numel))


_MEMO_OPCODES = {"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"}


def _check_pickle(data, where):
    """Walks the opcodes without running them: the pickle must be complete and its memo small.

    The C unpickler grows its memo to twice the largest index a PUT names; a 4-byte index
    alone would make it allocate gigabytes, so indices beyond the opcode count are refused.
    """
    try:
        for count, (opcode, arg, _) in enumerate(pickletools.genops(data)):
            if opcode.name in _MEMO_OPCODES and (not _is_int(arg) or not 0 <= arg <= count):
                raise CheckpointError(f"{where}: data.pkl names memo slot {arg} after {count} "
                                      "opcodes; the pickle is corrupt.")
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(f"{where}: data.pkl is not a valid pickle ({error}).") from error


def _entry_bytes(archive, name, where, expected=None):
    """Reads one archive entry, refusing inflated or mis-sized ones before reading."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise CheckpointError(f"{where} lacks the archive entry {name}.") from None
    if info.compress_type == zipfile.ZIP_STORED:
        if info.file_size != info.compress_size:
            raise CheckpointError(f"{where}: the entry {name} claims {info.file_size} bytes but "
                                  f"stores {info.compress_size}; the archive is corrupt.")
    elif info.file_size > _MAX_INFLATION * info.compress_size + (1 << 20):
        raise CheckpointError(f"{where}: the entry {name} would inflate {info.compress_size} "
                              f"bytes to {info.file_size}; refusing it.")
    if expected is not None and info.file_size != expected:
        raise CheckpointError(f"{where}: the entry {name} holds {info.file_size} bytes, its "
                              f"record needs {expected}.")
    try:
        raw = archive.read(name)
    except Exception as error:
        raise CheckpointError(f"{where}: could not read the entry {name} ({error}).") from error
    if len(raw) != info.file_size:
        raise CheckpointError(f"{where}: the entry {name} is truncated.")
    return raw


def _record_problem(record, numel):
    """Why a tensor record cannot be a view of a storage of `numel` elements, or None."""
    offset, size, stride = record.offset, record.size, record.stride
    if not _is_int(offset) or offset < 0:
        return f"has storage offset {_show(offset) if not _is_int(offset) else offset}"
    for name, value in (("shape", size), ("strides", stride)):
        if not isinstance(value, (tuple, list)) or len(value) > _MAX_RANK:
            what = len(value) if isinstance(value, (tuple, list)) else _show(value)
            return f"has a {name} of rank {what} (at most {_MAX_RANK})"
        if not all(_is_int(v) and 0 <= v <= _MAX_DIM for v in value):
            return f"has a {name} entry that is not a non-negative integer"
    if len(size) != len(stride):
        return f"has {len(size)} dimensions and {len(stride)} strides"
    elements = math.prod(size)
    if elements == 0:
        return None if offset <= numel else f"starts at element {offset} of {numel}"
    extent = offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1
    if extent > numel:
        return (f"(shape {tuple(size)}, strides {tuple(stride)}, offset {offset}) reaches "
                f"element {extent} of a storage of {numel}")
    if elements > numel:
        return (f"has {elements} elements from a storage of {numel} (broadcast strides are "
                "not supported)")
    return None


class _Archive:
    """The storages of an open torch.save archive, each read once and size-checked."""

    def __init__(self, archive, prefix, byteorder, where):
        self.archive, self.prefix, self.byteorder, self.where = archive, prefix, byteorder, where
        self.raw = {}

    def tensor(self, name, record):
        ref = record.storage
        if not isinstance(ref, _StorageRef):
            raise CheckpointError(f"{self.where}: tensor {_show(name)} has no storage record.")
        dtype = ref.storage_type.raw_dtype(self.byteorder)
        problem = _record_problem(record, ref.numel)
        if problem:
            raise CheckpointError(f"{self.where}: tensor {_show(name)} {problem}; the "
                                  "checkpoint is corrupt or crafted.")
        raw = self.raw.get(ref.key)
        if raw is None:
            raw = _entry_bytes(self.archive, f"{self.prefix}/data/{ref.key}", self.where)
            self.raw[ref.key] = raw
        if len(raw) != ref.numel * dtype.itemsize:
            raise CheckpointError(
                f"{self.where}: tensor {_show(name)} claims {ref.numel} elements of "
                f"{dtype.itemsize} bytes in storage {ref.key}, which holds {len(raw)} bytes."
            )
        size, stride = tuple(int(s) for s in record.size), tuple(int(s) for s in record.stride)
        if math.prod(size) == 0:
            value = np.zeros(size, dtype)
        else:
            # The record was checked against the storage above: the view stays inside it.
            base = np.frombuffer(raw, dtype=dtype, count=ref.numel)[int(record.offset):]
            value = np.lib.stride_tricks.as_strided(
                base, size, tuple(s * dtype.itemsize for s in stride), writeable=False
            ).copy()
        if ref.storage_type.dtype == "bfloat16":
            return (value.astype(np.uint32) << 16).view(np.float32)
        return value.astype(dtype.newbyteorder("="), copy=False)


def read_torch_state_dict(path):
    """Reads a `torch.save` state dict (zip format) into a dict of NumPy arrays, without torch.

    Only tensors are rebuilt: every other pickled object is refused. Each tensor's shape,
    strides and offset are checked against the bytes of its storage before anything is read.

    Args:
        path: str. A `.pth` / `.bin` file written by `torch.save(state_dict, path)`.

    Returns:
        dict mapping parameter names to NumPy arrays (bfloat16 tensors become float32).

    Raises:
        CheckpointError: the file is not a zip-format state dict of tensors, is truncated,
            or a tensor record does not fit its storage (named in the message).

    Example:
    >>> tensors = read_torch_state_dict("dinov2_vits14_pretrain.pth")
    >>> tensors["pos_embed"].shape   # (1, 1370, 384)
    """
    where = os.fspath(path)
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise CheckpointError(f"{where} does not exist.") from None
    except IsADirectoryError:
        raise CheckpointError(f"{where} is a folder, not a torch checkpoint file.") from None
    except Exception as error:   # BadZipFile, truncated central directory, bad offsets
        raise CheckpointError(
            f"{where} is not a zip-format torch checkpoint ({error}); torch >= 1.6 writes that "
            "format."
        ) from error
    with archive:
        try:
            names = archive.namelist()
        except Exception as error:
            raise CheckpointError(f"{where}: unreadable archive ({error}).") from error
        pickles = sorted(n for n in names if n.endswith("/data.pkl") and n.count("/") == 1)
        if not pickles:
            raise CheckpointError(f"{where} has no data.pkl: not a torch checkpoint.")
        prefix = pickles[0][: -len("/data.pkl")]
        byteorder = "<"
        if f"{prefix}/byteorder" in names:
            order = _entry_bytes(archive, f"{prefix}/byteorder", where)[:16]
            if order not in (b"little", b"big"):
                raise CheckpointError(f"{where}: byteorder {order!r} is neither little nor big.")
            byteorder = "<" if order == b"little" else ">"
        info = archive.getinfo(pickles[0])
        if info.file_size > _MAX_PICKLE_BYTES:
            raise CheckpointError(f"{where}: data.pkl is {info.file_size} bytes; a state dict's "
                                  f"records take at most {_MAX_PICKLE_BYTES}.")
        data = _entry_bytes(archive, pickles[0], where)
        _check_pickle(data, where)
        try:
            state = _StateDictUnpickler(io.BytesIO(data)).load()
        except Exception as error:
            raise CheckpointError(f"{where}: could not unpickle data.pkl ({error}).") from error
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        if not isinstance(state, dict):
            raise CheckpointError(f"{where} holds a {type(state).__name__}, not a state dict.")
        storages = _Archive(archive, prefix, byteorder, where)
        tensors = {}
        for key, record in state.items():
            if not isinstance(key, str):
                raise CheckpointError(f"{where}: the state dict has a key of type "
                                      f"{type(key).__name__}; names must be strings.")
            if not isinstance(record, _TensorRecord):
                raise CheckpointError(f"{where}: {_show(key)} holds a {type(record).__name__}, "
                                      "not a tensor.")
            tensors[key] = storages.tensor(key, record)
    return tensors


# ----------------------------------------------------------------------------------------
# Architecture: what the tensors say, what a config says, and whether they agree
# ----------------------------------------------------------------------------------------


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


def _tensor_architecture(tensors, where):
    """Reads the architecture off torch-hub-named tensors, checking their ranks and shapes.

    Returns a dict: hidden_dim, patch_size, grid (side of the position grid), registers,
    num_layers, ffn_type, ffn_hidden (hidden width of the feed-forward, per SwiGLU half),
    layer_scale (bool). An empty `register_tokens` (1, 0, D) is dropped from `tensors`.
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
            raise CheckpointError(f"{where}: {_show(key)} holds {value.dtype} values, not real "
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
    return {
        "hidden_dim": dim,
        "patch_size": patch,
        "grid": grid,
        "num_register_tokens": registers,
        "num_layers": depth,
        "ffn_type": ffn,
        "ffn_hidden": hidden,
        "layer_scale": "blocks.0.ls1.gamma" in tensors,
    }


def _ffn_hidden(config):
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
        raise CheckpointError(f"{where}: {names.get(field, field)}={_value(value)} is out of "
                              f"bounds; expected {expected}.")

    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: the configuration is a {type(config).__name__}, "
                              "not a JSON object.")
    for field, (low, high) in _INT_FIELDS.items():
        if field in config:
            value = config[field]
            if not _is_int(value) or not low <= value <= high:
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

    Args:
        config: dict of DINOv2Backbone arguments (already within bounds).
        arch: dict from the tensors (`_tensor_architecture`).
        where: str. Names the source in the message.
        names: optional dict, our field name -> the source's field name.

    Raises:
        CheckpointError: naming the first field that disagrees, its value, and what the
            tensors hold.
    """
    names = names or {}

    def fail(field, says):
        value = config[field]
        if field == "ffn_type" and names.get(field) == "use_swiglu_ffn":
            value = value == "swiglu"
        shown = f"{names.get(field, field)}={_value(value)}"
        raise CheckpointError(f"{where}: {shown} does not match the tensors, which {says}.")

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
    if _ffn_hidden({"mlp_ratio": 4.0, "ffn_type": "mlp", **config}) != arch["ffn_hidden"]:
        fail("mlp_ratio", f"hold a feed-forward {arch['ffn_hidden']} wide")
    if (config.get("layer_scale_init", 1e-5) is not None) != arch["layer_scale"]:
        fail("layer_scale_init", "have " + ("" if arch["layer_scale"] else "no ") +
             "LayerScale gammas")


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
    hidden = _ffn_hidden(config)
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
    }


def _linear(prefix):
    return [(f"{prefix}.weight", "kernel", "linear"), (f"{prefix}.bias", "bias", "plain")]


def _norm(prefix):
    return [(f"{prefix}.weight", "gamma", "plain"), (f"{prefix}.bias", "beta", "plain")]


def _torch_hub_layout(backbone):
    """Pairs each backbone variable with its torch-hub key and the transform it needs."""
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
    layout = _torch_hub_layout(backbone)
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
    with registers, "original" without). Keyword arguments override any of it (for example
    `drop_path_rate=0.3` to continue pretraining, or `dtype="mixed_bfloat16"`). The result
    is checked against the tensors before the model is built.

    Args:
        path: str. A `dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth` file or any state dict in
            that layout (prefixes `module.`, `backbone.`, `teacher.backbone.` are dropped).
        **overrides: DINOv2Backbone constructor arguments.

    Returns:
        DINOv2Backbone with the checkpoint's weights.

    Raises:
        CheckpointError: the file is malformed, or the overrides do not fit its tensors.

    Example:
    >>> backbone = load_torch_hub_checkpoint("dinov2_vits14_pretrain.pth")
    """
    return _build(*torch_hub_parts(path, **overrides))


def _build(config, tensors, where):
    backbone = DINOv2Backbone(**config)
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
    arch = _tensor_architecture(tensors, where)
    if arch["num_layers"] > MAX_LAYERS:
        raise CheckpointError(f"{where}: the tensors hold {arch['num_layers']} blocks; at most "
                              f"{MAX_LAYERS} are supported.")
    config = {**_infer_torch_hub_config(arch), **overrides}
    check_backbone_config(config, where)
    check_config_against_tensors(config, arch, where)
    return config, tensors, where


_HF_RENAMES = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.register_tokens$", "register_tokens"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale(\d)\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_in\.", r"blocks.\1.mlp.w12."),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_out\.", r"blocks.\1.mlp.w3."),
    (r"^encoder\.layer\.(\d+)\.(norm1|norm2|mlp\.fc1|mlp\.fc2)\.", r"blocks.\1.\2."),
    (r"^layernorm\.", "norm."),
]

_HF_QKV = re.compile(
    r"^encoder\.layer\.(\d+)\.attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)$"
)


def _hf_to_torch_hub(tensors, where="the transformers checkpoint"):
    """Renames a transformers Dinov2 state dict to the torch-hub layout (qkv fused)."""
    out, qkv = {}, {}
    for key, value in tensors.items():
        for prefix in ("dinov2.", "model."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        match = _HF_QKV.match(key)
        if match:
            layer, long_name, short_name, kind = match.groups()
            part = "qkv".index((long_name or short_name)[0])
            qkv.setdefault((layer, kind), [None, None, None])[part] = value
            continue
        for pattern, replacement in _HF_RENAMES:
            new, count = re.subn(pattern, replacement, key)
            if count:
                out[new] = value
                break
        else:
            out[key] = value
    for (layer, kind), parts in qkv.items():
        kinds = "weights" if kind == "weight" else "biases"
        if any(p is None for p in parts):
            raise CheckpointError(f"{where}: layer {layer} lacks one of its query, key or value "
                                  f"{kinds}.")
        rank = 2 if kind == "weight" else 1
        if any(p.ndim != rank or p.shape != parts[0].shape for p in parts):
            raise CheckpointError(
                f"{where}: layer {layer}'s query, key and value {kinds} have shapes "
                f"{[p.shape for p in parts]}; expected three equal {rank}-d shapes."
            )
        out[f"blocks.{layer}.attn.qkv.{kind}"] = np.concatenate(parts, axis=0)
    return out


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
        raise CheckpointError(f"{folder}: the {what} {_show(name)} is not a file name inside "
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


def _read_safetensors(path):
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except Exception as error:   # SafetensorError (header, offsets), OSError, unknown dtype
        raise CheckpointError(f"{path} is not a readable safetensors file ({error}).") from error


def _read_hf_tensors(folder):
    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(single):
        return _read_safetensors(folder_file(folder, "model.safetensors", "weights file"))
    if os.path.exists(index):
        stored = read_json(folder_file(folder, "model.safetensors.index.json", "index"))
        weight_map = stored.get("weight_map") if isinstance(stored, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no `weight_map` object naming the shards.")
        shards = {}
        for tensor, name in weight_map.items():
            path = folder_file(folder, name, f"shard of {_show(tensor)}")
            shards.setdefault(path, []).append(tensor)
        tensors = {}
        for path in sorted(shards):
            shard = _read_safetensors(path)
            for key in shard:
                if key in tensors:
                    raise CheckpointError(f"{index}: tensor {_show(key)} is stored in two shards.")
            absent = [t for t in shards[path] if t not in shard]
            if absent:
                raise CheckpointError(f"{index} places {_show(absent[0])} in {path}, which lacks "
                                      "it.")
            tensors.update(shard)
        return tensors
    binary = os.path.join(folder, "pytorch_model.bin")
    if os.path.exists(binary):
        return read_torch_state_dict(folder_file(folder, "pytorch_model.bin", "weights file"))
    raise CheckpointError(
        f"{folder!r} has no model.safetensors, model.safetensors.index.json or "
        "pytorch_model.bin."
    )


# Our constructor argument -> transformers' config key, for messages.
_HF_NAMES = {
    "patch_size": "patch_size",
    "hidden_dim": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "mlp_ratio": "mlp_ratio",
    "ffn_type": "use_swiglu_ffn",
    "num_register_tokens": "num_register_tokens",
    "image_size": "image_size",
    "layer_scale_init": "layerscale_value",
    "layer_norm_epsilon": "layer_norm_eps",
}


def transformers_config_to_backbone_config(hf_config, where="config.json"):
    """Maps a transformers Dinov2 / Dinov2WithRegisters config dict to constructor arguments.

    Every field is checked for its type and bounds (`check_backbone_config`); the image size
    is kept as transformers reads it (its position grid is `image_size // patch_size`).

    Raises:
        CheckpointError: naming the field, the value and what is allowed.

    Example:
    >>> transformers_config_to_backbone_config(json.load(open("config.json")))
    """
    if not isinstance(hf_config, dict):
        raise CheckpointError(f"{where} holds a {type(hf_config).__name__}, not a JSON object.")
    model_type = hf_config.get("model_type")
    if model_type not in ("dinov2", "dinov2_with_registers"):
        raise CheckpointError(
            f"{where}: expected model_type 'dinov2' or 'dinov2_with_registers', received "
            f"{_show(model_type)}."
        )
    swiglu = hf_config.get("use_swiglu_ffn", False)
    if not isinstance(swiglu, bool):
        raise CheckpointError(f"{where}: use_swiglu_ffn={_show(swiglu)} must be true or false.")
    act = hf_config.get("hidden_act", "gelu")
    if act != "gelu" and not swiglu:
        raise CheckpointError(f"{where}: unsupported hidden_act {_show(act)}; expected 'gelu'.")
    # transformers' defaults where a key is absent (Dinov2WithRegistersConfig uses patch 16).
    default_patch = 16 if model_type == "dinov2_with_registers" else 14
    registers = hf_config.get("num_register_tokens", 0)
    config = {
        "patch_size": hf_config.get("patch_size", default_patch),
        "hidden_dim": hf_config.get("hidden_size", 768),
        "num_layers": hf_config.get("num_hidden_layers", 12),
        "num_heads": hf_config.get("num_attention_heads", 12),
        "mlp_ratio": hf_config.get("mlp_ratio", 4),
        "ffn_type": "swiglu" if swiglu else "mlp",
        "num_register_tokens": 0 if registers is None else registers,
        "image_size": hf_config.get("image_size", 224),
        "interpolation": "registers" if model_type == "dinov2_with_registers" else "transformers",
        "layer_scale_init": hf_config.get("layerscale_value", 1.0),
        "layer_norm_epsilon": hf_config.get("layer_norm_eps", 1e-6),
    }
    # transformers accepts an image size that is not a multiple of the patch: check the
    # rest first, then round the size down to the grid it actually uses.
    check_backbone_config({k: v for k, v in config.items() if k != "image_size"}, where,
                          _HF_NAMES)
    size, patch = config["image_size"], config["patch_size"]
    if not _is_int(size) or not patch <= size <= MAX_IMAGE_SIZE:
        raise CheckpointError(f"{where}: image_size={_value(size)} is out of bounds; expected an "
                              f"integer in [patch_size={patch}, {MAX_IMAGE_SIZE}].")
    config["image_size"] = size // patch * patch
    if config["layer_scale_init"] is None:
        raise CheckpointError(f"{where}: layerscale_value=None is out of bounds; expected a "
                              "finite number.")
    config["mlp_ratio"] = float(config["mlp_ratio"])
    config["layer_scale_init"] = float(config["layer_scale_init"])
    config["layer_norm_epsilon"] = float(config["layer_norm_epsilon"])
    check_backbone_config(config, where, _HF_NAMES)
    return config


def load_transformers_checkpoint(folder, **overrides):
    """Builds a DINOv2Backbone from a Hugging Face `Dinov2Model` or `Dinov2WithRegistersModel`.

    Reads `config.json` and the weights (`model.safetensors`, a sharded safetensors index, or
    `pytorch_model.bin`). The interpolation rule follows the port: "transformers" for
    `dinov2` (no 0.1 offset, no antialias: at interpolated sizes this differs from the
    official first release) and "registers" for `dinov2_with_registers`. The config is
    checked against the tensors (depth, width, heads, registers, patch, position grid)
    before the model is built. An empty `register_tokens` tensor is accepted.

    Args:
        folder: str. A folder written by `save_pretrained`.
        **overrides: DINOv2Backbone constructor arguments.

    Raises:
        CheckpointError: a missing, malformed or inconsistent file, named in the message.

    Example:
    >>> backbone = load_transformers_checkpoint("dinov2-small")
    """
    return _build(*transformers_parts(folder, **overrides))


def transformers_parts(folder, **overrides):
    """Everything `load_transformers_checkpoint` reads and checks, short of building the model.

    Returns:
        (config, tensors, where), as `torch_hub_parts`.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder!r} is not a folder: a transformers checkpoint is a "
                              "folder holding config.json and the weights.")
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(f"{folder!r} has no config.json: not a transformers checkpoint "
                              "folder.")
    hf_config = read_json(folder_file(folder, "config.json", "config"))
    config = transformers_config_to_backbone_config(hf_config, config_path)
    where = f"transformers checkpoint {folder}"
    tensors = _hf_to_torch_hub(_read_hf_tensors(folder), where)
    arch = _tensor_architecture(tensors, where)
    check_config_against_tensors(config, arch, config_path, _HF_NAMES)
    config = {**config, **overrides}
    if overrides:
        check_backbone_config(config, "the overrides")
        check_config_against_tensors(config, arch, "the overrides")
    return config, tensors, where
