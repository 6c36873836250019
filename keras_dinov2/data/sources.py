"""Image sources for pretraining and evaluation: an image folder, a TFDS dataset, in-memory arrays, bundled digits.

A source is an `ImageSource`: a finite collection of images, with integer labels when the data has them. Random
access sources (folders, arrays, digits) are read by index, so every epoch can be an exact permutation; TFDS
datasets are streams, shuffled with a buffer. Every source yields float32 RGB images in [0, 1], (H, W, 3).

`get_source(spec)` turns what a user types (`--data digits|FOLDER|tfds:NAME[:SPLIT]`) into a source.
"""

from __future__ import annotations

import os
import re

import numpy as np
import tensorflow as tf

from keras_dinov2.data.image_headers import DEFAULT_MAX_IMAGE_PIXELS, image_header_size

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageSource",
    "image_folder_source",
    "array_source",
    "digits_source",
    "tfds_source",
    "split_source",
    "get_source",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "image_header_size",
]

_INPUT_ONLY_CHECKED = False


def _tensorflow_for_input_only():
    """Keep TensorFlow off the GPUs when another Keras backend trains (TF then only runs the input pipeline).

    Otherwise TensorFlow reserves the whole memory of every GPU when it first runs an op, next to JAX's or
    PyTorch's own allocation. Runs once, before this module creates any tensor; a no-op for the TensorFlow backend
    or when TensorFlow has already initialized its devices.
    """
    global _INPUT_ONLY_CHECKED
    if _INPUT_ONLY_CHECKED:
        return
    _INPUT_ONLY_CHECKED = True
    try:
        import keras

        if keras.backend.backend() != "tensorflow":
            tf.config.set_visible_devices([], "GPU")
    except (ImportError, RuntimeError, ValueError):
        pass


# What `tf.io.decode_image` reads (GIF: first frame).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


class ImageSource:
    """A finite collection of images, optionally labelled, that the pipelines read.

    Build one with `image_folder_source`, `array_source`, `digits_source`, `tfds_source` or `get_source`, not
    directly. A random-access source has `read(index)`; a streaming one has `stream(num_shards, shard_index)`.

    Args:
        name: str. Human-readable description (used in messages).
        num_examples: int or None. Number of images, None when unknown.
        read: callable or None, default None. int64 scalar tensor -> record; makes the source random access.
        stream: callable or None, default None. (num_shards, shard_index, shuffle_files) -> `tf.data.Dataset`
            of records.
        decode: callable. record -> (float32 image (H, W, 3) in [0, 1], int32 label, -1 when unlabelled).
        labels: int NumPy array or None, default None. Labels of a random-access source, by index.
        class_names: tuple of str or None, default None.
        describe: callable or None, default None. record -> string tensor naming the record in messages (its
            path). Set it when decoding can fail on bad data (files, encoded bytes): the pipelines then skip a
            record whose image cannot be decoded, and report it by this name. None: decoding cannot fail.
        explain: callable or None, default None. name (str, from `describe`) -> a short note on why that record
            was skipped ("" when unknown), added to the pipelines' report; Python, called only for failures.

    Example:
        >>> src = array_source(np.zeros([4, 8, 8], np.uint8))
        >>> src.num_examples, src.random_access, src.num_classes
        (4, True, None)
    """

    def __init__(
        self,
        name,
        num_examples,
        *,
        decode,
        read=None,
        stream=None,
        labels=None,
        class_names=None,
        describe=None,
        explain=None,
    ):
        if (read is None) == (stream is None):
            raise ValueError("ImageSource needs exactly one of `read` (random access) or `stream`.")
        self.name = name
        self.num_examples = None if num_examples is None else int(num_examples)
        self._read = read
        self._stream = stream
        self._decode = decode
        self.labels = None if labels is None else np.asarray(labels, np.int32)
        self.class_names = None if class_names is None else tuple(class_names)
        self._describe = describe
        self._explain = explain

    def __repr__(self):
        return f"ImageSource({self.name!r}, num_examples={self.num_examples}, num_classes={self.num_classes})"

    def __len__(self):
        if self.num_examples is None:
            raise TypeError(f"{self.name}: the number of examples is unknown.")
        return self.num_examples

    @property
    def random_access(self) -> bool:
        """Whether images can be read by index (exact per-epoch permutations)."""
        return self._read is not None

    @property
    def num_classes(self) -> int | None:
        """Number of classes, or None when the source is unlabelled."""
        if self.class_names is not None:
            return len(self.class_names)
        if self.labels is not None and self.labels.size:
            return int(self.labels.max()) + 1
        return None

    @property
    def has_labels(self) -> bool:
        """Whether the images carry class labels."""
        return self.class_names is not None or self.labels is not None

    def read(self, index):
        """Return the record of example `index` (int64 scalar tensor); random-access sources only."""
        if self._read is None:
            raise ValueError(f"{self.name} is a stream; it cannot be read by index.")
        return self._read(index)

    def stream(
        self, num_shards: int = 1, shard_index: int = 0, shuffle_files: bool = False
    ) -> tf.data.Dataset:
        """Return this shard's records, in stored order unless `shuffle_files`.

        Random-access sources give every num_shards-th record, the same count for every shard (the tail that
        does not divide is left out), so replicas run the same number of steps. TFDS sources give their
        `even_splits` part; `shuffle_files` lets TFDS reorder its files at every pass (seeded).
        """
        _check_shards(num_shards, shard_index)
        if self._stream is not None:
            return self._stream(num_shards, shard_index, shuffle_files)
        per_shard = self.num_examples // num_shards
        indices = tf.data.Dataset.range(shard_index, per_shard * num_shards, num_shards)
        return indices.map(tf.autograph.experimental.do_not_convert(self._read))

    def decode(self, record):
        """Return (float32 image (H, W, 3) in [0, 1], int32 label or -1) for a record."""
        return self._decode(record)

    @property
    def can_fail(self) -> bool:
        """Whether decoding can fail on bad data (a corrupt file), so the pipelines must guard it."""
        return self._describe is not None

    def describe(self, record):
        """Return a string tensor naming `record` in messages (a file's path)."""
        if self._describe is None:
            return tf.constant(self.name)
        return self._describe(record)

    def explain(self, name: str) -> str:
        """A short note on why the record named `name` could not be decoded, or "" when there is none to give."""
        if self._explain is None:
            return ""
        try:
            return self._explain(name)
        except OSError:  # the file went away since: nothing more to say
            return ""


