"""Frozen features: a backbone wrapped into a compiled feature model, and extraction over labelled data.

The reference's `extract_features`: inference mode, no augmentation, every sample once, in order. The features are
the final-norm CLS token (the k-NN input) or the mean patch token, of the last block or of the last n blocks
concatenated, optionally followed by the last block's mean patch token (the reference's linear `use_avgpool`).
"""

import keras
import numpy as np
from keras import ops

from keras_dinov2.evaluation.checks import check_positive_int, to_numpy

FEATURE_TYPES = ("cls", "patch_mean")


class FeatureModel(keras.Model):
    """Maps images to one float32 feature vector per image; a keras.Model so predict_on_batch compiles it.

    Build it with `feature_model`, which checks the arguments; `extract_features` and the k-NN functions take
    an instance as is, so one compiled forward serves several extractions.
    """

    def __init__(self, backbone, features="cls", n_last_blocks=1, avgpool=False, name="feature_model", **kwargs):
        super().__init__(name=name, **kwargs)
        self.backbone = backbone
        self.features = features
        self.n_last_blocks = n_last_blocks
        self.avgpool = avgpool

    def call(self, images):
        if self.n_last_blocks == 1:
            # The final output equals the normed last block of get_intermediate_layers, and is one graph call.
            # DINOv2Backbone accepts a bare image tensor, so any single-input embedding model works here too.
            out = self.backbone(images, training=False)
            if not isinstance(out, dict):
                if self.features != "cls" or self.avgpool:
                    raise ValueError(
                        "`features='patch_mean'` and `avgpool=True` need a backbone returning a dict with "
                        f"'patch_tokens'; received output {type(out).__name__}."
                    )
                return ops.cast(ops.reshape(out, (ops.shape(out)[0], -1)), "float32")
            blocks = [out]
        else:
            blocks = self.backbone.get_intermediate_layers(
                images, n=self.n_last_blocks, norm=True, training=False
            )
        if self.features == "cls":
            parts = [ops.cast(b["cls_token"], "float32") for b in blocks]
        else:
            parts = [ops.mean(ops.cast(b["patch_tokens"], "float32"), axis=1) for b in blocks]
        if self.avgpool:
            parts.append(ops.mean(ops.cast(blocks[-1]["patch_tokens"], "float32"), axis=1))
        return parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=-1)


def feature_model(backbone, features="cls", n_last_blocks=1, avgpool=False):
    """Wrap a backbone into a `keras.Model` mapping images (B, H, W, 3) to float32 features (B, F).

    Reuse the returned model across `extract_features` calls to compile its forward pass only once.

    Args:
        backbone: `DINOv2Backbone`, or any Keras model taking images and returning a dict with "cls_token" and
            "patch_tokens" (or, for `features="cls"` with `n_last_blocks=1`, a plain (B, F) tensor).
        features: str, default "cls". Per-block feature: "cls" (the CLS token, the reference's k-NN and linear
            input) or "patch_mean" (the mean patch token).
        n_last_blocks: int, default 1. Concatenate the feature of the last n blocks, each through the final norm
            (the reference's linear probe uses 1 or 4). Needs `backbone.get_intermediate_layers` when above 1.
        avgpool: bool, default False. Append the last block's mean patch token (the reference's linear
            `use_avgpool`).

    Example:
    >>> model = feature_model(backbone, n_last_blocks=4, avgpool=True)
    >>> model.predict_on_batch(images).shape      # (B, 5 * D)
    """
    if features not in FEATURE_TYPES:
        raise ValueError(f"`features` must be one of {FEATURE_TYPES}, received {features!r}.")
    n_last_blocks = check_positive_int("n_last_blocks", n_last_blocks)
    if n_last_blocks > 1 and not hasattr(backbone, "get_intermediate_layers"):
        raise ValueError(
            f"`n_last_blocks={n_last_blocks}` needs a backbone with `get_intermediate_layers`; received "
            f"{type(backbone).__name__}."
        )
    if features == "patch_mean" and avgpool:
        raise ValueError("`avgpool=True` adds the mean patch token to CLS features; with `features='patch_mean'` "
                         "it would repeat it. Received features='patch_mean', avgpool=True.")
    num_layers = getattr(backbone, "num_layers", None)
    if num_layers is not None and n_last_blocks > num_layers:
        raise ValueError(
            f"`n_last_blocks` must be at most the backbone's {num_layers} blocks, received {n_last_blocks}."
        )
    return FeatureModel(backbone, features=features, n_last_blocks=n_last_blocks, avgpool=bool(avgpool))


