"""Row arithmetic on multi-crop batches that stack micro-batches and replicas.

A batch of the pipeline may stack R replicas' shares, each of k micro-batches, replica-major (see
`keras_dinov2.data.group_micro_batches` and `keras_dinov2.distribute.stack_batches`); these functions find the rows
of one micro-batch, reorder rows into the global view-major order and offset patch indices into the stacked rows.
"""

import keras
from keras import ops

from keras_dinov2.data.batch import N_MASKED_PATCHES
from keras_dinov2.ops.eager import take_rows


def unpack(data):
    if isinstance(data, (tuple, list)):
        # (x,) from a generator or PyDataset; targets are not used.
        data = keras.utils.unpack_x_y_sample_weight(tuple(data))[0]
    return data


def micro_rows(rows, index, k, replicas, views=1):
    """The rows of micro-batch `index` in rows laid out (views, replicas, k, per, ...)."""
    if k == 1:
        return rows
    shape = tuple(rows.shape)
    x = ops.reshape(rows, (views, replicas, k, -1) + shape[1:])
    return ops.reshape(x[:, :, index], (-1,) + shape[1:])


def replica_count(data):
    # A replica-stacked batch carries one masked-patch count per replica.
    counts = data.get(N_MASKED_PATCHES)
    if counts is None or len(counts.shape) != 1:
        return 1
    return int(counts.shape[0])


def view_major(rows, shards, views):
    """Rows of `shards` stacked replica batches (each view-major) in global view-major order.

    (shards * views * b, ...) -> (views * shards * b, ...): view v's rows become those of every
    replica in turn, as one batch of shards * b images.
    """
    if shards == 1:
        return rows
    shape = tuple(rows.shape)
    per_view = shape[0] // (shards * views)
    x = ops.reshape(rows, (shards, views, per_view) + shape[1:])
    x = ops.swapaxes(x, 0, 1)
    return ops.reshape(x, (shape[0],) + shape[1:])


def stacked_patch_indices(mask_indices, shards, crops_per_shard, num_patches):
    """Replica-local flat patch indices -> indices into the stacked (shards * 2b * N) patch rows."""
    per_shard = mask_indices.shape[0] // shards
    offsets = ops.arange(shards, dtype="int32")[:, None] * (crops_per_shard * num_patches)
    return ops.reshape(ops.reshape(mask_indices, (shards, per_shard)) + offsets, (-1,))


def gather_rows(tokens, flat_indices):
    """Rows of (B, N, D) tokens at flat indices into the B * N patches."""
    return take_rows(tokens, flat_indices)


def batch_layout(data, k):
    """(replicas R, micro-batches k) of a batch that stacks R * k per-replica micro-batches.

    Stacked batches are replica-major: replica r's k micro-batches follow each other (see
    `keras_dinov2.data.group_micro_batches` and `keras_dinov2.distribute.stack_batches`).
    """
    shards = replica_count(data)
    if shards % k:
        raise ValueError(
            f"gradient_accumulation_steps={k} needs batches that stack k micro-batches per "
            f"replica, received a batch of {shards} stacked micro-batch(es). Build the data with "
            f"`group_micro_batches(dataset, {k})` (or a distribution's `dataset(..., micro_batches={k})`)."
        )
    return shards // k, k


def micro_batch(data, index, k):
    """Micro-batch `index` (of k) of a stacked batch dict, every replica's share of it; the batch if k = 1."""
    replicas, k = batch_layout(data, k)
    if k == 1:
        return data
    out = {}
    for key, value in data.items():
        shape = tuple(value.shape)
        x = ops.reshape(value, (replicas, k, shape[0] // (replicas * k)) + shape[1:])
        out[key] = ops.reshape(x[:, index], (-1,) + shape[1:])
    return out
