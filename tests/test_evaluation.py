"""Evaluation: the reference k-NN against a brute-force loop, feature extraction, the k-NN callback, linear probe."""

import keras
import numpy as np
import pytest

from keras_dinov2 import DINOv2Backbone
from keras_dinov2 import evaluation as ev
from keras_dinov2.data import eval_dataset


def brute_force_knn(train_x, train_y, test_x, ks, temperature, num_classes):
    """One query at a time, float64, written from the protocol's description (not from the library code)."""
    train_x = np.asarray(train_x, np.float64)
    train_x = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    predictions = {k: [] for k in ks}
    for query in np.asarray(test_x, np.float64):
        query = query / np.linalg.norm(query)
        sims = [float(np.dot(query, ref)) for ref in train_x]
        order = sorted(range(len(sims)), key=lambda i: -sims[i])[: min(max(ks), len(sims))]
        weights = [np.exp(sims[i] / temperature) for i in order]
        total = sum(weights)
        for k in ks:
            votes = [0.0] * num_classes
            for i, w in zip(order[:k], weights[:k]):
                votes[train_y[i]] += w / total
            predictions[k].append(int(np.argmax(votes)))
    return {k: np.array(v) for k, v in predictions.items()}


def noisy_clusters(rng, num, num_classes, dim, spread):
    centers = rng.normal(size=(num_classes, dim))
    labels = rng.integers(0, num_classes, num)
    return (centers[labels] + spread * rng.normal(size=(num, dim))).astype(np.float32), labels


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_knn_matches_brute_force(temperature):
    rng = np.random.default_rng(1)
    # Overlapping classes so that predictions differ between ks and from the labels.
    x, y = noisy_clusters(rng, 360, 5, 16, spread=2.0)
    train_x, train_y, test_x, test_y = x[:300], y[:300], x[300:], y[300:]
    ks = (1, 5, 20, 300, 500)  # 500 > 300 reference samples: capped
    expected = brute_force_knn(train_x, train_y, test_x, ks, temperature, 5)
    predicted = ev.knn_predict(train_x, train_y, test_x, ks=ks, temperature=temperature)
    # Small chunks exercise the two-stage top-k over reference blocks and the test-row chunking.
    chunked = ev.knn_predict(train_x, train_y, test_x, ks=ks, temperature=temperature, batch_size=7,
                             train_chunk_size=23)
    accuracies = ev.knn_classify(train_x, train_y, test_x, test_y, ks=ks, temperature=temperature)
    for k in ks:
        np.testing.assert_array_equal(predicted[k], expected[k], err_msg=f"k={k}")
        np.testing.assert_array_equal(chunked[k], expected[k], err_msg=f"chunked k={k}")
        assert accuracies[k] == pytest.approx(100.0 * np.mean(expected[k] == test_y))
    assert len({tuple(expected[k]) for k in ks}) > 1
    assert 30.0 < accuracies[20] < 100.0
    np.testing.assert_array_equal(expected[300], expected[500])


def test_knn_separable_clusters_are_perfect():
    rng = np.random.default_rng(0)
    centers = 10.0 * np.eye(8, 32)
    train_y = np.repeat(np.arange(8), 30)
    test_y = np.tile(np.arange(8), 5)
    train_x = centers[train_y] + 0.1 * rng.normal(size=(240, 32))
    test_x = centers[test_y] + 0.1 * rng.normal(size=(40, 32))
    top1, top5 = ev.knn_classify(train_x, train_y, test_x, test_y, ks=(10, 20), return_top5=True)
    assert top1 == {10: 100.0, 20: 100.0}
    assert top5 == {10: 100.0, 20: 100.0}
    # float64 gives the same answer where float32 already resolves the similarities.
    assert ev.knn_classify(train_x, train_y, test_x, test_y, ks=20, dtype="float64") == {20: 100.0}


def test_knn_bad_inputs_name_the_argument():
    x = np.ones((10, 4), np.float32)
    y = np.zeros(10, np.int64)
    with pytest.raises(ValueError, match="train_labels"):
        ev.knn_classify(x, y[:9], x, y)
    with pytest.raises(ValueError, match="test_labels"):
        ev.knn_classify(x, y, x, y[:3])
    with pytest.raises(ValueError, match="ks"):
        ev.knn_classify(x, y, x, y, ks=(10, 0))
    with pytest.raises(ValueError, match="ks"):
        ev.knn_classify(x, y, x, y, ks=())
    with pytest.raises(ValueError, match="temperature"):
        ev.knn_classify(x, y, x, y, temperature=0.0)
    with pytest.raises(ValueError, match="width"):
        ev.knn_classify(x, y, x[:, :3], y)
    with pytest.raises(ValueError, match="num_classes"):
        ev.knn_classify(x, y + 3, x, y, num_classes=2)
    with pytest.raises(ValueError, match="train_labels"):
        ev.linear_probe(x, y[:9], x, y)


