"""TensorFlow Datasets splits as streaming sources; nothing is downloaded unless asked."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_dinov2.data.checks import check_max_image_pixels
from keras_dinov2.data.decoding import check_image_pixels, to_rgb_float
from keras_dinov2.data.image_headers import DEFAULT_MAX_IMAGE_PIXELS
from keras_dinov2.data.image_source import ImageSource, tensorflow_for_input_only

__all__ = ["tfds_builder", "tfds_source"]


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
    tensorflow_for_input_only()
    import tensorflow_datasets as tfds

    max_image_pixels = check_max_image_pixels(max_image_pixels)
    builder = tfds_builder(name, data_dir, download)
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
            image = check_image_pixels(image, max_image_pixels)
            image = tf.io.decode_image(image, channels=3, expand_animations=False)
            image.set_shape([None, None, 3])
        image = to_rgb_float(image)
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


def tfds_builder(name, data_dir, download):
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
