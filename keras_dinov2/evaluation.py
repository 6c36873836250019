"""Frozen-feature evaluation: feature extraction, the reference k-NN classifier, a linear probe, a k-NN callback.

Everything runs on any Keras backend: the backbone forward goes through `keras.Model.predict_on_batch` (compiled once
per feature model by JAX and TensorFlow, eager under torch), and the classifiers work on NumPy float32 arrays.

Reference protocol (facebookresearch/dinov2 `eval/knn.py`, `eval/linear.py`, `eval/utils.py`):

- k-NN: the final-norm CLS token, L2-normalized; cosine similarity of every query to every reference sample; the
  `max(ks)` most similar neighbours, weighted by `softmax(sim / T)` over those neighbours (T = 0.07); for each k the
  class votes of the first k neighbours are summed and the argmax is the prediction; k in {10, 20, 100, 200};
  top-1 accuracy averaged over samples ("micro").
- Linear: frozen features = the CLS tokens of the last 1 or 4 blocks concatenated, optionally followed by the mean
  patch token of the last block; one `Linear` layer (weights N(0, 0.01), zero bias) per learning rate, trained with
  SGD (momentum 0.9, no weight decay) and a cosine schedule to 0; learning rates scaled by batch_size / 256; the
  best classifier on the validation set is reported.

Example:
    >>> from keras_dinov2 import DINOv2Backbone, evaluation
    >>> backbone = DINOv2Backbone.from_preset("dinov2_vit_tiny4", load_weights=False)
    >>> evaluation.evaluate_digits(backbone)          # {10: ..., 20: ..., 100: ..., 200: ...} in %
"""

import functools
import math
import numbers

import keras
import numpy as np
from keras import ops

from keras_dinov2.data.image_headers import DEFAULT_MAX_IMAGE_PIXELS

__all__ = [
    "KNNMonitor",
    "evaluate_digits",
    "extract_features",
    "feature_model",
    "knn_accuracy",
    "knn_classify",
    "knn_predict",
    "linear_probe",
    "random_init_backbone",
]

DEFAULT_KS = (10, 20, 100, 200)
FEATURE_TYPES = ("cls", "patch_mean")


# ----------------------------------------------------------------------------------------------------------------------
# Feature extraction


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, received {value!r}.")
    return int(value)


def _to_numpy(x):
    # torch tensors (possibly on an accelerator) have no usable __array__ off the CPU.
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
    return np.asarray(x)


class _FeatureModel(keras.Model):
    """Maps images to one float32 feature vector per image; a keras.Model so predict_on_batch compiles it."""

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
    n_last_blocks = _check_positive_int("n_last_blocks", n_last_blocks)
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
        raise ValueError(f"`n_last_blocks` must be at most the backbone's {num_layers} blocks, received {n_last_blocks}.")
    return _FeatureModel(backbone, features=features, n_last_blocks=n_last_blocks, avgpool=bool(avgpool))


def _iterate_batches(dataset, batch_size, argument):
    """Yields (images, labels) NumPy batches and the number of batches (or None) from the supported inputs."""
    if isinstance(dataset, (tuple, list)) and len(dataset) == 2 and not hasattr(dataset[0], "as_numpy_iterator"):
        images, labels = (_to_numpy(a) for a in dataset)
        if len(images) != len(labels):
            raise ValueError(
                f"`{argument}` images and labels must have the same length, received {len(images)} images and "
                f"{len(labels)} labels."
            )
        batch_size = _check_positive_int("batch_size", 256 if batch_size is None else batch_size)
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


def _extract(model, dataset, batch_size, verbose, argument="dataset"):
    batches, num_batches = _iterate_batches(dataset, batch_size, argument)
    progbar = keras.utils.Progbar(num_batches, unit_name="batch") if verbose else None
    features, labels = [], []
    full = None
    for step, element in enumerate(batches, start=1):
        images, batch_labels = (_to_numpy(a) for a in _split_element(element, argument))
        count = len(images)
        if count == 0:
            continue
        full = full or count
        if count < full:
            # Padding the last partial batch keeps one input shape, so JAX and TF compile the forward only once.
            pad = np.zeros((full - count,) + images.shape[1:], images.dtype)
            images = np.concatenate([images, pad])
        out = _to_numpy(model.predict_on_batch(images))[:count]
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
    if not isinstance(backbone, _FeatureModel):
        backbone = feature_model(backbone, features=features, n_last_blocks=n_last_blocks, avgpool=avgpool)
    return _extract(backbone, dataset, batch_size, verbose)


# ----------------------------------------------------------------------------------------------------------------------
# k-NN


