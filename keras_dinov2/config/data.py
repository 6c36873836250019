"""The data sections of a run: multi-crop geometry, photometric augmentation, iBOT masking, grouped by DataConfig.

The pipeline's whole contract with the model is the crop sizes here and the patch size (`ModelConfig.patch_size`),
which it receives beside the DataConfig.
"""

from __future__ import annotations

import dataclasses

from keras_dinov2.config.fields import BLUR_PROBABILITY_PRESETS, ConfigBase, named_recipe

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "CropConfig", "AugmentationConfig", "MaskingConfig", "DataConfig"]

# ImageNet statistics of RGB values in [0, 1] (the reference's normalization).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass
class CropConfig(ConfigBase):
    """Multi-crop geometry: two global crops and `local_crops_number` local crops per image.

    Each crop is a torchvision-style RandomResizedCrop (area fraction uniform in `*_scale`, aspect ratio
    log-uniform in `aspect_ratio`, 10 attempts then a center fallback) resized to a square, then a horizontal flip.

    Args:
        global_crops_size: int, default 224. Side of the global crops in pixels (reference 224).
        global_crops_scale: (float, float), default (0.32, 1.0). Area fraction range of global crops.
        local_crops_number: int, default 8. Local crops per image (reference 8; 0 disables them).
        local_crops_size: int, default 98. Side of the local crops. The ViT-14 paper configs use 98 (7 patches of
            14); the reference's default config uses 96 with patch 16.
        local_crops_scale: (float, float), default (0.05, 0.32). Area fraction range of local crops.
        aspect_ratio: (float, float), default (3/4, 4/3). Aspect-ratio range of the crop box (torchvision default).
        flip_probability: float, default 0.5. Probability of a horizontal flip per crop.
        interpolation: str, default "bicubic". Resize method ("bicubic", "bilinear", "area", "lanczos3", ...,
            any `tf.image.resize` method); resizing is antialiased like PIL's.

    Example:
        >>> CropConfig(global_crops_size=112, local_crops_size=56, local_crops_number=4).global_crops_size
        112
    """

    global_crops_size: int = 224
    global_crops_scale: tuple[float, float] = (0.32, 1.0)
    local_crops_number: int = 8
    local_crops_size: int = 98
    local_crops_scale: tuple[float, float] = (0.05, 0.32)
    aspect_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_probability: float = 0.5
    interpolation: str = "bicubic"


@dataclasses.dataclass
class AugmentationConfig(ConfigBase):
    """Photometric augmentation of every crop, then normalization (the reference's DataAugmentationDINO).

    Per crop, in this order: color jitter with probability `color_jitter_probability` (brightness, contrast,
    saturation and hue factors drawn like torchvision's ColorJitter and applied in a random order per crop, as
    torchvision does), grayscale with probability `grayscale_probability`, Gaussian blur (probability per crop kind
    from `blur_probabilities`), solarization on global crop 2 only, then `(x - mean) / std`.

    Args:
        color_jitter_probability: float, default 0.8.
        brightness: float, default 0.4. Factor uniform in [max(0, 1 - b), 1 + b].
        contrast: float, default 0.4. Factor uniform in [max(0, 1 - c), 1 + c].
        saturation: float, default 0.2. Factor uniform in [max(0, 1 - s), 1 + s].
        hue: float, default 0.1. Shift uniform in [-hue, hue] of the hue circle (at most 0.5).
        grayscale_probability: float, default 0.2.
        blur_probabilities: str or (float, float, float), default "intended". Blur probability for global crop 1,
            global crop 2 and each local crop. "intended" = (1.0, 0.1, 0.5), the paper's and the reference call
            sites' values; "released" = (0.0, 0.9, 0.5), what the reference code actually applied (its blur
            wrapper passes 1 - p to RandomApply), i.e. what the published checkpoints were trained with.
        blur_kernel_size: int, default 9. Odd kernel side of the Gaussian blur (reflect padding).
        blur_sigma: (float, float), default (0.1, 2.0). Range of the blur's standard deviation, in pixels.
        solarize_probability: float, default 0.2. Solarization probability of global crop 2 (the only crop the
            reference solarizes).
        solarize_threshold: float, default 128. Pixels >= threshold (on the 0-255 scale) are inverted.
        mean: 3 floats, default ImageNet mean (0.485, 0.456, 0.406), for RGB in [0, 1].
        std: 3 floats, default ImageNet std (0.229, 0.224, 0.225).

    Example:
        >>> AugmentationConfig(blur_probabilities="released").resolved_blur_probabilities()
        (0.0, 0.9, 0.5)
    """

    color_jitter_probability: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_probability: float = 0.2
    blur_probabilities: str | tuple[float, float, float] = "intended"
    blur_kernel_size: int = 9
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_probability: float = 0.2
    solarize_threshold: float = 128.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def resolved_blur_probabilities(self) -> tuple[float, float, float]:
        """Return the blur probabilities (global crop 1, global crop 2, local crop) as three floats."""
        if isinstance(self.blur_probabilities, str):
            return BLUR_PROBABILITY_PRESETS[self.blur_probabilities]
        return tuple(self.blur_probabilities)


