"""Argument checks and NumPy conversion shared by the evaluation modules (features, k-NN, linear probe, monitor)."""

import numbers

import numpy as np


def check_positive_int(name, value):
    """`value` as an int, or a `ValueError` naming `name` when it is not a positive integer (bools refused).

    Example:
    >>> check_positive_int("k", 20)
    20
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, received {value!r}.")
    return int(value)


def to_numpy(x):
    """A NumPy array of `x`: a NumPy array, a list, or a backend tensor (a torch tensor is moved to the CPU first).

    Example:
    >>> to_numpy(keras.ops.ones((2, 3))).shape
    (2, 3)
    """
    # torch tensors (possibly on an accelerator) have no usable __array__ off the CPU.
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
    return np.asarray(x)


def check_features_labels(features, labels, features_name, labels_name):
    """(float32 features (num, dim), int64 labels (num,)), checked; errors name the two arguments.

    Labels may be any integer dtype, or floats holding whole numbers; they must be non-negative class ids, one per
    feature row, and there must be at least one row.

    Example:
    >>> x, y = check_features_labels(np.ones((4, 8)), [0, 1, 1, 2], "train_features", "train_labels")
    """
    features = np.asarray(to_numpy(features), dtype=np.float32)
    labels = np.asarray(to_numpy(labels))
    if features.ndim != 2:
        raise ValueError(f"`{features_name}` must have shape (num, dim), received shape {features.shape}.")
    if labels.ndim != 1:
        raise ValueError(f"`{labels_name}` must have shape (num,), received shape {labels.shape}.")
    if len(features) != len(labels):
        raise ValueError(
            f"`{features_name}` and `{labels_name}` must have the same length, received {len(features)} and "
            f"{len(labels)}."
        )
    if len(labels) == 0:
        raise ValueError(f"`{features_name}` must not be empty.")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.equal(np.mod(labels, 1), 0)):
            raise ValueError(f"`{labels_name}` must hold integer class ids, received dtype {labels.dtype}.")
    labels = labels.astype(np.int64)
    if labels.min() < 0:
        raise ValueError(f"`{labels_name}` must be non-negative class ids, received minimum {labels.min()}.")
    return features, labels


def resolve_num_classes(num_classes, *label_arrays):
    """The number of classes: `num_classes` checked against the labels, or the largest label + 1 when None.

    Example:
    >>> resolve_num_classes(None, np.array([0, 3]), np.array([1]))
    4
    """
    observed = int(max(labels.max() for labels in label_arrays)) + 1
    if num_classes is None:
        return observed
    num_classes = check_positive_int("num_classes", num_classes)
    if observed > num_classes:
        raise ValueError(f"`num_classes` is {num_classes} but the labels reach {observed - 1}.")
    return num_classes


def check_dtype(dtype):
    """`dtype` as a NumPy dtype, float32 or float64 (the k-NN's precisions), else a `ValueError`.

    Example:
    >>> check_dtype("float64")
    dtype('float64')
    """
    if np.dtype(dtype) not in (np.float32, np.float64):
        raise ValueError(f"`dtype` must be 'float32' or 'float64', received {dtype!r}.")
    return np.dtype(dtype)


def check_temperature(temperature):
    """`temperature` as given when it is a positive number (the k-NN vote's T), else a `ValueError`.

    Example:
    >>> check_temperature(0.07)
    0.07
    """
    if not (isinstance(temperature, numbers.Real) and temperature > 0):
        raise ValueError(f"`temperature` must be a positive number, received {temperature!r}.")
    return temperature


def check_train_test(train_features, train_labels, test_features, test_labels):
    """The reference set and the queries through `check_features_labels`, checked to have one feature width.

    Returns:
        (train_features, train_labels, test_features, test_labels): float32 (num, dim) and int64 (num,) arrays.
    """
    train_features, train_labels = check_features_labels(train_features, train_labels, "train_features",
                                                         "train_labels")
    test_features, test_labels = check_features_labels(test_features, test_labels, "test_features", "test_labels")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"`train_features` and `test_features` must have the same width, received {train_features.shape[1]} "
            f"and {test_features.shape[1]}."
        )
    return train_features, train_labels, test_features, test_labels
