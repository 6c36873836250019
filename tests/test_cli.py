"""The keras-dinov2 command line."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import to_numpy

from keras_dinov2.backbone import DINOv2Backbone
from keras_dinov2.cli import main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def test_help_lists_every_command():
    result = subprocess.run([sys.executable, "-m", "keras_dinov2.cli", "--help"],
                            capture_output=True, text=True, check=True)
    for command in ("pretrain", "evaluate", "export", "convert", "visualize"):
        assert command in result.stdout


def test_commands_that_have_not_landed_say_so(capsys):
    assert main(["pretrain"]) == 2
    assert "not available yet" in capsys.readouterr().err


def test_convert_transformers_folder_to_preset(tmp_path, capsys):
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=28, patch_size=7)
    model = transformers.Dinov2Model(config).eval()
    model.save_pretrained(tmp_path / "hf")
    assert main(["convert", "--from", "transformers", str(tmp_path / "hf"),
                 "--out", str(tmp_path / "preset")]) == 0
    assert "1 blocks" in capsys.readouterr().out
    backbone = DINOv2Backbone.from_preset(str(tmp_path / "preset"))
    images = np.random.default_rng(0).random((1, 28, 28, 3)).astype("float32")
    with torch.no_grad():
        expected = model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    np.testing.assert_allclose(to_numpy(backbone(images)["cls_token"]),
                               expected.pooler_output.numpy(), atol=1e-4)
    with pytest.raises(SystemExit, match="expects a .pth file"):
        main(["convert", "--from", "torch-hub", str(tmp_path / "missing.pth"),
              "--out", str(tmp_path / "x")])
