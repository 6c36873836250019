"""Images in and out: loading, resizing and normalizing for the backbone; patch-grid maps up to pixels, uint8.

Images come from files (read only after their header's pixel count is checked), NumPy arrays or scikit-image's
bundled pictures ("skimage:astronaut"), so the pictures can be made offline.
"""

import numbers
import os
import warnings

import numpy as np

from keras_dinov2.config import IMAGENET_MEAN, IMAGENET_STD
from keras_dinov2.data.image_headers import DEFAULT_MAX_IMAGE_PIXELS, image_header_size

SKIMAGE_PREFIX = "skimage:"
UPSAMPLING = ("nearest", "bilinear")


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


def resolve_size(backbone, size):
    """(height, width) from None (the backbone's image_size), an int or a pair; multiples of the patch size.

    A side that is not a multiple of the patch size gets a `ValueError` suggesting the nearest multiples.

    Example:
    >>> resolve_size(backbone, 32)      # patch size 8
    (32, 32)
    """
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


def as_image_list(images):
    """(list of images, whether a single image was given) from one image or several.

    One image is a path, a "skimage:NAME" string or an array (H, W[, C]); several are a list or tuple of those,
    or a (B, H, W, C) array.

    Example:
    >>> as_image_list("skimage:coffee")
    (['skimage:coffee'], True)
    """
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


def upsample_maps(maps, size, method):
    """(..., h, w, C) float maps -> (..., H, W, C) float32, nearest (blocks per patch) or bilinear.

    Args:
        maps: float array (..., h, w, C) on the patch grid.
        size: (H, W) in pixels, multiples of (h, w).
        method: str, one of `UPSAMPLING` ("nearest", "bilinear").
    """
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


def to_uint8(x):
    """Values in [0, 1] (clipped) as uint8 0-255, rounded to the nearest."""
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)

