"""A linear probe on frozen features: the reference's linear evaluation (dinov2 `eval/linear.py`), small.

One linear layer per learning rate on fixed features, all trained together as one layer, the best reported.
"""

import math
import numbers

import keras
import numpy as np
from keras import ops

from keras_dinov2.evaluation.checks import (
    check_positive_int,
    check_train_test,
    resolve_num_classes,
    to_numpy,
)


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
    train_features, train_labels, test_features, test_labels = check_train_test(
        train_features, train_labels, test_features, test_labels
    )
    learning_rates = tuple(learning_rates)
    if not learning_rates or not all(isinstance(lr, numbers.Real) and lr > 0 for lr in learning_rates):
        raise ValueError(f"`learning_rates` must be positive numbers, received {learning_rates!r}.")
    epochs = check_positive_int("epochs", epochs)
    batch_size = check_positive_int("batch_size", batch_size)
    num_classes = resolve_num_classes(num_classes, train_labels, test_labels)
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
    logits = to_numpy(model.predict(test_features, batch_size=max(batch_size, 1024), verbose=0))
    correct = np.argmax(logits, axis=-1) == test_labels[:, None]
    accuracies = {float(lr): float(100.0 * acc) for lr, acc in zip(learning_rates, correct.mean(axis=0))}
    best = max(accuracies, key=accuracies.get)
    return {"accuracy": accuracies[best], "learning_rate": best, "accuracies": accuracies}
