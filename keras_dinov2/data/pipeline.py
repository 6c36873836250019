"""The multi-crop pipeline for `model.fit`: multi-crop batches with iBOT masks, built from named stages.

Keras feeds a `tf.data.Dataset` to every backend (JAX, TensorFlow, PyTorch), so one pipeline serves all three.
Randomness is stateless and keyed: epoch key -> element seed (from the element's position in the epoch's
permutation) -> crop seeds, and the batch's masks from its first element's seed. The same seed therefore gives
the same batches whatever the parallelism, and an epoch can be regenerated on its own (resume).

`multicrop_dataset` composes the stages, in this order:

1. `epoch_keys` (in `keras_dinov2.data.reading`): one (seed, epoch) key per pass over the data.
2. `read_records` (in `keras_dinov2.data.reading`): each pass's images of this shard, decoded, each with its
   element seed; the images that cannot be decoded are dropped, named and replaced.
3. `skip_for_resume`: leave out the images a resumed run has already seen.
4. `augment_crops`: the multi-crop augmentation of each image.
5. `batch_and_collate`: batches of view-major crops with their iBOT masks (`collate`, `view_major`,
   `batch_masks`), the layout of `keras_dinov2.data.batch`.
6. `finish`: the dataset's cardinality and prefetching.

`group_micro_batches` stacks the batches of one gradient-accumulation update.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import tensorflow as tf

from keras_dinov2.config import DataConfig, data_and_patch_size
from keras_dinov2.data.augment import MultiCropAugmentation
from keras_dinov2.data.batch import BATCH_KEYS, GLOBAL_CROPS, LOCAL_CROPS, check_batch
from keras_dinov2.data.checks import check_positive_int, check_shards
from keras_dinov2.data.image_headers import DEFAULT_MAX_IMAGE_PIXELS
from keras_dinov2.data.masking import sample_masks
from keras_dinov2.data.reading import decode_pass, epoch_keys, read_records
from keras_dinov2.data.skipping import SkipLog
from keras_dinov2.data.sources import get_source

__all__ = [
    "augment_crops",
    "batch_and_collate",
    "batch_masks",
    "collate",
    "finish",
    "group_micro_batches",
    "image_crops",
    "merge_micro_batches",
    "multicrop_dataset",
    "skip_for_resume",
    "view_major",
]

# The stream of the stateless seeds folded into a batch's first element seed for its masks.
_MASK_STREAM = 13


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


# ----------------------------------------------------------------------------------------------------------------------
# 3. Skipping for resume


def skip_for_resume(records, skip_images):
    """`records` without their first `skip_images` images; before the augmentation, so skipped images cost a read."""
    if skip_images:
        return records.skip(int(skip_images))
    return records


# ----------------------------------------------------------------------------------------------------------------------
# 4. Augmentation into crops


def image_crops(augmentation, image, element_seed):
    """The crops of one image (`MultiCropAugmentation` output), with its element seed under "seed"."""
    crops = augmentation(image, element_seed)
    crops["seed"] = element_seed
    return crops


def augment_crops(records, augmentation, num_parallel_calls, deterministic):
    """(image, element seed) -> the image's crops (`image_crops`), in parallel."""
    return records.map(
        _plain(lambda image, element_seed: image_crops(augmentation, image, element_seed)),
        num_parallel_calls=num_parallel_calls,
        deterministic=deterministic,
    )


# ----------------------------------------------------------------------------------------------------------------------
# 5. Masking and batching


def view_major(crops, views, batch_size, size):
    """(B, views, S, S, 3) crops -> (views * B, S, S, 3): view 1 of every image, then view 2, ..."""
    crops = tf.transpose(crops, [1, 0, 2, 3, 4])
    return tf.reshape(crops, [views * batch_size, size, size, 3])


def batch_masks(first_seed, batch_size, config, grid):
    """The iBOT masks of a batch's 2B global crops on their (rows, columns) patch `grid` (`sample_masks`), keyed by
    the batch's first element seed."""
    return sample_masks(2 * batch_size, grid, _fold(first_seed, _MASK_STREAM), config.masking)