def _check_features_labels(features, labels, features_name, labels_name):
    features = np.asarray(_to_numpy(features), dtype=np.float32)
    labels = np.asarray(_to_numpy(labels))
    if features.ndim != 2:
        raise ValueError(f"`{features_name}` must have shape (num, dim), received shape {features.shape}.")
    if labels.ndim != 1:
        raise ValueError(f"`{labels_name}` must have shape (num,), received shape {labels.shape}.")
    if len(features) != len(labels):
        raise ValueError(
            f"`{features_name}` and `{labels_name}` must have the same length, received {len(features)} and "
            f"{len(labels)}."
        )
    if len(labels) == 0:
        raise ValueError(f"`{features_name}` must not be empty.")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.equal(np.mod(labels, 1), 0)):
            raise ValueError(f"`{labels_name}` must hold integer class ids, received dtype {labels.dtype}.")
    labels = labels.astype(np.int64)
    if labels.min() < 0:
        raise ValueError(f"`{labels_name}` must be non-negative class ids, received minimum {labels.min()}.")
    return features, labels


def _check_ks(ks):
    if isinstance(ks, numbers.Integral) and not isinstance(ks, bool):
        ks = (ks,)
    ks = tuple(ks)
    if not ks:
        raise ValueError("`ks` must hold at least one number of neighbours, received an empty sequence.")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"`ks` must hold positive integers, received {ks!r}.")
    return tuple(int(k) for k in ks)


def _l2_normalize(x):
    # The reference's F.normalize: x / max(||x||, 1e-12), so an all-zero row stays zero instead of NaN.
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    return x / np.maximum(norms, x.dtype.type(1e-12))


def _top_neighbours(queries, references, k, train_chunk_size):
    """Indices (Q, k) and similarities (Q, k) of the k most similar references, most similar first."""
    best_sims = best_idx = None
    for start in range(0, len(references), train_chunk_size):
        sims = queries @ references[start : start + train_chunk_size].T
        idx = np.broadcast_to(np.arange(start, start + sims.shape[1]), sims.shape)
        if best_sims is not None:
            # Second stage of a distributed top-k, as the reference merges per-rank candidates.
            sims = np.concatenate([best_sims, sims], axis=1)
            idx = np.concatenate([best_idx, idx], axis=1)
        if sims.shape[1] > k:
            keep = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            sims = np.take_along_axis(sims, keep, axis=1)
            idx = np.take_along_axis(idx, keep, axis=1)
        best_sims, best_idx = sims, idx
    order = np.argsort(-best_sims, axis=1, kind="stable")
    return np.take_along_axis(best_idx, order, axis=1), np.take_along_axis(best_sims, order, axis=1)


def _knn_votes(train_features, train_labels, test_features, ks, temperature, num_classes, batch_size,
               train_chunk_size, dtype):
    """Yields (row slice, {k: class votes (rows, num_classes)}) over chunks of test rows."""
    train = _l2_normalize(train_features.astype(dtype))
    test = _l2_normalize(test_features.astype(dtype))
    max_k = min(max(ks), len(train))
    for start in range(0, len(test), batch_size):
        rows = slice(start, start + batch_size)
        idx, sims = _top_neighbours(test[rows], train, max_k, train_chunk_size)
        # softmax over the max_k neighbours, as the reference; the per-row normalizer does not change any argmax.
        logits = sims / sims.dtype.type(temperature)
        weights = np.exp(logits - logits.max(axis=1, keepdims=True))
        weights /= weights.sum(axis=1, keepdims=True)
        neighbour_labels = train_labels[idx]
        n = len(idx)
        flat = np.arange(n)[:, None] * num_classes + neighbour_labels
        votes = np.zeros(n * num_classes, np.float64)
        out, done = {}, 0
        # Votes of the first k neighbours are a prefix sum, so each k only adds its new neighbours.
        for k in sorted(set(ks)):
            k_eff = min(k, max_k)
            if k_eff > done:
                votes += np.bincount(flat[:, done:k_eff].ravel(), weights[:, done:k_eff].ravel(),
                                     minlength=n * num_classes)
                done = k_eff
            out[k] = votes.reshape(n, num_classes).copy()  # votes keeps growing for the larger ks
        yield rows, out


def _resolve_num_classes(num_classes, *label_arrays):
    observed = int(max(labels.max() for labels in label_arrays)) + 1
    if num_classes is None:
        return observed
    num_classes = _check_positive_int("num_classes", num_classes)
    if observed > num_classes:
        raise ValueError(f"`num_classes` is {num_classes} but the labels reach {observed - 1}.")
    return num_classes


