"""Configuration dataclasses holding the DINOv2 reference defaults, and named recipes.

Every default below is the value of facebookresearch/dinov2 (``configs/ssl_default_config.yaml`` and the ViT-14
paper configs ``configs/train/vitl14.yaml``) unless its comment says otherwise. Configurations are plain dataclasses:
build them with keywords, change them with ``dataclasses.replace``, and store them with ``to_dict`` / ``from_dict``
(JSON-friendly: tuples become lists and come back as tuples).

Sections:

- data: ``CropConfig`` (multi-crop geometry), ``AugmentationConfig`` (photometric augmentation and normalization),
  ``MaskingConfig`` (iBOT block masking), grouped by ``DataConfig``; recipes through ``DataConfig.recipe(name)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BLUR_PROBABILITY_PRESETS",
    "CropConfig",
    "AugmentationConfig",
    "MaskingConfig",
    "DataConfig",
    "DATA_RECIPES",
    "HeadConfig",
    "LossConfig",
    "OptimConfig",
    "SSLConfig",
    "SSL_RECIPES",
]

# ImageNet statistics of RGB values in [0, 1] (the reference's normalization).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Gaussian-blur probabilities for (global crop 1, global crop 2, each local crop).
# "intended": what the DINOv2 paper and the reference's call sites ask for.
# "released": what the reference code really applied, and so what the published checkpoints saw: its GaussianBlur
# wrapper hands 1 - p to torchvision's RandomApply, turning 1.0 / 0.1 / 0.5 into 0.0 / 0.9 / 0.5.
BLUR_PROBABILITY_PRESETS = {
    "intended": (1.0, 0.1, 0.5),
    "released": (0.0, 0.9, 0.5),
}


# ----------------------------------------------------------------------------------------------------------------------
# Validation helpers: every error names the field, what it received and what it expects.


def _check_int(owner, name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an integer >= {minimum}; received {value!r}.")


def _check_probability(owner, name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{owner}.{name} must be a probability in [0, 1]; received {value!r}.")


def _check_nonnegative(owner, name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{owner}.{name} must be a number >= 0; received {value!r}.")


def _as_pair(owner, name, value, low=None, high=None, strictly_positive=False):
    """Return `value` as an ordered (a, b) tuple of floats, or raise a ValueError naming the field."""
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{owner}.{name} must be a pair (min, max) of numbers; received {value!r}."
        ) from None
    bad = a > b or (low is not None and a < low) or (high is not None and b > high)
    bad = bad or (strictly_positive and a <= 0)
    if bad:
        bounds = f" within [{low}, {high}]" if low is not None or high is not None else ""
        positive = " and > 0" if strictly_positive else ""
        raise ValueError(
            f"{owner}.{name} must be an ordered pair (min, max) with min <= max{bounds}{positive}; "
            f"received {value!r}."
        )
    return (a, b)


def _as_triple(owner, name, value, low=None):
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or (low is not None and min(out) <= low):
        limit = f" > {low}" if low is not None else ""
        raise ValueError(
            f"{owner}.{name} must be 3 numbers{limit} (one per RGB channel); received {value!r}."
        )
    return out


class _ConfigMixin:
    """Dictionary round trip shared by the config dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-friendly dict of the fields (nested configs become dicts)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, _ConfigMixin):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        """Build the config from `to_dict` output; unknown keys raise a ValueError."""
        if not isinstance(values, dict):
            raise ValueError(
                f"{cls.__name__}.from_dict expects a dict; received {type(values).__name__}."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(
                f"{cls.__name__}.from_dict received unknown keys {unknown}; expected a subset of {sorted(names)}."
            )
        return cls(**values)


# ----------------------------------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass
class CropConfig(_ConfigMixin):
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

    def __post_init__(self):
        owner = type(self).__name__
        _check_int(owner, "global_crops_size", self.global_crops_size, 1)
        _check_int(owner, "local_crops_number", self.local_crops_number, 0)
        _check_int(owner, "local_crops_size", self.local_crops_size, 1)
        self.global_crops_scale = _as_pair(
            owner, "global_crops_scale", self.global_crops_scale, 0.0, 1.0, True
        )
        self.local_crops_scale = _as_pair(
            owner, "local_crops_scale", self.local_crops_scale, 0.0, 1.0, True
        )
        self.aspect_ratio = _as_pair(
            owner, "aspect_ratio", self.aspect_ratio, strictly_positive=True
        )
        _check_probability(owner, "flip_probability", self.flip_probability)
        methods = (
            "bilinear",
            "bicubic",
            "area",
            "lanczos3",
            "lanczos5",
            "gaussian",
            "mitchellcubic",
            "nearest",
        )
        if self.interpolation not in methods:
            raise ValueError(
                f"{owner}.interpolation must be one of {methods}; received {self.interpolation!r}."
            )


@dataclasses.dataclass
class AugmentationConfig(_ConfigMixin):
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

    def __post_init__(self):
        owner = type(self).__name__
        for name in ("color_jitter_probability", "grayscale_probability", "solarize_probability"):
            _check_probability(owner, name, getattr(self, name))
        for name in ("brightness", "contrast", "saturation", "hue"):
            _check_nonnegative(owner, name, getattr(self, name))
        if self.hue > 0.5:
            raise ValueError(f"{owner}.hue must be in [0, 0.5]; received {self.hue!r}.")
        if isinstance(self.blur_probabilities, str):
            if self.blur_probabilities not in BLUR_PROBABILITY_PRESETS:
                raise ValueError(
                    f"{owner}.blur_probabilities must be one of {sorted(BLUR_PROBABILITY_PRESETS)} or three "
                    f"probabilities (global 1, global 2, local); received {self.blur_probabilities!r}."
                )
        else:
            try:
                probs = tuple(float(p) for p in self.blur_probabilities)
            except (TypeError, ValueError):
                probs = ()
            if len(probs) != 3 or not all(0.0 <= p <= 1.0 for p in probs):
                raise ValueError(
                    f"{owner}.blur_probabilities must be 'intended', 'released' or three probabilities "
                    f"(global 1, global 2, local) in [0, 1]; received {self.blur_probabilities!r}."
                )
            self.blur_probabilities = probs
        if (
            isinstance(self.blur_kernel_size, bool)
            or not isinstance(self.blur_kernel_size, int)
            or self.blur_kernel_size < 1
            or self.blur_kernel_size % 2 == 0
        ):
            raise ValueError(
                f"{owner}.blur_kernel_size must be an odd integer >= 1; received {self.blur_kernel_size!r}."
            )
        self.blur_sigma = _as_pair(owner, "blur_sigma", self.blur_sigma, strictly_positive=True)
        _check_nonnegative(owner, "solarize_threshold", self.solarize_threshold)
        self.mean = _as_triple(owner, "mean", self.mean)
        self.std = _as_triple(owner, "std", self.std, low=0.0)

    def resolved_blur_probabilities(self) -> tuple[float, float, float]:
        """Return the blur probabilities (global crop 1, global crop 2, local crop) as three floats."""
        if isinstance(self.blur_probabilities, str):
            return BLUR_PROBABILITY_PRESETS[self.blur_probabilities]
        return tuple(self.blur_probabilities)


@dataclasses.dataclass
class MaskingConfig(_ConfigMixin):
    """iBOT block masking of the global crops (the reference's MaskingGenerator and collate).

    Per batch of 2B global-crop images: the first int(2B * mask_sample_probability) get a target of
    int(N * U(p_i, p_i+1)) masked patches with p = linspace(*mask_ratio_min_max, count + 1) (stratified), the rest
    none; the order is then shuffled. A target is filled with rectangular blocks of area U(min_block_patches,
    min(remaining, max_block_ratio * N)) and log-uniform aspect ratio, at most `max_attempts` tries per block.

    Args:
        patch_size: int, default 14. Patch size of the student backbone: the mask grid is
            (global_crops_size / patch_size)^2.
        mask_sample_probability: float, default 0.5. Fraction of global-crop images that get a mask.
        mask_ratio_min_max: (float, float), default (0.1, 0.5). Range of masked-patch ratios, split into strata.
        max_block_ratio: float, default 0.5. Largest block as a fraction of N (reference: 0.5 * N patches).
        min_block_patches: int, default 4. Smallest block area drawn (reference 4).
        min_aspect: float, default 0.3. Smallest block aspect ratio; the largest is `max_aspect`.
        max_aspect: float or None, default None, meaning 1 / min_aspect.
        max_attempts: int, default 10. Tries to place one block before the image is declared full.

    Example:
        >>> MaskingConfig(patch_size=16).mask_ratio_min_max
        (0.1, 0.5)
    """

    patch_size: int = 14
    mask_sample_probability: float = 0.5
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    max_block_ratio: float = 0.5
    min_block_patches: int = 4
    min_aspect: float = 0.3
    max_aspect: float | None = None
    max_attempts: int = 10

    def __post_init__(self):
        owner = type(self).__name__
        _check_int(owner, "patch_size", self.patch_size, 1)
        _check_probability(owner, "mask_sample_probability", self.mask_sample_probability)
        self.mask_ratio_min_max = _as_pair(
            owner, "mask_ratio_min_max", self.mask_ratio_min_max, 0.0, 1.0
        )
        if (
            not isinstance(self.max_block_ratio, (int, float))
            or not 0.0 < self.max_block_ratio <= 1.0
        ):
            raise ValueError(
                f"{owner}.max_block_ratio must be in (0, 1]; received {self.max_block_ratio!r}."
            )
        _check_int(owner, "min_block_patches", self.min_block_patches, 1)
        _check_int(owner, "max_attempts", self.max_attempts, 1)
        if not isinstance(self.min_aspect, (int, float)) or self.min_aspect <= 0:
            raise ValueError(
                f"{owner}.min_aspect must be a number > 0; received {self.min_aspect!r}."
            )
        if self.max_aspect is not None and (
            not isinstance(self.max_aspect, (int, float)) or self.max_aspect < self.min_aspect
        ):
            raise ValueError(
                f"{owner}.max_aspect must be None or a number >= min_aspect ({self.min_aspect}); "
                f"received {self.max_aspect!r}."
            )

    @property
    def aspect_range(self) -> tuple[float, float]:
        """(min, max) block aspect ratio, with the reference's max = 1 / min when `max_aspect` is None."""
        return (float(self.min_aspect), float(self.max_aspect or 1.0 / self.min_aspect))


@dataclasses.dataclass
class DataConfig(_ConfigMixin):
    """Everything the data pipeline needs: crops, augmentation and masking.

    The pipeline knows nothing else about the model: the crop sizes, the patch size and the mask shape below are
    the whole contract. Both crop sizes must be multiples of the patch size (the backbone embeds non-overlapping
    patches).

    Args:
        crops: CropConfig, default CropConfig() (224 / 8 x 98).
        augmentation: AugmentationConfig, default AugmentationConfig().
        masking: MaskingConfig, default MaskingConfig() (patch 14).

    Example:
        >>> cfg = DataConfig.recipe("digits")
        >>> cfg.grid_size, cfg.num_patches
        ((8, 8), 64)
    """

    crops: CropConfig = dataclasses.field(default_factory=CropConfig)
    augmentation: AugmentationConfig = dataclasses.field(default_factory=AugmentationConfig)
    masking: MaskingConfig = dataclasses.field(default_factory=MaskingConfig)

    def __post_init__(self):
        owner = type(self).__name__
        for name, cls in (
            ("crops", CropConfig),
            ("augmentation", AugmentationConfig),
            ("masking", MaskingConfig),
        ):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, cls.from_dict(value))
            elif not isinstance(value, cls):
                raise ValueError(
                    f"{owner}.{name} must be a {cls.__name__} or a dict; received {type(value).__name__}."
                )
        patch = self.masking.patch_size
        for name in ("global_crops_size", "local_crops_size"):
            size = getattr(self.crops, name)
            if size % patch:
                raise ValueError(
                    f"{owner}: crops.{name} must be a multiple of masking.patch_size ({patch}); received {size}."
                )
        # Reflect padding needs a pad smaller than the image side.
        half = self.augmentation.blur_kernel_size // 2
        smallest = min(self.crops.global_crops_size, self.crops.local_crops_size)
        if half >= smallest:
            raise ValueError(
                f"{owner}: augmentation.blur_kernel_size // 2 must be smaller than the smallest crop side "
                f"({smallest}) for reflect padding; received blur_kernel_size="
                f"{self.augmentation.blur_kernel_size}."
            )

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, columns) of a global crop."""
        side = self.crops.global_crops_size // self.masking.patch_size
        return (side, side)

    @property
    def num_patches(self) -> int:
        """N, the number of patches of a global crop (mask length)."""
        rows, cols = self.grid_size
        return rows * cols

    def mask_buffer_size(self, batch_size: int) -> int:
        """M, the static length of the masked-patch index buffer for `batch_size` images (2 * batch_size crops).

        This is the reference's upper bound sum_i int(N * p_(i+1)) over the masked strata.
        """
        from keras_dinov2.data.masking import mask_buffer_size

        return mask_buffer_size(2 * batch_size, self.num_patches, self.masking)

    @classmethod
    def recipe(cls, name: str) -> DataConfig:
        """Return a fresh copy of a named recipe from `DATA_RECIPES`."""
        if name not in DATA_RECIPES:
            raise ValueError(
                f"DataConfig.recipe: name must be one of {sorted(DATA_RECIPES)}; received {name!r}."
            )
        return cls.from_dict(DATA_RECIPES[name]().to_dict())


def _digits_recipe() -> DataConfig:
    # 8x8 digits upsampled to 24 px: a 6x6 patch grid at patch 4 (N = 36), four locals of 3x3 patches. The 8x8
    # source holds no more detail than that, and fewer tokens make the CPU default fast (32 px globals and eight
    # 16 px locals cost 2.3x the tokens for a lower k-NN, see the README's "Small datasets"). Blur keeps the
    # reference's pixel sigma. Crops are larger than the reference's: a 5% crop of an 8x8 digit is a stroke or
    # two, which no view of the whole digit predicts, and a 32% global crop can cut a 7 into a 1. No flips: a
    # mirrored 2 or 5 is another symbol.
    return DataConfig(
        crops=CropConfig(global_crops_size=24, local_crops_size=12, local_crops_number=4,
                         global_crops_scale=(0.5, 1.0), local_crops_scale=(0.2, 0.5), flip_probability=0.0),
        masking=MaskingConfig(patch_size=4),
    )


DATA_RECIPES = {
    # The ViT-14 paper recipe (configs/train/vitl14.yaml): 2 x 224 + 8 x 98, patch 14. The library default.
    "vit14": DataConfig,
    # The reference's ssl_default_config.yaml: 8 x 96 local crops with patch 16.
    "reference_default": lambda: DataConfig(
        crops=CropConfig(local_crops_size=96), masking=MaskingConfig(patch_size=16)
    ),
    # The bundled digits data set (no download): 24 px globals, four 12 px locals, patch 4.
    "digits": _digits_recipe,
}


# ----------------------------------------------------------------------------------------------------------------------
# Pretraining: heads, losses, optimization, and the SSLConfig that groups them with the data.


@dataclasses.dataclass
class HeadConfig(_ConfigMixin):
    """The DINO and iBOT heads (the reference's `dino` and `ibot` sections).

    Args:
        num_prototypes: int, default 65536. DINO head outputs (`dino.head_n_prototypes`).
        hidden_dim: int, default 2048. MLP width of both heads.
        bottleneck_dim: int, default 256. DINO head bottleneck.
        num_layers: int, default 3. MLP layers of both heads.
        ibot_separate_head: bool, default False. Untied iBOT head (True in the paper recipes).
        ibot_num_prototypes: int, default 65536. iBOT head outputs when untied.
        ibot_bottleneck_dim: int, default 256. iBOT head bottleneck when untied.
        use_bn: bool, default False. Batch normalization in the heads' MLPs (`dino.head_use_bn`
            style; see `DINOHead`). Off in the reference's configs.
    """

    num_prototypes: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    num_layers: int = 3
    ibot_separate_head: bool = False
    ibot_num_prototypes: int = 65536
    ibot_bottleneck_dim: int = 256
    use_bn: bool = False

    def __post_init__(self):
        owner = type(self).__name__
        for name in ("num_prototypes", "hidden_dim", "bottleneck_dim", "num_layers",
                     "ibot_num_prototypes", "ibot_bottleneck_dim"):
            _check_int(owner, name, getattr(self, name), 1)


CENTERING_MODES = ("centering", "sinkhorn_knopp")
KOLEO_SCOPES = ("global", "replica")


@dataclasses.dataclass
class LossConfig(_ConfigMixin):
    """Loss weights, temperatures and the teacher's target rule.

    Args:
        dino_weight: float, default 1.0 (`dino.loss_weight`).
        ibot_weight: float, default 1.0 (`ibot.loss_weight`).
        koleo_weight: float, default 0.1 (`dino.koleo_loss_weight`).
        student_temp: float, default 0.1.
        centering: str, default "centering". "centering" (softmax with an EMA center) or
            "sinkhorn_knopp" (the paper recipes).
        center_momentum: float, default 0.9.
        koleo_scope: str, default "global". Which rows KoLeo's nearest neighbours come from when
            training on several replicas: "global" gathers the student's CLS tokens of each global
            crop from every replica (as DINOv3's distributed KoLeo), so the loss does not depend on
            the device count; "replica" keeps the reference's per-replica KoLeo (each replica's
            own rows, averaged over replicas). The same on one device.
    """

    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    student_temp: float = 0.1
    centering: str = "centering"
    center_momentum: float = 0.9
    koleo_scope: str = "global"

    def __post_init__(self):
        owner = type(self).__name__
        for name in ("dino_weight", "ibot_weight", "koleo_weight"):
            _check_nonnegative(owner, name, getattr(self, name))
        if self.centering not in CENTERING_MODES:
            raise ValueError(
                f"{owner}.centering must be one of {CENTERING_MODES}; received {self.centering!r}."
            )
        _check_probability(owner, "center_momentum", self.center_momentum)
        if self.koleo_scope not in KOLEO_SCOPES:
            raise ValueError(
                f"{owner}.koleo_scope must be one of {KOLEO_SCOPES}; received {self.koleo_scope!r}."
            )
        if not self.student_temp > 0:
            raise ValueError(f"{owner}.student_temp must be > 0; received {self.student_temp!r}.")


@dataclasses.dataclass
class OptimConfig(_ConfigMixin):
    """Optimizer, schedules and regularization (the reference's `optim`, `teacher`, `train`).

    An "epoch" is `steps_per_epoch` optimizer updates (the reference's OFFICIAL_EPOCH_LENGTH
    is 1250), whatever the data size.

    Args:
        epochs: int, default 100.
        steps_per_epoch: int, default 1250.
        base_lr: float, default 0.004. Scaled by sqrt(global batch / 1024).
        min_lr: float, default 1e-6.
        warmup_epochs: float, default 10.
        weight_decay: float, default 0.04. Cosine to `weight_decay_end`.
        weight_decay_end: float, default 0.4.
        momentum_teacher: float, default 0.992. Cosine to `final_momentum_teacher`.
        final_momentum_teacher: float, default 1.0.
        teacher_temp: float, default 0.07.
        warmup_teacher_temp: float, default 0.04.
        warmup_teacher_temp_epochs: float, default 30.
        freeze_last_layer_epochs: float, default 1.
        clip_grad: float, default 3.0. Per part (backbone, each head); 0 disables.
        layer_decay: float, default 0.9.
        patch_embed_lr_mult: float, default 0.2.
        adamw_beta1: float, default 0.9.
        adamw_beta2: float, default 0.999.
        drop_path_rate: float, default 0.3. Student stochastic depth.
        drop_path_uniform: bool, default True. The same `drop_path_rate` in every block, as the
            reference's `drop_path_uniform: true` (ssl_default_config.yaml); False ramps the rate
            linearly from 0 in the first block to `drop_path_rate` in the last (DINO v1's rule).
        layer_scale_init: float, default 1e-5.
        position_embedding_init_std: float, default 0.02. Std of the position table's init for a
            new backbone (not in the reference's configs, which fix 0.02).
        gradient_accumulation_steps: int, default 1. Micro-batches per optimizer update.
    """

    epochs: int = 100
    steps_per_epoch: int = 1250
    base_lr: float = 0.004
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30
    freeze_last_layer_epochs: float = 1
    clip_grad: float = 3.0
    layer_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999
    drop_path_rate: float = 0.3
    drop_path_uniform: bool = True
    layer_scale_init: float = 1e-5
    position_embedding_init_std: float = 0.02
    gradient_accumulation_steps: int = 1

    def __post_init__(self):
        owner = type(self).__name__
        _check_int(owner, "epochs", self.epochs, 1)
        _check_int(owner, "steps_per_epoch", self.steps_per_epoch, 1)
        _check_int(owner, "gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        for name in ("base_lr", "min_lr", "warmup_epochs", "weight_decay", "weight_decay_end",
                     "warmup_teacher_temp_epochs", "freeze_last_layer_epochs", "clip_grad"):
            _check_nonnegative(owner, name, getattr(self, name))
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(
                f"{owner}.drop_path_rate must be in [0, 1); received {self.drop_path_rate!r}."
            )
        if not isinstance(self.drop_path_uniform, bool):
            raise ValueError(
                f"{owner}.drop_path_uniform must be True or False; received "
                f"{self.drop_path_uniform!r}."
            )
        std = self.position_embedding_init_std
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not std > 0:
            raise ValueError(
                f"{owner}.position_embedding_init_std must be a number > 0; received {std!r}."
            )


    def stochastic_depth(self) -> dict[str, Any]:
        """The student backbone's stochastic-depth arguments (`DINOv2Backbone(**...)`).

        Example:
            >>> OptimConfig().stochastic_depth()
            {'drop_path_rate': 0.3, 'drop_path_uniform': True}
        """
        return {"drop_path_rate": self.drop_path_rate, "drop_path_uniform": self.drop_path_uniform}

    def new_backbone_init(self) -> dict[str, Any]:
        """The initialization arguments of a new (randomly initialized) student backbone."""
        return {"layer_scale_init": self.layer_scale_init,
                "position_embedding_init_std": self.position_embedding_init_std}


@dataclasses.dataclass
class SSLConfig(_ConfigMixin):
    """Every knob of a DINOv2 run, with the reference's defaults; recipes via `SSLConfig.recipe`.

    Args:
        batch_size: int, default 64. Source images per replica per step (`train.batch_size_per_gpu`).
        heads: HeadConfig.
        loss: LossConfig.
        optim: OptimConfig.
        data: DataConfig, default the ViT-14 paper crops (2 x 224 + 8 x 98, patch 14).
        seed: int, default 0.

    Example:
        >>> config = SSLConfig.recipe("digits")
        >>> config.data.crops.global_crops_size
        32
    """

    batch_size: int = 64
    heads: HeadConfig = dataclasses.field(default_factory=HeadConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    seed: int = 0

    def __post_init__(self):
        owner = type(self).__name__
        _check_int(owner, "batch_size", self.batch_size, 1)
        for name, cls in (("heads", HeadConfig), ("loss", LossConfig), ("optim", OptimConfig),
                          ("data", DataConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, cls.from_dict(value))
            elif not isinstance(value, cls):
                raise ValueError(
                    f"{owner}.{name} must be a {cls.__name__} or a dict; received "
                    f"{type(value).__name__}."
                )

    @classmethod
    def recipe(cls, name: str) -> SSLConfig:
        """Return a fresh copy of a named recipe from `SSL_RECIPES`."""
        if name not in SSL_RECIPES:
            raise ValueError(
                f"SSLConfig.recipe: name must be one of {sorted(SSL_RECIPES)}; received {name!r}."
            )
        return cls.from_dict(SSL_RECIPES[name]().to_dict())


def _paper_recipe(drop_path_rate):
    # configs/train/vitl14.yaml and vitg14.yaml (the paper's large runs).
    return SSLConfig(
        batch_size=32,
        heads=HeadConfig(num_prototypes=131072, bottleneck_dim=384, ibot_separate_head=True,
                         ibot_num_prototypes=131072, ibot_bottleneck_dim=256),
        loss=LossConfig(centering="sinkhorn_knopp"),
        optim=OptimConfig(epochs=500, base_lr=2e-4, warmup_epochs=80, weight_decay_end=0.2,
                          momentum_teacher=0.994, layer_decay=1.0,
                          drop_path_rate=drop_path_rate),
    )


def _digits_ssl_recipe():
    # The bundled digits on a CPU in a few hundred steps (README, "Small datasets"). The reference's settings
    # collapse here to uniform targets: with LayerScale 1e-5 every image gets the same CLS token at init, so
    # centered targets carry nothing. LayerScale 1.0, Sinkhorn-Knopp at a fixed teacher temperature of 0.02 and
    # 256 prototypes keep the targets image-dependent. Position embeddings at the patch embeddings' scale (std
    # 1.0) let the untrained network see where each patch is (random-init k-NN 47-50% -> 66-71%); their common
    # part makes CLS tokens alike, which batch norm in the heads removes, so the targets stay sharp. A constant
    # teacher momentum of 0.99: on a 200-step schedule the cosine to 1.0 freezes the teacher for the second
    # half, and the student ends ahead of it. Batch 32 for 14 epochs (588 steps at 42 per pass): on 2 CPU cores
    # a step of 32 costs 0.26 s and one of 64 0.69 s, and at equal time more, smaller steps learn more (batch
    # 64 for 15 epochs: 92.2% k-NN; batch 32 for 16: 94.7%, seed 0).
    return SSLConfig(
        batch_size=32,
        heads=HeadConfig(num_prototypes=256, hidden_dim=512, bottleneck_dim=128, use_bn=True),
        loss=LossConfig(centering="sinkhorn_knopp"),
        optim=OptimConfig(epochs=14, steps_per_epoch=42, base_lr=0.004, warmup_epochs=1,
                          teacher_temp=0.02, warmup_teacher_temp=0.02, warmup_teacher_temp_epochs=0,
                          momentum_teacher=0.99, final_momentum_teacher=0.99, drop_path_rate=0.1,
                          drop_path_uniform=False, layer_scale_init=1.0,
                          position_embedding_init_std=1.0),
        data=_digits_recipe(),
    )


SSL_RECIPES = {
    # configs/ssl_default_config.yaml (with the ViT-14 crops of the data default).
    "reference_default": SSLConfig,
    "vitl14": lambda: _paper_recipe(0.4),
    "vitg14": lambda: _paper_recipe(0.4),
    "digits": _digits_ssl_recipe,
}
