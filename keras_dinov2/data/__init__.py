"""Data: image sources, the DINOv2 multi-crop augmentation, iBOT block masking and the tf.data pipelines.

Example:
    >>> import keras_dinov2 as kd
    >>> from keras_dinov2.config import DataConfig
    >>> ds = kd.data.multicrop_dataset("digits", batch_size=32, config=DataConfig.recipe("digits"))
"""

from keras_dinov2.data.arrays import array_source, digits_source, split_source
from keras_dinov2.data.augment import (
    MultiCropAugmentation,
    color_jitter,
    gaussian_blur,
    normalize,
    random_resized_crop,
    solarize,
    to_grayscale,
)
from keras_dinov2.data.folder import IMAGE_EXTENSIONS, image_folder_source
from keras_dinov2.data.image_headers import DEFAULT_MAX_IMAGE_PIXELS, image_header_size
from keras_dinov2.data.image_source import ImageSource
from keras_dinov2.data.masking import block_masks, mask_buffer_size, mask_strata, sample_masks
from keras_dinov2.data.pipeline import (
    BATCH_KEYS,
    eval_dataset,
    group_micro_batches,
    multicrop_dataset,
)
from keras_dinov2.data.sources import get_source
from keras_dinov2.data.tfds import tfds_source

__all__ = [
    "BATCH_KEYS",
    "DEFAULT_MAX_IMAGE_PIXELS",
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
    "image_header_size",
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