def _check_shards(num_shards, shard_index):
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be an integer >= 1; received {num_shards!r}.")
    if (
        isinstance(shard_index, bool)
        or not isinstance(shard_index, int)
        or not 0 <= shard_index < num_shards
    ):
        raise ValueError(
            f"shard_index must be an integer in [0, {num_shards}); received {shard_index!r}."
        )


# ----------------------------------------------------------------------------------------------------------------------
# Image folders


def _to_rgb_float(image):
    """uint8 / float image with 1, 3 or 4 channels -> float32 RGB in [0, 1]."""
    if image.dtype != tf.float32:
        image = tf.image.convert_image_dtype(image, tf.float32)
    channels = image.shape[-1]
    if channels == 1:
        image = tf.tile(image, [1, 1, 3])
    elif channels == 4:
        image = image[..., :3]
    elif channels is None:
        raise ValueError("image channels must be known (1, 3 or 4).")
    return image


def _le_int(header, offset, dtype=tf.int32):
    size = {tf.int32: 4, tf.uint16: 2}[dtype]
    return tf.cast(tf.io.decode_raw(tf.strings.substr(header, offset, size), dtype)[0], tf.int32)


def _bmp_header(data):
    """The first 54 bytes of `data`, zero-padded, so that parsing a short file raises no error here."""
    return tf.strings.substr(tf.strings.join([tf.strings.substr(data, 0, 54), b"\0" * 54]), 0, 54)


def _is_indexed_bmp(data):
    """True for an uncompressed BMP with 1, 4 or 8 bits per pixel (colors from a palette)."""
    header = _bmp_header(data)
    bits = _le_int(header, 28, tf.uint16)
    return (
        tf.equal(tf.strings.substr(header, 0, 2), b"BM")
        & tf.equal(_le_int(header, 30), 0)
        & ((bits == 1) | (bits == 4) | (bits == 8))
    )


