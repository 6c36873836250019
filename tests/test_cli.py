"""The keras-dinov2 command line."""

import os
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


def test_evaluate_rejects_a_folder_that_is_no_preset(tmp_path):
    with pytest.raises(SystemExit, match="neither a preset folder"):
        main(["evaluate", "--preset", str(tmp_path)])


def _rows(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_pretrain_writes_a_run_directory_and_resumes_exactly(tmp_path, capsys):
    run = str(tmp_path / "run")
    args = ["pretrain", "--out", run, "--epochs", "2", "--steps-per-epoch", "2",
            "--batch-size", "8", "--verbose", "0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "k-NN top-1 on the held-out digits" in out and "random init" in out
    for name in ("config.json", "metrics.csv", "epochs.csv", "metrics.png",
                 "checkpoint-00002.npz", "teacher_preset/config.json", "knn.json"):
        assert os.path.exists(os.path.join(run, name)), name
    rows = _rows(os.path.join(run, "metrics.csv"))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    assert "knn_top1" in _rows(os.path.join(run, "epochs.csv"))[0]
    DINOv2Backbone.from_preset(os.path.join(run, "teacher_preset"))

    # Lose the last epoch as a kill would, then resume: the redone steps replace the lost ones
    # in metrics.csv, and match them.
    os.remove(os.path.join(run, "checkpoint-00002.npz"))
    assert main(["pretrain", "--out", run, "--resume", "--verbose", "0"]) == 0
    redone = _rows(os.path.join(run, "metrics.csv"))
    assert [int(r["step"]) for r in redone] == [0, 1, 2, 3]
    for first, again in zip(rows[2:4], redone[2:4]):
        np.testing.assert_allclose(float(again["loss"]), float(first["loss"]), rtol=1e-4)
    assert main(["pretrain", "--out", run, "--resume", "--verbose", "0"]) == 0
    assert "already finished" in capsys.readouterr().out

    # The run directory evaluates directly (its teacher_preset/), with the random-init comparison.
    report = str(tmp_path / "eval.json")
    assert main(["evaluate", "--preset", run, "--linear", "--linear-epochs", "2",
                 "--output", report]) == 0
    out = capsys.readouterr().out
    assert "k-NN k=20" in out and "random init" in out and "linear" in out
    import json

    with open(report) as f:
        result = json.load(f)
    assert set(result["knn"]) == {"10", "20", "100", "200"}
    assert result["num_train"] == 1347 and result["num_test"] == 450
    assert 0.0 <= result["linear"]["accuracy"] <= 100.0 and "knn" in result["random_init"]


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
