"""PCA of patch features: a joint PCA over images, with optional foreground separation, as RGB pictures."""

import numbers
import warnings

import numpy as np

from keras_dinov2.config import IMAGENET_MEAN, IMAGENET_STD
from keras_dinov2.visualize.forward import tokens_and_attention
from keras_dinov2.visualize.images import (
    as_image_list,
    prepare_images,
    resolve_size,
    to_uint8,
    upsample_maps,
)


def _principal_components(rows, n_components):
    """Projections of the centered rows on their first principal axes, with a deterministic sign per axis."""
    rows = rows.astype(np.float64)
    centered = rows - rows.mean(axis=0, keepdims=True)
    _, _, axes = np.linalg.svd(centered, full_matrices=False)
    axes = axes[:n_components]
    # SVD's sign is arbitrary: make each axis's largest loading positive so the colours are reproducible.
    signs = np.sign(axes[np.arange(len(axes)), np.argmax(np.abs(axes), axis=1)])
    axes = axes * np.where(signs == 0, 1.0, signs)[:, None]
    projected = centered @ axes.T
    if projected.shape[1] < n_components:  # fewer patches or dimensions than components
        projected = np.pad(projected, ((0, 0), (0, n_components - projected.shape[1])))
    return projected


def _min_max(values):
    """Scales each column to [0, 1] by its minimum and maximum."""
    low, high = values.min(axis=0), values.max(axis=0)
    span = np.where(high - low > 0, high - low, 1.0)
    return np.clip((values - low) / span, 0.0, 1.0)


def _border(grid_shape):
    mask = np.ones(grid_shape, bool)
    if min(grid_shape) > 2:
        mask[1:-1, 1:-1] = False
    return mask


def patch_pca(features, n_components=3, background_threshold=None):
    """Joint PCA of patch features of one or more images, each component min-max scaled to [0, 1].

    Without `background_threshold` every patch takes part in one PCA. With it, a first PCA's first component
    (min-max scaled to [0, 1]) splits the patches: those above the threshold are the foreground, and a second
    PCA on the foreground patches alone gives the components; background patches get 0 in every component.
    The sign of a principal axis is arbitrary, so the first component is oriented to score the image border
    lower than the interior on average: in object-centred pictures the border is mostly background.

    Args:
        features: float array (B, h, w, D), as `patch_features` returns.
        n_components: int, default 3.
        background_threshold: float in [0, 1) or None, default None (no foreground separation). The
            paper's procedure, with about 0.5 for trained backbones.

    Returns:
        (components float32 (B, h, w, n_components) in [0, 1], foreground bool (B, h, w)).

    Example:
    >>> components, foreground = patch_pca(patch_features(backbone, images), background_threshold=0.5)
    """
    features = np.asarray(features, np.float32)
    if features.ndim != 4:
        raise ValueError(f"`features` must have shape (B, h, w, D); received shape {features.shape}.")
    if isinstance(n_components, bool) or not isinstance(n_components, numbers.Integral) or n_components < 1:
        raise ValueError(f"`n_components` must be a positive integer; received {n_components!r}.")
    if background_threshold is not None and not 0.0 <= background_threshold < 1.0:
        raise ValueError(
            f"`background_threshold` must be in [0, 1) or None; received {background_threshold!r}."
        )
    batch, height, width, dim = features.shape
    rows = features.reshape(-1, dim)
    foreground = np.ones(len(rows), bool)
    if background_threshold is not None:
        first = _min_max(_principal_components(rows, 1))[:, 0]
        border = np.broadcast_to(_border((height, width)), (batch, height, width)).reshape(-1)
        if (~border).any() and first[border].mean() > first[~border].mean():
            first = 1.0 - first
        foreground = first > background_threshold
        if foreground.sum() < 2:
            warnings.warn(
                f"background_threshold={background_threshold} leaves {int(foreground.sum())} foreground "
                "patches; using every patch instead.",
                stacklevel=2,
            )
            foreground[:] = True
    components = np.zeros((len(rows), n_components), np.float32)
    kept = _principal_components(rows[foreground], n_components)
    components[foreground] = _min_max(kept)
    return (components.reshape(batch, height, width, n_components),
            foreground.reshape(batch, height, width))


def pca_image(backbone, image, size=None, background_threshold=None, upsample="nearest",
              mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The first three PCA components of the patch tokens as an RGB picture at the input size.

    Args:
        backbone: `DINOv2Backbone`.
        image: one image or a list of images (anything `load_image` accepts). A list shares one PCA, so
            colours correspond across its images.
        size: int, (height, width) or None, default None: the backbone's `image_size`. Multiples of the patch
            size; every image is resized to it.
        background_threshold: float in [0, 1) or None, default None. Separate the background first (see
            `patch_pca`); background patches are black.
        upsample: str, default "nearest" (one flat block per patch) or "bilinear".
        mean, std: normalization, default ImageNet's (the evaluation transform).

    Returns:
        uint8 array (height, width, 3), or (B, height, width, 3) for a list.

    Example:
    >>> pca_image(backbone, ["skimage:chelsea", "skimage:astronaut"], size=224).shape
    (2, 224, 224, 3)
    """
    images, single = as_image_list(image)
    size = resolve_size(backbone, size)
    normalized, _ = prepare_images(images, size, mean, std)
    pictures = pca_pictures(tokens_and_attention(backbone, normalized)[0], size, background_threshold, upsample)
    return pictures[0] if single else pictures


def pca_pictures(tokens, size, background_threshold, upsample):
    """uint8 RGB pictures (B, height, width, 3) of the first three components of `patch_pca` over `tokens`.

    Args:
        tokens: float array (B, h, w, D), as `patch_features` returns.
        size: (height, width) in pixels.
        background_threshold, upsample: see `pca_image`.
    """
    components, _ = patch_pca(tokens, 3, background_threshold)
    return to_uint8(upsample_maps(components, size, upsample))

