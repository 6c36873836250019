"""One call per use: a backbone's k-NN on the bundled digits, and the command line's full evaluation.

`evaluate_backbone` loads labelled data, extracts features, runs the k-NN (and optionally a linear probe) and does
the same for a randomly initialized backbone of the same architecture, so a figure always comes with its baseline.
"""

from keras_dinov2.data.image_headers import DEFAULT_MAX_IMAGE_PIXELS
from keras_dinov2.evaluation.baseline import random_init_backbone
from keras_dinov2.evaluation.features import extract_features, feature_model
from keras_dinov2.evaluation.knn import DEFAULT_KS, knn_accuracy
from keras_dinov2.evaluation.linear import linear_probe
from keras_dinov2.evaluation.splits import digits_datasets, labelled_splits


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
    train, test = digits_datasets(image_size, batch_size)
    return knn_accuracy(backbone, train, test, ks=ks, temperature=temperature, verbose=verbose, dtype=dtype,
                        **feature_kwargs)


def evaluate_backbone(backbone, data="digits", image_size=None, ks=DEFAULT_KS, temperature=0.07, features="cls",
                      n_last_blocks=1, avgpool=False, linear=False, linear_epochs=100, linear_learning_rates=None,
                      compare_random_init=True,
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
        linear_learning_rates: sequence of float or None, default None: `linear_probe`'s grid.
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
            grid = {} if linear_learning_rates is None else {"learning_rates": tuple(linear_learning_rates)}
            out["linear"] = linear_probe(train_x, train_y, test_x, test_y, epochs=linear_epochs,
                                         num_classes=num_classes, **grid)
        return out

    result = run(backbone)
    if compare_random_init:
        result["random_init"] = run(random_init_backbone(backbone))
    result.update(data=str(data), image_size=size, num_train=train_source.num_examples,
                  num_test=test_source.num_examples)
    return result
