"""The batch contract: the keys, shapes and dtypes of a multi-crop batch, in one place.

`multicrop_dataset` produces these batches; the pretrainer's steps and the distribution engines read them. For B
images per batch, G / L the global / local crop sides, n_local local crops per image, N = (G / patch)^2 patches per
global crop and M the masked-patch buffer (`mask_buffer_size(2B, N, masking)`):

```
global_crops      float32 (2B, G, G, 3)         view-major: rows 0..B-1 = view 1 of images 0..B-1, then view 2
local_crops       float32 (n_local*B, L, L, 3)  view-major likewise (may be absent when n_local is 0)
masks             bool    (2B, N)               True = patch replaced by the mask token in the student
mask_indices      int32   (M,)                  flat indices into the 2B*N patch rows of the masked patches,
                                                then padding entries 0
masks_weight      float32 (M,)                  1 / (masked patches of that image); 0 for padding
n_masked_patches  int32   ()                    number of real entries of mask_indices
```

A stacked batch holds S such batches (the k micro-batches of one update, `group_micro_batches`, or the replicas'
batches, `keras_dinov2.distribute.stack_batches`): every array is the concatenation of theirs along axis 0, and
`n_masked_patches` is the vector (S,) of their counts, each batch's `mask_indices` staying local to it.
"""

from __future__ import annotations

from typing import NamedTuple

from keras_dinov2.config import data_and_patch_size
from keras_dinov2.data.checks import check_positive_int
from keras_dinov2.data.mask_budget import mask_buffer_size

__all__ = [
    "BATCH_KEYS",
    "GLOBAL_CROPS",
    "LOCAL_CROPS",
    "MASKS",
    "MASKS_WEIGHT",
    "MASK_INDICES",
    "N_MASKED_PATCHES",
    "FieldSpec",
    "batch_spec",
    "check_batch",
    "num_stacked",
]

GLOBAL_CROPS = "global_crops"
LOCAL_CROPS = "local_crops"
MASKS = "masks"
MASK_INDICES = "mask_indices"
MASKS_WEIGHT = "masks_weight"
N_MASKED_PATCHES = "n_masked_patches"

# The keys of a multi-crop batch, in the order the pipeline yields them.
BATCH_KEYS = (GLOBAL_CROPS, LOCAL_CROPS, MASKS, MASK_INDICES, MASKS_WEIGHT, N_MASKED_PATCHES)


class FieldSpec(NamedTuple):
    """What one key of a batch holds: its static shape (a tuple of ints) and its dtype name ("float32", ...)."""

    shape: tuple
    dtype: str


def batch_spec(
    config, batch_size: int, stacked: int | None = None, patch_size: int | None = None
) -> dict[str, FieldSpec]:
    """The shape and dtype of every key of a multi-crop batch of `batch_size` images, in `BATCH_KEYS` order.

    Args:
        config: DataConfig, or a config holding one as `.data` (SSLConfig); None for `DataConfig()`.
        batch_size: int. Images per batch (B), per micro-batch and replica when stacked.
        stacked: int or None, default None. None: one batch (`n_masked_patches` is a scalar). S: S batches stacked
            (every first dimension times S, `n_masked_patches` of shape (S,)).
        patch_size: int or None, default None. The model's patch size; None: the run config's
            `.model.patch_size`, else 14 (`keras_dinov2.config.data_and_patch_size`).

    Example:
        >>> from keras_dinov2.config import DataConfig
        >>> batch_spec(DataConfig.recipe("digits"), 8, patch_size=4)["masks"]
        FieldSpec(shape=(16, 36), dtype='bool')
    """
    config, patch_size = data_and_patch_size(config, patch_size)
    b = check_positive_int("batch_size", batch_size)
    s = 1 if stacked is None else check_positive_int("stacked", stacked)
    crops = config.crops
    rows, cols = config.patch_grid(patch_size)
    num_patches = rows * cols
    buffer = mask_buffer_size(2 * b, num_patches, config.masking)
    g, loc = crops.global_crops_size, crops.local_crops_size
    return {
        GLOBAL_CROPS: FieldSpec((s * 2 * b, g, g, 3), "float32"),
        LOCAL_CROPS: FieldSpec((s * crops.local_crops_number * b, loc, loc, 3), "float32"),
        MASKS: FieldSpec((s * 2 * b, num_patches), "bool"),
        MASK_INDICES: FieldSpec((s * buffer,), "int32"),
        MASKS_WEIGHT: FieldSpec((s * buffer,), "float32"),
        N_MASKED_PATCHES: FieldSpec(() if stacked is None else (s,), "int32"),
    }


