"""The tf.data pipelines: multi-crop batches with iBOT masks for `model.fit`, and labelled batches for k-NN.

Keras feeds a `tf.data.Dataset` to every backend (JAX, TensorFlow, PyTorch), so one pipeline serves all three.
Randomness is stateless and keyed: epoch key -> element seed (from the element's position in the epoch's
permutation) -> crop seeds, and the batch's masks from its first element's seed. The same seed therefore gives
the same batches whatever the parallelism, and an epoch can be regenerated on its own (resume).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tensorflow as tf

from keras_dinov2.config import IMAGENET_MEAN, IMAGENET_STD, DataConfig, data_and_patch_size
from keras_dinov2.data.augment import MultiCropAugmentation, normalize
from keras_dinov2.data.masking import sample_masks
from keras_dinov2.data.sources import DEFAULT_MAX_IMAGE_PIXELS, _check_shards, get_source

__all__ = ["multicrop_dataset", "eval_dataset", "BATCH_KEYS"]

# The keys of a multi-crop batch, in order.
BATCH_KEYS = (
    "global_crops",
    "local_crops",
    "masks",
    "mask_indices",
    "masks_weight",
    "n_masked_patches",
)

_PERMUTATION_STREAM = 11
_MASK_STREAM = 13
_REFILL_STREAM = 17


# Our map functions have no Python control flow on tensors: skipping AutoGraph saves tracing time.
_plain = tf.autograph.experimental.do_not_convert

# One augmentation (and so one XLA compilation) per distinct configuration, shared by the datasets of a process.
_AUGMENTATIONS = {}


def _augmentation(config, jit_compile):
    key = (json.dumps(config.to_dict(), sort_keys=True), bool(jit_compile))
    if key not in _AUGMENTATIONS:
        _AUGMENTATIONS[key] = MultiCropAugmentation(
            DataConfig.from_dict(config.to_dict()), jit_compile=jit_compile
        )
    return _AUGMENTATIONS[key]


def _fold(seed, value):
    return tf.random.experimental.stateless_fold_in(seed, tf.cast(value, tf.int32))


class _SkipLog:
    """Names of the images a pipeline skipped because they could not be decoded, reported once per pass.

    tf.data cannot catch a decoding error inside a map function; `_decode_skipping` decodes each record in a
    one-element dataset with `ignore_errors`, so a failure becomes a missing element, and calls back into Python
    only for those failures. At the end of each pass the pipeline prints one message with the count and the
    names (paths), each with the source's note on it when it has one (a header declaring too many pixels);
    files already named in an earlier pass are only counted.
    """

    max_listed = 20

    def __init__(self, source_name, refilled, explain=None):
        self.source_name = source_name
        self.refilled = refilled
        self.explain = explain or (lambda name: "")
        self.skipped = {}  # pass id -> {name: None}, in order of appearance
        self.reported = set()

    def record(self, pass_id, name):
        self.skipped.setdefault(int(pass_id), {})[name.numpy().decode("utf-8", "replace")] = None
        return False

    def report(self, pass_id):
        names = list(self.skipped.pop(int(pass_id), {}))
        if not names:
            return 0
        what = f"{len(names)} image(s) of {self.source_name} that could not be decoded"
        after = (
            "Other images took their places, so the pass kept its length."
            if self.refilled
            else "They were left out."
        )
        new = [name for name in names if name not in self.reported]
        if new:
            notes = {name: self.explain(name) for name in new[: self.max_listed]}
            listed = "\n  ".join(f"{name} ({note})" if note else name for name, note in notes.items())
            more = len(new) - self.max_listed
            tail = f"\n  ... and {more} more" if more > 0 else ""
            large = (
                " Images that are only too large can be read with a higher max_image_pixels "
                "(--max-image-pixels)." if any(notes.values()) else ""
            )
            message = (
                f"skipped {what} (corrupt, truncated, not an image, or more pixels than max_image_pixels) "
                f"in this pass over the data:\n  {listed}{tail}\n{after} Remove or repair these files.{large}"
            )
        else:
            message = f"skipped the same {what} again in this pass."
        self.reported.update(names)
        print("\nWARNING: " + message, file=sys.stderr, flush=True)
        return 0


def _decode_skipping(src, records, log, pass_id, num_parallel_calls, deterministic):
    """(record, extra) -> (image, label, extra), dropping records whose image cannot be decoded (named in `log`).

    Each record is decoded inside its own one-element dataset with `ignore_errors`, followed by a placeholder
    flagged as failed; `take(1)` keeps the image when decoding worked and the placeholder when it raised. The
    placeholders are dropped, and logged, by the filter. Everything stays in the graph except the logging of
    failures.
    """

    def one(record, extra):
        def decoded(record, extra):
            image, label = src.decode(record)
            return image, label, extra, tf.constant(True), tf.constant("")

        attempt = tf.data.Dataset.from_tensors((record, extra)).map(_plain(decoded)).ignore_errors()
        failed = tf.data.Dataset.from_tensors(
            (tf.zeros([1, 1, 3], tf.float32), tf.constant(-1, tf.int32), extra, tf.constant(False),
             src.describe(record))
        )
        return attempt.concatenate(failed).take(1)

    def keep(image, label, extra, ok, name):
        def log_failure():
            flag = tf.py_function(lambda p, n: log.record(p, n), [pass_id, name], tf.bool)
            flag.set_shape([])
            return flag

        return tf.cond(ok, lambda: tf.constant(True), log_failure)

    ds = records.interleave(
        _plain(one),
        cycle_length=8,
        block_length=1,
        num_parallel_calls=num_parallel_calls,
        deterministic=deterministic,
    )
    ds = ds.filter(_plain(keep))
    return ds.map(_plain(lambda image, label, extra, ok, name: (image, label, extra)))


def _report_at_end(ds, log, pass_id):
    """`ds`, then a call to `log.report(pass_id)` once `ds` is exhausted (it adds no element)."""

    def blank(spec):
        shape = [1 if d is None else d for d in spec.shape]
        return tf.fill(shape, "") if spec.dtype == tf.string else tf.zeros(shape, spec.dtype)

    def report(_):
        done = tf.py_function(lambda p: log.report(p) != 0, [pass_id], tf.bool)
        done.set_shape([])
        return tf.nest.map_structure(blank, ds.element_spec), done

    # One extra element that runs the report; its flag is False, so the filter drops it.
    tail = tf.data.Dataset.range(1).map(_plain(report))
    flagged = ds.map(_plain(lambda *element: (element if len(element) > 1 else element[0], tf.constant(True))))
    return flagged.concatenate(tail).filter(_plain(lambda element, ok: ok)).map(
        _plain(lambda element, ok: element)
    )


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; received {value!r}.")
    return int(value)


def _resolve_shards(num_shards, shard_index, input_context):
    if input_context is not None:
        if (num_shards, shard_index) != (1, 0):
            raise ValueError(
                "pass either input_context or num_shards / shard_index, not both; received "
                f"num_shards={num_shards}, shard_index={shard_index} with an input_context."
            )
        num_shards, shard_index = input_context.num_input_pipelines, input_context.input_pipeline_id
    _check_shards(num_shards, shard_index)
    return num_shards, shard_index


def multicrop_dataset(
    source,
    batch_size: int,
    config: DataConfig | None = None,
    *,
    patch_size: int | None = None,
    seed: int = 0,
    repeat: bool = False,
    start_epoch: int = 0,
    skip_images: int = 0,
    shuffle: bool = True,
    shuffle_buffer_size: int = 10_000,
    num_shards: int = 1,
    shard_index: int = 0,
    input_context=None,
    num_parallel_calls: int = tf.data.AUTOTUNE,
    deterministic: bool = True,
    prefetch: int | None = tf.data.AUTOTUNE,
    jit_compile: bool = True,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> tf.data.Dataset:
    """Build the DINOv2 multi-crop dataset that `model.fit` consumes on every backend.

    Each element is one batch of B images, a dict (shapes are static; the last partial batch is dropped):

    ```
    global_crops      float32 (2B, G, G, 3)         view-major: rows 0..B-1 = view 1 of images 0..B-1, then view 2
    local_crops       float32 (n_local*B, L, L, 3)  view-major likewise
    masks             bool    (2B, N)               N = (G / patch)^2; True = patch masked in the student
    mask_indices      int32   (M,)                  flat indices into the 2B*N patch rows of the masked patches,
                                                    then padding entries 0; M = the reference's upper bound
    masks_weight      float32 (M,)                  1 / (masked patches of that image); 0 for padding
    n_masked_patches  int32   ()                    number of real entries in mask_indices
    ```

    Crops are normalized with the ImageNet mean and std. `model.fit(dataset)` receives the dict as `x` (no `y`).
    M is `mask_buffer_size(2B, N, config.masking)` (`keras_dinov2.data.masking`).

    Epochs: by default the dataset is one pass over the data (this shard's share), and every pass (each `fit`
    epoch) draws a new permutation and new augmentations, deterministically from `seed`. The per-pass key comes
    from `tf.data.Dataset.random`, so TensorFlow's global seed (`keras.utils.set_random_seed`) enters it too.
    With `repeat=True` the dataset is infinite and epoch e uses key (seed, e) only: use `fit(...,
    steps_per_epoch=...)`, and `start_epoch` to resume an exact epoch. Batches then run across epoch boundaries
    (like the reference's infinite sampler).

    Undecodable files (corrupt, truncated, empty, not an image, or a header declaring more pixels than the
    source's `max_image_pixels`) are skipped: another image of the shard takes the place of each, so a pass
    keeps its length, and one warning at the end of the pass names them.

    Sharding: every shard sees the same permutation and takes every num_shards-th image (the reference's sharded
    sampler); all shards get the same number of batches. `batch_size` is per shard (per replica), like the
    reference's batch_size_per_gpu; use `strategy.distribute_datasets_from_function(lambda ctx:
    multicrop_dataset(..., input_context=ctx))` with tf.distribute.

    Args:
        source: str, path-like, NumPy array or ImageSource. "digits", a folder, "tfds:NAME[:SPLIT]", ... (see
            `get_source`).
        batch_size: int. Images per batch (B).
        config: DataConfig or None, default None (`DataConfig()`, the ViT-14 recipe: 2 x 224 + 8 x 98).
            A config holding a DataConfig as `.data` and a ModelConfig as `.model` (the run's SSLConfig) is
            accepted too, and gives the patch size.
        patch_size: int or None, default None. The model's patch size (mask grid (G / patch)^2; both crop sizes
            must be multiples of it). None: the `.model.patch_size` of a run config, else `ModelConfig()`'s 14.
        seed: int, default 0. Non-negative seed.
        repeat: bool, default False. Infinite stream of epochs keyed (seed, epoch).
        start_epoch: int, default 0. First epoch when `repeat=True`.
        skip_images: int, default 0. Images of `start_epoch` to leave out (this shard's), when `repeat=True`:
            batches run across passes, so a resumed run continues at an image, not at a batch boundary.
        shuffle: bool, default True. Permute the images each epoch (buffer shuffle for TFDS streams).
        shuffle_buffer_size: int, default 10000. Shuffle buffer of streaming (TFDS) sources.
        num_shards: int, default 1. Number of input pipelines (hosts / replicas).
        shard_index: int, default 0. This pipeline's index.
        input_context: tf.distribute.InputContext or None, default None. Sets num_shards and shard_index.
        num_parallel_calls: int, default tf.data.AUTOTUNE. Parallelism of decoding and augmentation.
        deterministic: bool, default True. Keep the order under parallel map (False trades it for speed).
        prefetch: int or None, default tf.data.AUTOTUNE. Batches prefetched; None disables it.
        jit_compile: bool, default True. XLA-compile the crop stage after the resize (see `MultiCropAugmentation`).
        max_image_pixels: int or None, default 89,478,485. For a folder or "tfds:" spec: images whose header
            declares more pixels are skipped, never decoded (see `get_source`); None for no limit.

    Example:
        >>> ds = multicrop_dataset("digits", batch_size=8, config=DataConfig.recipe("digits"), patch_size=4)
        >>> batch = next(iter(ds))
        >>> batch["global_crops"].shape, batch["masks"].shape, batch["mask_indices"].shape
        (TensorShape([16, 24, 24, 3]), TensorShape([16, 36]), TensorShape([91]))
    """
    config, patch_size = data_and_patch_size(config, patch_size)
    grid = config.patch_grid(patch_size)
    batch_size = _check_positive_int("batch_size", batch_size)
    shuffle_buffer_size = _check_positive_int("shuffle_buffer_size", shuffle_buffer_size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63); received {seed!r}.")
    if (
        isinstance(start_epoch, bool)
        or not isinstance(start_epoch, (int, np.integer))
        or start_epoch < 0
    ):
        raise ValueError(f"start_epoch must be an integer >= 0; received {start_epoch!r}.")
    if start_epoch and not repeat:
        raise ValueError(
            f"start_epoch={start_epoch} needs repeat=True (finite datasets draw a new key per pass)."
        )
    if isinstance(skip_images, bool) or not isinstance(skip_images, (int, np.integer)) or skip_images < 0:
        raise ValueError(f"skip_images must be an integer >= 0; received {skip_images!r}.")
    if skip_images and not repeat:
        raise ValueError(f"skip_images={skip_images} needs repeat=True.")
    num_shards, shard_index = _resolve_shards(num_shards, shard_index, input_context)
    src = get_source(source, max_image_pixels=max_image_pixels)

    per_shard = None if src.num_examples is None else src.num_examples // num_shards
    if per_shard is not None and per_shard < batch_size:
        raise ValueError(
            f"batch_size={batch_size} is larger than the {per_shard} images of each of the {num_shards} shard(s) "
            f"of {src.name}: no full batch could be formed."
        )

    augmentation = _augmentation(config, jit_compile)
    log = _SkipLog(src.name, refilled=per_shard is not None, explain=src.explain)

    def read_and_decode(records, key):
        """(record, seed) -> (image, seed) for one pass; a pass never ends early on an undecodable file."""
        if not src.can_fail:
            return records.map(_plain(lambda record, seed: (src.decode(record)[0], seed)))
        ds = _decode_skipping(src, records, log, key[1], num_parallel_calls, deterministic)
        ds = ds.map(_plain(lambda image, label, seed: (image, seed)))
        if per_shard is not None:
            ds = ds.take(per_shard)
        return _report_at_end(ds, log, key[1])

    if repeat:
        epochs = tf.data.Dataset.range(int(start_epoch), 2**62)
    else:
        # One element per pass, different for every pass over the same dataset object.
        epochs = tf.data.Dataset.random(
            seed=int(seed) % 2**31, rerandomize_each_iteration=True
        ).take(1)
    seed_value = int(seed)
    keys = epochs.map(
        _plain(lambda e: tf.stack([tf.constant(seed_value, tf.int64), tf.cast(e, tf.int64)]))
    )

    if src.random_access:
        n = src.num_examples
        positions = tf.range(shard_index, per_shard * num_shards, num_shards, dtype=tf.int32)

        def epoch_records(key):
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
            return read_and_decode(
                ds.map(_plain(lambda index, p: (src.read(tf.cast(index, tf.int64)), _fold(key, p)))),
                key,
            )

        records = keys.flat_map(_plain(epoch_records))
    else:
        stream = src.stream(num_shards, shard_index, shuffle_files=shuffle)
        if per_shard is not None:
            stream = stream.take(per_shard)
        if shuffle:
            # A buffer shuffle, reshuffled at each pass over the stream (each epoch) in a sequence fixed by the
            # seed. Its seed must be a Python int (a tensor seed breaks under tf.random.set_seed(0)), so for
            # streams the order is keyed by (seed, start_epoch) and the passes since, not by the epoch alone.
            shuffle_seed = int(
                np.random.SeedSequence([seed_value, int(start_epoch)]).generate_state(1)[0] >> 1
            )
            stream = stream.shuffle(
                shuffle_buffer_size, seed=shuffle_seed, reshuffle_each_iteration=True
            )

        def epoch_records(key):
            # Stand-ins for images that fail to decode come from a second (reshuffled) pass.
            refill = src.can_fail and per_shard is not None
            ds = (stream.repeat(2) if refill else stream).enumerate()
            ds = ds.map(
                _plain(lambda i, record: (record, _fold(key, i * num_shards + shard_index)))
            )
            return read_and_decode(ds, key)

        records = keys.flat_map(_plain(epoch_records))

    def augment(image, element_seed):
        crops = augmentation(image, element_seed)
        crops["seed"] = element_seed
        return crops

    crops_cfg = config.crops
    n_local = crops_cfg.local_crops_number

    def collate(batch):
        def view_major(x, views, size):
            x = tf.transpose(x, [1, 0, 2, 3, 4])
            return tf.reshape(x, [views * batch_size, size, size, 3])

        out = {
            "global_crops": view_major(batch["global_crops"], 2, crops_cfg.global_crops_size),
            "local_crops": view_major(batch["local_crops"], n_local, crops_cfg.local_crops_size),
        }
        out.update(
            sample_masks(
                2 * batch_size, grid, _fold(batch["seed"][0], _MASK_STREAM), config.masking
            )
        )
        return {key: out[key] for key in BATCH_KEYS}

    if skip_images:
        records = records.skip(int(skip_images))  # before the augmentation: skipped images cost a read
    ds = records.map(
        _plain(augment), num_parallel_calls=num_parallel_calls, deterministic=deterministic
    )
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.map(_plain(collate), num_parallel_calls=num_parallel_calls, deterministic=deterministic)
    if repeat:
        ds = ds.apply(tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))
    elif per_shard is not None:
        ds = ds.apply(tf.data.experimental.assert_cardinality(per_shard // batch_size))
    if prefetch is not None:
        ds = ds.prefetch(prefetch)
    return ds


def group_micro_batches(dataset: tf.data.Dataset, micro_batches: int) -> tf.data.Dataset:
    """Stack every `micro_batches` consecutive multi-crop batches into one update's batch.

    With gradient accumulation (`OptimConfig.gradient_accumulation_steps = k`) the pretrainer's
    step takes the k micro-batches of one optimizer update at once: the teacher sees all of
    them before the student's k passes. Every array of the k batches is concatenated along axis
    0 (each micro-batch keeps its own view-major crops and its own masked-patch buffer, whose
    indices stay local to it), and `n_masked_patches` becomes a vector of k counts, the layout
    `keras_dinov2.distribute.stack_batches` gives replicas. An incomplete last group is dropped.

    Args:
        dataset: tf.data.Dataset of multi-crop batches (`multicrop_dataset`).
        micro_batches: int >= 1. Micro-batches per update; 1 returns `dataset` unchanged.

    Example:
    >>> ds = group_micro_batches(multicrop_dataset("digits", 16, config), 4)  # updates of 64
    """
    _check_positive_int("micro_batches", micro_batches)
    if micro_batches == 1:
        return dataset

    def merge(batch):
        out = {}
        for key, value in batch.items():
            shape = value.shape
            if shape.rank == 1:  # n_masked_patches: one count per micro-batch
                out[key] = value
            else:
                out[key] = tf.reshape(value, [-1] + shape[2:].as_list())
        return out

    return dataset.batch(micro_batches, drop_remainder=True).map(merge)


def _resize_center_crop(image, resize_size, crop_size, method):
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
    image_size = _check_positive_int("image_size", image_size)
    batch_size = _check_positive_int("batch_size", batch_size)
    if resize_size is None:
        resize_size = int(image_size * 256 / 224)
    resize_size = _check_positive_int("resize_size", resize_size)
    if resize_size < image_size:
        raise ValueError(
            f"resize_size must be >= image_size ({image_size}); received {resize_size}."
        )
    src = get_source(source, split=split, max_image_pixels=max_image_pixels)
    if not src.has_labels:
        raise ValueError(
            f"eval_dataset needs labelled images; {src.name} has no labels (use class subfolders)."
        )
    _check_shards(num_shards, shard_index)

    def prepare(image, label):
        image = _resize_center_crop(image, resize_size, image_size, interpolation)
        return normalize(image, mean, std), label

    ds = src.stream(num_shards, shard_index)
    if src.can_fail:
        # Undecodable files are left out (and named at the end of each pass); the rest keep their order.
        log = _SkipLog(src.name, refilled=False, explain=src.explain)
        pass_id = tf.constant(0, tf.int64)
        ds = ds.map(_plain(lambda record: (record, tf.constant(0, tf.int32))))
        ds = _decode_skipping(src, ds, log, pass_id, num_parallel_calls, True)
        ds = _report_at_end(ds.map(_plain(lambda image, label, _: (image, label))), log, pass_id)
    else:
        ds = ds.map(_plain(src.decode))
    ds = ds.map(_plain(prepare), num_parallel_calls=num_parallel_calls, deterministic=True)
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
