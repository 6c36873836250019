"""Attention maps: the CLS token's last-block attention over the patches, per head, overlaid on the input."""

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


def _colorize(maps, colormap):
    """(..., H, W) in [0, 1] -> float (..., H, W, 3) through a matplotlib colormap."""
    import matplotlib

    try:
        cmap = matplotlib.colormaps[colormap]
    except KeyError as error:
        raise ValueError(f"`colormap` {colormap!r} is not a matplotlib colormap.") from error
    return cmap(maps)[..., :3].astype(np.float32)


def attention_maps(backbone, image, size=None, colormap="inferno", alpha=0.6, upsample="bilinear",
                   mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The CLS token's last-block attention over the patches, per head, and overlays on the input.

    The attention of the CLS query is renormalized over the patch tokens (leaving out the CLS and register
    keys), so each head's map is a distribution over the patch grid summing to 1. For the overlays each map is
    min-max scaled, upsampled, coloured and blended with the input: `(1 - alpha) * image + alpha * colour`.

    Args:
        backbone: `DINOv2Backbone`.
        image: one image or a list of images (anything `load_image` accepts).
        size: int, (height, width) or None, default None: the backbone's `image_size`.
        colormap: str, default "inferno". A matplotlib colormap.
        alpha: float in [0, 1], default 0.6. Weight of the colour in the overlay.
        upsample: str, default "bilinear", or "nearest".
        mean, std: normalization, default ImageNet's.

    Returns:
        dict of NumPy arrays (with a leading batch axis B for a list):
        "attention" float32 (heads, h, w), each map summing to 1; "mean" float32 (h, w), the mean over heads;
        "overlays" uint8 (heads + 1, height, width, 3), the heads then the mean; "image" uint8 (height, width, 3),
        the resized input.

    Example:
    >>> maps = attention_maps(backbone, "skimage:astronaut", size=224)
    >>> maps["attention"].sum(axis=(-2, -1))      # ones, one per head
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1]; received {alpha!r}.")
    images, single = as_image_list(image)
    size = resolve_size(backbone, size)
    normalized, display = prepare_images(images, size, mean, std)
    result = attention_pictures(tokens_and_attention(backbone, normalized)[1], display, size, colormap, alpha,
                                 upsample)
    return {k: v[0] for k, v in result.items()} if single else result


def attention_pictures(weights, display, size, colormap, alpha, upsample):
    """`attention_maps`' result for a batch, from the CLS attention (B, heads, h, w) and the display images.

    Args:
        weights: float array (B, heads, h, w), as `tokens_and_attention` returns.
        display: uint8 array (B, height, width, 3), the resized inputs (`prepare_images`' second output).
        size: (height, width) in pixels.
        colormap, alpha, upsample: see `attention_maps`.
    """
    weights = weights.astype(np.float64)
    total = np.maximum(weights.sum(axis=(-2, -1), keepdims=True), 1e-30)
    attention = (weights / total).astype(np.float32)
    mean_map = attention.mean(axis=1)
    every = np.concatenate([attention, mean_map[:, None]], axis=1)  # (B, heads + 1, h, w)
    low = every.min(axis=(-2, -1), keepdims=True)
    span = every.max(axis=(-2, -1), keepdims=True) - low
    scaled = (every - low) / np.where(span > 0, span, 1.0)
    scaled = upsample_maps(scaled[..., None], size, upsample)[..., 0]
    colours = _colorize(scaled, colormap)
    base = display[:, None].astype(np.float32) / 255.0
    overlays = to_uint8((1.0 - alpha) * base + alpha * colours)
    return {"attention": attention, "mean": mean_map, "overlays": overlays, "image": display}

