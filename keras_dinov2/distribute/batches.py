"""Replica-stacked batches: the per-replica multi-crop batches of one host concatenated along the batch axis.

A JAX program over the global batch is fed every replica's batch of this host at once: every array is the
concatenation of the replicas' arrays, and `n_masked_patches` (a scalar per batch) becomes a vector with one
entry per replica, which tells the pretrainer how many replicas the batch holds.
"""

import keras
import numpy as np

from keras_dinov2.data.batch import N_MASKED_PATCHES


def _is_scalar(x):
    return len(getattr(x, "shape", ())) == 0


def stack_batches(batches):
    """Replica-stacked batch from per-replica multi-crop batches (NumPy or tensors).

    Every array is concatenated along axis 0; `n_masked_patches` (a scalar per batch) becomes a vector with
    one entry per replica, which tells the pretrainer how many replicas the batch holds.

    Example:
    >>> stacked = stack_batches([batch_replica_0, batch_replica_1])
    """
    if not batches:
        raise ValueError("`batches` must hold at least one batch, received an empty list.")
    out = {}
    for key in batches[0]:
        values = [np.asarray(keras.ops.convert_to_numpy(b[key])) for b in batches]
        out[key] = np.stack(values) if _is_scalar(values[0]) else np.concatenate(values, 0)
    return out


def stack_datasets(datasets):
    """tf.data: zips per-replica datasets into one of replica-stacked batches (see `stack_batches`)."""
    import tensorflow as tf

    if len(datasets) == 1:
        single = datasets[0]

        def expand(batch):
            return {k: (tf.reshape(v, [1]) if v.shape.rank == 0 else v) for k, v in batch.items()}

        return single.map(expand)

    def stack(*batches):
        out = {}
        for key in batches[0]:
            values = [b[key] for b in batches]
            out[key] = tf.stack(values) if values[0].shape.rank == 0 else tf.concat(values, 0)
        return out

    return tf.data.Dataset.zip(tuple(datasets)).map(stack).prefetch(tf.data.AUTOTUNE)


def replica_count(batch):
    """Replicas held by a batch: the length of its `n_masked_patches` vector when stacked, else 1."""
    counts = batch.get(N_MASKED_PATCHES) if isinstance(batch, dict) else None
    if counts is None or len(counts.shape) == 0:
        return 1
    return int(counts.shape[0])
