"""Pictures of what a backbone sees: PCA of its patch features and the CLS token's attention maps.

Two views, as in the DINO and DINOv2 papers:

- `pca_image`: the first three principal components of the final-norm patch tokens, one per RGB channel. With
  `background_threshold`, a first PCA separates foreground from background on its first component, and a second
  PCA on the foreground patches alone gives the colours (the DINOv2 paper's Figure 1 procedure). Several images
  share one PCA, so the same part of different objects gets the same colour.
- `attention_maps`: the CLS token's attention over the patches in the last block, one map per head.

`save_figure` writes both as one PNG grid, one row per image: input | PCA | head 1 ... head h | mean of heads.
Everything runs on any Keras backend and any input size that is a multiple of the patch size (the position
embeddings are interpolated); images come from files, NumPy arrays or scikit-image's bundled pictures
(`"skimage:astronaut"`), so the pictures can be made offline.

Example:
    >>> from keras_dinov2 import DINOv2Backbone, visualize
    >>> backbone = DINOv2Backbone.from_preset("dinov2_vit_tiny4", load_weights=False)
    >>> rgb = visualize.pca_image(backbone, "skimage:chelsea", size=64)       # uint8 (64, 64, 3)
    >>> maps = visualize.attention_maps(backbone, "skimage:chelsea", size=64)
    >>> maps["attention"].shape                                              # (3, 16, 16): heads, grid
    >>> visualize.save_figure(backbone, ["skimage:chelsea", "skimage:coffee"], "pictures.png", size=64)
"""

import math
import numbers
import os
import warnings

import keras
import numpy as np

from keras_dinov2.config import IMAGENET_MEAN, IMAGENET_STD
from keras_dinov2.data.image_headers import DEFAULT_MAX_IMAGE_PIXELS, image_header_size

__all__ = [
    "attention_maps",
    "load_image",
    "patch_features",
    "patch_pca",
    "pca_image",
    "prepare_images",
    "save_figure",
]

SKIMAGE_PREFIX = "skimage:"
UPSAMPLING = ("nearest", "bilinear")


# ----------------------------------------------------------------------------------------------------------------------
# Images in


def _skimage_picture(name):
    try:
        from skimage import data
    except ImportError as error:
        raise ValueError(
            f"image {SKIMAGE_PREFIX}{name} needs scikit-image (pip install scikit-image)."
        ) from error
    loader = getattr(data, name, None)
    if name.startswith("_") or not callable(loader):
        raise ValueError(
            f"image {SKIMAGE_PREFIX}{name!r}: scikit-image has no bundled picture {name!r}; try "
            "skimage:astronaut, skimage:coffee, skimage:chelsea, skimage:rocket or skimage:coins."
        )
    try:
        return np.asarray(loader())
    except Exception as error:  # pictures outside the wheel need pooch and a download
        raise ValueError(
            f"image {SKIMAGE_PREFIX}{name} could not be loaded ({error}); pictures bundled with scikit-image "
            "(astronaut, coffee, chelsea, rocket, coins, camera) need no download."
        ) from error


def load_image(image, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    """An image as float32 RGB (H, W, 3) in [0, 1], from a file, an array or a scikit-image picture name.

    A file's size is read from its header first: one declaring more than `max_image_pixels` pixels is refused
    before it is decoded (a decompression bomb: kilobytes on disk, gigabytes in memory).

    Args:
        image: str or path-like: a file PIL reads (PNG, JPEG, BMP, GIF, WebP...), or "skimage:NAME" for one of
            scikit-image's bundled pictures (astronaut, coffee, chelsea, rocket, coins, camera...). Or a NumPy
            array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4): uint8 (0-255), bool, or float (taken as [0, 1]
            when its maximum is at most 1, else as 0-255). Alpha is dropped; gray is repeated to RGB.
        max_image_pixels: int or None, default 89,478,485 (PIL's limit). Largest width * height of a file;
            None for no limit.

    Returns:
        float32 array (H, W, 3) in [0, 1].

    Raises:
        FileNotFoundError: naming the path, when a file does not exist.
        ValueError: for arrays of another shape, an unknown scikit-image name, a file that is not an image or
            one over `max_image_pixels`.

    Example:
    >>> load_image("skimage:coffee").shape
    (400, 600, 3)
    """
    if isinstance(image, (str, os.PathLike)):
        text = os.fspath(image)
        if text.startswith(SKIMAGE_PREFIX):
            array = _skimage_picture(text[len(SKIMAGE_PREFIX):])
        else:
            if not os.path.isfile(text):
                raise FileNotFoundError(f"image file {text!r} does not exist.")
            array = _read_image_file(text, max_image_pixels)
    else:
        if hasattr(image, "detach") and hasattr(image, "cpu"):  # a torch tensor
            image = image.detach().cpu()
        array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or min(array.shape[:2]) < 1:
        raise ValueError(
            f"`image` must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); received shape {array.shape}."
        )
    if array.dtype == bool:
        array = array.astype(np.float32)
    elif np.issubdtype(array.dtype, np.integer):
        array = array.astype(np.float32) / 255.0
    else:
        array = array.astype(np.float32)
        if np.nanmax(array) > 1.0:
            array = array / 255.0
    array = np.clip(np.nan_to_num(array), 0.0, 1.0)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array[..., :3])


