"""Data pipeline: sources, multi-crop augmentation, batch structure, seeding, sharding, and model.fit on the backend."""

import dataclasses
import importlib.util
import io
import os
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_dinov2.config import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentationConfig,
    CropConfig,
    DataConfig,
    ModelConfig,
)
from keras_dinov2.data import (
    BATCH_KEYS,
    MultiCropAugmentation,
    array_source,
    batch_spec,
    check_batch,
    color_jitter,
    digits_source,
    eval_dataset,
    gaussian_blur,
    get_source,
    group_micro_batches,
    image_folder_source,
    mask_buffer_size,
    multicrop_dataset,
    solarize,
    split_source,
)
from keras_dinov2.data.augment import crop_box, shifted_slices_blur
from keras_dinov2.data.sources import parse_tfds_spec

# The input pipeline is TensorFlow on every backend: one job runs it (see conftest).
pytestmark = pytest.mark.once

MEAN = np.array(IMAGENET_MEAN, np.float32)
STD = np.array(IMAGENET_STD, np.float32)

# 16 px global crops (4 x 4 patches of 4 px), 2 local crops of 8 px.
PATCH = 4
TINY = DataConfig(crops=CropConfig(global_crops_size=16, local_crops_size=8, local_crops_number=2))


def tiny_dataset(source, batch_size, config, **kwargs):
    """`multicrop_dataset` with the tiny configs' patch size."""
    return multicrop_dataset(source, batch_size, config, patch_size=PATCH, **kwargs)


def plain(**augmentation):
    """TINY without randomness in the pixels: full-image crops, no flip, no photometric changes (unless given)."""
    values = dict(
        color_jitter_probability=0.0,
        grayscale_probability=0.0,
        blur_probabilities=(0.0, 0.0, 0.0),
        solarize_probability=0.0,
    )
    values.update(augmentation)
    crops = dataclasses.replace(
        TINY.crops,
        global_crops_scale=(1.0, 1.0),
        local_crops_scale=(1.0, 1.0),
        aspect_ratio=(1.0, 1.0),
        flip_probability=0.0,
    )
    return DataConfig(crops=crops, augmentation=AugmentationConfig(**values), masking=TINY.masking)


def constant_images(n, size=8):
    """Image i is the constant (i + 1) / (n + 1) in every channel, so crops reveal which image they came from."""
    values = (np.arange(n, dtype=np.float32) + 1) / (n + 1)
    return np.broadcast_to(values[:, None, None, None], (n, size, size, 3)).copy()


def image_ids(crops, n):
    """Recover the image index of each normalized crop cut from `constant_images(n)`."""
    value = crops[:, 0, 0, 0] * STD[0] + MEAN[0]
    return np.round(value * (n + 1)).astype(int) - 1


