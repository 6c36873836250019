"""In-memory sources: NumPy arrays, scikit-learn's bundled digits, and stratified splits of labelled sources."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_dinov2.data.decoding import to_rgb_float
from keras_dinov2.data.image_source import ImageSource, tensorflow_for_input_only

__all__ = ["array_source", "digits_source", "split_source"]


def array_source(images, labels=None, name: str = "arrays", class_names=None) -> ImageSource:
    """Serve in-memory images: uint8 in [0, 255] or float in [0, 1], (N, H, W), (N, H, W, 1) or (N, H, W, 3).

    The array is held as a constant of the input pipeline (keep it well under 2 GB; use a folder or TFDS for
    bigger data). Gray images are repeated to RGB.

    Args:
        images: NumPy array (N, H, W[, C]), C in {1, 3}; dtype uint8 or floating point in [0, 1].
        labels: int array (N,) or None, default None.
        name: str, default "arrays". Description for messages.
        class_names: sequence of str or None, default None.

    Example:
        >>> array_source(np.random.rand(10, 16, 16, 3), labels=np.arange(10) % 2).num_classes
        2
    """
    tensorflow_for_input_only()
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(
            f"images must have shape (N, H, W), (N, H, W, 1) or (N, H, W, 3) with N > 0; received {images.shape}."
        )
    if images.dtype == np.uint8:
        pass
    elif np.issubdtype(images.dtype, np.floating):
        low, high = float(images.min()), float(images.max())
        if not (np.isfinite(low) and np.isfinite(high)) or low < 0.0 or high > 1.0:
            raise ValueError(
                f"float images must lie in [0, 1]; received values in [{low}, {high}] "
                "(divide by 255, or pass uint8)."
            )
        images = images.astype(np.float32)
    else:
        raise ValueError(f"images must be uint8 or floating point; received dtype {images.dtype}.")
    if labels is not None:
        labels = np.asarray(labels)
        if (
            labels.shape != (images.shape[0],)
            or not np.issubdtype(labels.dtype, np.integer)
            or labels.min() < 0
        ):
            raise ValueError(
                f"labels must be non-negative integers of shape ({images.shape[0]},); received shape "
                f"{labels.shape} and dtype {labels.dtype}."
            )
    table = tf.constant(images)
    label_table = tf.constant(
        labels.astype(np.int32) if labels is not None else np.full(images.shape[0], -1, np.int32)
    )

    def read(index):
        return {"image": tf.gather(table, index), "label": tf.gather(label_table, index)}

    def decode(record):
        return to_rgb_float(record["image"]), record["label"]

    return ImageSource(
        name, images.shape[0], read=read, decode=decode, labels=labels, class_names=class_names
    )

def _stratified_split(labels, test_fraction, seed):
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    return train_test_split(indices, test_size=test_fraction, stratify=labels, random_state=seed)


def digits_source(
    split: str = "train", image_size: int = 32, test_fraction: float = 0.25, seed: int = 0
) -> ImageSource:
    """scikit-learn's handwritten digits (1,797 8x8 images, 10 classes), bundled, so nothing is downloaded.

    The images (ink levels 0-16) are scaled to [0, 1], upsampled to `image_size` with antialiased bicubic
    interpolation and repeated to RGB. A stratified, seeded split holds out `test_fraction` of every class for
    k-NN evaluation: 1,347 train / 450 test images with the defaults.

    Args:
        split: str, default "train". "train", "test" or "all".
        image_size: int, default 32. Side of the upsampled images.
        test_fraction: float, default 0.25. Held-out fraction (stratified by class).
        seed: int, default 0. Seed of the split.

    Example:
        >>> digits_source("test").num_examples
        450
    """
    tensorflow_for_input_only()
    if split not in ("train", "test", "all"):
        raise ValueError(f"digits split must be 'train', 'test' or 'all'; received {split!r}.")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8; received {image_size!r}.")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32)[..., None] / 16.0
    images = tf.image.resize(images, [image_size, image_size], method="bicubic", antialias=True)
    images = np.round(np.clip(images.numpy(), 0.0, 1.0) * 255.0).astype(np.uint8)
    labels = digits.target.astype(np.int32)
    if split != "all":
        train, test = _stratified_split(labels, test_fraction, seed)
        keep = np.sort(train if split == "train" else test)
        images, labels = images[keep], labels[keep]
    names = [str(i) for i in range(10)]
    return array_source(images, labels, name=f"digits:{split}", class_names=names)


def split_source(source: ImageSource, test_fraction: float = 0.25, seed: int = 0):
    """Split a labelled random-access source into (train, test) sources, stratified by class.

    Args:
        source: ImageSource. Random access and labelled (a folder with class subfolders, labelled arrays).
        test_fraction: float, default 0.25.
        seed: int, default 0.

    Example:
        >>> train, test = split_source(array_source(np.zeros([8, 4, 4]), np.arange(8) % 2), 0.5)
        >>> train.num_examples, test.num_examples
        (4, 4)
    """
    if not source.random_access or source.labels is None:
        raise ValueError(
            f"split_source needs a labelled random-access source; received {source!r}."
        )
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1); received {test_fraction!r}.")
    parts = [np.sort(p) for p in _stratified_split(source.labels, test_fraction, seed)]
    return tuple(_subset(source, keep, tag) for keep, tag in zip(parts, ("train", "test")))


def _subset(source, keep, tag):
    table = tf.constant(keep.astype(np.int64))
    return ImageSource(
        f"{source.name} ({tag} split)",
        len(keep),
        read=lambda index: source.read(tf.gather(table, index)),
        decode=source.decode,
        labels=source.labels[keep],
        class_names=source.class_names,
        describe=source.describe if source.can_fail else None,
        explain=source.explain,
    )