def _knn_inputs(train_features, train_labels, test_features, test_labels, ks, temperature, num_classes,
                batch_size, train_chunk_size, dtype):
    train_features, train_labels = _check_features_labels(train_features, train_labels, "train_features",
                                                          "train_labels")
    test_features, test_labels = _check_features_labels(test_features, test_labels, "test_features",
                                                        "test_labels")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"`train_features` and `test_features` must have the same width, received {train_features.shape[1]} "
            f"and {test_features.shape[1]}."
        )
    ks = _check_ks(ks)
    if not (isinstance(temperature, numbers.Real) and temperature > 0):
        raise ValueError(f"`temperature` must be a positive number, received {temperature!r}.")
    num_classes = _resolve_num_classes(num_classes, train_labels, test_labels)
    batch_size = _check_positive_int("batch_size", batch_size)
    train_chunk_size = _check_positive_int("train_chunk_size", train_chunk_size)
    if np.dtype(dtype) not in (np.float32, np.float64):
        raise ValueError(f"`dtype` must be 'float32' or 'float64', received {dtype!r}.")
    return (train_features, train_labels, test_features, test_labels, ks, num_classes, batch_size,
            train_chunk_size, np.dtype(dtype))


def knn_predict(train_features, train_labels, test_features, ks=DEFAULT_KS, temperature=0.07, num_classes=None,
                batch_size=256, train_chunk_size=65536, dtype="float32"):
    """Predicted class of every test sample by the reference's weighted k-NN vote, for each k.

    See `knn_classify` for the protocol. Ties between classes go to the smallest class id (as `argmax`).

    Args:
        train_features: float array (num_train, dim). The reference set.
        train_labels: int array (num_train,).
        test_features: float array (num_test, dim). The queries.
        ks: int or sequence of int, default (10, 20, 100, 200).
        temperature: float, default 0.07.
        num_classes: int or None, default None (the largest label + 1).
        batch_size: int, default 256. Test rows per chunk.
        train_chunk_size: int, default 65536. Reference rows per similarity block.
        dtype: str, default "float32". "float32" or "float64", see `knn_classify`.

    Returns:
        dict {k: int64 predictions (num_test,)}.

    Example:
    >>> knn_predict(train_x, train_y, test_x, ks=(20,))[20]
    """
    dummy_labels = np.zeros(len(_to_numpy(test_features)), np.int64)
    (train_features, train_labels, test_features, _, ks, num_classes, batch_size, train_chunk_size,
     dtype) = _knn_inputs(train_features, train_labels, test_features, dummy_labels, ks, temperature,
                          num_classes, batch_size, train_chunk_size, dtype)
    predictions = {k: np.empty(len(test_features), np.int64) for k in ks}
    for rows, votes in _knn_votes(train_features, train_labels, test_features, ks, temperature, num_classes,
                                  batch_size, train_chunk_size, dtype):
        for k in ks:
            predictions[k][rows] = np.argmax(votes[k], axis=1)
    return predictions


def knn_classify(train_features, train_labels, test_features, test_labels, ks=DEFAULT_KS, temperature=0.07,
                 num_classes=None, batch_size=256, train_chunk_size=65536, return_top5=False, dtype="float32"):
    """Top-1 accuracy (%) of the reference's weighted k-NN classifier, for each k.

    The protocol of facebookresearch/dinov2 `eval/knn.py`: features are L2-normalized; the similarity is the dot
    product (cosine); each query keeps its `max(ks)` most similar reference samples; their weights are
    `softmax(sim / temperature)` over those neighbours; for each k the weights of the first k neighbours are summed
    per class and the class with the largest sum is the prediction. Accuracy is averaged over samples. Where we
    differ: k is capped at the number of reference samples (the reference's `topk` would fail), and the NumPy
    computation is chunked over test rows and reference rows so memory stays bounded on one host.

    Args:
        train_features: float array (num_train, dim). The reference set (any float dtype; computed in `dtype`).
        train_labels: int array (num_train,). Class ids in [0, num_classes).
        test_features: float array (num_test, dim). The queries.
        test_labels: int array (num_test,).
        ks: int or sequence of int, default (10, 20, 100, 200). Numbers of neighbours, each >= 1.
        temperature: float, default 0.07. T of the vote weights.
        num_classes: int or None, default None: the largest label (train or test) + 1.
        batch_size: int, default 256. Test rows per chunk; memory is about batch_size * min(num_train,
            train_chunk_size) floats.
        train_chunk_size: int, default 65536. Reference rows per similarity block.
        return_top5: bool, default False. Also return the top-5 accuracies (class ties ranked by class id).
        dtype: str, default "float32", the reference's precision. "float64" resolves features that differ only
            in their last float32 digits, such as the CLS token of a randomly initialized backbone with
            LayerScale 1e-5 (its blocks barely touch the token, so every cosine similarity rounds to 1 in
            float32 and the float32 vote is chance).

    Returns:
        dict {k: top-1 accuracy in %}, or (top-1 dict, top-5 dict) with `return_top5=True`.

    Example:
    >>> knn_classify(train_x, train_y, test_x, test_y, ks=(10, 20))
    {10: 97.3, 20: 96.9}
    """
    (train_features, train_labels, test_features, test_labels, ks, num_classes, batch_size, train_chunk_size,
     dtype) = _knn_inputs(train_features, train_labels, test_features, test_labels, ks, temperature,
                          num_classes, batch_size, train_chunk_size, dtype)
    top1 = dict.fromkeys(ks, 0)
    top5 = dict.fromkeys(ks, 0)
    for rows, votes in _knn_votes(train_features, train_labels, test_features, ks, temperature, num_classes,
                                  batch_size, train_chunk_size, dtype):
        target = test_labels[rows]
        for k in ks:
            top1[k] += int(np.sum(np.argmax(votes[k], axis=1) == target))
            if return_top5:
                ranked = np.argsort(-votes[k], axis=1, kind="stable")[:, :5]
                top5[k] += int(np.sum(np.any(ranked == target[:, None], axis=1)))
    total = len(test_labels)
    top1 = {k: 100.0 * c / total for k, c in top1.items()}
    if return_top5:
        return top1, {k: 100.0 * c / total for k, c in top5.items()}
    return top1