@pytest.fixture(scope="module")
def digits():
    """20 normalized digits (32 x 32) as NumPy, through the evaluation transform."""
    images, labels = next(iter(eval_dataset("digits", 32, 20, split="test")))
    return np.asarray(images), np.asarray(labels)


@pytest.fixture
def tiny():
    return DINOv2Backbone.from_preset("dinov2_vit_tiny4", load_weights=False, layer_scale_init=1.0)


def test_extract_features_shapes_and_values(tiny, digits):
    images, labels = digits
    out = tiny({"images": images})
    # batch_size 8 over 20 images: the last batch is padded and the padding dropped.
    cls, y = ev.extract_features(tiny, (images, labels), batch_size=8, verbose=False)
    assert cls.shape == (20, 96) and cls.dtype == np.float32
    assert y.dtype == np.int64
    np.testing.assert_array_equal(y, labels)
    np.testing.assert_allclose(cls, keras.ops.convert_to_numpy(out["cls_token"]), atol=1e-4)

    blocks = tiny.get_intermediate_layers(images, n=4)
    expected_cls4 = np.concatenate([keras.ops.convert_to_numpy(b["cls_token"]) for b in blocks], axis=-1)
    ds = eval_dataset("digits", 32, 8, split="test").take(3).unbatch().take(20).batch(8)
    cls4, _ = ev.extract_features(tiny, ds, n_last_blocks=4, verbose=False)
    assert cls4.shape == (20, 4 * 96)
    np.testing.assert_allclose(cls4, expected_cls4, atol=1e-4)

    pooled, _ = ev.extract_features(tiny, (images, labels), avgpool=True, batch_size=8, verbose=False)
    assert pooled.shape == (20, 2 * 96)
    patch_mean = keras.ops.convert_to_numpy(out["patch_tokens"]).mean(axis=1)
    np.testing.assert_allclose(pooled[:, 96:], patch_mean, atol=1e-4)
    np.testing.assert_allclose(pooled[:, :96], cls, atol=1e-5)


def test_extract_features_bad_inputs(tiny, digits):
    images, labels = digits
    with pytest.raises(ValueError, match="n_last_blocks"):
        ev.extract_features(tiny, (images, labels), n_last_blocks=0)
    with pytest.raises(ValueError, match="n_last_blocks"):
        ev.extract_features(tiny, (images, labels), n_last_blocks=5)
    with pytest.raises(ValueError, match="features"):
        ev.extract_features(tiny, (images, labels), features="registers")
    with pytest.raises(ValueError, match="dataset"):
        ev.extract_features(tiny, (images, labels[:5]))
    with pytest.raises(ValueError, match="infinite"):
        ev.extract_features(tiny, eval_dataset("digits", 32, 8, split="test").repeat())


def test_raw_pixels_knn_on_digits():
    # A plain Keras model returning a (B, F) tensor is a valid feature extractor: here, the pixels themselves.
    flatten = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten()])
    train = eval_dataset("digits", 32, 512, split="train")
    test = eval_dataset("digits", 32, 512, split="test")
    accuracy = ev.knn_accuracy(flatten, train, test, ks=(10, 20), verbose=False)
    assert accuracy[20] > 95.0