def _iterate_batches(dataset, batch_size, argument):
    """Yields (images, labels) NumPy batches and the number of batches (or None) from the supported inputs."""
    if isinstance(dataset, (tuple, list)) and len(dataset) == 2 and not hasattr(dataset[0], "as_numpy_iterator"):
        images, labels = (to_numpy(a) for a in dataset)
        if len(images) != len(labels):
            raise ValueError(
                f"`{argument}` images and labels must have the same length, received {len(images)} images and "
                f"{len(labels)} labels."
            )
        batch_size = check_positive_int("batch_size", 256 if batch_size is None else batch_size)
        starts = range(0, len(images), batch_size)
        return ((images[i : i + batch_size], labels[i : i + batch_size]) for i in starts), len(starts)
    if hasattr(dataset, "as_numpy_iterator"):
        cardinality = int(dataset.cardinality())
        if cardinality == -1:  # tf.data.INFINITE_CARDINALITY: extraction would never end.
            raise ValueError(f"`{argument}` is an infinite tf.data dataset (repeat()); pass a finite one.")
        return dataset.as_numpy_iterator(), (cardinality if cardinality >= 0 else None)
    if hasattr(dataset, "__iter__"):
        return iter(dataset), (len(dataset) if hasattr(dataset, "__len__") else None)
    raise ValueError(
        f"`{argument}` must be a tf.data dataset or an iterable of (images, labels) batches, or a tuple of NumPy "
        f"arrays (images, labels); received {type(dataset).__name__}."
    )


def _split_element(element, argument):
    if isinstance(element, dict):
        if "images" not in element or "labels" not in element:
            raise ValueError(f"`{argument}` dict elements need 'images' and 'labels', received {sorted(element)}.")
        return element["images"], element["labels"]
    if isinstance(element, (tuple, list)) and len(element) >= 2:
        return element[0], element[1]
    raise ValueError(f"`{argument}` must yield (images, labels) pairs, received {type(element).__name__}.")


def extract_labelled(model, dataset, batch_size, verbose, argument="dataset"):
    """(features float32 (num, F), labels int64 (num,)) of `model` (a `FeatureModel`) over labelled data.

    `extract_features` without the wrapping: `dataset` takes the forms `extract_features` accepts, and
    `argument` is the name that error messages give it ("train_data", "test_dataset"...).

    Example:
    >>> feats, labels = extract_labelled(feature_model(backbone), (images, labels), 256, False, "train_data")
    """
    batches, num_batches = _iterate_batches(dataset, batch_size, argument)
    progbar = keras.utils.Progbar(num_batches, unit_name="batch") if verbose else None
    features, labels = [], []
    full = None
    for step, element in enumerate(batches, start=1):
        images, batch_labels = (to_numpy(a) for a in _split_element(element, argument))
        count = len(images)
        if count == 0:
            continue
        full = full or count
        if count < full:
            # Padding the last partial batch keeps one input shape, so JAX and TF compile the forward only once.
            pad = np.zeros((full - count,) + images.shape[1:], images.dtype)
            images = np.concatenate([images, pad])
        out = to_numpy(model.predict_on_batch(images))[:count]
        features.append(out.astype(np.float32, copy=False).reshape(count, -1))
        batch_labels = batch_labels.reshape(count, -1) if batch_labels.ndim > 1 else batch_labels
        if batch_labels.ndim != 1:
            raise ValueError(
                f"`{argument}` labels must be integer class ids of shape (batch,), received shape "
                f"{batch_labels.shape}."
            )
        labels.append(batch_labels.astype(np.int64))
        if progbar is not None:
            progbar.update(step)
    if not features:
        raise ValueError(f"`{argument}` yielded no images.")
    return np.concatenate(features), np.concatenate(labels)


def extract_features(backbone, dataset, features="cls", n_last_blocks=1, avgpool=False, batch_size=None,
                     verbose=True):
    """Run a frozen backbone over a labelled dataset and return (features, labels) as NumPy arrays.

    The reference's `extract_features`: inference mode, no augmentation, every sample once, in order. The default
    features are the final-norm CLS token, the k-NN input; `n_last_blocks=4, avgpool=True` gives the reference's
    richest linear-probe input. The last partial batch is zero-padded to the batch size so the compiled forward
    sees one shape; padded rows are dropped.

    Args:
        backbone: `DINOv2Backbone`, a compatible Keras model (see `feature_model`), or a model returned by
            `feature_model` (then `features`, `n_last_blocks` and `avgpool` are ignored).
        dataset: a finite tf.data dataset of (images, labels) batches (as `keras_dinov2.data.eval_dataset` gives),
            another iterable of such batches, or a tuple of NumPy arrays (images (N, H, W, 3), labels (N,)).
        features: str, default "cls". "cls" or "patch_mean", see `feature_model`.
        n_last_blocks: int, default 1.
        avgpool: bool, default False.
        batch_size: int or None, default None. Batch size for NumPy inputs (None means 256); batched datasets
            keep their own batching.
        verbose: bool, default True. Show a progress bar.

    Returns:
        (features float32 (num, F), labels int64 (num,)).

    Example:
    >>> ds = keras_dinov2.data.eval_dataset("digits", 32, 256, split="train")
    >>> feats, labels = extract_features(backbone, ds)          # (1347, 96), (1347,)
    """
    if not isinstance(backbone, FeatureModel):
        backbone = feature_model(backbone, features=features, n_last_blocks=n_last_blocks, avgpool=avgpool)
    return extract_labelled(backbone, dataset, batch_size, verbose)


