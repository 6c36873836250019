"""Configuration dataclasses holding the DINOv2 reference defaults, and named recipes.

Every default is the value of facebookresearch/dinov2 (``configs/ssl_default_config.yaml`` and the ViT-14 paper
configs ``configs/train/vitl14.yaml``) unless its docstring says otherwise. Configurations are plain dataclasses:
build them with keywords, change them with ``dataclasses.replace``, and store them with ``to_dict`` / ``from_dict``
(JSON-friendly: tuples become lists and come back as tuples). Every field is validated by its rule in
``fields.FIELD_RULES``; an error names the class, the field and the value.

Modules (this package imports nothing else of keras_dinov2):

- fields: the table of field rules, ``validate``, the base class, the recipe registry.
- data: ``CropConfig`` (multi-crop geometry), ``AugmentationConfig`` (photometric augmentation and normalization),
  ``MaskingConfig`` (iBOT block masking), grouped by ``DataConfig``.
- model: ``ModelConfig`` (the student backbone's patch size, stochastic depth and initialization).
- training: ``HeadConfig``, ``LossConfig``, ``OptimConfig``.
- ssl: ``SSLConfig``, every section of a run; ``upgrade_layout`` for config.json files of older runs;
  ``data_and_patch_size``, what a data pipeline takes from a DataConfig or a run config.
- recipes: ``DATA_RECIPES`` and ``SSL_RECIPES`` (``DataConfig.recipe(name)``, ``SSLConfig.recipe(name)``).
- architectures: ``ARCHITECTURES``, the named backbones (DINOv2Backbone arguments, official weight URLs) of
  DINOv2 and DINO v1.
"""

from keras_dinov2.config.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentationConfig,
    CropConfig,
    DataConfig,
    MaskingConfig,
)
from keras_dinov2.config.fields import (
    BLUR_PROBABILITY_PRESETS,
    CENTERING_MODES,
    FIELD_RULES,
    INTERPOLATIONS,
    KOLEO_SCOPES,
    validate,
)
from keras_dinov2.config.model import ModelConfig
from keras_dinov2.config.recipes import DATA_RECIPES, SSL_RECIPES
from keras_dinov2.config.ssl import SSLConfig, data_and_patch_size, upgrade_layout
from keras_dinov2.config.training import HeadConfig, LossConfig, OptimConfig

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BLUR_PROBABILITY_PRESETS",
    "INTERPOLATIONS",
    "CENTERING_MODES",
    "KOLEO_SCOPES",
    "FIELD_RULES",
    "validate",
    "CropConfig",
    "AugmentationConfig",
    "MaskingConfig",
    "DataConfig",
    "DATA_RECIPES",
    "ModelConfig",
    "HeadConfig",
    "LossConfig",
    "OptimConfig",
    "SSLConfig",
    "SSL_RECIPES",
    "upgrade_layout",
    "data_and_patch_size",
]
