"""Data: image sources, the DINOv2 multi-crop augmentation, iBOT block masking, the tf.data pipelines and the batch
contract (`batch`: keys, shapes and dtypes of a multi-crop batch).

Example:
    >>> import keras_dinov2 as kd
    >>> ds = kd.data.multicrop_dataset("digits", batch_size=32, config=kd.SSLConfig.recipe("digits"))
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
from keras_dinov2.data.batch import (
    BATCH_KEYS,
    GLOBAL_CROPS,
    LOCAL_CROPS,
    MASK_INDICES,
    MASKS,
    MASKS_WEIGHT,
    N_MASKED_PATCHES,
    batch_spec,
    check_batch,
)
from keras_dinov2.data.eval_pipeline import eval_dataset, pool_dataset
from keras_dinov2.data.folder import IMAGE_EXTENSIONS, file_list_source, image_folder_source
from keras_dinov2.data.image_headers import DEFAULT_MAX_IMAGE_PIXELS, image_header_size
from keras_dinov2.data.image_source import ImageSource
from keras_dinov2.data.manifest import MANIFEST_FILE, MANIFEST_SUFFIX, manifest_path, read_manifest, write_manifest
from keras_dinov2.data.masking import block_masks, mask_buffer_size, mask_strata, sample_masks
from keras_dinov2.data.pipeline import group_micro_batches, multicrop_dataset
from keras_dinov2.data.sources import get_source, manifest_source
from keras_dinov2.data.tfds import tfds_source

__all__ = [
    "BATCH_KEYS",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "GLOBAL_CROPS",
    "LOCAL_CROPS",
    "MASKS",
    "MASKS_WEIGHT",
    "MASK_INDICES",
    "N_MASKED_PATCHES",
    "IMAGE_EXTENSIONS",
    "MANIFEST_FILE",
    "MANIFEST_SUFFIX",
    "ImageSource",
    "MultiCropAugmentation",
    "array_source",
    "batch_spec",
    "block_masks",
    "check_batch",
    "color_jitter",
    "digits_source",
    "eval_dataset",
    "file_list_source",
    "gaussian_blur",
    "group_micro_batches",
    "get_source",
    "image_folder_source",
    "image_header_size",
    "manifest_path",
    "manifest_source",
    "mask_buffer_size",
    "mask_strata",
    "multicrop_dataset",
    "normalize",
    "pool_dataset",
    "random_resized_crop",
    "read_manifest",
    "sample_masks",
    "solarize",
    "split_source",
    "tfds_source",
    "to_grayscale",
    "write_manifest",
]