def _decode_indexed_bmp(data):
    """uint8 RGB (H, W, 3) of an uncompressed 1, 4 or 8 bit BMP, through its palette.

    TensorFlow's BMP decoder returns the palette indices of 8-bit files as gray levels and rejects 1 and 4-bit
    files; this reads the rows (padded to 4 bytes, bottom-up unless the height is negative), unpacks the indices
    and looks up the BGR(A) palette that follows the info header.
    """
    header = _bmp_header(data)
    width, height = _le_int(header, 18), _le_int(header, 22)
    rows = tf.abs(height)
    bits = _le_int(header, 28, tf.uint16)
    row_bytes = (bits * width + 31) // 32 * 4
    pixels = tf.io.decode_raw(
        tf.strings.substr(data, _le_int(header, 10), row_bytes * rows), tf.uint8
    )
    pixels = tf.reshape(pixels, [rows, row_bytes])
    per_byte = 8 // bits
    # The pixels of a byte, most significant bits first: shift right by (per_byte - 1 - j) * bits, mask.
    shifts = tf.cast((per_byte - 1 - tf.range(per_byte)) * bits, tf.uint8)
    indices = tf.bitwise.bitwise_and(
        tf.bitwise.right_shift(pixels[:, :, None], shifts[None, None, :]),
        tf.cast(tf.bitwise.left_shift(1, bits) - 1, tf.uint8),
    )
    indices = tf.reshape(indices, [rows, row_bytes * per_byte])[:, :width]
    indices = tf.cond(height > 0, lambda: tf.reverse(indices, [0]), lambda: indices)
    colors = _le_int(header, 46)
    colors = tf.where(colors > 0, colors, tf.bitwise.left_shift(1, bits))
    palette = tf.io.decode_raw(
        tf.strings.substr(data, 14 + _le_int(header, 14), 4 * colors), tf.uint8
    )
    palette = tf.reverse(tf.reshape(palette, [colors, 4])[:, :3], [1])  # BGR(A) -> RGB
    return tf.gather(palette, tf.cast(indices, tf.int32))


# ----------------------------------------------------------------------------------------------------------------------
# Image sizes from headers: a decompression bomb is refused before any pixel buffer is allocated.

def _unsigned(head, offset, size, big_endian=False):
    """int64 value of the `size` bytes of `head` at `offset` (a string tensor long enough)."""
    values = tf.cast(tf.io.decode_raw(tf.strings.substr(head, offset, size), tf.uint8), tf.int64)
    weights = 256 ** np.arange(size, dtype=np.int64)
    return tf.reduce_sum(values * (weights[::-1] if big_endian else weights))


