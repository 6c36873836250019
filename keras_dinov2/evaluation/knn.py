"""The reference's weighted k-NN classifier on frozen features (facebookresearch/dinov2 `eval/knn.py`).

Features are L2-normalized and compared by cosine similarity; each query keeps its `max(ks)` most similar
reference samples, weighted by `softmax(sim / T)` (T = 0.07); for each k the class votes of the first k
neighbours are summed and the argmax is the prediction; top-1 accuracy is averaged over samples. The computation
is NumPy, chunked over query rows and reference rows so memory stays bounded on one host.
"""

import numbers

import numpy as np

from keras_dinov2.evaluation.checks import (
    check_dtype,
    check_positive_int,
    check_temperature,
    check_train_test,
    resolve_num_classes,
    to_numpy,
)
from keras_dinov2.evaluation.features import FeatureModel, extract_labelled, feature_model

DEFAULT_KS = (10, 20, 100, 200)


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


def _knn_inputs(train_features, train_labels, test_features, test_labels, ks, temperature, num_classes,
                batch_size, train_chunk_size, dtype):
    train_features, train_labels, test_features, test_labels = check_train_test(
        train_features, train_labels, test_features, test_labels
    )
    ks = _check_ks(ks)
    check_temperature(temperature)
    num_classes = resolve_num_classes(num_classes, train_labels, test_labels)
    batch_size = check_positive_int("batch_size", batch_size)
    train_chunk_size = check_positive_int("train_chunk_size", train_chunk_size)
    return (train_features, train_labels, test_features, test_labels, ks, num_classes, batch_size,
            train_chunk_size, check_dtype(dtype))


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
    dummy_labels = np.zeros(len(to_numpy(test_features)), np.int64)
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
    if not isinstance(model, FeatureModel):
        model = feature_model(backbone, features=features, n_last_blocks=n_last_blocks, avgpool=avgpool)
    train_x, train_y = extract_labelled(model, train_dataset, batch_size, verbose, "train_dataset")
    test_x, test_y = extract_labelled(model, test_dataset, batch_size, verbose, "test_dataset")
    return knn_classify(train_x, train_y, test_x, test_y, ks=ks, temperature=temperature, num_classes=num_classes,
                        dtype=dtype)

