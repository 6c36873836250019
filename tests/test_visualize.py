"""Pictures: PCA of patch features, CLS attention maps, the PNG grid and `keras-dinov2 visualize`."""

import csv
import os

import keras
import numpy as np
import pytest
from PIL import Image

from keras_dinov2 import visualize
from keras_dinov2.backbone import DINOv2Backbone
from keras_dinov2.cli import main

pytest.importorskip("skimage")

PATCH = 4  # dinov2_vit_tiny4
HEADS = 3


@pytest.fixture(scope="module")
def backbone():
    return DINOv2Backbone.from_preset("dinov2_vit_tiny4", load_weights=False)


def _figure_size(num_images, side, heads=HEADS, min_panel=128, padding=4, title_height=16):
    """(width, height) of save_figure's PNG, written out from its documented layout."""
    panel = side * max(1, -(-min_panel // side))
    columns = heads + 3  # input, PCA, heads, mean
    return (columns * panel + (columns + 1) * padding,
            title_height + num_images * panel + (num_images + 1) * padding)


def test_load_image_accepts_files_arrays_and_bundled_pictures(tmp_path):
    coffee = visualize.load_image("skimage:coffee")
    assert coffee.shape == (400, 600, 3) and coffee.dtype == np.float32
    assert 0.0 <= coffee.min() and coffee.max() <= 1.0
    gray = visualize.load_image(np.full((5, 7), 255, np.uint8))
    assert gray.shape == (5, 7, 3) and np.all(gray == 1.0)
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 51
    rgba[..., 3] = 255
    np.testing.assert_allclose(visualize.load_image(rgba)[0, 0], [0.2, 0.0, 0.0], atol=1e-6)
    path = tmp_path / "picture.png"
    Image.fromarray((coffee[:16, :24] * 255).round().astype(np.uint8)).save(path)
    np.testing.assert_allclose(visualize.load_image(str(path)), coffee[:16, :24], atol=1 / 255)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        visualize.load_image(str(tmp_path / "missing.jpg"))
    with pytest.raises(ValueError, match="no bundled picture"):
        visualize.load_image("skimage:not_a_picture")


def _png_claiming(width, height):
    """A PNG signature and IHDR declaring width x height, with no pixel data: what a bomb's header says."""
    import zlib

    header = b"IHDR" + width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + header
            + zlib.crc32(header).to_bytes(4, "big"))


def test_load_image_refuses_files_over_the_pixel_limit_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_claiming(23000, 23000))
    with pytest.raises(ValueError, match=r"23000 x 23000 = 529,000,000 pixels.*max_image_pixels=89,478,485"):
        visualize.load_image(str(bomb))
    picture = np.zeros((40, 40, 3), np.uint8)
    for name in ("p.png", "p.tiff"):  # TIFF: a format only PIL's own header reading knows here
        Image.fromarray(picture).save(tmp_path / name)
        with pytest.raises(ValueError, match="40 x 40 = 1,600 pixels"):
            visualize.load_image(str(tmp_path / name), max_image_pixels=1000)
        assert visualize.load_image(str(tmp_path / name), max_image_pixels=1600).shape == (40, 40, 3)
    # A raised limit also lifts PIL's own (global) one, and leaves it as it was.
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 100
    try:
        assert visualize.load_image(str(tmp_path / "p.png"), max_image_pixels=None).shape == (40, 40, 3)
        assert Image.MAX_IMAGE_PIXELS == 100
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    with pytest.raises(ValueError, match="max_image_pixels must be"):
        visualize.load_image(str(tmp_path / "p.png"), max_image_pixels=0)


def test_pca_image_is_rgb_uint8_at_the_input_size(backbone):
    rgb = visualize.pca_image(backbone, "skimage:chelsea", size=32)
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
    # Each component is min-max scaled, so each channel spans the full range.
    assert (rgb.reshape(-1, 3).min(0) == 0).all() and (rgb.reshape(-1, 3).max(0) == 255).all()
    # Nearest upsampling: one flat colour per 4 x 4 patch.
    blocks = rgb.reshape(8, PATCH, 8, PATCH, 3)
    assert (blocks == blocks[:, :1, :, :1]).all()
    joint = visualize.pca_image(backbone, ["skimage:chelsea", "skimage:coffee"], size=32,
                                upsample="bilinear")
    assert joint.shape == (2, 32, 32, 3) and joint.dtype == np.uint8


def test_pca_first_component_separates_two_different_halves(backbone):
    rng = np.random.default_rng(0)
    image = np.zeros((32, 32, 3), np.float32)
    image[:, :16] = rng.uniform(0.0, 0.2, (32, 16, 3))           # dark noise
    image[:, 16:] = 0.8 + 0.2 * (np.indices((32, 16)).sum(0) % 2)[..., None]  # bright checkerboard
    first = visualize.pca_image(backbone, image, size=32)[..., 0].astype(int)
    left, right = first[:, :16], first[:, 16:]
    assert left.max() < right.min() or right.max() < left.min()
    assert abs(left.mean() - right.mean()) > 128


