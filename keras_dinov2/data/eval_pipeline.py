"""The evaluation pipelines: batches of resized, center-cropped, normalized images in stored order, labelled
(`eval_dataset`, for k-NN and linear probes) or with their positions in the source (`pool_dataset`, for
embedding a curation pool, labelled or not)."""

from __future__ import annotations

import tensorflow as tf

from keras_dinov2.config import IMAGENET_MEAN, IMAGENET_STD
from keras_dinov2.data.augment import normalize
from keras_dinov2.data.checks import check_positive_int, check_shards
from keras_dinov2.data.image_headers import DEFAULT_MAX_IMAGE_PIXELS
from keras_dinov2.data.skipping import SkipLog, decode_skipping, report_at_end
from keras_dinov2.data.sources import get_source

__all__ = ["eval_dataset", "pool_dataset", "resize_center_crop"]

# Our map functions have no Python control flow on tensors: skipping AutoGraph saves tracing time.
_plain = tf.autograph.experimental.do_not_convert


def resize_center_crop(image, resize_size, crop_size, method):
    """torchvision Resize(shorter side = resize_size) then CenterCrop(crop_size)."""
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    short = tf.minimum(height, width)
    long = tf.maximum(height, width)
    new_long = tf.cast(
        tf.cast(resize_size, tf.float64) * tf.cast(long, tf.float64) / tf.cast(short, tf.float64),
        tf.int32,
    )
    new_h = tf.where(height <= width, resize_size, new_long)
    new_w = tf.where(height <= width, new_long, resize_size)
    image = tf.image.resize(image, tf.stack([new_h, new_w]), method=method, antialias=True)
    image = tf.clip_by_value(image, 0.0, 1.0)
    top = tf.cast(tf.round(tf.cast(new_h - crop_size, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - crop_size, tf.float32) / 2.0), tf.int32)
    image = image[top : top + crop_size, left : left + crop_size]
    image.set_shape([crop_size, crop_size, 3])
    return image