def knn_accuracy(backbone, train_dataset, test_dataset, ks=DEFAULT_KS, temperature=0.07, features="cls",
                 n_last_blocks=1, avgpool=False, num_classes=None, batch_size=None, verbose=True, dtype="float32"):
    """Extract features of a reference set and a query set with one backbone, then run `knn_classify`.

    Args:
        backbone: `DINOv2Backbone`, a compatible model, or a `feature_model` (see `extract_features`).
        train_dataset: labelled reference data: tf.data of (images, labels), or NumPy (images, labels).
        test_dataset: labelled queries, same forms.
        ks: int or sequence of int, default (10, 20, 100, 200).
        temperature: float, default 0.07.
        features: str, default "cls".
        n_last_blocks: int, default 1.
        avgpool: bool, default False.
        num_classes: int or None, default None.
        batch_size: int or None, default None. For NumPy inputs (None means 256).
        verbose: bool, default True. Progress bars while extracting.
        dtype: str, default "float32". Precision of the k-NN, see `knn_classify`.

    Returns:
        dict {k: top-1 accuracy in %}.

    Example:
    >>> train = kd.data.eval_dataset("digits", 32, 256, split="train")
    >>> test = kd.data.eval_dataset("digits", 32, 256, split="test")
    >>> knn_accuracy(backbone, train, test, ks=(20,))      # {20: ...}
    """
    model = backbone
    if not isinstance(model, _FeatureModel):
        model = feature_model(backbone, features=features, n_last_blocks=n_last_blocks, avgpool=avgpool)
    train_x, train_y = _extract(model, train_dataset, batch_size, verbose, "train_dataset")
    test_x, test_y = _extract(model, test_dataset, batch_size, verbose, "test_dataset")
    return knn_classify(train_x, train_y, test_x, test_y, ks=ks, temperature=temperature, num_classes=num_classes,
                        dtype=dtype)


def random_init_backbone(backbone, seed=0):
    """A randomly initialized backbone of `backbone`'s architecture: the same weights for the same seed.

    The "random init" baseline of a k-NN: built from `backbone.get_config()` with Keras' initializer seeds drawn
    from a Python generator seeded with `seed`, so the baseline printed at the start of a run, at its end, after a
    resume and by `keras-dinov2 evaluate` is one network and one number. Python's global random state is left
    as it was, so building the baseline changes nothing else in a run.

    Args:
        backbone: a Keras model with `get_config()` / `from_config()` (a `DINOv2Backbone`).
        seed: int, default 0.

    Example:
    >>> fresh = random_init_backbone(trained_backbone)
    >>> evaluate_digits(fresh, ks=(20,))
    """
    import random

    # Keras draws the seed of every initializer without one from Python's `random` module.
    state = random.getstate()
    try:
        random.seed(seed)
        return type(backbone).from_config(backbone.get_config())
    finally:
        random.setstate(state)


def _digits_datasets(image_size, batch_size):
    from keras_dinov2.data import eval_dataset

    return (eval_dataset("digits", image_size, batch_size, split="train"),
            eval_dataset("digits", image_size, batch_size, split="test"))


