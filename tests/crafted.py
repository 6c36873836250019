"""Hand-made torch.save archives for the reader tests: any tensor record, any storage bytes.

`torch.save` only writes consistent records; these helpers write what an attacker would, in
the same zip layout (archive/data.pkl, archive/data/<key>, archive/version), so the tests can
feed the reader offsets, shapes and strides that do not fit their storage.
"""

import collections
import io
import pickle
import zipfile

import numpy as np


class Storage:
    """A storage reference: its archive key, the element count it claims and its class."""

    def __init__(self, key, numel, kind="FloatStorage"):
        self.key, self.numel, self.kind = key, numel, kind


class Tensor:
    """A tensor record, pickled as torch does: _rebuild_tensor_v2(storage, offset, size, stride)."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        import torch

        return (torch._utils._rebuild_tensor_v2, self.args)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            import torch

            return ("storage", getattr(torch, obj.kind), obj.key, "cpu", obj.numel)
        return None


def state_pickle(records):
    """The data.pkl bytes of an OrderedDict of `records` ({name: Tensor or anything})."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(collections.OrderedDict(records))
    return buffer.getvalue()


def write_archive(path, pickled, storages, prefix="archive"):
    """Writes a torch.save-layout zip: `pickled` as data.pkl, `storages` {key: bytes}."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{prefix}/data.pkl", pickled)
        archive.writestr(f"{prefix}/byteorder", "little")
        for key, raw in storages.items():
            archive.writestr(f"{prefix}/data/{key}", raw)
        archive.writestr(f"{prefix}/version", "3\n")
    return path


def write_state(path, records, storages):
    """write_archive for a state dict of records; `storages` {key: float32 array or bytes}."""
    raw = {k: v if isinstance(v, bytes) else np.asarray(v, "<f4").tobytes()
           for k, v in storages.items()}
    return write_archive(path, state_pickle(records), raw)