def _dtype_name(dtype):
    """"float32" for NumPy, TensorFlow, JAX and torch dtypes alike."""
    name = getattr(dtype, "name", None)
    if isinstance(name, str):
        return name
    return str(dtype).rpartition(".")[2]  # torch.float32 -> float32


def _shape(value):
    shape = getattr(value, "shape", None)
    if shape is None:
        return None
    if getattr(shape, "rank", 0) is None:  # a TensorShape of unknown rank
        return None
    return tuple(None if d is None else int(d) for d in shape)


def check_batch(batch, config, batch_size: int, stacked: int | None = None, patch_size: int | None = None):
    """Check that `batch` follows the contract of `batch_spec(config, batch_size, stacked)`; return it unchanged.

    Works on arrays and tensors of any backend, and on `tf.TensorSpec`s (`check_batch(dataset.element_spec, ...)`).
    A dimension that is None (unknown while tracing) matches any size. `local_crops` may be left out when the
    config has no local crops. Errors name the key, the expected and the received shape or dtype.

    Args:
        batch: dict of arrays, tensors or tensor specs.
        config: DataConfig, or a config holding one as `.data`; None for `DataConfig()`.
        batch_size: int. Images per batch (B).
        stacked: int or None, default None. See `batch_spec`.
        patch_size: int or None, default None. See `batch_spec`.

    Raises:
        ValueError: a key is missing or unknown, or a shape or dtype differs.

    Example:
        >>> check_batch(next(iter(dataset)), config, batch_size=8)  # doctest: +SKIP
    """
    if not isinstance(batch, dict):
        raise ValueError(f"a multi-crop batch is a dict with keys {list(BATCH_KEYS)}; received {type(batch).__name__}.")
    config, patch_size = data_and_patch_size(config, patch_size)
    spec = batch_spec(config, batch_size, stacked, patch_size)
    unknown = sorted(set(batch) - set(spec))
    if unknown:
        raise ValueError(f"batch has unknown key(s) {unknown}; a multi-crop batch has {list(BATCH_KEYS)}.")
    for key, (shape, dtype) in spec.items():
        if key not in batch:
            if key == LOCAL_CROPS and config.crops.local_crops_number == 0:
                continue
            raise ValueError(f"batch has no {key!r}; expected {dtype} of shape {shape}.")
        value = batch[key]
        received = _shape(value)
        if received is None or len(received) != len(shape) or any(
            r is not None and r != e for r, e in zip(received, shape)
        ):
            raise ValueError(f"batch[{key!r}] must have shape {shape}; received shape {received}.")
        received_dtype = _dtype_name(getattr(value, "dtype", None))
        if received_dtype != dtype:
            raise ValueError(f"batch[{key!r}] must have dtype {dtype}; received dtype {received_dtype}.")
    return batch


def num_stacked(batch) -> int:
    """How many batches a batch stacks: the length of its `n_masked_patches` vector, 1 when that is a scalar.

    Example:
        >>> import numpy as np
        >>> num_stacked({N_MASKED_PATCHES: np.zeros([4], "int32")}), num_stacked({N_MASKED_PATCHES: np.int32(3)})
        (4, 1)
    """
    counts = batch.get(N_MASKED_PATCHES) if isinstance(batch, dict) else None
    if counts is None or len(counts.shape) == 0:
        return 1
    return int(counts.shape[0])