def evaluate_digits(backbone, image_size=32, ks=DEFAULT_KS, temperature=0.07, batch_size=256, verbose=False,
                    dtype="float32", **feature_kwargs):
    """k-NN top-1 accuracy (%) on the bundled digits: the 1,347 train images as references, the 450 held-out queries.

    Images go through the reference's evaluation transform (`keras_dinov2.data.eval_dataset`: resize, center crop,
    ImageNet normalization). As a scale: raw normalized pixels through the same classifier reach about 97% (k=20), so
    only features above that show that pretraining learned something beyond pixel similarity.

    Args:
        backbone: `DINOv2Backbone` (or see `extract_features`); its patch size must divide `image_size`.
        image_size: int, default 32.
        ks: int or sequence of int, default (10, 20, 100, 200).
        temperature: float, default 0.07.
        batch_size: int, default 256.
        verbose: bool, default False.
        dtype: str, default "float32". Precision of the k-NN, see `knn_classify`.
        **feature_kwargs: `features`, `n_last_blocks`, `avgpool` for `feature_model`.

    Returns:
        dict {k: top-1 accuracy in %}.

    Example:
    >>> evaluate_digits(DINOv2Backbone.from_preset("dinov2_vit_tiny4", load_weights=False), ks=(20,))
    """
    train, test = _digits_datasets(image_size, batch_size)
    return knn_accuracy(backbone, train, test, ks=ks, temperature=temperature, verbose=verbose, dtype=dtype,
                        **feature_kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Callback


class KNNMonitor(keras.callbacks.Callback):
    """Log the k-NN top-1 accuracy of a model's backbone on held-out labelled data every few epochs.

    At the end of every `every_n_epochs`-th epoch the backbone's features of `train_data` (the reference set) and
    `test_data` (the queries) go through `knn_classify` (reference protocol, final-norm CLS), and the top-1
    accuracy for `k` is written into the epoch's `logs` as `knn_top1`, so `History`, the progress bar and
    `CSVLogger` record it (place this callback before a `CSVLogger` in the list; Keras runs callbacks in order).
    With `compare_random_init=True` a randomly initialized backbone of the same architecture
    (`random_init_backbone`, seeded) is evaluated once at train begin and logged as `knn_top1_random_init` next
    to every `knn_top1`: pretraining helped where the first is higher. `random_init_accuracy` passes that
    baseline in instead, computed elsewhere (once per run, so every place that prints it prints one number). On
    JAX the training state is synced into the variables before they are read.

    Args:
        train_data: labelled reference data: a finite tf.data dataset of (images, labels) batches or NumPy
            (images, labels).
        test_data: labelled queries, same forms.
        backbone_fn: callable returning the backbone to evaluate (e.g. `lambda: pretrainer.teacher`), a backbone,
            or None, default None: the model's `teacher` attribute, else its `backbone` attribute, else the model.
        k: int, default 20. Neighbours for the logged accuracy (the reference finds 20 usually best).
        temperature: float, default 0.07.
        every_n_epochs: int, default 1.
        compare_random_init: bool, default False.
        random_init_accuracy: float or None, default None. The baseline's top-1 (%) at `k`, already computed;
            logged like a computed one (and nothing is computed).
        batch_size: int or None, default None. For NumPy data (None means 256).
        verbose: int, default 1. 1 prints each result; 0 is silent.
        dtype: str, default "float32". Precision of the k-NN (see `knn_classify`). A fresh backbone with
            LayerScale 1e-5 (the recipes' init) has a nearly image-independent CLS token: in float32 its
            baseline is chance, "float64" measures it.

    Example:
    >>> train = kd.data.eval_dataset("digits", 32, 256, split="train")
    >>> test = kd.data.eval_dataset("digits", 32, 256, split="test")
    >>> monitor = KNNMonitor(train, test, backbone_fn=lambda: pretrainer.teacher, compare_random_init=True)
    >>> history = pretrainer.fit(data, epochs=10, callbacks=[monitor])
    >>> history.history["knn_top1"]
    """

    def __init__(self, train_data, test_data, backbone_fn=None, k=20, temperature=0.07, every_n_epochs=1,
                 compare_random_init=False, batch_size=None, verbose=1, dtype="float32",
                 random_init_accuracy=None):
        super().__init__()
        self.train_data = train_data
        self.test_data = test_data
        self.backbone_fn = backbone_fn
        self.k = _check_positive_int("k", k)
        if not (isinstance(temperature, numbers.Real) and temperature > 0):
            raise ValueError(f"`temperature` must be a positive number, received {temperature!r}.")
        self.temperature = float(temperature)
        self.every_n_epochs = _check_positive_int("every_n_epochs", every_n_epochs)
        self.compare_random_init = bool(compare_random_init)
        self.batch_size = batch_size
        self.verbose = verbose
        if np.dtype(dtype) not in (np.float32, np.float64):
            raise ValueError(f"`dtype` must be 'float32' or 'float64', received {dtype!r}.")
        self.dtype = str(np.dtype(dtype))
        self.random_init_accuracy = None if random_init_accuracy is None else float(random_init_accuracy)
        self._given_baseline = self.random_init_accuracy is not None
        self.history = []  # (epoch, accuracy) pairs, kept also when the model has no History.
        self._feature_model = None

    @classmethod
    def digits(cls, image_size=32, batch_size=256, **kwargs):
        """A monitor on the bundled digits: the train split as references, the held-out split as queries.

        Example:
        >>> monitor = KNNMonitor.digits(32, backbone_fn=lambda: pretrainer.teacher)
        """
        train, test = _digits_datasets(image_size, batch_size)
        return cls(train, test, **kwargs)

    def _backbone(self):
        model = self.model
        if self.backbone_fn is None:
            for name in ("teacher", "backbone"):
                if getattr(model, name, None) is not None:
                    return getattr(model, name)
            return model
        if isinstance(self.backbone_fn, keras.Model) or not callable(self.backbone_fn):
            return self.backbone_fn
        return self.backbone_fn()

    def _evaluate(self, model):
        train_x, train_y = _extract(model, self.train_data, self.batch_size, False, "train_data")
        test_x, test_y = _extract(model, self.test_data, self.batch_size, False, "test_data")
        return knn_classify(train_x, train_y, test_x, test_y, ks=(self.k,), temperature=self.temperature,
                            dtype=self.dtype)[self.k]

    def _sync(self):
        # JAX keeps the training state outside the variables during fit(); write it back before reading them.
        model = self._model if hasattr(self, "_model") else None
        if model is not None and hasattr(model, "jax_state_sync"):
            model.jax_state_sync()

    def on_train_begin(self, logs=None):
        if not self._given_baseline:
            if not self.compare_random_init:
                return
            self._sync()
            self.random_init_accuracy = self._evaluate(feature_model(random_init_backbone(self._backbone())))
        if self.verbose:
            print(f"k-NN top-1 (k={self.k}) of a randomly initialized backbone: {self.random_init_accuracy:.2f}%")

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_n_epochs:
            return
        self._sync()
        backbone = self._backbone()
        if self._feature_model is None or self._feature_model.backbone is not backbone:
            # Kept across epochs so JAX and TensorFlow compile the forward once per run.
            self._feature_model = feature_model(backbone)
        accuracy = self._evaluate(self._feature_model)
        self.history.append((epoch, accuracy))
        if logs is not None:
            logs["knn_top1"] = accuracy
            if self.random_init_accuracy is not None:
                logs["knn_top1_random_init"] = self.random_init_accuracy
        if self.verbose:
            extra = ""
            if self.random_init_accuracy is not None:
                extra = f" (random init: {self.random_init_accuracy:.2f}%)"
            print(f"Epoch {epoch + 1}: k-NN top-1 (k={self.k}) = {accuracy:.2f}%{extra}")


# ----------------------------------------------------------------------------------------------------------------------
# Linear probe


def _stacked_cross_entropy(head_weights):
    head_weights = np.asarray(head_weights, np.float32)

    def loss(y_true, y_pred):
        # y_pred (B, heads, C): one independent linear classifier per learning rate.
        y_true = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        log_probs = ops.log_softmax(ops.cast(y_pred, "float32"), axis=-1)
        one_hot = ops.one_hot(y_true, ops.shape(y_pred)[-1])[:, None, :]
        per_head = -ops.sum(one_hot * log_probs, axis=-1)
        return ops.sum(per_head * ops.convert_to_tensor(head_weights), axis=-1)

    return loss


def linear_probe(train_features, train_labels, test_features, test_labels,
                 learning_rates=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1), epochs=100, batch_size=256, num_classes=None,
                 seed=0, verbose=False):
    """Train a linear classifier on frozen features for each learning rate; return the best test accuracy.

    The reference's linear evaluation, small: one linear layer per learning rate (weights N(0, 0.01), zero bias)
    on fixed features, cross-entropy, SGD with momentum 0.9 and no weight decay, a cosine learning-rate schedule
    to 0, learning rates scaled by batch_size / 256, and the classifier with the best accuracy on the evaluation
    set reported (the reference selects on its validation set, which is also its test set by default). All
    classifiers train together as one (dim, len(learning_rates) * C) layer: the loss of each is weighted by its
    learning rate under an optimizer whose base rate is 1, which for SGD with momentum is exactly a separate
    rate per classifier, and costs one compilation. Features are used as given (the reference does not
    normalize them); build them with `extract_features(..., n_last_blocks=4, avgpool=True)` for the reference's
    richest input. Keras' SGD folds the rate into the momentum buffer where torch's multiplies the buffer; with
    the cosine schedule the two differ slightly.

    Args:
        train_features: float array (num_train, dim).
        train_labels: int array (num_train,).
        test_features: float array (num_test, dim).
        test_labels: int array (num_test,).
        learning_rates: sequence of float, default (1e-3, 3e-3, 1e-2, 3e-2, 1e-1). Base rates for batch 256
            (the reference searches 13 rates from 1e-5 to 0.1).
        epochs: int, default 100. Passes over the training features.
        batch_size: int, default 256.
        num_classes: int or None, default None (the largest label + 1).
        seed: int, default 0. Seed of the weight initialization.
        verbose: bool, default False. Show Keras' training progress.

    Returns:
        dict with "accuracy" (best top-1 %), "learning_rate" (its base rate) and "accuracies" ({lr: top-1 %}).

    Example:
    >>> linear_probe(train_x, train_y, test_x, test_y, epochs=50)
    {'accuracy': 98.4, 'learning_rate': 0.01, 'accuracies': {0.001: ..., ...}}
    """
    train_features, train_labels = _check_features_labels(train_features, train_labels, "train_features",
                                                          "train_labels")
    test_features, test_labels = _check_features_labels(test_features, test_labels, "test_features", "test_labels")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"`train_features` and `test_features` must have the same width, received {train_features.shape[1]} "
            f"and {test_features.shape[1]}."
        )
    learning_rates = tuple(learning_rates)
    if not learning_rates or not all(isinstance(lr, numbers.Real) and lr > 0 for lr in learning_rates):
        raise ValueError(f"`learning_rates` must be positive numbers, received {learning_rates!r}.")
    epochs = _check_positive_int("epochs", epochs)
    batch_size = _check_positive_int("batch_size", batch_size)
    num_classes = _resolve_num_classes(num_classes, train_labels, test_labels)
    heads = len(learning_rates)
    dim = train_features.shape[1]

    model = keras.Sequential(
        [
            keras.Input((dim,)),
            keras.layers.Dense(
                heads * num_classes,
                kernel_initializer=keras.initializers.RandomNormal(stddev=0.01, seed=seed),
                bias_initializer="zeros",
            ),
            keras.layers.Reshape((heads, num_classes)),
        ]
    )
    steps = epochs * math.ceil(len(train_features) / batch_size)
    scale = batch_size / 256.0
    model.compile(
        optimizer=keras.optimizers.SGD(keras.optimizers.schedules.CosineDecay(1.0, steps), momentum=0.9),
        loss=_stacked_cross_entropy([lr * scale for lr in learning_rates]),
    )
    model.fit(train_features, train_labels, epochs=epochs, batch_size=batch_size, shuffle=True,
              verbose=2 if verbose else 0)
    logits = _to_numpy(model.predict(test_features, batch_size=max(batch_size, 1024), verbose=0))
    correct = np.argmax(logits, axis=-1) == test_labels[:, None]
    accuracies = {float(lr): float(100.0 * acc) for lr, acc in zip(learning_rates, correct.mean(axis=0))}
    best = max(accuracies, key=accuracies.get)
    return {"accuracy": accuracies[best], "learning_rate": best, "accuracies": accuracies}


