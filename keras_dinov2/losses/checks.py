"""Shape and dtype checks shared by the objectives; errors name the argument and the shapes received."""

import math

import keras
from keras import ops


def as_float32(x):
    dtype = getattr(x, "dtype", None)
    if dtype is not None and ops.is_tensor(x) and keras.backend.standardize_dtype(dtype) == "float32":
        return x  # already one: the conversion and the cast are ~5 us of dispatch each on PyTorch
    return ops.cast(ops.convert_to_tensor(x), "float32")


def static_shape(x):
    if not hasattr(x, "shape"):
        x = ops.convert_to_tensor(x)
    return tuple(x.shape)


def check_rank(name, x, ranks):
    shape = static_shape(x)
    if len(shape) not in ranks:
        expected = " or ".join(str(r) for r in ranks)
        raise ValueError(f"`{name}` must have rank {expected}, received shape {shape}.")
    return shape


def same_dim(a, b):
    return a is None or b is None or a == b


def check_same_shape(name_a, a, name_b, b):
    sa, sb = static_shape(a), static_shape(b)
    if len(sa) != len(sb) or not all(same_dim(x, y) for x, y in zip(sa, sb)):
        raise ValueError(
            f"`{name_a}` and `{name_b}` must have the same shape, received {name_a}.shape={sa} and "
            f"{name_b}.shape={sb}."
        )


def rows_mask(name, valid, n_valid, num_rows, shape):
    """A (rows,) bool mask from `valid` or from a count `n_valid` of leading valid rows, or None."""
    if valid is not None:
        vshape = static_shape(valid)
        if len(vshape) != 1 or not same_dim(vshape[0], shape[0]):
            raise ValueError(
                f"`valid` must have shape (rows,) matching `{name}`, received valid.shape={vshape} and "
                f"{name}.shape={shape}."
            )
        valid = ops.convert_to_tensor(valid)
        if keras.backend.standardize_dtype(valid.dtype) == "bool":
            return valid
        return ops.greater(as_float32(valid), 0.0)
    if n_valid is not None:
        # The data pipeline pads the masked-patch buffer at the end: the first n_valid rows are real.
        return ops.less(ops.arange(num_rows), ops.cast(n_valid, "int32"))
    return None


def check_center(center, logits_shape):
    cshape = static_shape(center)
    size = math.prod(cshape) if all(d is not None for d in cshape) else None
    num_prototypes = logits_shape[-1] if logits_shape else None
    if (
        not logits_shape
        or not cshape
        or not same_dim(cshape[-1], num_prototypes)
        or not same_dim(size, num_prototypes)
    ):
        raise ValueError(
            "`center` must hold one value per prototype of `teacher_logits`, received "
            f"center.shape={cshape} and teacher_logits.shape={logits_shape}."
        )
