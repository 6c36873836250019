"""Kernels for the small eager steps of the embeddings and the objectives, behind one interface.

Each function is a handful of tensor ops: the position grid's resampling, the token assembly, a row gather, the
split of a concatenated head output, KoLeo, the teacher's centering (with its center's update: one call per head in a
step), the soft cross-entropy and the collapse signals. Where ops dispatch one by one from Python (PyTorch), a dozen
Keras ops of 5-15 us of dispatch each cost more than the kernels they wrap, so the backend's module
(`keras_dinov2.ops.torch`) runs them as the torch calls the reference makes. The functions that return None where the
backend has no kernel (all but `resample_axes`, `take_rows` and `split_rows`) leave the plain Keras formulation to
their caller (the losses and layers, which define the values); tests compare each kernel against it and against
NumPy. Compiled backends (XLA, tf.function) take the plain path: their compiler removes the dispatch.
"""

import keras
import numpy as np
from keras.src.backend import get_autocast_scope  # not in the public API

from keras_dinov2.ops import eager_kernel, float32_kernel


def resample_axes(rows, grid, cols):
    """einsum("hm,mnd,wn->hwd", rows, grid, cols): a (M, N, D) grid resampled by (H, M) and (W, N) matrices (NumPy
    arrays kept by the caller, or tensors). PyTorch in float32: two torch matmuls, NumPy matrices converted once
    (`keras_dinov2.ops.torch.resample_axes`; the local crops' position grid was ~0.3 ms of a small model's step).
    Elsewhere the Keras einsum."""
    matrices = [m for m in (rows, cols) if not isinstance(m, np.ndarray)]
    function = float32_kernel("resample_axes", grid, *matrices)
    if function is not None:
        return function(rows, grid, cols)
    return keras.ops.einsum("hm,mnd,wn->hwd", rows, grid, cols)


def koleo(x, eps):
    """KoLeo of float32 rows x (N >= 2, D) as `keras_dinov2.losses.koleo` defines it (one group), as one kernel where
    the backend has one, else None. PyTorch: the nearest-neighbour search without autograd and `pairwise_distance`."""
    function = float32_kernel("koleo", x)
    return None if function is None else function(x, float(eps))


def softmax_center(logits, center, temperature):
    """softmax((logits - center) / temperature) over the last axis for float32 `logits` and `center`, as one kernel
    where the backend has one, else None (`keras_dinov2.losses.softmax_center`)."""
    function = float32_kernel("softmax_center", logits, center)
    return None if function is None else function(logits, center, temperature)


def update_center(center, logits, momentum, valid, reduction):
    """`keras_dinov2.losses.update_center` for float32 `center` and `logits` and a boolean `valid` or None, as one
    kernel where the backend has one (the collectives through `reduction`), else None."""
    function = float32_kernel("update_center", center, logits)
    return None if function is None else function(center, logits, float(momentum), valid, reduction)


def center_targets(logits, center, temperature, momentum, valid, reduction):
    """`softmax_center(logits, center, temperature)`, then `center` assigned `update_center(center, logits, momentum,
    valid, reduction)` in place, for float32 `logits`, a float32 Keras variable `center` and a boolean `valid` or None,
    as one kernel where the backend has one, else None (nothing assigned then). A training step's centering of one
    head: the prologue and the assignment of the two calls cost more than their kernels on PyTorch."""
    if not isinstance(center, keras.Variable) or center.dtype != "float32" or not _bool_or_none(valid):
        return None
    function = float32_kernel("center_targets", logits)
    return None if function is None else function(logits, center.value, temperature, float(momentum), valid, reduction)


def _bool_or_none(x):
    return x is None or (keras.ops.is_tensor(x) and keras.backend.standardize_dtype(x.dtype) == "bool")


def assemble_tokens(patches, masks, mask_token, cls_token, positions, registers=None):
    """[CLS; patches, masked ones replaced by `mask_token`] + `positions`, with the `registers` inserted after CLS:
    `DINOv2Embeddings`' token sequence (float32) from patch embeddings in any float dtype, as one kernel where the
    backend has one, else None. `positions` is a float32 tensor (1, 1 + N, D); the tokens are float32 variables, read
    as they are: None within an autocast scope that would read them in another dtype."""
    scope = get_autocast_scope()
    if not keras.ops.is_tensor(patches) or (scope is not None and scope.dtype):
        return None
    function = float32_kernel("assemble_tokens", positions)
    return None if function is None else function(patches, masks, mask_token, cls_token, positions, registers)


def take_rows(x, indices):
    """Rows of `x` flattened over its leading axes ((..., D) as (rows, D)) at integer `indices`, each in [0, rows)
    (no negative indices): `keras.ops.take` of the reshaped x along axis 0; on PyTorch one `index_select` (Keras'
    reshape and take are ~30 us of dispatch around it)."""
    function = eager_kernel("take_rows") if keras.ops.is_tensor(x) and keras.ops.is_tensor(indices) else None
    if function is not None:
        return function(x, indices)
    return keras.ops.take(keras.ops.reshape(x, (-1, keras.ops.shape(x)[-1])), indices, axis=0)


def soft_cross_entropy(logits, targets, temperature):
    """-sum(targets * log_softmax(logits / temperature)) per row for float32 tensors, the targets a constant, as one
    kernel where the backend has one, else None (`keras_dinov2.losses.dino_cross_entropy` and its iBOT form)."""
    function = float32_kernel("soft_cross_entropy", logits, targets)
    return None if function is None else function(logits, targets, temperature)


def collapse_entropies(probs, reduction=None):
    """(mean per-row entropy, entropy of the mean row) of float32 probabilities (rows, K), logs floored at 1e-12, the
    mean row's over replicas with a `reduction`, as one kernel where the backend has one, else None."""
    function = float32_kernel("collapse_entropies", probs)
    return None if function is None else function(probs, reduction)


def split_rows(x, sizes):
    """x split along its first axis into consecutive parts of `sizes` rows (ints summing to the rows of x): slices;
    on PyTorch one `split` (the reference's split of its head's output)."""
    function = eager_kernel("split_rows") if keras.ops.is_tensor(x) else None
    if function is not None:
        return function(x, list(sizes))
    starts = np.cumsum([0, *sizes])
    return [x[int(a):int(b)] for a, b in zip(starts, starts[1:])]