def eval_dataset(
    source,
    image_size: int,
    batch_size: int,
    *,
    resize_size: int | None = None,
    split: str | None = None,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    interpolation: str = "bicubic",
    num_shards: int = 1,
    shard_index: int = 0,
    drop_remainder: bool = False,
    num_parallel_calls: int = tf.data.AUTOTUNE,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> tf.data.Dataset:
    """Build a labelled evaluation dataset of (images, labels): resize, center crop, normalize; stored order.

    The reference's k-NN / linear transform: resize the shorter side to `resize_size` (bicubic), center crop
    `image_size`, normalize with the ImageNet mean and std. For k-NN on the bundled digits use "digits:train" as the
    reference set and "digits:test" (the held-out 25%) as queries.

    Args:
        source: str, path-like, NumPy array or ImageSource (see `get_source`); must be labelled.
        image_size: int. Side of the output images.
        batch_size: int. Images per batch.
        resize_size: int or None, default None, meaning int(image_size * 256 / 224) (reference 256 for 224).
        split: str or None, default None. Passed to `get_source` ("test" for the held-out digits).
        mean: 3 floats, default ImageNet mean.
        std: 3 floats, default ImageNet std.
        interpolation: str, default "bicubic". A `tf.image.resize` method (antialiased).
        num_shards: int, default 1.
        shard_index: int, default 0.
        drop_remainder: bool, default False. Drop the last partial batch.
        num_parallel_calls: int, default tf.data.AUTOTUNE.
        max_image_pixels: int or None, default 89,478,485. For a folder or "tfds:" spec: images whose header
            declares more pixels are left out (and named), never decoded; None for no limit.

    Returns:
        `tf.data.Dataset` of (float32 (B, S, S, 3), int32 (B,)).

    Example:
        >>> ds = eval_dataset("digits", 32, 64, split="test")
        >>> images, labels = next(iter(ds))
        >>> images.shape, labels.shape
        (TensorShape([64, 32, 32, 3]), TensorShape([64]))
    """
    image_size = check_positive_int("image_size", image_size)
    batch_size = check_positive_int("batch_size", batch_size)
    if resize_size is None:
        resize_size = int(image_size * 256 / 224)
    resize_size = check_positive_int("resize_size", resize_size)
    if resize_size < image_size:
        raise ValueError(
            f"resize_size must be >= image_size ({image_size}); received {resize_size}."
        )
    src = get_source(source, split=split, max_image_pixels=max_image_pixels)
    if not src.has_labels:
        raise ValueError(
            f"eval_dataset needs labelled images; {src.name} has no labels (use class subfolders)."
        )
    check_shards(num_shards, shard_index)

    def prepare(image, label):
        image = resize_center_crop(image, resize_size, image_size, interpolation)
        return normalize(image, mean, std), label

    ds = src.stream(num_shards, shard_index)
    if src.can_fail:
        # Undecodable files are left out (and named at the end of each pass); the rest keep their order.
        log = SkipLog(src.name, refilled=False, explain=src.explain)
        pass_id = tf.constant(0, tf.int64)
        ds = ds.map(_plain(lambda record: (record, tf.constant(0, tf.int32))))
        ds = decode_skipping(src, ds, log, pass_id, num_parallel_calls, True)
        ds = report_at_end(ds.map(_plain(lambda image, label, _: (image, label))), log, pass_id)
    else:
        ds = ds.map(_plain(src.decode))
    ds = ds.map(_plain(prepare), num_parallel_calls=num_parallel_calls, deterministic=True)
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


def pool_dataset(
    source,
    image_size: int,
    batch_size: int,
    *,
    start: int = 0,
    stop: int | None = None,
    resize_size: int | None = None,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    interpolation: str = "bicubic",
    num_parallel_calls: int = tf.data.AUTOTUNE,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> tf.data.Dataset:
    """Batches of (images, positions) of the images `start` .. `stop` - 1 of a source, transformed as `eval_dataset`.

    Labels are not needed: a curation pool is usually unlabelled. An image that cannot be decoded is left out (and
    named in a warning at the end of the pass), so the positions (int64, the image's index in the source's stored
    order) say which images each row of features belongs to, and the missing ones are the unreadable ones.

    Args:
        source: str, path-like, list of files, NumPy array or ImageSource (see `get_source`).
        image_size: int. Side of the output images.
        batch_size: int. Images per batch (the last one may be smaller).
        start: int, default 0. First position read.
        stop: int or None, default None (the end of the source). Position after the last one read.
        resize_size, mean, std, interpolation, num_parallel_calls, max_image_pixels: as `eval_dataset`.

    Returns:
        `tf.data.Dataset` of (float32 (B, S, S, 3), int64 (B,)).

    Example:
        >>> images, positions = next(iter(pool_dataset("digits", 32, 64, start=64)))
        >>> positions[:3].numpy()
        array([64, 65, 66])
    """
    image_size = check_positive_int("image_size", image_size)
    batch_size = check_positive_int("batch_size", batch_size)
    resize_size = check_positive_int("resize_size", resize_size or int(image_size * 256 / 224))
    src = get_source(source, max_image_pixels=max_image_pixels)
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be an integer >= 0; received {start!r}.")
    if stop is not None and (isinstance(stop, bool) or not isinstance(stop, int) or stop < start):
        raise ValueError(f"stop must be None or an integer >= start ({start}); received {stop!r}.")
    if src.random_access:
        stop = src.num_examples if stop is None else min(stop, src.num_examples)
        positions = tf.data.Dataset.range(start, max(stop, start))
        records = positions.map(_plain(lambda i: (src.read(i), i)))
    else:
        records = src.stream().skip(start)
        records = records.take(stop - start) if stop is not None else records
        records = records.enumerate(start).map(_plain(lambda i, record: (record, i)))

    def prepare(image, position):
        image = resize_center_crop(image, resize_size, image_size, interpolation)
        return normalize(image, mean, std), position

    if src.can_fail:
        log = SkipLog(src.name, refilled=False, explain=src.explain)
        pass_id = tf.constant(start, tf.int64)
        ds = decode_skipping(src, records, log, pass_id, num_parallel_calls, True)
        ds = report_at_end(ds.map(_plain(lambda image, label, position: (image, position))), log, pass_id)
    else:
        ds = records.map(_plain(lambda record, position: (src.decode(record)[0], position)))
    ds = ds.map(_plain(prepare), num_parallel_calls=num_parallel_calls, deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