class TinyKNNModel(keras.Model):
    """A model with a `backbone` attribute, as a pretrainer exposes its teacher."""

    def __init__(self, backbone, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.head = keras.layers.Dense(1)

    def call(self, images):
        return self.head(self.backbone(images)["cls_token"])


def test_knn_monitor_logs_to_history(tiny, digits):
    images, labels = digits
    tiny.trainable = False  # the callback is under test, not training: no gradient through the ViT keeps it fast
    model = TinyKNNModel(tiny)
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
    # Equal-sized reference and query sets: one input shape, so one compilation per feature model.
    monitor = ev.KNNMonitor((images[:10], labels[:10]), (images[10:], labels[10:]), k=3, every_n_epochs=2,
                            compare_random_init=True, verbose=0)
    history = model.fit(images[:8], np.zeros((8, 1), np.float32), batch_size=4, epochs=3, callbacks=[monitor],
                        verbose=0)
    assert len(history.history["knn_top1"]) == 1  # only epoch 2 of 3 is evaluated
    assert [epoch for epoch, _ in monitor.history] == [1]
    assert 0.0 <= history.history["knn_top1"][0] <= 100.0
    assert history.history["knn_top1_random_init"][0] == monitor.random_init_accuracy
    # The baseline is random_init_backbone's (seeded), through the same protocol.
    fresh = ev.knn_accuracy(ev.random_init_backbone(tiny), (images[:10], labels[:10]),
                            (images[10:], labels[10:]), ks=(3,))
    assert monitor.random_init_accuracy == fresh[3]
    # A baseline computed elsewhere is logged as given, and nothing is recomputed.
    given = ev.KNNMonitor((images[:10], labels[:10]), (images[10:], labels[10:]), k=3, verbose=0,
                          random_init_accuracy=12.5)
    history = model.fit(images[:4], np.zeros((4, 1), np.float32), batch_size=4, epochs=1, callbacks=[given],
                        verbose=0)
    assert history.history["knn_top1_random_init"] == [12.5]
    assert monitor.feature_extractor.backbone is tiny
    with pytest.raises(ValueError, match="every_n_epochs"):
        ev.KNNMonitor((images, labels), (images, labels), every_n_epochs=0)
    with pytest.raises(ValueError, match="`k`"):
        ev.KNNMonitor((images, labels), (images, labels), k=0)


def test_random_init_backbone_is_one_network_per_seed(tiny):
    import random

    state = random.getstate()
    first, again, other = (ev.random_init_backbone(tiny, seed=s) for s in (0, 0, 1))
    assert random.getstate() == state  # a run's other random draws are untouched
    values = [[keras.ops.convert_to_numpy(w) for w in b.weights] for b in (first, again, other)]
    assert all(np.array_equal(a, b) for a, b in zip(values[0], values[1]))
    assert any(not np.array_equal(a, b) for a, b in zip(values[0], values[2]))
    assert first.get_config() == tiny.get_config()


def test_linear_probe_separable_features():
    rng = np.random.default_rng(0)
    centers = 3.0 * rng.normal(size=(5, 16))
    train_y = np.repeat(np.arange(5), 40)
    test_y = np.repeat(np.arange(5), 12)
    train_x = centers[train_y] + 0.5 * rng.normal(size=(200, 16))
    test_x = centers[test_y] + 0.5 * rng.normal(size=(60, 16))
    result = ev.linear_probe(train_x, train_y, test_x, test_y, learning_rates=(1e-9, 0.1), epochs=30,
                             batch_size=32)
    assert result["accuracy"] >= 95.0
    assert result["learning_rate"] == 0.1
    # Each classifier has its own rate: at 1e-9 the weights stay at their random initialization.
    assert result["accuracies"][1e-9] < 60.0


def _write_class_folders(root, per_class):
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts = {}
    for image, label in zip(digits.images, digits.target):
        if label > 2 or counts.get(label, 0) >= per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 15).astype(np.uint8)).resize((16, 16)).save(folder / f"{counts[label]}.png")


def test_labelled_splits_resolves_digits_and_folders(tmp_path):
    train, test = ev.labelled_splits("digits")
    assert (train.num_examples, test.num_examples) == (1347, 450)
    # One folder of class subfolders: a stratified 25% hold-out.
    _write_class_folders(tmp_path / "flat", per_class=8)
    train, test = ev.labelled_splits(str(tmp_path / "flat"))
    assert (train.num_examples, test.num_examples) == (18, 6)
    assert sorted(np.bincount(test.labels)) == [2, 2, 2]
    # train/ and val/ subfolders are used as they are.
    _write_class_folders(tmp_path / "split" / "train", per_class=4)
    _write_class_folders(tmp_path / "split" / "val", per_class=2)
    train, test = ev.labelled_splits(str(tmp_path / "split"))
    assert (train.num_examples, test.num_examples) == (12, 6)
    with pytest.raises(ValueError, match="does not exist"):
        ev.labelled_splits(str(tmp_path / "missing"))


def test_evaluate_backbone_on_a_folder_compares_with_random_init(tmp_path):
    _write_class_folders(tmp_path, per_class=8)
    backbone = DINOv2Backbone.from_preset("dinov2_vit_tiny4", load_weights=False, layer_scale_init=1.0)
    result = ev.evaluate_backbone(backbone, data=str(tmp_path), image_size=16, ks=(1, 5), verbose=False)
    assert set(result["knn"]) == {1, 5} and set(result["random_init"]["knn"]) == {1, 5}
    assert (result["num_train"], result["num_test"], result["image_size"]) == (18, 6, 16)
    with pytest.raises(ValueError, match="multiple of the backbone's patch size"):
        ev.evaluate_backbone(backbone, data=str(tmp_path), image_size=18, verbose=False)
