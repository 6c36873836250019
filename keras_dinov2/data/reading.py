"""Reading the multi-crop pipeline's images: the passes over the data, this shard's records, decoded, with seeds.

Stages 1 and 2 of `keras_dinov2.data.pipeline.multicrop_dataset`: `epoch_keys` gives one key per pass, and
`read_records` turns each into the pass's (image, element seed) pairs: `random_access_pass` for sources read by
index (an exact permutation per epoch), `shuffled_stream` and `stream_pass` for streams (a shuffle buffer), both
through `decode_pass`, which drops and names the images that cannot be decoded while keeping the pass's length.
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf

from keras_dinov2.data.skipping import decode_skipping, report_at_end

__all__ = [
    "decode_pass",
    "epoch_keys",
    "random_access_pass",
    "read_records",
    "shuffled_stream",
    "stream_pass",
]

# Streams of the stateless seeds folded into an epoch's key: the permutation, and the order of the stand-ins.
_PERMUTATION_STREAM = 11
_REFILL_STREAM = 17

# Our map functions have no Python control flow on tensors: skipping AutoGraph saves tracing time.
_plain = tf.autograph.experimental.do_not_convert


def _fold(seed, value):
    return tf.random.experimental.stateless_fold_in(seed, tf.cast(value, tf.int32))


# ----------------------------------------------------------------------------------------------------------------------
# 1. Epochs


def epoch_keys(seed, repeat, start_epoch=0):
    """A dataset of int64 keys (seed, epoch), shape (2,): one per pass over the data.

    With `repeat`, the infinite epochs start_epoch, start_epoch + 1, ...; otherwise one element per pass, drawn by
    `tf.data.Dataset.random` (so TensorFlow's global seed enters it too), different at every pass over the same
    dataset object.
    """
    if repeat:
        epochs = tf.data.Dataset.range(int(start_epoch), 2**62)
    else:
        # One element per pass, different for every pass over the same dataset object.
        epochs = tf.data.Dataset.random(
            seed=int(seed) % 2**31, rerandomize_each_iteration=True
        ).take(1)
    seed_value = int(seed)
    return epochs.map(
        _plain(lambda e: tf.stack([tf.constant(seed_value, tf.int64), tf.cast(e, tf.int64)]))
    )


# ----------------------------------------------------------------------------------------------------------------------
# 2. Reading and decoding


def decode_pass(src, records, key, log, per_shard, num_parallel_calls, deterministic):
    """(record, seed) -> (image, seed) for one pass; a pass never ends early on an undecodable file.

    A source that can fail to decode goes through `decode_skipping`: a failure is dropped and named in `log`, the
    pass is cut to `per_shard` images (the stand-ins that follow the pass's own records fill the holes), and the
    log reports at the end of the pass. `key[1]` (the epoch) identifies the pass in the log.
    """
    if not src.can_fail:
        return records.map(_plain(lambda record, seed: (src.decode(record)[0], seed)))
    ds = decode_skipping(src, records, log, key[1], num_parallel_calls, deterministic)
    ds = ds.map(_plain(lambda image, label, seed: (image, seed)))
    if per_shard is not None:
        ds = ds.take(per_shard)
    return report_at_end(ds, log, key[1])


def random_access_pass(src, key, positions, *, shuffle, per_shard, num_shards, decode):
    """One pass of a random-access source: (image, element seed) of this shard's images, in the epoch's order.

    Every shard permutes all the images with the epoch's key and takes the ones at its `positions` (every
    num_shards-th); an element's seed is the key folded with its position. When decoding can fail, stand-ins
    follow: the same shard's images in another order (their own seeds), read only while the pass is not full.

    Args:
        src: ImageSource, random access.
        key: int64 (2,) tensor, the epoch's key.
        positions: int32 tensor, this shard's positions in the permutation.
        shuffle: bool. Permute the images (else stored order).
        per_shard: int. Images per shard and pass.
        num_shards: int.
        decode: (records, key) -> dataset of (image, seed); `decode_pass` with the pipeline's arguments bound.
    """
    n = src.num_examples
    if shuffle:
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int32), _fold(key, _PERMUTATION_STREAM)
        )
        indices = tf.gather(order, positions)
    else:
        indices = positions
    ds = tf.data.Dataset.from_tensor_slices((indices, positions))
    if src.can_fail:
        # Stand-ins for images that fail to decode: the same shard's images in another order, with
        # their own seeds; `take` stops reading them once the pass is full.
        refill = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int32), _fold(key, _REFILL_STREAM)
        )
        ds = ds.concatenate(
            tf.data.Dataset.from_tensor_slices(
                (tf.gather(refill, positions), positions + per_shard * num_shards)
            )
        )
    return decode(
        ds.map(_plain(lambda index, p: (src.read(tf.cast(index, tf.int64)), _fold(key, p)))),
        key,
    )


def shuffled_stream(src, *, shuffle, shuffle_buffer_size, seed, start_epoch, num_shards, shard_index, per_shard):
    """This shard's records of a streaming source, cut to `per_shard` and buffer-shuffled when `shuffle`.

    The buffer is reshuffled at each pass over the stream (each epoch) in a sequence fixed by the seed. Its seed
    must be a Python int (a tensor seed breaks under tf.random.set_seed(0)), so for streams the order is keyed by
    (seed, start_epoch) and the passes since, not by the epoch alone.
    """
    stream = src.stream(num_shards, shard_index, shuffle_files=shuffle)
    if per_shard is not None:
        stream = stream.take(per_shard)
    if shuffle:
        shuffle_seed = int(
            np.random.SeedSequence([int(seed), int(start_epoch)]).generate_state(1)[0] >> 1
        )
        stream = stream.shuffle(
            shuffle_buffer_size, seed=shuffle_seed, reshuffle_each_iteration=True
        )
    return stream


def stream_pass(stream, key, *, refill, num_shards, shard_index, decode):
    """One pass of a stream: (image, element seed), the seed from the key and the record's global position.

    With `refill`, stand-ins for images that fail to decode come from a second (reshuffled) pass of the stream.
    """
    ds = (stream.repeat(2) if refill else stream).enumerate()
    ds = ds.map(
        _plain(lambda i, record: (record, _fold(key, i * num_shards + shard_index)))
    )
    return decode(ds, key)


def read_records(src, keys, decode, *, shuffle, shuffle_buffer_size, seed, start_epoch, num_shards, shard_index,
                 per_shard):
    """(image, element seed) of every pass keyed by `keys`, this shard's share of `src`, decoded by `decode`."""
    if src.random_access:
        positions = tf.range(shard_index, per_shard * num_shards, num_shards, dtype=tf.int32)
        one_pass = functools.partial(random_access_pass, src, positions=positions, shuffle=shuffle,
                                     per_shard=per_shard, num_shards=num_shards, decode=decode)
        return keys.flat_map(_plain(lambda key: one_pass(key)))
    stream = shuffled_stream(src, shuffle=shuffle, shuffle_buffer_size=shuffle_buffer_size, seed=seed,
                             start_epoch=start_epoch, num_shards=num_shards, shard_index=shard_index,
                             per_shard=per_shard)
    one_pass = functools.partial(stream_pass, stream, refill=src.can_fail and per_shard is not None,
                                 num_shards=num_shards, shard_index=shard_index, decode=decode)
    return keys.flat_map(_plain(lambda key: one_pass(key)))
