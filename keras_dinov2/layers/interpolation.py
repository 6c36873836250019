"""PyTorch-exact bicubic resampling of position-embedding grids, written with keras.ops.

TensorFlow's and JAX's bicubic resizers use a different cubic coefficient and edge rules, so
they cannot reproduce the position embeddings of checkpoints trained with PyTorch. Here the
resampling is separable: one dense (out, in) weight matrix per axis, built from the same
formulas as PyTorch's `F.interpolate(mode="bicubic", align_corners=False)` kernels, applied
with two matrix products. The matrices are built with keras.ops from a symbolic output size, so
the same code runs under `jit` and `tf.function` with unknown image sizes; for sizes known
ahead (Python ints) the same float32 formulas run once in NumPy and the matrices are cached
constants (on an eager backend building them cost about a tenth of a small backbone's call).
"""

import functools
import types

import numpy as np
from keras import ops

from keras_dinov2.ops.eager import resample_axes

# The three resampling rules found in released DINOv2 models.
INTERPOLATION_MODES = ("original", "registers", "transformers")


# The keras.ops the matrices use, in NumPy: float32 arrays and Python scalars round alike in both.
_NUMPY = types.SimpleNamespace(
    abs=np.abs, where=np.where, zeros_like=np.zeros_like, arange=np.arange, floor=np.floor, clip=np.clip,
    equal=np.equal, maximum=np.maximum, minimum=np.minimum, logical_and=np.logical_and, sum=np.sum,
    cast=lambda x, dtype: np.asarray(x).astype(dtype),
)


def _cubic(x, a, ops=ops):
    """Keys' cubic convolution kernel with coefficient `a`, evaluated at distance `x`."""
    x = ops.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return ops.where(x < 1.0, near, ops.where(x < 2.0, far, ops.zeros_like(x)))


def bicubic_matrix(in_size, out_size, step=None, antialias=False, ops=ops):
    """Returns the (out_size, in_size) float32 matrix of PyTorch's 1-D bicubic resampling.

    Args:
        in_size: int. Length of the input axis.
        out_size: int or scalar tensor. Length of the output axis.
        step: optional float or scalar tensor. Distance in input pixels between two output
            pixels. PyTorch uses `1 / scale_factor` when a scale factor is given and
            `in_size / out_size` (the default here) when an output size is given.
        antialias: bool, default False. False reproduces PyTorch's plain bicubic kernel
            (a = -0.75, four taps clamped to the edge). True reproduces its antialiased kernel
            (a = -0.5, support widened by the step when downsampling, taps outside the input
            dropped, weights renormalized to sum to one).
        ops: the module of operations, default keras.ops; any namespace with the same functions works (the
            resampling keeps matrices of known sizes built by a NumPy one, as float32 arrays).

    Example:
    >>> w = bicubic_matrix(16, 7, antialias=True)   # (7, 16); resized = w @ grid
    """
    if step is None:
        step = float(in_size) / ops.cast(out_size, "float32")
    step = ops.cast(step, "float32")
    i = ops.cast(ops.arange(out_size), "float32")[:, None]
    j = ops.cast(ops.arange(in_size), "float32")[None, :]
    if not antialias:
        src = step * (i + 0.5) - 0.5
        base = ops.floor(src)
        t = src - base
        weights = 0.0
        for tap in (-1, 0, 1, 2):
            index = ops.clip(base + tap, 0.0, float(in_size - 1))
            coefficient = _cubic(t - tap, -0.75, ops)
            weights = weights + coefficient * ops.cast(ops.equal(index, j), "float32")
        return weights
    support = ops.where(step >= 1.0, 2.0 * step, 2.0)
    inv_scale = ops.where(step >= 1.0, 1.0 / step, 1.0)
    center = step * (i + 0.5)
    # PyTorch truncates these bounds to integers before clamping them to the input.
    low = ops.maximum(ops.floor(center - support + 0.5), 0.0)
    high = ops.minimum(ops.floor(center + support + 0.5), float(in_size))
    inside = ops.logical_and(j >= low, j < high)
    weights = ops.where(inside, _cubic((j - center + 0.5) * inv_scale, -0.5, ops), 0.0)
    total = ops.sum(weights, axis=1, keepdims=True)
    return weights / ops.where(total == 0.0, 1.0, total)


def resample_grid(grid, out_height, out_width, mode):
    """Resamples a square (M, M, D) position grid to (out_height, out_width, D) in float32.

    Args:
        grid: tensor (M, M, D). The learned patch position embeddings as a grid.
        out_height: int or scalar tensor. Rows of the output grid.
        out_width: int or scalar tensor. Columns of the output grid.
        mode: str. `"original"`: the first DINOv2 release (PyTorch bicubic given
            `scale_factor = (g + 0.1) / M`, so input coordinates step by M / (g + 0.1), no
            antialias); `"registers"`: the registers release (output size given, antialias);
            `"transformers"`: Hugging Face's `Dinov2Model` port (output size given, no
            antialias). At interpolated sizes the three give different embeddings.

    Example:
    >>> resample_grid(ops.zeros((16, 16, 8)), 7, 7, "registers").shape   # (7, 7, 8)
    """
    if mode not in INTERPOLATION_MODES:
        raise ValueError(
            f"`interpolation` must be one of {INTERPOLATION_MODES}, received {mode!r}."
        )
    size = int(grid.shape[0])
    grid = ops.cast(grid, "float32")
    rows, cols = (_axis_matrix(size, out, mode) for out in (out_height, out_width))
    return resample_axes(rows, grid, cols)


def _axis_matrix(size, out, mode):
    if isinstance(out, int):
        return _constant_matrix(size, out, mode)
    if mode == "original":
        return bicubic_matrix(size, out, step=_offset_step(size, out))
    return bicubic_matrix(size, out, antialias=mode == "registers")


@functools.lru_cache(maxsize=64)
def _constant_matrix(size, out, mode):
    """`_axis_matrix` for a known output size: computed once, in NumPy, with the same float32 formulas."""
    if mode == "original":
        matrix = bicubic_matrix(size, out, step=_offset_step(size, out), ops=_NUMPY)
    else:
        matrix = bicubic_matrix(size, out, antialias=mode == "registers", ops=_NUMPY)
    matrix = np.asarray(matrix, "float32")
    matrix.setflags(write=False)
    return matrix


def _offset_step(size, out):
    """Step of the "original" rule: PyTorch inverts the double `scale_factor` (g + 0.1) / M."""
    if isinstance(out, int):
        return 1.0 / ((out + 0.1) / size)
    return float(size) / (ops.cast(out, "float32") + 0.1)
