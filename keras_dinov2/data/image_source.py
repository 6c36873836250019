"""`ImageSource`, what every pipeline reads: a finite collection of images, labelled or not, by index or as a stream.

The sources themselves are built in `folder` (image folders), `arrays` (in-memory arrays, the bundled digits, splits)
and `tfds` (TensorFlow Datasets); `sources.get_source` picks one from a spec string.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_dinov2.data.checks import check_shards

__all__ = ["ImageSource", "tensorflow_for_input_only"]

_INPUT_ONLY_CHECKED = False


def tensorflow_for_input_only():
    """Keep TensorFlow off the GPUs when another Keras backend trains (TF then only runs the input pipeline).

    Otherwise TensorFlow reserves the whole memory of every GPU when it first runs an op, next to JAX's or
    PyTorch's own allocation. Runs once, before the first source creates any tensor; a no-op for the TensorFlow backend
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
        paths: sequence of str or None, default None. The file of each example, by index, for sources read from
            files (folders, file lists, manifests); curation lists them next to the embeddings.

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
        paths=None,
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
        self.paths = None if paths is None else tuple(paths)

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
        check_shards(num_shards, shard_index)
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
