"""A Keras callback that logs the k-NN top-1 of a model's backbone during `fit`, next to a random-init baseline."""

import keras

from keras_dinov2.evaluation.baseline import random_init_backbone
from keras_dinov2.evaluation.checks import check_dtype, check_positive_int, check_temperature
from keras_dinov2.evaluation.features import extract_labelled, feature_model
from keras_dinov2.evaluation.knn import knn_classify
from keras_dinov2.evaluation.splits import digits_datasets


class KNNMonitor(keras.callbacks.Callback):
    """Log the k-NN top-1 accuracy of a model's backbone on held-out labelled data every few epochs.

    At the end of every `every_n_epochs`-th epoch the backbone's features of `train_data` (the reference set) and
    `test_data` (the queries) go through `knn_classify` (reference protocol, final-norm CLS), and the top-1
    accuracy for `k` is written into the epoch's `logs` as `name` (`knn_top1`), so `History`, the progress bar and
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
        name: str, default "knn_top1". The log key of the accuracy (several monitors in one run, one per
            backbone, need their own); the baseline is logged as `knn_top1_random_init` either way.
        dtype: str, default "float32". Precision of the k-NN (see `knn_classify`). A fresh backbone with
            LayerScale 1e-5 (the recipes' init) has a nearly image-independent CLS token: in float32 its
            baseline is chance, "float64" measures it.

    Attributes:
        history: list of (epoch, top-1 %) pairs, one per evaluation.
        random_init_accuracy: float or None. The baseline's top-1 (%), once known.
        feature_extractor: the `feature_model` of the backbone last evaluated (None before the first epoch's
            evaluation); kept across epochs so the forward compiles once per run.

    Example:
    >>> train = kd.data.eval_dataset("digits", 32, 256, split="train")
    >>> test = kd.data.eval_dataset("digits", 32, 256, split="test")
    >>> monitor = KNNMonitor(train, test, backbone_fn=lambda: pretrainer.teacher, compare_random_init=True)
    >>> history = pretrainer.fit(data, epochs=10, callbacks=[monitor])
    >>> history.history["knn_top1"]
    """

    def __init__(self, train_data, test_data, backbone_fn=None, k=20, temperature=0.07, every_n_epochs=1,
                 compare_random_init=False, batch_size=None, verbose=1, dtype="float32",
                 random_init_accuracy=None, name="knn_top1"):
        super().__init__()
        self.log_name = str(name)
        self.train_data = train_data
        self.test_data = test_data
        self.backbone_fn = backbone_fn
        self.k = check_positive_int("k", k)
        self.temperature = float(check_temperature(temperature))
        self.every_n_epochs = check_positive_int("every_n_epochs", every_n_epochs)
        self.compare_random_init = bool(compare_random_init)
        self.batch_size = batch_size
        self.verbose = verbose
        self.dtype = str(check_dtype(dtype))
        self.random_init_accuracy = None if random_init_accuracy is None else float(random_init_accuracy)
        self._given_baseline = self.random_init_accuracy is not None
        self.history = []  # (epoch, accuracy) pairs, kept also when the model has no History.
        self.feature_extractor = None

    @classmethod
    def digits(cls, image_size=32, batch_size=256, **kwargs):
        """A monitor on the bundled digits: the train split as references, the held-out split as queries.

        Example:
        >>> monitor = KNNMonitor.digits(32, backbone_fn=lambda: pretrainer.teacher)
        """
        train, test = digits_datasets(image_size, batch_size)
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
        train_x, train_y = extract_labelled(model, self.train_data, self.batch_size, False, "train_data")
        test_x, test_y = extract_labelled(model, self.test_data, self.batch_size, False, "test_data")
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
        if self.feature_extractor is None or self.feature_extractor.backbone is not backbone:
            # Kept across epochs so JAX and TensorFlow compile the forward once per run.
            self.feature_extractor = feature_model(backbone)
        accuracy = self._evaluate(self.feature_extractor)
        self.history.append((epoch, accuracy))
        if logs is not None:
            logs[self.log_name] = accuracy
            if self.random_init_accuracy is not None:
                logs["knn_top1_random_init"] = self.random_init_accuracy
        if self.verbose:
            extra = ""
            if self.random_init_accuracy is not None:
                extra = f" (random init: {self.random_init_accuracy:.2f}%)"
            label = "" if self.log_name == "knn_top1" else f" of {self.log_name.removeprefix('knn_top1_')}"
            print(f"Epoch {epoch + 1}: k-NN top-1{label} (k={self.k}) = {accuracy:.2f}%{extra}")
