"""Data: image sources, the DINOv2 multi-crop augmentation, iBOT block masking and the tf.data pipelines.

Example:
    >>> import keras_dinov2 as kd
    >>> ds = kd.data.multicrop_dataset("digits", batch_size=32, config=kd.SSLConfig.recipe("digits"))
"""

from keras_dinov2.data.augment import (
    MultiCropAugmentation,
    color_jitter,
    gaussian_blur,
    normalize,
    random_resized_crop,
    solarize,
    to_grayscale,
)
from keras_dinov2.data.masking import block_masks, mask_buffer_size, mask_strata, sample_masks
from keras_dinov2.data.pipeline import (
    BATCH_KEYS,
    eval_dataset,
    group_micro_batches,
    multicrop_dataset,
)
from keras_dinov2.data.sources import (
    IMAGE_EXTENSIONS,
    ImageSource,
    array_source,
    digits_source,
    get_source,
    image_folder_source,
    split_source,
    tfds_source,
)

__all__ = [
    "BATCH_KEYS",
    "IMAGE_EXTENSIONS",
    "ImageSource",
    "MultiCropAugmentation",
    "array_source",
    "block_masks",
    "color_jitter",
    "digits_source",
    "eval_dataset",
    "gaussian_blur",
    "group_micro_batches",
    "get_source",
    "image_folder_source",
    "mask_buffer_size",
    "mask_strata",
    "multicrop_dataset",
    "normalize",
    "random_resized_crop",
    "sample_masks",
    "solarize",
    "split_source",
    "tfds_source",
    "to_grayscale",
]