@dataclasses.dataclass
class MaskingConfig(ConfigBase):
    """iBOT block masking of the global crops (the reference's MaskingGenerator and collate).

    Per batch of 2B global-crop images: the first int(2B * mask_sample_probability) get a target of
    int(N * U(p_i, p_i+1)) masked patches with p = linspace(*mask_ratio_min_max, count + 1) (stratified), the rest
    none; the order is then shuffled. A target is filled with rectangular blocks of area U(min_block_patches,
    min(remaining, max_block_ratio * N)) and log-uniform aspect ratio, at most `max_attempts` tries per block.

    The mask grid is (global_crops_size / patch_size)^2, with the patch size of the model (`ModelConfig.patch_size`).

    Args:
        mask_sample_probability: float, default 0.5. Fraction of global-crop images that get a mask.
        mask_ratio_min_max: (float, float), default (0.1, 0.5). Range of masked-patch ratios, split into strata.
        max_block_ratio: float, default 0.5. Largest block as a fraction of N (reference: 0.5 * N patches).
        min_block_patches: int, default 4. Smallest block area drawn (reference 4).
        min_aspect: float, default 0.3. Smallest block aspect ratio; the largest is `max_aspect`.
        max_aspect: float or None, default None, meaning 1 / min_aspect.
        max_attempts: int, default 10. Tries to place one block before the image is declared full.

    Example:
        >>> MaskingConfig(mask_sample_probability=0.25).mask_ratio_min_max
        (0.1, 0.5)
    """

    mask_sample_probability: float = 0.5
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    max_block_ratio: float = 0.5
    min_block_patches: int = 4
    min_aspect: float = 0.3
    max_aspect: float | None = None
    max_attempts: int = 10

    @property
    def aspect_range(self) -> tuple[float, float]:
        """(min, max) block aspect ratio, with the reference's max = 1 / min when `max_aspect` is None."""
        return (float(self.min_aspect), float(self.max_aspect or 1.0 / self.min_aspect))


@dataclasses.dataclass
class DataConfig(ConfigBase):
    """Everything the data pipeline needs: crops, augmentation and masking.

    The pipeline knows nothing else about the model but its patch size (`ModelConfig.patch_size`, given beside
    this config): the crop sizes, the patch size and the mask shape are the whole contract. Both crop sizes must be
    multiples of the patch size (the backbone embeds non-overlapping patches); `patch_grid` checks it.

    Args:
        crops: CropConfig, default CropConfig() (224 / 8 x 98).
        augmentation: AugmentationConfig, default AugmentationConfig().
        masking: MaskingConfig, default MaskingConfig().

    Example:
        >>> DataConfig.recipe("digits").patch_grid(4)
        (6, 6)
    """

    crops: CropConfig = dataclasses.field(default_factory=CropConfig)
    augmentation: AugmentationConfig = dataclasses.field(default_factory=AugmentationConfig)
    masking: MaskingConfig = dataclasses.field(default_factory=MaskingConfig)

    def __post_init__(self):
        super().__post_init__()
        # Reflect padding needs a pad smaller than the image side.
        half = self.augmentation.blur_kernel_size // 2
        smallest = min(self.crops.global_crops_size, self.crops.local_crops_size)
        if half >= smallest:
            raise ValueError(
                f"{type(self).__name__}: augmentation.blur_kernel_size // 2 must be smaller than the smallest crop "
                f"side ({smallest}) for reflect padding; received blur_kernel_size="
                f"{self.augmentation.blur_kernel_size}."
            )

    def crop_not_a_multiple(self, patch_size: int) -> str | None:
        """The name of the first crop size (of `crops`) that is not a multiple of `patch_size`, or None."""
        for name in ("global_crops_size", "local_crops_size"):
            if getattr(self.crops, name) % patch_size:
                return name
        return None

    def patch_grid(self, patch_size: int) -> tuple[int, int]:
        """Patch grid (rows, columns) of a global crop with patches of `patch_size` pixels.

        Raises:
            ValueError: a crop size is not a multiple of `patch_size`.
        """
        name = self.crop_not_a_multiple(patch_size)
        if name is not None:
            raise ValueError(
                f"{type(self).__name__}: crops.{name} must be a multiple of the patch size ({patch_size}); "
                f"received {getattr(self.crops, name)}."
            )
        side = self.crops.global_crops_size // patch_size
        return (side, side)

    @classmethod
    def recipe(cls, name: str) -> DataConfig:
        """Return a fresh copy of a named recipe from `DATA_RECIPES`."""
        return named_recipe(cls, name)
