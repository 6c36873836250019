"""Image folders as random-access sources: every image under a folder, labels from first-level subfolders."""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from keras_dinov2.data.checks import check_max_image_pixels
from keras_dinov2.data.decoding import decode_image_file, explain_image_size
from keras_dinov2.data.image_headers import DEFAULT_MAX_IMAGE_PIXELS
from keras_dinov2.data.image_source import ImageSource, tensorflow_for_input_only

__all__ = ["IMAGE_EXTENSIONS", "file_list_source", "files_source", "image_folder_source"]

# What `tf.io.decode_image` reads (GIF: first frame).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def _scan_folder(root):
    paths = []
    seen = set()
    for directory, subdirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(directory)
        if real in seen:  # a symlink cycle
            subdirs[:] = []
            continue
        seen.add(real)
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(directory, name))
    return sorted(paths)


def image_folder_source(
    path, split: str | None = None, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> ImageSource:
    """Read every image under a folder, recursively; labels come from first-level subfolders when all images lie in one.

    Files ending in .jpg, .jpeg, .png, .bmp, .gif (first frame) or .webp (any case) are read; names starting with
    a dot are skipped. When every image sits inside a first-level subfolder, that subfolder is its class (sorted
    names -> 0, 1, ...), as in an ImageNet-style layout; when some sit directly in the folder, the source is
    unlabelled. A file whose header declares more than `max_image_pixels` pixels is never decoded: the pipelines
    skip it and name it, like a corrupt file.

    Args:
        path: str or path-like. The folder.
        split: str or None, default None. A subfolder to use instead (e.g. "train" or "val").
        max_image_pixels: int or None, default 89,478,485 (PIL's limit). Largest width * height read; None for no
            limit.

    Example:
        >>> src = image_folder_source("/data/my_photos")  # doctest: +SKIP
    """
    tensorflow_for_input_only()
    max_image_pixels = check_max_image_pixels(max_image_pixels)
    root = os.fspath(path)
    if split is not None:
        root = os.path.join(root, split)
    if not os.path.isdir(root):
        what = "is not a folder" if os.path.exists(root) else "does not exist"
        raise ValueError(
            f"data folder {root!r} {what}; expected a folder of images (jpg, png, ...)."
        )
    paths = _scan_folder(root)
    if not paths:
        raise ValueError(
            f"data folder {root!r} holds no images; expected files ending in {', '.join(IMAGE_EXTENSIONS)}."
        )
    parts = [os.path.relpath(p, root).split(os.sep) for p in paths]
    labels = class_names = None
    if all(len(p) > 1 for p in parts):
        class_names = sorted({p[0] for p in parts})
        lookup = {name: i for i, name in enumerate(class_names)}
        labels = np.array([lookup[p[0]] for p in parts], np.int32)
    return files_source(f"image folder {root}", paths, labels, class_names, max_image_pixels)


def files_source(name, paths, labels=None, class_names=None, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    """A random-access source over image files `paths` (with int `labels`, or unlabelled), read and decoded in
    the pipeline; a file that cannot be decoded is skipped and named by its path (`ImageSource.describe`)."""
    path_table = tf.constant(list(paths))
    label_table = tf.constant(labels if labels is not None else np.full(len(paths), -1, np.int32))

    def read(index):
        return {"path": tf.gather(path_table, index), "label": tf.gather(label_table, index)}

    def decode(record):
        return decode_image_file(record["path"], max_image_pixels), record["label"]

    return ImageSource(
        name,
        len(paths),
        read=read,
        decode=decode,
        labels=labels,
        class_names=class_names,
        describe=lambda record: record["path"],
        explain=explain_image_size(max_image_pixels),
        paths=paths,
    )


def file_list_source(paths, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> ImageSource:
    """Read the image files `paths` in the given order, unlabelled: a pool assembled from anywhere.

    The files are not opened here: one that is missing or cannot be decoded is skipped by the pipelines and
    named, as in a folder.

    Args:
        paths: non-empty sequence of str or path-like. Image files (any format `tf.io.decode_image` reads).
        max_image_pixels: int or None, default 89,478,485 (PIL's limit). Largest width * height decoded.

    Example:
        >>> file_list_source(["/data/a.jpg", "/data/b.png"]).num_examples  # doctest: +SKIP
        2
    """
    tensorflow_for_input_only()
    max_image_pixels = check_max_image_pixels(max_image_pixels)
    if isinstance(paths, (str, os.PathLike)) or not hasattr(paths, "__len__") or len(paths) == 0:
        raise ValueError(f"paths must be a non-empty list of image files; received {paths!r}.")
    try:
        paths = [os.fspath(path) for path in paths]
    except TypeError:
        raise ValueError(f"paths must hold str or path-like file names; received {paths!r}.") from None
    return files_source(f"file list ({len(paths)} files)", paths, max_image_pixels=max_image_pixels)