def test_background_threshold_keeps_the_centred_object(backbone):
    image = np.zeros((32, 32, 3), np.float32)
    image[8:24, 8:24] = (0.9, 0.7, 0.2)  # a 4 x 4 patch object in the middle of a black picture
    features = visualize.patch_features(backbone, visualize.prepare_images([image], (32, 32))[0])
    components, foreground = visualize.patch_pca(features, background_threshold=0.5)
    expected = np.zeros((8, 8), bool)
    expected[2:6, 2:6] = True
    np.testing.assert_array_equal(foreground[0], expected)
    assert (components[0][~expected] == 0).all()
    rgb = visualize.pca_image(backbone, image, size=32, background_threshold=0.5)
    assert (rgb[:8] == 0).all() and rgb[8:24, 8:24].max() > 0


def test_attention_maps_are_distributions_per_head(backbone):
    maps = visualize.attention_maps(backbone, "skimage:astronaut", size=32)
    attention = maps["attention"]
    assert attention.shape == (HEADS, 8, 8) and attention.dtype == np.float32
    assert (attention >= 0).all()
    np.testing.assert_allclose(attention.sum(axis=(1, 2)), np.ones(HEADS), rtol=1e-5)
    np.testing.assert_allclose(maps["mean"], attention.mean(0), rtol=1e-6)
    assert maps["overlays"].shape == (HEADS + 1, 32, 32, 3) and maps["overlays"].dtype == np.uint8
    assert maps["image"].shape == (32, 32, 3)
    # The heads are different projections, so their maps differ.
    assert np.abs(attention[0] - attention[1]).max() > 1e-4
    # Overlays blend the input with the colour map: alpha 0 gives the input back.
    plain = visualize.attention_maps(backbone, "skimage:astronaut", size=32, alpha=0.0)
    assert (plain["overlays"] == plain["image"]).all()


def test_any_multiple_of_the_patch_size_works_and_others_fail_clearly(backbone):
    rgb = visualize.pca_image(backbone, "skimage:coffee", size=(40, 56))
    assert rgb.shape == (40, 56, 3)
    maps = visualize.attention_maps(backbone, ["skimage:coffee", "skimage:chelsea"], size=(40, 56))
    assert maps["attention"].shape == (2, HEADS, 10, 14)
    np.testing.assert_allclose(maps["attention"].sum(axis=(-2, -1)), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match=r"30 is not a multiple of the backbone's patch size 4"):
        visualize.pca_image(backbone, "skimage:coffee", size=30)


def test_save_figure_writes_the_documented_grid(backbone, tmp_path):
    path = tmp_path / "sub" / "grid.png"
    picture = visualize.save_figure(backbone, ["skimage:chelsea", "skimage:coffee"], str(path),
                                    size=32)
    with Image.open(path) as written:
        assert written.size == _figure_size(2, 32)
        np.testing.assert_array_equal(np.asarray(written.convert("RGB")), picture)


def _fake_run(tmp_path, backbone):
    run = tmp_path / "run"
    backbone.save_to_preset(str(run / "teacher_preset"))
    with open(run / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss", "lr"])
        for step in range(5):
            writer.writerow([step, 10.0 - step, 1e-3 * step])
    return run


def test_cli_visualize_writes_the_pictures_and_the_run_plot(backbone, tmp_path, capsys):
    run = _fake_run(tmp_path, backbone)
    out = tmp_path / "pictures.png"
    args = ["visualize", "--preset", str(run), "--image", "skimage:coffee", "--out", str(out),
            "--size", "32"]
    assert main(args) == 0
    with Image.open(out) as written:
        assert written.size == _figure_size(1, 32)
    assert os.path.exists(run / "metrics.png")
    printed = capsys.readouterr().out
    assert "pictures.png" in printed and "metrics.png" in printed

    # Bad input: exit status 2 and one line naming the problem.
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_claiming(23000, 23000))
    for argv, words in [
        (["visualize", "--preset", str(run), "--image", str(tmp_path / "missing.png"), "--out", str(out)],
         ["missing.png"]),
        (args[:-1] + ["30"], ["30 is not a multiple of the backbone's patch size 4"]),
        (["visualize", "--preset", "dinov2_vit_tiny4", "--image", "skimage:coffee", "--out", str(out)],
         ["--random-weights"]),
        (["visualize", "--preset", str(run), "--image", str(bomb), "--out", str(out)],
         ["bomb.png", "529,000,000 pixels", "--max-image-pixels"]),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(word in err[0] for word in words), err


def test_pictures_read_the_backbones_own_outputs(backbone):
    # The compiled picture forward must agree with the backbone's public outputs.
    normalized, _ = visualize.prepare_images(["skimage:rocket"], (24, 36))
    tokens = visualize.patch_features(backbone, normalized)
    expected = keras.ops.convert_to_numpy(backbone({"images": normalized})["patch_tokens"])
    np.testing.assert_allclose(tokens.reshape(expected.shape), expected, atol=1e-5)
    weights = keras.ops.convert_to_numpy(backbone.last_attention_weights(normalized))
    maps = visualize.attention_maps(backbone, "skimage:rocket", size=(24, 36))
    np.testing.assert_allclose(maps["attention"].reshape(weights.shape[1:]),
                               weights[0] / weights[0].sum(-1, keepdims=True), rtol=1e-4, atol=1e-7)