def _header_pixels(data):
    """int64: width * height declared by the header of encoded image bytes (see `image_header_size`); 0 when
    the format is not recognized (decoding then fails or succeeds on its own)."""
    head = tf.strings.substr(tf.strings.join([tf.strings.substr(data, 0, 32), b"\0" * 32]), 0, 32)

    def starts(prefix, offset=0):
        return tf.equal(tf.strings.substr(head, offset, len(prefix)), prefix)

    def signed32(value):
        return tf.abs(tf.where(value >= 2**31, value - 2**32, value))

    u = lambda offset, size, big=False: _unsigned(head, offset, size, big)  # noqa: E731
    b = [u(21 + i, 1) for i in range(4)]  # the VP8L size bits
    candidates = [
        (starts(b"\x89PNG\r\n\x1a\n"), u(16, 4, True) * u(20, 4, True)),
        (starts(b"GIF8"), u(6, 2) * u(8, 2)),
        (starts(b"BM") & tf.equal(u(14, 4), 12), u(18, 2) * u(20, 2)),
        (starts(b"BM"), signed32(u(18, 4)) * signed32(u(22, 4))),
        (starts(b"RIFF") & starts(b"WEBPVP8X", 8), (1 + u(24, 3)) * (1 + u(27, 3))),
        (starts(b"RIFF") & starts(b"WEBPVP8L", 8),
         (1 + (b[0] + b[1] % 64 * 256)) * (1 + (b[1] // 64 + b[2] * 4 + b[3] % 16 * 1024))),
        (starts(b"RIFF") & starts(b"WEBPVP8 ", 8), (u(26, 2) % 16384) * (u(28, 2) % 16384)),
    ]
    pixels = tf.constant(0, tf.int64)
    for matches, count in reversed(candidates):  # the first match wins
        pixels = tf.where(matches, count, pixels)

    def jpeg_pixels():
        shape = tf.cast(tf.image.extract_jpeg_shape(data), tf.int64)
        return shape[0] * shape[1]

    return tf.cond(starts(b"\xff\xd8"), jpeg_pixels, lambda: pixels)


def _check_pixels(data, max_image_pixels):
    """`data`, once its header is known to declare at most `max_image_pixels` pixels (else an error is raised
    before anything decodes it, which the pipelines turn into a skipped, named file). None: no limit."""
    if max_image_pixels is None:
        return data
    check = tf.debugging.assert_less_equal(
        _header_pixels(data), tf.constant(max_image_pixels, tf.int64),
        message=f"the image header declares more pixels than max_image_pixels={max_image_pixels}",
    )
    with tf.control_dependencies([check]):
        return tf.identity(data)


def _check_max_image_pixels(value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(
            f"max_image_pixels must be a positive integer or None (no limit); received {value!r}."
        )
    return int(value)


def _explain_size(max_image_pixels):
    """name (a file path) -> a note when its header declares more than `max_image_pixels` pixels."""

    def explain(name):
        size = image_header_size(name) if max_image_pixels is not None and os.path.isfile(name) else None
        if size is None or size[0] * size[1] <= max_image_pixels:
            return ""
        return (f"{size[0]} x {size[1]} = {size[0] * size[1]:,} pixels, over the limit of "
                f"{max_image_pixels:,}")

    return explain


def _decode_file(path, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    data = _check_pixels(tf.io.read_file(path), max_image_pixels)
    image = tf.cond(
        _is_indexed_bmp(data),
        lambda: _decode_indexed_bmp(data),
        lambda: tf.io.decode_image(data, channels=3, expand_animations=False),
    )
    image.set_shape([None, None, 3])
    return tf.image.convert_image_dtype(image, tf.float32)


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
    _tensorflow_for_input_only()
    max_image_pixels = _check_max_image_pixels(max_image_pixels)
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
    path_table = tf.constant(paths)
    label_table = tf.constant(labels if labels is not None else np.full(len(paths), -1, np.int32))

    def read(index):
        return {"path": tf.gather(path_table, index), "label": tf.gather(label_table, index)}

    def decode(record):
        return _decode_file(record["path"], max_image_pixels), record["label"]

    return ImageSource(
        f"image folder {root}",
        len(paths),
        read=read,
        decode=decode,
        labels=labels,
        class_names=class_names,
        describe=lambda record: record["path"],
        explain=_explain_size(max_image_pixels),
    )


# ----------------------------------------------------------------------------------------------------------------------
# In-memory arrays


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
    _tensorflow_for_input_only()
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
        return _to_rgb_float(record["image"]), record["label"]

    return ImageSource(
        name, images.shape[0], read=read, decode=decode, labels=labels, class_names=class_names
    )


# ----------------------------------------------------------------------------------------------------------------------
# Bundled digits


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
    _tensorflow_for_input_only()
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


# ----------------------------------------------------------------------------------------------------------------------
# TensorFlow Datasets


def _find_feature(features, kind, wanted, argument, preferred):
    import tensorflow_datasets as tfds

    feature_type = {"image": tfds.features.Image, "label": tfds.features.ClassLabel}[kind]
    if wanted is not None:
        if wanted not in features:
            raise ValueError(
                f"{argument} {wanted!r} is not a feature; available: {sorted(features.keys())}."
            )
        return wanted
    found = [key for key, feature in features.items() if isinstance(feature, feature_type)]
    if len(found) == 1:
        return found[0]
    if preferred in found:
        return preferred
    if kind == "label":
        return None  # unlabelled, or ambiguous: leave it out
    raise ValueError(
        f"cannot pick the image feature automatically: candidates {found or sorted(features.keys())}; "
        f"pass {argument}."
    )


def tfds_source(
    name: str,
    split: str = "train",
    *,
    image_key: str | None = None,
    label_key: str | None = None,
    data_dir: str | None = None,
    download: bool = False,
    shuffle_files_seed: int = 0,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> ImageSource:
    """A TensorFlow Datasets split as a streaming source; the image feature is found automatically.

    The image feature is the only `tfds.features.Image` of the dataset (or the one called "image"); the label is
    the only `ClassLabel` (or "label"), else the source is unlabelled. Encoded images are decoded in the
    pipeline's parallel map, after shuffling, so the shuffle buffer holds compressed bytes. With several shards,
    each reads its own `tfds.even_splits` part of the split.

    Nothing is downloaded unless `download=True`: a dataset that is not prepared in the data directory fails at
    once with how to prepare it (`tfds build NAME` where there is network access, then copy the folder, or point
    TFDS_DATA_DIR / `data_dir` at it), instead of waiting on a network that may not be there.

    Args:
        name: str. Dataset name, optionally with config and version ("imagenet2012", "mnist:3.*.*").
        split: str, default "train". Any TFDS split expression ("train", "train[:10%]").
        image_key: str or None, default None. Name of the image feature, when automatic detection is ambiguous.
        label_key: str or None, default None. Name of the label feature.
        data_dir: str or None, default None. TFDS data directory (None: TFDS_DATA_DIR, else ~/tensorflow_datasets).
        download: bool, default False. Let TFDS download and prepare the dataset if it is not prepared yet.
        shuffle_files_seed: int, default 0. Seed of the file order when the pretraining pipeline shuffles
            (reshuffled at each pass); evaluation reads files in order.
        max_image_pixels: int or None, default 89,478,485. Encoded images whose header declares more pixels are
            skipped (and reported) instead of decoded; None for no limit.

    Example:
        >>> src = tfds_source("cifar10", "test")  # doctest: +SKIP
    """
    _tensorflow_for_input_only()
    import tensorflow_datasets as tfds

    max_image_pixels = _check_max_image_pixels(max_image_pixels)
    builder = _tfds_builder(name, data_dir, download)
    features = builder.info.features
    image_key = _find_feature(features, "image", image_key, "image_key", "image")
    label_key = _find_feature(features, "label", label_key, "label_key", "label")
    image_feature = features[image_key]
    # Encoded bytes can be shuffled cheaply and decoded in parallel later.
    skip = isinstance(image_feature, tfds.features.Image) and image_feature.np_dtype == np.uint8
    decoders = {image_key: tfds.decode.SkipDecoding()} if skip else None
    class_names = None
    if label_key is not None and isinstance(features[label_key], tfds.features.ClassLabel):
        class_names = features[label_key].names

    def load(sub_split, shuffle_files=False):
        read_config = tfds.ReadConfig(
            shuffle_seed=shuffle_files_seed, shuffle_reshuffle_each_iteration=True
        )
        ds = tfds.load(
            name,
            split=sub_split,
            data_dir=data_dir,
            download=download,
            shuffle_files=shuffle_files,
            decoders=decoders,
            read_config=read_config,
        )
        keys = [image_key] + ([label_key] if label_key else [])
        return ds.map(tf.autograph.experimental.do_not_convert(lambda ex: {k: ex[k] for k in keys}))

    def stream(num_shards, shard_index, shuffle_files):
        if num_shards > 1:
            return load(
                tfds.even_splits(split, n=num_shards, drop_remainder=True)[shard_index],
                shuffle_files,
            )
        return load(split, shuffle_files)

    def decode(record):
        image = record[image_key]
        if skip:
            image = _check_pixels(image, max_image_pixels)
            image = tf.io.decode_image(image, channels=3, expand_animations=False)
            image.set_shape([None, None, 3])
        image = _to_rgb_float(image)
        label = tf.cast(record[label_key], tf.int32) if label_key else tf.constant(-1, tf.int32)
        return image, label

    first = load(split)
    size = int(first.cardinality())
    num_examples = size if size >= 0 else None
    tag = f"an image of tfds:{name}:{split}"
    return ImageSource(
        f"tfds:{name}:{split}",
        num_examples,
        stream=stream,
        decode=decode,
        class_names=class_names,
        describe=(lambda record: tf.constant(tag)) if skip else None,
    )


def _tfds_builder(name, data_dir, download):
    """The TFDS builder of `name`, checked to be known and (unless `download`) prepared; no network access."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        # TFDS' own message lists every dataset it knows (hundreds of lines): suggest the close ones.
        import difflib

        known = tfds.list_builders(with_community_datasets=False)
        close = difflib.get_close_matches(name.split(":")[0].split("/")[0], known, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(
            f"tfds dataset {name!r} is not in TensorFlow Datasets' catalog; {hint}"
            "see https://www.tensorflow.org/datasets/catalog or tfds.list_builders()."
        ) from None
    except Exception as error:  # a bad version or config, an unreadable data directory...
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"tfds dataset {name!r} could not be opened: {first}") from error
    if not download and not builder.is_prepared():
        base = name.split(":")[0]
        raise ValueError(
            f"tfds dataset {name!r} is not prepared in {builder.data_dir} and nothing is downloaded here: run "
            f"`tfds build {base}` on a machine with network access and copy its ~/tensorflow_datasets folder "
            "here, or set TFDS_DATA_DIR to a folder where it is prepared (in Python: tfds_source(..., "
            "download=True) downloads it)."
        )
    return builder


# ----------------------------------------------------------------------------------------------------------------------
# Spec strings


_VERSION = re.compile(r"^(\d+|\*)(\.(\d+|\*)){0,2}$")


def _parse_tfds(spec):
    rest = spec[len("tfds:") :]
    name, _, split = rest.partition(":")
    # A version ("mnist:3.0.1") also uses a colon: keep it in the name.
    if split:
        version, _, after = split.partition(":")
        if _VERSION.match(version):
            name, split = f"{name}:{version}", after
    if not re.fullmatch(r"[A-Za-z0-9_]+(/[A-Za-z0-9_.\-]+)?(:[0-9.*]+)?", name):
        raise ValueError(
            f"data spec {spec!r}: expected 'tfds:NAME[:SPLIT]' with a dataset name; received name {name!r}."
        )
    return name, split or None


def get_source(
    spec, split: str | None = None, *, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, **kwargs
) -> ImageSource:
    """Turn a data spec into an `ImageSource`: "digits", a folder path, "tfds:NAME[:SPLIT]", arrays or a source.

    Accepted specs:
    - "digits" or "digits:train" / "digits:test" / "digits:all": the bundled digits (`digits_source`).
    - "tfds:NAME[:SPLIT]": a TFDS dataset (`tfds_source`), split "train" unless given.
    - any other string or path-like: an image folder (`image_folder_source`).
    - a NumPy array, or a tuple (images, labels): `array_source`.
    - an `ImageSource`: returned as is.

    Args:
        spec: str, path-like, NumPy array, (images, labels) tuple or ImageSource.
        split: str or None, default None. Overrides the split of "digits" / "tfds:" specs; for a folder, a
            subfolder name ("train", "val").
        max_image_pixels: int or None, default 89,478,485 (PIL's limit). Folders and TFDS datasets skip (and
            name) encoded images whose header declares more pixels, before decoding them; None for no limit.
            Digits and arrays are not encoded: it does not apply to them.
        **kwargs: passed to the source builder (e.g. `image_key`, `data_dir`, `download` for TFDS).

    Example:
        >>> get_source("digits").num_examples
        1347
    """
    if split is not None and not isinstance(spec, (str, os.PathLike)):
        raise ValueError(
            f"split applies to 'digits', 'tfds:' and folder specs; received split={split!r} with a "
            f"{type(spec).__name__} (use split_source for arrays and sources)."
        )
    if isinstance(spec, ImageSource):
        return spec
    if isinstance(spec, np.ndarray):
        return array_source(spec, **kwargs)
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], np.ndarray):
        return array_source(spec[0], spec[1], **kwargs)
    if not isinstance(spec, (str, os.PathLike)):
        raise ValueError(
            "data must be 'digits', a folder path, 'tfds:NAME[:SPLIT]', a NumPy array or an ImageSource; "
            f"received {type(spec).__name__}."
        )
    text = os.fspath(spec)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"data spec must be a non-empty string; received {spec!r}.")
    if text == "digits" or text.startswith("digits:"):
        spec_split = text.partition(":")[2] or None
        return digits_source(split or spec_split or "train", **kwargs)
    if text.startswith("tfds:"):
        name, spec_split = _parse_tfds(text)
        return tfds_source(
            name, split or spec_split or "train", max_image_pixels=max_image_pixels, **kwargs
        )
    if (
        ":" in text.split(os.sep)[0]
        and not os.path.exists(text)
        and not re.match(r"^[A-Za-z]:[\\/]", text)
    ):
        raise ValueError(
            f"data spec {text!r} is not understood: expected 'digits', a folder path or 'tfds:NAME[:SPLIT]'."
        )
    return image_folder_source(text, split=split, max_image_pixels=max_image_pixels, **kwargs)
