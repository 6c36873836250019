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

The modules, one concern each:
    features   the feature model around a backbone and extraction over labelled data
    knn        the reference's weighted k-NN: predictions, accuracies, accuracy of a backbone
    linear     the linear probe
    baseline   the seeded random-init backbone every figure is compared with
    splits     labelled data specs ("digits", "tfds:NAME", folders) into train and test sources
    evaluate   one call each: the digits k-NN and the command line's full evaluation
    monitor    KNNMonitor, the k-NN callback for `fit`
    checks     argument checks shared by the above

Example:
    >>> from keras_dinov2 import DINOv2Backbone, evaluation
    >>> backbone = DINOv2Backbone.from_preset("dinov2_vit_tiny4", load_weights=False)
    >>> evaluation.evaluate_digits(backbone)          # {10: ..., 20: ..., 100: ..., 200: ...} in %
"""

from keras_dinov2.evaluation.baseline import random_init_backbone
from keras_dinov2.evaluation.evaluate import evaluate_backbone, evaluate_digits
from keras_dinov2.evaluation.features import FEATURE_TYPES, extract_features, feature_model
from keras_dinov2.evaluation.knn import DEFAULT_KS, knn_accuracy, knn_classify, knn_predict
from keras_dinov2.evaluation.linear import linear_probe
from keras_dinov2.evaluation.monitor import KNNMonitor
from keras_dinov2.evaluation.splits import labelled_splits

__all__ = [
    "DEFAULT_KS",
    "FEATURE_TYPES",
    "KNNMonitor",
    "evaluate_backbone",
    "evaluate_digits",
    "extract_features",
    "feature_model",
    "knn_accuracy",
    "knn_classify",
    "knn_predict",
    "labelled_splits",
    "linear_probe",
    "random_init_backbone",
]
