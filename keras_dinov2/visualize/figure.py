"""The figure: one PNG grid, one row per image: input | PCA | attention of each head | mean of heads."""

import math
import os

import numpy as np

from keras_dinov2.config import IMAGENET_MEAN, IMAGENET_STD
from keras_dinov2.data.image_headers import DEFAULT_MAX_IMAGE_PIXELS
from keras_dinov2.visualize.attention import attention_pictures
from keras_dinov2.visualize.forward import tokens_and_attention
from keras_dinov2.visualize.images import as_image_list, prepare_images, resolve_size
from keras_dinov2.visualize.pca import pca_pictures


def _panel_scale(size, min_panel):
    return max(1, math.ceil(min_panel / max(size)))


def _draw_titles(canvas, titles, starts, panel_width, title_height):
    from PIL import Image, ImageDraw

    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    for title, x in zip(titles, starts):
        text = title
        while text and draw.textlength(text) > panel_width:
            text = text[:-1]
        offset = max(0, (panel_width - draw.textlength(text)) // 2)
        draw.text((x + offset, max(0, (title_height - 11) // 2)), text, fill=(0, 0, 0))
    return np.asarray(picture)


def save_figure(backbone, images, path, size=None, background_threshold=None, upsample="nearest",
                colormap="inferno", alpha=0.6, min_panel=128, padding=4, title_height=16,
                mean=IMAGENET_MEAN, std=IMAGENET_STD, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    """Writes a PNG grid, one row per image: input | PCA | attention of each head | mean of heads.

    The PCA is joint over the images (colours correspond across rows). Panels are the input size times an integer
    factor, the smallest that makes them at least `min_panel` pixels on their longer side (nearest neighbour, so
    a 32 px input shows as 128 px blocks). The PNG is exactly
    `columns * panel_width + (columns + 1) * padding` wide and
    `title_height + rows * panel_height + (rows + 1) * padding` high, with columns = heads + 3.

    Args:
        backbone: `DINOv2Backbone`.
        images: one image or a list of images (anything `load_image` accepts).
        path: str. The PNG to write (parent folders are created).
        size: int, (height, width) or None, default None: the backbone's `image_size`.
        background_threshold, upsample: see `pca_image`.
        colormap, alpha: see `attention_maps`.
        min_panel: int, default 128. Smallest panel side in pixels.
        padding: int, default 4. White space between panels.
        title_height: int, default 16. Height of the column titles strip (0 for none).
        mean, std: normalization, default ImageNet's.
        max_image_pixels: int or None, default 89,478,485. Largest image file read (see `load_image`).

    Returns:
        The written picture, uint8 (height, width, 3).

    Example:
    >>> save_figure(backbone, ["skimage:chelsea", "skimage:coffee"], "out.png", size=224)
    """
    from PIL import Image

    images, _ = as_image_list(images)
    size = resolve_size(backbone, size)
    normalized, display = prepare_images(images, size, mean, std, max_image_pixels)
    tokens, weights = tokens_and_attention(backbone, normalized)
    pca = pca_pictures(tokens, size, background_threshold, upsample)
    maps = attention_pictures(weights, display, size, colormap, alpha, "bilinear")
    heads = maps["attention"].shape[1]
    titles = ["input", "PCA"] + [f"head {i + 1}" for i in range(heads)] + ["mean"]
    scale = _panel_scale(size, min_panel)
    panel_h, panel_w = size[0] * scale, size[1] * scale
    rows, columns = len(images), len(titles)
    canvas = np.full((title_height + rows * panel_h + (rows + 1) * padding,
                      columns * panel_w + (columns + 1) * padding, 3), 255, np.uint8)
    starts = [padding + c * (panel_w + padding) for c in range(columns)]
    for r in range(rows):
        panels = [maps["image"][r], pca[r]] + list(maps["overlays"][r])
        top = title_height + padding + r * (panel_h + padding)
        for panel, left in zip(panels, starts):
            big = np.repeat(np.repeat(panel, scale, axis=0), scale, axis=1)
            canvas[top:top + panel_h, left:left + panel_w] = big
    if title_height:
        canvas = _draw_titles(canvas, titles, starts, panel_w, title_height)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    Image.fromarray(canvas).save(path, format="PNG")
    return canvas