# ----------------------------------------------------------------------------------------------------------------------
# One call for the command line: load, extract, k-NN, linear probe, random-init comparison


def labelled_splits(data="digits", train_split=None, test_split=None, test_fraction=0.25, seed=0,
                    max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    """Resolve a labelled data spec into (train, test) `ImageSource`s for evaluation.

    - "digits": the bundled train split and its held-out 25% (1,347 / 450 images).
    - "tfds:NAME": its "train" split and its "test" split (else "validation"), unless splits are given.
    - a folder: `train/` with `val/` or `test/` subfolders (class subfolders inside each) when present;
      otherwise one folder of class subfolders, split stratified by class (`test_fraction` held out).
    `train_split` / `test_split` name the splits (TFDS splits, digits splits or subfolders) explicitly.
    `max_image_pixels` (default 89,478,485, PIL's limit; None for none) is the largest image of a folder or TFDS
    dataset that is decoded; larger ones are left out and named (see `keras_dinov2.data.get_source`).

    Example:
        >>> train, test = labelled_splits("digits")
        >>> train.num_examples, test.num_examples
        (1347, 450)
    """
    import os

    from keras_dinov2.data import sources, split_source
    from keras_dinov2.data.tfds import tfds_builder

    get_source = functools.partial(sources.get_source, max_image_pixels=max_image_pixels)
    text = os.fspath(data) if isinstance(data, (str, os.PathLike)) else None
    if text is None:
        raise ValueError(f"`data` must be 'digits', 'tfds:NAME' or a folder path; received {type(data).__name__}.")
    if text == "digits" or text.startswith("digits:"):
        return (get_source("digits", split=train_split or "train"),
                get_source("digits", split=test_split or "test"))
    if text.startswith("tfds:"):
        if test_split is None:
            name = text[len("tfds:"):].split(":")[0]
            splits = tfds_builder(name, None, download=False).info.splits
            test_split = "test" if "test" in splits else "validation" if "validation" in splits else None
            if test_split is None:
                raise ValueError(f"{text} has no 'test' or 'validation' split; pass --test-split.")
        return (get_source(text, split=train_split or "train"), get_source(text, split=test_split))
    if not os.path.isdir(text):
        raise ValueError(f"data folder {text!r} does not exist; expected 'digits', 'tfds:NAME' or a folder.")
    if train_split is None and test_split is None:
        held_out = [name for name in ("val", "test") if os.path.isdir(os.path.join(text, name))]
        if os.path.isdir(os.path.join(text, "train")) and held_out:
            train_split, test_split = "train", held_out[0]
    if train_split is not None or test_split is not None:
        if train_split is None or test_split is None:
            raise ValueError("pass both a train split and a test split for a folder, or neither.")
        train = get_source(text, split=train_split)
        test = get_source(text, split=test_split)
    else:
        train, test = split_source(get_source(text), test_fraction=test_fraction, seed=seed)
    for what, source in (("train", train), ("test", test)):
        if source.labels is None:
            raise ValueError(
                f"the {what} data {source.name!r} has no labels: evaluation needs one subfolder per class."
            )
    return train, test


def evaluate_backbone(backbone, data="digits", image_size=None, ks=DEFAULT_KS, temperature=0.07, features="cls",
                      n_last_blocks=1, avgpool=False, linear=False, linear_epochs=100, compare_random_init=True,
                      batch_size=256, train_split=None, test_split=None, dtype="float32", verbose=True,
                      max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    """k-NN (and optionally a linear probe) of a frozen backbone on labelled data, next to a random init.

    Args:
        backbone: `DINOv2Backbone`.
        data: str, default "digits". See `labelled_splits`.
        image_size: int or None, default None: the backbone's `image_size` (its position table's native size).
        ks, temperature: the k-NN protocol (see `knn_classify`).
        features, n_last_blocks, avgpool: the k-NN features (see `feature_model`); the linear probe always uses
            the reference's linear features (CLS of the last 4 blocks, or all blocks if fewer, plus the mean patch).
        linear: bool, default False. Also run `linear_probe`.
        linear_epochs: int, default 100.
        compare_random_init: bool, default True. Evaluate `random_init_backbone(backbone)` (seed 0) too.
        batch_size: int, default 256.
        train_split, test_split: optional split names, see `labelled_splits`.
        dtype: str, default "float32". Precision of the k-NN.
        verbose: bool, default True. Progress bars.
        max_image_pixels: int or None, default 89,478,485 (PIL's limit). Largest image decoded, see
            `labelled_splits`; None for no limit.

    Returns:
        dict: {"knn": {k: %}, "linear": {...} (if asked), "random_init": {"knn": ..., "linear": ...} (if asked),
        "data": ..., "image_size": ..., "num_train": ..., "num_test": ...}.
    """
    from keras_dinov2.data import eval_dataset

    train_source, test_source = labelled_splits(data, train_split, test_split, max_image_pixels=max_image_pixels)
    size = int(image_size or backbone.image_size)
    patch = backbone.patch_size
    if size % patch:
        raise ValueError(f"image_size {size} must be a multiple of the backbone's patch size {patch}.")
    train = eval_dataset(train_source, size, batch_size)
    test = eval_dataset(test_source, size, batch_size)
    num_classes = len(train_source.class_names) if train_source.class_names else None
    linear_blocks = min(4, backbone.num_layers)

    def run(model):
        out = {"knn": knn_accuracy(model, train, test, ks=ks, temperature=temperature, features=features,
                                   n_last_blocks=n_last_blocks, avgpool=avgpool, num_classes=num_classes,
                                   verbose=verbose, dtype=dtype)}
        if linear:
            lin = feature_model(model, n_last_blocks=linear_blocks, avgpool=True)
            train_x, train_y = extract_features(lin, train, verbose=verbose)
            test_x, test_y = extract_features(lin, test, verbose=verbose)
            out["linear"] = linear_probe(train_x, train_y, test_x, test_y, epochs=linear_epochs,
                                         num_classes=num_classes)
        return out

    result = run(backbone)
    if compare_random_init:
        result["random_init"] = run(random_init_backbone(backbone))
    result.update(data=str(data), image_size=size, num_train=train_source.num_examples,
                  num_test=test_source.num_examples)
    return result