def as_numpy(batch):
    return {k: v.numpy() for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Batch structure


def test_batch_structure_shapes_and_dtypes():
    images = np.random.default_rng(0).random((12, 20, 24, 3)).astype(np.float32)
    ds = tiny_dataset(images, batch_size=4, config=TINY, seed=0)
    m = mask_buffer_size(8, 16, TINY.masking)
    expected = {
        "global_crops": ((8, 16, 16, 3), tf.float32),
        "local_crops": ((8, 8, 8, 3), tf.float32),
        "masks": ((8, 16), tf.bool),
        "mask_indices": ((m,), tf.int32),
        "masks_weight": ((m,), tf.float32),
        "n_masked_patches": ((), tf.int32),
    }
    assert tuple(ds.element_spec) == BATCH_KEYS
    for key, (shape, dtype) in expected.items():
        assert ds.element_spec[key].shape == shape, key
        assert ds.element_spec[key].dtype == dtype, key
    assert int(ds.cardinality()) == 3
    batches = [as_numpy(b) for b in ds]
    assert len(batches) == 3
    for batch in batches:
        n = int(batch["n_masked_patches"])
        assert n == batch["masks"].sum()
        np.testing.assert_array_equal(batch["mask_indices"][:n], np.flatnonzero(batch["masks"]))
        assert np.all(batch["masks_weight"][n:] == 0)
        # normalized crops: pixels in [0, 1] map into [-mean/std, (1-mean)/std]
        low, high = (-MEAN / STD).min() - 1e-4, ((1 - MEAN) / STD).max() + 1e-4
        assert batch["global_crops"].min() >= low and batch["global_crops"].max() <= high


def test_batch_contract_describes_and_checks_the_batches():
    images = np.random.default_rng(0).random((12, 20, 24, 3)).astype(np.float32)
    ds = multicrop_dataset(images, batch_size=2, config=TINY, patch_size=PATCH, seed=0)
    spec = batch_spec(TINY, 2, patch_size=PATCH)
    assert tuple(spec) == BATCH_KEYS == tuple(ds.element_spec)
    for key, (shape, dtype) in spec.items():
        assert ds.element_spec[key].shape == shape and ds.element_spec[key].dtype.name == dtype, key
    batch = as_numpy(next(iter(ds)))
    assert check_batch(batch, TINY, 2, patch_size=PATCH) is batch
    grouped = group_micro_batches(ds, 3)
    stacked = as_numpy(next(iter(grouped)))
    check_batch(stacked, TINY, 2, stacked=3, patch_size=PATCH)
    check_batch(grouped.element_spec, TINY, 2, stacked=3, patch_size=PATCH)
    assert {key: value.shape for key, value in batch_spec(TINY, 2, stacked=3, patch_size=PATCH).items()} == {
        key: tuple(value.shape) for key, value in stacked.items()}
    # torch tensors, and a batch without local crops when the config has none
    if importlib.util.find_spec("torch"):
        import torch

        check_batch({k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}, TINY, 2, patch_size=PATCH)
    no_local = dataclasses.replace(TINY, crops=dataclasses.replace(TINY.crops, local_crops_number=0))
    check_batch({k: v for k, v in batch.items() if k != "local_crops"}, no_local, 2, patch_size=PATCH)
    for bad, message in [
        ({k: v for k, v in batch.items() if k != "masks"}, r"no 'masks'; expected bool of shape \(4, 16\)"),
        ({**batch, "labels": np.zeros(2)}, r"unknown key\(s\) \['labels'\]"),
        ({**batch, "masks": batch["masks"][:3]},
         r"batch\['masks'\] must have shape \(4, 16\); received shape \(3, 16\)"),
        ({**batch, "mask_indices": batch["mask_indices"].astype(np.int64)},
         r"batch\['mask_indices'\] must have dtype int32; received dtype int64"),
        ({**batch, "n_masked_patches": np.zeros([1], np.int32)},
         r"batch\['n_masked_patches'\] must have shape \(\); received shape \(1,\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_batch(bad, TINY, 2, patch_size=PATCH)
    with pytest.raises(ValueError, match=r"no 'local_crops'"):
        check_batch({k: v for k, v in batch.items() if k != "local_crops"}, TINY, 2, patch_size=PATCH)


def test_crops_are_view_major():
    n, b = 8, 4
    ds = tiny_dataset(constant_images(n), batch_size=b, config=plain(), seed=1)
    for batch in ds:
        batch = as_numpy(batch)
        ids = image_ids(batch["global_crops"], n)
        local_ids = image_ids(batch["local_crops"], n)
        assert len(set(ids[:b])) == b, "the first B rows are B different images (view 1)"
        np.testing.assert_array_equal(
            ids[:b], ids[b:]
        )  # then view 2 of the same images, same order
        np.testing.assert_array_equal(local_ids, np.tile(ids[:b], 2))


def test_normalization_uses_mean_and_std():
    ds = tiny_dataset(
        np.full((4, 8, 8, 3), 0.5, np.float32), batch_size=2, config=plain(), seed=0
    )
    batch = as_numpy(next(iter(ds)))
    np.testing.assert_allclose(
        batch["global_crops"], np.broadcast_to((0.5 - MEAN) / STD, (4, 16, 16, 3)), atol=1e-5
    )
    custom = plain(mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    batch = as_numpy(
        next(iter(tiny_dataset(np.full((4, 8, 8, 3), 0.75, np.float32), 2, custom)))
    )
    np.testing.assert_allclose(batch["local_crops"][0, 0, 0], [1.0, 0.5, 0.25], atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Seeding, epochs, sharding


def test_seeded_and_different_every_epoch():
    images = np.random.default_rng(1).random((8, 12, 12, 3)).astype(np.float32)

    def passes(ds, count):
        return [[as_numpy(b) for b in ds] for _ in range(count)]

    first, second = passes(tiny_dataset(images, 4, TINY, seed=5), 2)
    again = passes(tiny_dataset(images, 4, TINY, seed=5), 1)[0]
    other = passes(tiny_dataset(images, 4, TINY, seed=6), 1)[0]
    for a, b in zip(first, again):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(a[key], b[key])
    assert not np.allclose(first[0]["global_crops"], second[0]["global_crops"]), (
        "each pass draws new crops"
    )
    assert not np.allclose(first[0]["global_crops"], other[0]["global_crops"])


def test_repeat_keys_epochs_so_one_can_resume():
    n, b = 8, 4  # two batches per epoch
    images = constant_images(n)
    stream = [
        as_numpy(x) for x in tiny_dataset(images, b, plain(), seed=3, repeat=True).take(6)
    ]
    resumed = [
        as_numpy(x)
        for x in tiny_dataset(images, b, plain(), seed=3, repeat=True, start_epoch=1).take(2)
    ]
    for a, c in zip(stream[2:4], resumed):
        np.testing.assert_array_equal(a["global_crops"], c["global_crops"])
        np.testing.assert_array_equal(a["masks"], c["masks"])
    epochs = [
        np.sort(np.concatenate([image_ids(x["global_crops"][:b], n) for x in stream[i : i + 2]]))
        for i in (0, 2, 4)
    ]
    for ids in epochs:
        np.testing.assert_array_equal(ids, np.arange(n))  # every epoch is a permutation of the data
    orders = [
        np.concatenate([image_ids(x["global_crops"][:b], n) for x in stream[i : i + 2]])
        for i in (0, 2, 4)
    ]
    assert len({tuple(o) for o in orders}) > 1, "reshuffled per epoch"


def test_shards_are_disjoint_and_even():
    n, b = 16, 4
    images = constant_images(n)
    seen = []
    for index in range(2):
        ds = tiny_dataset(images, b, plain(), seed=9, num_shards=2, shard_index=index)
        assert int(ds.cardinality()) == 2
        seen.append(np.concatenate([image_ids(x["global_crops"][:b], n) for x in as_list(ds)]))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(np.concatenate(seen)) == list(range(n))
    context = tf.distribute.InputContext(
        num_input_pipelines=2, input_pipeline_id=1, num_replicas_in_sync=2
    )
    via_context = tiny_dataset(images, b, plain(), seed=9, input_context=context)
    ids = np.concatenate([image_ids(x["global_crops"][:b], n) for x in as_list(via_context)])
    np.testing.assert_array_equal(ids, seen[1])
    with pytest.raises(ValueError, match="shard_index"):
        tiny_dataset(images, b, plain(), num_shards=2, shard_index=2)


def as_list(ds):
    return [as_numpy(x) for x in ds]


# ----------------------------------------------------------------------------------------------------------------------
# Augmentation


def high_frequency(crops):
    return np.mean(np.square(np.diff(crops, axis=2)), axis=(1, 2, 3))


def test_blur_probability_presets():
    noise = np.random.default_rng(2).random((32, 16, 16, 3)).astype(np.float32)
    sharp_blur = dict(blur_sigma=(1.5, 2.0))

    def blurred_fraction(preset):
        config = plain(blur_probabilities=preset, **sharp_blur)
        view1, view2 = [], []
        for batch in tiny_dataset(noise, 16, config, seed=4):
            crops = batch["global_crops"].numpy()
            view1.append(crops[:16])
            view2.append(crops[16:])
        reference = high_frequency(np.concatenate(baseline))
        # blur with sigma >= 1.5 removes most of the energy between neighbouring pixels of noise
        return [
            np.mean(high_frequency(np.concatenate(v)) < 0.3 * reference) for v in (view1, view2)
        ]

    baseline = [
        b["global_crops"].numpy()[:16] for b in tiny_dataset(noise, 16, plain(), seed=4)
    ]
    intended = blurred_fraction("intended")  # global 1 always (p 1.0), global 2 p 0.1
    released = blurred_fraction("released")  # global 1 never (p 0.0), global 2 p 0.9
    assert intended[0] == 1.0 and intended[1] < 0.35
    assert released[0] == 0.0 and released[1] > 0.65
    assert AugmentationConfig(blur_probabilities="released").resolved_blur_probabilities() == (
        0.0,
        0.9,
        0.5,
    )
    assert AugmentationConfig().resolved_blur_probabilities() == (1.0, 0.1, 0.5)


def test_solarize_only_second_global_crop():
    images = np.full((16, 8, 8, 3), 0.9, np.float32)  # above the 128 / 255 threshold
    batch = as_numpy(
        next(iter(tiny_dataset(images, 16, plain(solarize_probability=1.0), seed=0)))
    )
    pixels = batch["global_crops"][:, 0, 0, 0] * STD[0] + MEAN[0]
    np.testing.assert_allclose(pixels[:16], 0.9, atol=1e-5)
    np.testing.assert_allclose(pixels[16:], 0.1, atol=1e-5)
    local = batch["local_crops"][:, 0, 0, 0] * STD[0] + MEAN[0]
    np.testing.assert_allclose(local, 0.9, atol=1e-5)
    np.testing.assert_allclose(
        solarize(tf.constant([0.2, 0.5, 0.6])).numpy(), [0.2, 0.5, 0.4], atol=1e-6
    )


def test_flip_and_grayscale_probabilities():
    ramp = np.linspace(0, 1, 16, dtype=np.float32)
    image = np.stack([np.tile(ramp, (16, 1)), np.full((16, 16), 0.2), np.full((16, 16), 0.7)], -1)
    crops = dataclasses.replace(plain().crops, flip_probability=0.5)
    config = DataConfig(
        crops=crops,
        augmentation=plain(grayscale_probability=0.2).augmentation,
        masking=TINY.masking,
    )
    ds = tiny_dataset(np.repeat(image[None], 64, 0), 32, config, seed=1)
    flipped, gray = [], []
    for batch in ds:
        for crops_ in (batch["global_crops"].numpy(), batch["local_crops"].numpy()):
            pixels = crops_ * STD + MEAN
            gray.extend(np.abs(pixels[..., 0] - pixels[..., 2]).max(axis=(1, 2)) < 1e-4)
            row = pixels[:, 0, :, 0] if not gray[-1] else pixels[:, 0, :, 0]
            flipped.extend(row[:, 0] > row[:, -1])
    gray, flipped = np.array(gray), np.array(flipped)
    assert 0.12 < gray.mean() < 0.28, gray.mean()
    # gray crops of a ramp still slope, so the flip shows in them too
    assert 0.4 < flipped.mean() < 0.6, flipped.mean()


def test_color_jitter_is_seeded_and_in_range():
    image = tf.random.stateless_uniform([12, 12, 3], [0, 1])
    a = color_jitter(image, tf.constant([3, 4])).numpy()
    b = color_jitter(image, tf.constant([3, 4])).numpy()
    c = color_jitter(image, tf.constant([3, 5])).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert a.min() >= 0 and a.max() <= 1
    # Brightness alone multiplies every pixel by one factor in [0.6, 1.4].
    only = color_jitter(
        image, tf.constant([1, 1]), brightness=0.4, contrast=0, saturation=0, hue=0
    ).numpy()
    ratio = only / np.maximum(image.numpy(), 1e-6)
    unclipped = only < 1
    assert np.ptp(ratio[unclipped]) < 1e-4 and 0.6 <= ratio[unclipped].mean() <= 1.4


def numpy_gaussian_blur(image, sigma, kernel_size):
    half = kernel_size // 2
    taps = np.arange(-half, half + 1)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(image, ((half, half), (half, half), (0, 0)), mode="reflect")
    rows = sum(kernel[i] * padded[i : i + image.shape[0]] for i in range(kernel_size))
    return sum(kernel[i] * rows[:, i : i + image.shape[1]] for i in range(kernel_size))


def test_gaussian_blur_matches_numpy():
    image = np.random.default_rng(3).random((13, 11, 3)).astype(np.float32)
    for sigma in (0.1, 0.8, 2.0):
        expected = numpy_gaussian_blur(image, sigma, 9)
        ours = gaussian_blur(tf.constant(image), sigma, 9).numpy()
        np.testing.assert_allclose(ours, expected, atol=1e-5)
        # the form the XLA-compiled crop stage uses
        compiled = tf.function(shifted_slices_blur, jit_compile=True, autograph=False)
        np.testing.assert_allclose(
            compiled(tf.constant(image), sigma, 9).numpy(), expected, atol=1e-5
        )
    np.testing.assert_allclose(
        gaussian_blur(tf.fill([10, 10, 3], 0.3), 1.7).numpy(), 0.3, atol=1e-6
    )


def test_random_resized_crop_boxes():
    height, width = 50, 80
    scale, ratio = (0.05, 0.32), (3 / 4, 4 / 3)
    box = tf.function(lambda u: crop_box(height, width, u, scale, ratio))
    areas = []
    for i in range(200):
        u = tf.random.stateless_uniform([40], [i, 0])
        top, left, h, w = (int(v) for v in box(u))
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        areas.append(h * w / (height * width))
        assert 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1
    areas = np.array(areas)
    assert areas.min() >= 0.04 and areas.max() <= 0.34
    assert 0.15 < areas.mean() < 0.22  # uniform in (0.05, 0.32): mean 0.185


@pytest.mark.parametrize(
    "augmentation",
    [
        {},  # the defaults: jitter p 0.8, gray p 0.2, blur (1.0, 0.1, 0.5), solarize p 0.2
        dict(
            color_jitter_probability=1.0,
            blur_probabilities=(1.0, 1.0, 1.0),
            solarize_probability=1.0,
        ),
        dict(grayscale_probability=1.0, blur_probabilities=(0.0, 0.0, 1.0)),
    ],
)
def test_compiled_crop_stage_matches_plain_tensorflow(augmentation):
    """The XLA-compiled stage after the resize (flip, jitter, gray, blur, solarize, normalize; the local crops in
    one loop) gives the values of the same operations as plain TensorFlow ops."""
    config = DataConfig(
        crops=dataclasses.replace(TINY.crops, local_crops_number=3, flip_probability=0.5),
        augmentation=AugmentationConfig(**augmentation),
        masking=TINY.masking,
    )
    image = tf.random.stateless_uniform([30, 40, 3], [5, 6])
    compiled, plain_ops = (
        MultiCropAugmentation(config),
        MultiCropAugmentation(config, jit_compile=False),
    )
    for seed in range(6):
        a = compiled(image, tf.constant([seed, 1]))
        b = plain_ops(image, tf.constant([seed, 1]))
        for key in ("global_crops", "local_crops"):
            np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), atol=2e-5, err_msg=key)
    # normalized: a crop of the constant image is (value - mean) / std in every pixel (no jitter, gray or blur)
    still = MultiCropAugmentation(plain())(tf.fill([20, 20, 3], 0.25), tf.constant([0, 0]))
    np.testing.assert_allclose(
        still["local_crops"].numpy(), ((0.25 - MEAN) / STD) * np.ones((2, 8, 8, 3)), atol=1e-5
    )


def test_multicrop_augmentation_direct():
    aug = MultiCropAugmentation(TINY)
    out = aug(tf.random.uniform([30, 20, 3]), tf.constant([1, 2]))
    assert out["global_crops"].shape == (2, 16, 16, 3)
    assert out["local_crops"].shape == (2, 8, 8, 3)
    none = MultiCropAugmentation(
        DataConfig(
            crops=dataclasses.replace(TINY.crops, local_crops_number=0), masking=TINY.masking
        )
    )
    assert none(tf.random.uniform([30, 20, 3]), tf.constant([1, 2]))["local_crops"].shape == (
        0,
        8,
        8,
        3,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Sources


def write_image(path, array):
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ext = path.rsplit(".", 1)[-1].lower()
    if ext == "png":
        data = tf.io.encode_png(array)
    elif ext in ("jpg", "jpeg"):
        data = tf.io.encode_jpeg(array)
    else:
        from PIL import Image as image_module

        buffer = io.BytesIO()
        image_module.fromarray(array.squeeze()).save(
            buffer, format={"bmp": "BMP", "gif": "GIF", "webp": "WEBP"}[ext]
        )
        data = buffer.getvalue()
    tf.io.write_file(path, data)


def test_image_folder_with_class_subfolders(tmp_path):
    rng = np.random.default_rng(0)
    rgb = lambda h, w: rng.integers(0, 255, (h, w, 3), dtype=np.uint8)  # noqa: E731
    write_image(tmp_path / "cat" / "a.png", rgb(20, 30))
    write_image(tmp_path / "cat" / "b.JPG", rgb(24, 24))
    write_image(
        tmp_path / "dog" / "deeper" / "c.png", rng.integers(0, 255, (18, 18, 1), dtype=np.uint8)
    )  # gray
    write_image(tmp_path / "dog" / "d.jpeg", rgb(30, 20))
    # BMP, GIF and WebP files are written with Pillow (a test dependency through scikit-image), PNG without it.
    pillow = importlib.util.find_spec("PIL") is not None
    for name in ("e.bmp", "f.gif", "g.webp") if pillow else ("e.png", "f.png", "g.png"):
        write_image(tmp_path / "eel" / name, rgb(16, 16))
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    write_image(tmp_path / "cat" / ".hidden.png", rgb(8, 8))

    source = get_source(tmp_path)
    assert source.num_examples == 7
    assert source.class_names == ("cat", "dog", "eel")
    np.testing.assert_array_equal(source.labels, [0, 0, 1, 1, 2, 2, 2])
    decoded = [source.decode(r) for r in source.stream()]
    # sorted paths: cat/a, cat/b, dog/d.jpeg, dog/deeper/c (gray, decoded to RGB), eel/...
    assert [tuple(img.shape) for img, _ in decoded][:4] == [
        (20, 30, 3),
        (24, 24, 3),
        (30, 20, 3),
        (18, 18, 3),
    ]
    assert all(float(tf.reduce_max(img)) <= 1.0 for img, _ in decoded)
    assert [int(label) for _, label in decoded] == [0, 0, 1, 1, 2, 2, 2]

    batch = next(iter(tiny_dataset(str(tmp_path), 3, TINY, seed=0)))
    assert batch["global_crops"].shape == (6, 16, 16, 3)
    images, labels = next(iter(eval_dataset(tmp_path, 16, 8)))
    assert images.shape == (7, 16, 16, 3) and labels.dtype == tf.int32
    np.testing.assert_array_equal(labels.numpy(), [0, 0, 1, 1, 2, 2, 2])

    train, test = split_source(source, test_fraction=3 / 7, seed=0)
    assert train.num_examples + test.num_examples == 7 and test.num_classes == 3


def _bmp_4bit_top_down(indices, palette_rgb):
    """A hand-built uncompressed 4-bit BMP, rows stored top-down (negative height), for the decoder test."""
    height, width = indices.shape
    row_bytes = (4 * width + 31) // 32 * 4
    rows = np.zeros((height, row_bytes), np.uint8)
    padded = np.zeros((height, 2 * row_bytes), np.uint8)
    padded[:, :width] = indices
    rows[:, :] = (padded[:, 0::2] << 4) | padded[:, 1::2]
    palette = np.zeros((16, 4), np.uint8)
    palette[: len(palette_rgb), :3] = palette_rgb[:, ::-1]  # stored as B, G, R, 0
    offset = 14 + 40 + palette.nbytes
    info = np.array([40, width, -height], "<i4").tobytes() + np.array([1, 4], "<u2").tobytes()
    info += np.array([0, rows.nbytes, 2835, 2835, 16, 0], "<i4").tobytes()
    file_header = b"BM" + np.array([offset + rows.nbytes, 0, offset], "<u4").tobytes()
    return file_header + info + palette.tobytes() + rows.tobytes()


def test_palette_bmp_files_decode_through_their_palette(tmp_path):
    """8-bit, 4-bit and 1-bit BMPs hold palette indices; TensorFlow's decoder alone returns the indices as gray
    levels (8-bit) or fails (1 and 4-bit)."""
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 255, (13, 11, 3), dtype=np.uint8)
    expected = {}
    if importlib.util.find_spec("PIL") is not None:
        from PIL import Image as image_module

        for name, convert in [
            ("p16.bmp", dict(mode="P", palette=1, colors=16)),
            ("bw.bmp", dict(mode="1")),
        ]:
            image = image_module.fromarray(pixels).convert(**convert)
            image.save(tmp_path / name)
            expected[name] = np.asarray(image.convert("RGB"))
    indices = rng.integers(0, 12, (5, 7)).astype(np.uint8)
    palette = rng.integers(0, 255, (12, 3), dtype=np.uint8)
    (tmp_path / "nibbles.bmp").write_bytes(_bmp_4bit_top_down(indices, palette))
    expected["nibbles.bmp"] = palette[indices]

    source = get_source(tmp_path)
    decoded = {
        os.path.basename(source.describe(record).numpy().decode()): source.decode(record)[0].numpy()
        for record in source.stream()
    }
    assert sorted(decoded) == sorted(expected)
    for name, pixels_rgb in expected.items():
        np.testing.assert_array_equal(
            np.round(decoded[name] * 255).astype(np.uint8), pixels_rgb, err_msg=name
        )


def _folder_with_bad_files(root):
    rng = np.random.default_rng(1)
    for i in range(4):
        write_image(root / "ok" / f"rgb{i}.png", rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
    write_image(root / "ok" / "gray.png", rng.integers(0, 255, (20, 20, 1), dtype=np.uint8))
    rgba = rng.integers(0, 255, (20, 20, 4), dtype=np.uint8)
    write_image(root / "ok" / "rgba.png", rgba)
    jpeg = tf.io.encode_jpeg(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).numpy()
    bad = {
        "bad/garbage.jpg": b"this is not an image",
        "bad/truncated.jpg": jpeg[: len(jpeg) // 2],
        "bad/empty.png": b"",
    }
    for name, data in bad.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return [str(root / name) for name in bad]


def test_undecodable_files_are_skipped_counted_and_named(tmp_path, capfd):
    bad = _folder_with_bad_files(tmp_path)
    source = get_source(tmp_path)
    assert source.num_examples == 9 and source.can_fail
    ds = tiny_dataset(source, 3, TINY, seed=0)
    for epoch in range(2):
        batches = list(ds)
        # The pass keeps its length: undecodable files are replaced by other images, not dropped.
        assert len(batches) == 3, epoch
        for batch in batches:
            assert np.isfinite(batch["global_crops"].numpy()).all()
        err = capfd.readouterr().err
        if epoch == 0:
            assert "skipped 3 image(s)" in err
            assert all(err.count(path) == 1 for path in bad), err
        else:  # named once, then only counted
            assert "skipped the same 3 image(s)" in err and bad[0] not in err

    # Deterministic with the skipping in place.
    a = next(iter(tiny_dataset(source, 3, TINY, seed=5, repeat=True, start_epoch=2)))
    b = next(iter(tiny_dataset(source, 3, TINY, seed=5, repeat=True, start_epoch=2)))
    np.testing.assert_array_equal(a["local_crops"], b["local_crops"])

    # Evaluation leaves them out and keeps the rest in order.
    images, labels = next(iter(eval_dataset(source, 16, 16)))
    assert images.shape[0] == 6 and set(labels.numpy()) == {1}
    err = capfd.readouterr().err
    assert "left out" in err and all(path in err for path in bad)


# ----------------------------------------------------------------------------------------------------------------------
# Decompression bombs: sizes come from the header, before decoding


def _png_bomb(width, height):
    """A valid 1-bit gray PNG of all-zero pixels: kilobytes on disk, width * height * 3 bytes once decoded to RGB."""
    import zlib

    def chunk(kind, data):
        return (len(data).to_bytes(4, "big") + kind + data
                + zlib.crc32(kind + data).to_bytes(4, "big"))

    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed pixels
    packer = zlib.compressobj(9)
    rows_per_block = 1000
    body = []
    for start in range(0, height, rows_per_block):
        body.append(packer.compress(row * min(rows_per_block, height - start)))
    body.append(packer.flush())
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(body))
            + chunk(b"IEND", b""))


def _encoded_samples():
    """{name: (bytes, (width, height))} in every format the folders read, written by Pillow and TensorFlow."""
    from PIL import Image as image_module

    rng = np.random.default_rng(3)
    samples = {}

    def pillow(name, size, mode="RGB", **options):
        array = rng.integers(0, 255, (size[1], size[0], 4 if mode == "RGBA" else 3), dtype=np.uint8)
        image = image_module.fromarray(array, "RGBA" if mode == "RGBA" else "RGB").convert(mode)
        buffer = io.BytesIO()
        image.save(buffer, **options)
        samples[name] = (buffer.getvalue(), size)

    pillow("rgb.png", (301, 7), format="PNG")
    pillow("gray.png", (9, 260), mode="L", format="PNG")
    pillow("bits.png", (33, 5), mode="1", format="PNG")
    # An APP1 segment of 3 kB before the frame header: the marker walk must step over it.
    pillow("exif.jpg", (270, 19), format="JPEG", exif=b"Exif\x00\x00" + bytes(3000))
    pillow("progressive.jpg", (17, 300), format="JPEG", progressive=True)
    pillow("a.gif", (300, 11), format="GIF")
    pillow("a.bmp", (13, 258), format="BMP")
    pillow("p.bmp", (14, 3), mode="P", format="BMP")
    pillow("lossless.webp", (1000, 3), format="WEBP", lossless=True)  # VP8L
    pillow("lossy.webp", (3, 1000), format="WEBP", quality=50)  # VP8
    pillow("alpha.webp", (300, 200), mode="RGBA", format="WEBP", quality=50)  # VP8X
    samples["top_down.bmp"] = (_bmp_4bit_top_down(np.zeros((5, 7), np.uint8), np.zeros((2, 3), np.uint8)),
                               (7, 5))
    samples["bomb.png"] = (_png_bomb(23000, 23000)[:200], (23000, 23000))
    return samples


def test_image_header_size_in_python_and_in_the_graph():
    pytest.importorskip("PIL")
    from keras_dinov2.data.decoding import header_pixels
    from keras_dinov2.data.image_headers import image_header_size

    samples = _encoded_samples()
    assert samples["alpha.webp"][0][12:16] == b"VP8X" and samples["lossy.webp"][0][12:16] == b"VP8 "
    for name, (data, size) in samples.items():
        assert image_header_size(data) == size, name
        assert int(header_pixels(tf.constant(data))) == size[0] * size[1], name
    for data in (b"", b"not an image", b"\x89PNG", b"GIF89a"):
        assert int(header_pixels(tf.constant(data))) == 0 or data.startswith((b"\x89PNG", b"GIF"))
    assert image_header_size(b"") is None and image_header_size(b"not an image at all") is None
    assert image_header_size(b"\xff\xd8\xff\xe0\x00") is None  # cut before any frame header


def _hwm_bytes():
    """Peak resident memory of this process (Linux), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def _reset_hwm():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident set size (Linux >= 4.0)


def test_decompression_bomb_is_skipped_and_named_without_decoding(tmp_path, capfd):
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("peak memory is measured through /proc/self (Linux)")
    rng = np.random.default_rng(2)
    for i in range(3):
        write_image(tmp_path / "ok" / f"{i}.png", rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
    bomb = tmp_path / "zzz" / "bomb.png"
    bomb.parent.mkdir()
    bomb.write_bytes(_png_bomb(23000, 23000))  # 1.6 GB as uint8 RGB, 6.3 GB as float32
    assert bomb.stat().st_size < 200_000
    source = get_source(tmp_path)

    _reset_hwm()
    before = _hwm_bytes()
    images, labels = next(iter(eval_dataset(source, 16, 8)))
    batches = list(tiny_dataset(source, 2, TINY, seed=0))
    grown = _hwm_bytes() - before
    assert images.shape[0] == 3 and set(labels.numpy()) == {0}
    assert len(batches) == 2  # the pass kept its length: another image took the bomb's place
    assert grown < 300 * 2**20, f"peak memory grew by {grown / 2**20:.0f} MiB"
    err = capfd.readouterr().err
    assert err.count(str(bomb)) == 2  # once per pipeline
    assert "23000 x 23000 = 529,000,000 pixels, over the limit of 89,478,485" in err
    assert "--max-image-pixels" in err

    # Decoding the record directly refuses too (the check runs before the decoder).
    record = source.read(tf.constant(3, tf.int64))
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_image_pixels"):
        source.decode(record)


def test_max_image_pixels_limit_can_be_raised(tmp_path, capfd):
    rng = np.random.default_rng(5)
    write_image(tmp_path / "a" / "small.png", rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
    write_image(tmp_path / "a" / "large.jpg", rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    images, _ = next(iter(eval_dataset(get_source(tmp_path, max_image_pixels=1000), 16, 8)))
    assert images.shape[0] == 1
    err = capfd.readouterr().err
    assert "large.jpg (40 x 40 = 1,600 pixels, over the limit of 1,000)" in err and "small.png" not in err
    for limit in (1600, None):
        images, _ = next(iter(eval_dataset(get_source(tmp_path, max_image_pixels=limit), 16, 8)))
        assert images.shape[0] == 2
    assert "skipped" not in capfd.readouterr().err
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="max_image_pixels"):
            get_source(tmp_path, max_image_pixels=bad)


def test_image_folder_without_classes(tmp_path):
    image = np.zeros((12, 12, 3), np.uint8)
    write_image(tmp_path / "top.png", image)
    write_image(tmp_path / "sub" / "inner.png", image)
    source = image_folder_source(tmp_path)
    assert source.num_examples == 2 and not source.has_labels and source.labels is None
    with pytest.raises(ValueError, match="no labels"):
        eval_dataset(source, 8, 2)


def test_bad_specs_and_folders(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        get_source(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no images"):
        get_source(tmp_path / "empty")
    with pytest.raises(ValueError, match="not a folder"):
        get_source(tmp_path / "empty" / "readme.txt")
    for spec in ("tfds:", "tfds:bad name!", "tfds::train"):
        with pytest.raises(ValueError, match="tfds:NAME"):
            get_source(spec)
    with pytest.raises(ValueError, match="not understood"):
        get_source("s3:bucket")
    with pytest.raises(ValueError, match="data must be"):
        get_source(123)
    with pytest.raises(ValueError, match="digits split"):
        get_source("digits:validation")
    assert parse_tfds_spec("tfds:mnist") == ("mnist", None)
    assert parse_tfds_spec("tfds:mnist:test") == ("mnist", "test")
    assert parse_tfds_spec("tfds:mnist:3.0.1:train[:10%]") == ("mnist:3.0.1", "train[:10%]")
    assert parse_tfds_spec("tfds:imagenet2012/subset:validation") == (
        "imagenet2012/subset",
        "validation",
    )


@pytest.mark.parametrize(
    "images",
    [
        np.arange(2 * 6 * 5, dtype=np.uint8).reshape(2, 6, 5),  # gray (N, H, W)
        np.arange(2 * 6 * 5, dtype=np.uint8).reshape(2, 6, 5, 1),  # gray (N, H, W, 1)
        np.arange(2 * 6 * 5 * 3, dtype=np.uint8).reshape(2, 6, 5, 3),  # RGB uint8
        np.linspace(0, 1, 2 * 6 * 5 * 3).reshape(2, 6, 5, 3),  # RGB float64 in [0, 1]
        np.linspace(0, 1, 2 * 6 * 5, dtype=np.float32).reshape(2, 6, 5, 1),  # gray float
    ],
)
def test_array_sources(images):
    source = array_source(images, labels=[1, 0])
    assert source.num_examples == 2 and source.num_classes == 2
    image, label = source.decode(source.read(tf.constant(1, tf.int64)))
    expected = images[1].astype(np.float32)
    expected = expected / 255.0 if images.dtype == np.uint8 else expected
    expected = np.broadcast_to(expected.reshape(6, 5, -1), (6, 5, 3))
    np.testing.assert_allclose(image.numpy(), expected, atol=1e-6)
    assert int(label) == 0


def test_array_source_errors():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        array_source(np.full((2, 4, 4, 3), 255.0))
    with pytest.raises(ValueError, match="shape"):
        array_source(np.zeros((2, 4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="dtype"):
        array_source(np.zeros((2, 4, 4), np.int64))
    with pytest.raises(ValueError, match="labels"):
        array_source(np.zeros((2, 4, 4), np.uint8), labels=[0, 1, 2])
    with pytest.raises(ValueError, match="batch_size"):
        tiny_dataset(np.zeros((3, 8, 8), np.uint8), batch_size=4, config=TINY)


def test_pipeline_argument_errors_and_run_config():
    images = np.zeros((4, 8, 8), np.uint8)
    with pytest.raises(ValueError, match="config"):
        multicrop_dataset(images, 2, config="digits")
    with pytest.raises(ValueError, match="start_epoch"):
        tiny_dataset(images, 2, TINY, start_epoch=1)
    with pytest.raises(ValueError, match="seed"):
        tiny_dataset(images, 2, TINY, seed=-1)
    with pytest.raises(ValueError, match="split"):
        get_source(images, split="test")
    with pytest.raises(ValueError, match="multiple of the patch size"):
        multicrop_dataset(images, 2, TINY)  # the default patch size, 14
    # A run config (e.g. the SSLConfig of a run) gives the data section and the patch size.
    run_config = types.SimpleNamespace(data=TINY, model=ModelConfig(patch_size=PATCH))
    assert multicrop_dataset(images, 2, run_config).element_spec["masks"].shape == (4, 16)


def test_tfds_source_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    # The mocked dataset counts as not prepared: download=True lets it through (the mock downloads nothing).
    with tfds.testing.mock_data(num_examples=12):
        source = get_source("tfds:mnist", download=True)
        assert source.num_examples == 12 and source.num_classes == 10 and not source.random_access
        ds = tiny_dataset(source, 4, TINY, seed=0)
        assert int(ds.cardinality()) == 3
        batches = as_list(ds)
        assert len(batches) == 3 and batches[0]["global_crops"].shape == (8, 16, 16, 3)
        again = as_list(tiny_dataset(get_source("tfds:mnist", download=True), 4, TINY, seed=0))
        np.testing.assert_array_equal(batches[0]["global_crops"], again[0]["global_crops"])
        shard = tiny_dataset(source, 2, TINY, seed=0, num_shards=2, shard_index=1)
        assert len(as_list(shard)) == 3
        test = get_source("tfds:mnist:test", download=True)
        images, labels = next(iter(eval_dataset(test, 16, 5)))
        assert images.shape == (5, 16, 16, 3) and labels.dtype == tf.int32
        with pytest.raises(ValueError, match="image_key"):
            get_source("tfds:mnist", image_key="picture", download=True)


def test_tfds_errors_are_short_and_never_reach_the_network(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")

    def no_network(*args, **kwargs):
        raise AssertionError("download_and_prepare was called")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_network)
    with pytest.raises(ValueError) as caught:
        get_source("tfds:mnist", data_dir=str(tmp_path))
    message = str(caught.value)
    assert "'mnist' is not prepared in" in message and str(tmp_path) in message
    assert "tfds build mnist" in message and "TFDS_DATA_DIR" in message and "\n" not in message
    with pytest.raises(ValueError) as caught:
        get_source("tfds:nonexistent")
    assert "not in TensorFlow Datasets' catalog" in str(caught.value) and len(str(caught.value)) < 300
    with pytest.raises(ValueError, match="did you mean mnist"):
        get_source("tfds:mnsit")


def test_digits_source_and_split():
    train, test, everything = digits_source("train"), digits_source("test"), digits_source("all")
    assert (train.num_examples, test.num_examples, everything.num_examples) == (1347, 450, 1797)
    assert train.num_classes == test.num_classes == 10
    per_class = np.bincount(everything.labels, minlength=10)
    np.testing.assert_array_equal(
        np.bincount(train.labels, minlength=10) + np.bincount(test.labels, minlength=10), per_class
    )
    # stratified: every class holds out a quarter, up to rounding
    assert np.all(np.abs(np.bincount(test.labels, minlength=10) - per_class * 0.25) <= 1)
    assert not np.array_equal(digits_source("test", seed=1).labels, test.labels)
    image, _ = test.decode(test.read(tf.constant(0, tf.int64)))
    assert image.shape == (32, 32, 3)
    assert (
        get_source("digits").num_examples == 1347 and get_source("digits:test").num_examples == 450
    )


def test_eval_dataset_digits_and_center_crop():
    ds = eval_dataset("digits", 32, 100, split="test")
    batches = list(ds)
    assert sum(int(x.shape[0]) for x, _ in batches) == 450
    images, labels = batches[0]
    assert images.shape == (100, 32, 32, 3) and labels.dtype == tf.int32
    pixels = images.numpy() * STD + MEAN
    assert pixels.min() > -1e-3 and pixels.max() < 1 + 1e-3
    # Resize the shorter side to 10 (20 x 40 -> 10 x 20), center crop 8: columns 6 .. 13 of the resized image.
    wide = np.tile(np.linspace(0, 1, 40, dtype=np.float32), (20, 1))[..., None]
    images, _ = next(iter(eval_dataset(array_source(wide[None], labels=[0]), 8, 1, resize_size=10)))
    resized = tf.image.resize(
        np.repeat(wide, 3, -1), [10, 20], method="bicubic", antialias=True
    ).numpy()
    expected = (np.clip(resized, 0, 1)[1:9, 6:14] - MEAN) / STD
    np.testing.assert_allclose(images.numpy()[0], expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# model.fit on the current backend


class ReadsTheBatch(keras.Model):
    """A trivial model that touches every entry of the batch dict, including the index buffer."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(1)

    def call(self, inputs):
        ops = keras.ops
        pooled = ops.concatenate(
            [
                ops.mean(inputs["global_crops"], axis=(1, 2)),
                ops.mean(inputs["local_crops"], axis=(1, 2)),
            ],
            axis=0,
        )
        patches = ops.reshape(ops.cast(inputs["masks"], "float32"), (-1,))
        picked = ops.take(patches, inputs["mask_indices"], axis=0) * inputs["masks_weight"]
        masked = ops.sum(picked) / ops.maximum(ops.cast(inputs["n_masked_patches"], "float32"), 1.0)
        return self.dense(pooled) + masked

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return keras.ops.mean(keras.ops.square(y_pred - 1.0))


@pytest.mark.every_backend
def test_model_fit_accepts_the_dataset():
    ds = tiny_dataset("digits", batch_size=4, config=TINY, seed=0).take(2)
    model = ReadsTheBatch()
    model.compile(optimizer="sgd")
    history = model.fit(ds, epochs=2, verbose=0)
    losses = history.history["loss"]
    assert len(losses) == 2 and all(np.isfinite(losses))
