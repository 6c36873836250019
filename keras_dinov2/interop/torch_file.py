"""torch.save archives (.pth, pytorch_model.bin) read without torch, tensors only.

A `.pth` file is a zip archive: `data.pkl` (the pickled state dict, whose tensors point into
storages) and one entry per storage under `data/`. The unpickler here rebuilds nothing but
tensor records: every other global is refused, and each record's shape, strides and offset are
checked against the bytes of its storage before any view of it is made.
"""

import collections
import io
import math
import os
import pickle
import pickletools
import re
import zipfile

import numpy as np

from keras_dinov2.interop.files import CheckpointError, is_integer, show_name

_MAX_PICKLE_BYTES = 64 << 20   # data.pkl of ViT-g/14 is ~40 kB: only the records, no data
_MAX_RANK = 8
_MAX_DIM = 1 << 40
_MAX_INFLATION = 64            # a compressed archive entry may expand at most this much


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
            f"Refusing to load {show_name(module)}.{show_name(name)}: a DINOv2 checkpoint holds only "
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
            raise pickle.UnpicklingError(f"a storage key {show_name(key)} that is not a plain name")
        if not is_integer(numel) or not 0 <= numel <= _MAX_DIM:
            raise pickle.UnpicklingError(f"storage {key} claims {show_name(numel)} elements")
        return _StorageRef(key, storage_type, int(numel))


_MEMO_OPCODES = {"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"}


def _check_pickle(data, where):
    """Walks the opcodes without running them: the pickle must be complete and its memo small.

    The C unpickler grows its memo to twice the largest index a PUT names; a 4-byte index
    alone would make it allocate gigabytes, so indices beyond the opcode count are refused.
    """
    try:
        for count, (opcode, arg, _) in enumerate(pickletools.genops(data)):
            if opcode.name in _MEMO_OPCODES and (not is_integer(arg) or not 0 <= arg <= count):
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
    if not is_integer(offset) or offset < 0:
        return f"has storage offset {show_name(offset) if not is_integer(offset) else offset}"
    for name, value in (("shape", size), ("strides", stride)):
        if not isinstance(value, (tuple, list)) or len(value) > _MAX_RANK:
            what = len(value) if isinstance(value, (tuple, list)) else show_name(value)
            return f"has a {name} of rank {what} (at most {_MAX_RANK})"
        if not all(is_integer(v) and 0 <= v <= _MAX_DIM for v in value):
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
            raise CheckpointError(f"{self.where}: tensor {show_name(name)} has no storage record.")
        dtype = ref.storage_type.raw_dtype(self.byteorder)
        problem = _record_problem(record, ref.numel)
        if problem:
            raise CheckpointError(f"{self.where}: tensor {show_name(name)} {problem}; the "
                                  "checkpoint is corrupt or crafted.")
        raw = self.raw.get(ref.key)
        if raw is None:
            raw = _entry_bytes(self.archive, f"{self.prefix}/data/{ref.key}", self.where)
            self.raw[ref.key] = raw
        if len(raw) != ref.numel * dtype.itemsize:
            raise CheckpointError(
                f"{self.where}: tensor {show_name(name)} claims {ref.numel} elements of "
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
                raise CheckpointError(f"{where}: {show_name(key)} holds a {type(record).__name__}, "
                                      "not a tensor.")
            tensors[key] = storages.tensor(key, record)
    return tensors