def _read_image_file(path, max_image_pixels):
    """uint8 RGB pixels of an image file, refused when its header declares more than `max_image_pixels`."""
    from PIL import Image

    if max_image_pixels is not None and (
        isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int) or max_image_pixels < 1
    ):
        raise ValueError(
            f"max_image_pixels must be a positive integer or None (no limit); received {max_image_pixels!r}."
        )
    size = image_header_size(path)
    too_large = (f"image file {path!r} declares {{}} x {{}} = {{:,}} pixels, more than max_image_pixels="
                 f"{max_image_pixels:,}" if max_image_pixels else "")
    hint = " (raise it, --max-image-pixels on the command line, if the image is trusted)."
    if size is not None and max_image_pixels is not None and size[0] * size[1] > max_image_pixels:
        raise ValueError(too_large.format(size[0], size[1], size[0] * size[1]) + hint)
    # PIL applies its own, global limit at open(); the check above and below replaces it, so that
    # max_image_pixels alone decides (restored at once: open() reads only the header).
    default_limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None
        try:
            picture = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = default_limit
        with picture:
            width, height = picture.size
            if max_image_pixels is not None and width * height > max_image_pixels:
                raise ValueError(too_large.format(width, height, width * height) + hint)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                return np.asarray(picture.convert("RGB"))
    except (OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"image file {path!r} could not be read as an image ({error}).") from error


def _resolve_size(backbone, size):
    """(height, width) from None (the backbone's image_size), an int or a pair; multiples of the patch size."""
    patch = int(backbone.patch_size)
    if size is None:
        size = backbone.image_size
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        size = (int(size), int(size))
    size = tuple(size)
    if len(size) != 2 or not all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in size
    ):
        raise ValueError(f"`size` must be a positive int or a pair (height, width); received {size!r}.")
    height, width = (int(s) for s in size)
    for side in (height, width):
        if side % patch:
            raise ValueError(
                f"`size` {side} is not a multiple of the backbone's patch size {patch}; use a multiple "
                f"such as {max(patch, side // patch * patch)} or {(side // patch + 1) * patch}."
            )
    return height, width


def _as_list(images):
    """(list of images, whether a single image was given)."""
    if isinstance(images, (str, os.PathLike)):
        return [images], True
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images), False
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("`image` must be one image or a non-empty list of images; received an empty list.")
        return list(images), False
    return [images], True