def collate(batch, config, batch_size, grid):
    """A batch of per-image crops -> the multi-crop batch (`keras_dinov2.data.batch`), in `BATCH_KEYS` order."""
    crops = config.crops
    out = {
        GLOBAL_CROPS: view_major(batch[GLOBAL_CROPS], 2, batch_size, crops.global_crops_size),
        LOCAL_CROPS: view_major(batch[LOCAL_CROPS], crops.local_crops_number, batch_size, crops.local_crops_size),
    }
    out.update(batch_masks(batch["seed"][0], batch_size, config, grid))
    return {key: out[key] for key in BATCH_KEYS}


def batch_and_collate(crops, config, batch_size, grid, num_parallel_calls, deterministic):
    """Per-image crops -> multi-crop batches of `batch_size` images (`collate`); the last partial batch is dropped."""
    ds = crops.batch(batch_size, drop_remainder=True)
    return ds.map(
        _plain(lambda batch: collate(batch, config, batch_size, grid)),
        num_parallel_calls=num_parallel_calls,
        deterministic=deterministic,
    )


# ----------------------------------------------------------------------------------------------------------------------
# 6. Options


def finish(ds, *, repeat, per_shard, batch_size, prefetch):
    """The dataset's cardinality (infinite, or the batches of one pass when known), then `prefetch` (None: none)."""
    if repeat:
        ds = ds.apply(tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))
    elif per_shard is not None:
        ds = ds.apply(tf.data.experimental.assert_cardinality(per_shard // batch_size))
    if prefetch is not None:
        ds = ds.prefetch(prefetch)
    return ds


# ----------------------------------------------------------------------------------------------------------------------
# The pipeline


def _resolve_shards(num_shards, shard_index, input_context):
    if input_context is not None:
        if (num_shards, shard_index) != (1, 0):
            raise ValueError(
                "pass either input_context or num_shards / shard_index, not both; received "
                f"num_shards={num_shards}, shard_index={shard_index} with an input_context."
            )
        num_shards, shard_index = input_context.num_input_pipelines, input_context.input_pipeline_id
    check_shards(num_shards, shard_index)
    return num_shards, shard_index


def _check_arguments(seed, repeat, start_epoch, skip_images):
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
    batch_size = check_positive_int("batch_size", batch_size)
    shuffle_buffer_size = check_positive_int("shuffle_buffer_size", shuffle_buffer_size)
    _check_arguments(seed, repeat, start_epoch, skip_images)
    num_shards, shard_index = _resolve_shards(num_shards, shard_index, input_context)
    src = get_source(source, max_image_pixels=max_image_pixels)

    per_shard = None if src.num_examples is None else src.num_examples // num_shards
    if per_shard is not None and per_shard < batch_size:
        raise ValueError(
            f"batch_size={batch_size} is larger than the {per_shard} images of each of the {num_shards} shard(s) "
            f"of {src.name}: no full batch could be formed."
        )

    augmentation = _augmentation(config, jit_compile)
    log = SkipLog(src.name, refilled=per_shard is not None, explain=src.explain)
    decode = functools.partial(decode_pass, src, log=log, per_shard=per_shard,
                               num_parallel_calls=num_parallel_calls, deterministic=deterministic)
    keys = epoch_keys(seed, repeat, start_epoch)
    records = read_records(src, keys, decode, shuffle=shuffle, shuffle_buffer_size=shuffle_buffer_size, seed=seed,
                           start_epoch=start_epoch, num_shards=num_shards, shard_index=shard_index,
                           per_shard=per_shard)
    records = skip_for_resume(records, skip_images)
    crops = augment_crops(records, augmentation, num_parallel_calls, deterministic)
    ds = batch_and_collate(crops, config, batch_size, grid, num_parallel_calls, deterministic)
    check_batch(ds.element_spec, config, batch_size, patch_size=patch_size)
    return finish(ds, repeat=repeat, per_shard=per_shard, batch_size=batch_size, prefetch=prefetch)


def merge_micro_batches(batch):
    """A batch of k multi-crop batches (every array with a leading axis k) -> one stacked batch (`group_micro_batches`).

    Every array is concatenated along axis 0, except the (k,) vector of `n_masked_patches` counts, kept as it is.
    """
    out = {}
    for key, value in batch.items():
        shape = value.shape
        if shape.rank == 1:  # n_masked_patches: one count per micro-batch
            out[key] = value
        else:
            out[key] = tf.reshape(value, [-1] + shape[2:].as_list())
    return out


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
    check_positive_int("micro_batches", micro_batches)
    if micro_batches == 1:
        return dataset
    return dataset.batch(micro_batches, drop_remainder=True).map(merge_micro_batches)