def prepare_images(images, size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    """Load, resize (bicubic, aspect ratio not kept) and normalize images for the backbone.

    The evaluation transform without its center crop: a picture is resized to `size` as a whole, so nothing is
    cut off. Pass a (height, width) with the image's aspect ratio to keep its proportions.

    Args:
        images: list of anything `load_image` accepts.
        size: (height, width) in pixels.
        mean: 3 floats, default the ImageNet mean.
        std: 3 floats, default the ImageNet standard deviation.
        max_image_pixels: int or None, default 89,478,485. See `load_image`.

    Returns:
        (normalized float32 (B, height, width, 3), display uint8 (B, height, width, 3)).
    """
    from PIL import Image

    height, width = size
    display = []
    for image in images:
        rgb = np.round(load_image(image, max_image_pixels) * 255.0).astype(np.uint8)
        if rgb.shape[:2] != (height, width):
            rgb = np.asarray(Image.fromarray(rgb).resize((width, height), Image.BICUBIC))
        display.append(rgb)
    display = np.stack(display)
    mean = np.asarray(mean, np.float32).reshape(1, 1, 1, 3)
    std = np.asarray(std, np.float32).reshape(1, 1, 1, 3)
    return (display.astype(np.float32) / 255.0 - mean) / std, display


# ----------------------------------------------------------------------------------------------------------------------
# PCA of patch features


class _PictureModel(keras.Model):
    """Images -> final-norm patch tokens and the CLS attention of the last block, as one compiled forward."""

    def __init__(self, backbone, **kwargs):
        super().__init__(name="picture_model", **kwargs)
        self.backbone = backbone

    def call(self, images):
        # The backbone's forward pass, spelled out to read the last block's attention on the way (the
        # functional model's outputs do not include it): one pass instead of the two that calling the
        # backbone and `last_attention_weights` would take.
        backbone = self.backbone
        x = backbone.embeddings(images)
        for block in backbone.transformer_blocks[:-1]:
            x = block(x, training=False)
        last = backbone.transformer_blocks[-1]
        first_patch = 1 + backbone.num_register_tokens
        attention = last.attn.attention_weights(last.norm1(x))[:, :, 0, first_patch:]
        tokens = backbone.norm(last(x, training=False))[:, first_patch:]
        return {"patch_tokens": keras.ops.cast(tokens, "float32"),
                "attention": keras.ops.cast(attention, "float32")}


_LAST_MODEL = []  # the _PictureModel of the last backbone drawn (it keeps that backbone alive)


def _forward(backbone, images):
    """(patch tokens (B, h, w, D), CLS attention (B, heads, h, w)) as float32 NumPy arrays."""
    # predict_on_batch compiles the forward (once per input shape under JAX and TensorFlow), which is several
    # times faster than op-by-op execution for a new shape; the model is kept so the next call reuses it.
    if not _LAST_MODEL or _LAST_MODEL[0].backbone is not backbone:
        _LAST_MODEL[:] = [_PictureModel(backbone)]
    model = _LAST_MODEL[0]
    images = np.asarray(images, np.float32)
    patch = int(backbone.patch_size)
    grid = (images.shape[1] // patch, images.shape[2] // patch)
    out = model.predict_on_batch(images)
    tokens = np.asarray(keras.ops.convert_to_numpy(out["patch_tokens"]))
    attention = np.asarray(keras.ops.convert_to_numpy(out["attention"]))
    return (tokens.reshape((len(images),) + grid + (tokens.shape[-1],)),
            attention.reshape(attention.shape[:2] + grid))


def patch_features(backbone, images):
    """Final-norm patch tokens on the patch grid, float32 NumPy (B, H / p, W / p, D).

    Args:
        backbone: `DINOv2Backbone`.
        images: float array (B, H, W, 3), already normalized (see `prepare_images`); H and W multiples of the
            patch size.
    """
    return _forward(backbone, images)[0]


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


def _upsample(maps, size, method):
    """(..., h, w, C) float maps -> (..., H, W, C) float32, nearest (blocks per patch) or bilinear."""
    if method not in UPSAMPLING:
        raise ValueError(f"`upsample` must be one of {UPSAMPLING}; received {method!r}.")
    height, width = size
    fy, fx = height // maps.shape[-3], width // maps.shape[-2]
    if method == "nearest":
        return np.repeat(np.repeat(maps, fy, axis=-3), fx, axis=-2).astype(np.float32)
    from PIL import Image

    flat = maps.reshape((-1,) + maps.shape[-3:])
    out = np.empty((len(flat), height, width, maps.shape[-1]), np.float32)
    for i, image in enumerate(flat):
        for c in range(image.shape[-1]):
            channel = Image.fromarray(np.ascontiguousarray(image[..., c], np.float32), mode="F")
            out[i, ..., c] = np.asarray(channel.resize((width, height), Image.BILINEAR))
    return out.reshape(maps.shape[:-3] + (height, width, maps.shape[-1]))


def _to_uint8(x):
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


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
    images, single = _as_list(image)
    size = _resolve_size(backbone, size)
    normalized, _ = prepare_images(images, size, mean, std)
    pictures = _pca_pictures(_forward(backbone, normalized)[0], size, background_threshold, upsample)
    return pictures[0] if single else pictures


def _pca_pictures(tokens, size, background_threshold, upsample):
    components, _ = patch_pca(tokens, 3, background_threshold)
    return _to_uint8(_upsample(components, size, upsample))


# ----------------------------------------------------------------------------------------------------------------------
# Attention maps


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
    images, single = _as_list(image)
    size = _resolve_size(backbone, size)
    normalized, display = prepare_images(images, size, mean, std)
    result = _attention_pictures(_forward(backbone, normalized)[1], display, size, colormap, alpha,
                                 upsample)
    return {k: v[0] for k, v in result.items()} if single else result


def _attention_pictures(weights, display, size, colormap, alpha, upsample):
    weights = weights.astype(np.float64)
    total = np.maximum(weights.sum(axis=(-2, -1), keepdims=True), 1e-30)
    attention = (weights / total).astype(np.float32)
    mean_map = attention.mean(axis=1)
    every = np.concatenate([attention, mean_map[:, None]], axis=1)  # (B, heads + 1, h, w)
    low = every.min(axis=(-2, -1), keepdims=True)
    span = every.max(axis=(-2, -1), keepdims=True) - low
    scaled = (every - low) / np.where(span > 0, span, 1.0)
    scaled = _upsample(scaled[..., None], size, upsample)[..., 0]
    colours = _colorize(scaled, colormap)
    base = display[:, None].astype(np.float32) / 255.0
    overlays = _to_uint8((1.0 - alpha) * base + alpha * colours)
    return {"attention": attention, "mean": mean_map, "overlays": overlays, "image": display}


# ----------------------------------------------------------------------------------------------------------------------
# The figure


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

    images, _ = _as_list(images)
    size = _resolve_size(backbone, size)
    normalized, display = prepare_images(images, size, mean, std, max_image_pixels)
    tokens, weights = _forward(backbone, normalized)
    pca = _pca_pictures(tokens, size, background_threshold, upsample)
    maps = _attention_pictures(weights, display, size, colormap, alpha, "bilinear")
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
