"""The examples run end to end in their reduced (--quick) form, each in a fresh Python process."""

import importlib.util
import os
import re
import subprocess
import sys

import keras
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def run_example(name, *args, cwd=None, timeout=600):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)  # KERAS_BACKEND is inherited
    result = subprocess.run([sys.executable, os.path.join(EXAMPLES, name), *args], capture_output=True,
                            text=True, env=env, cwd=cwd, timeout=timeout)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def percentages(pattern, text):
    found = re.findall(pattern, text)
    assert found, f"no line matching {pattern!r} in:\n{text}"
    values = [float(v) for group in found for v in (group if isinstance(group, tuple) else (group,))]
    assert all(0.0 <= v <= 100.0 for v in values), values
    return values


@pytest.mark.parametrize("name", ["downstream_classifier", "dense_features", "pretrain_folder"])
def test_examples_explain_themselves(name, capsys):
    # In-process: --help only parses arguments, and a fresh interpreter would spend its time importing.
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--quick" in help_text and "usage:" in help_text


def test_downstream_classifier_quick():
    out = run_example("downstream_classifier.py", "--quick")
    assert "WARNING: no --preset given" in out
    percentages(r"Linear probe \(frozen backbone, 1 epochs\): test accuracy ([\d.]+)%", out)
    percentages(r"Fine-tuned \(layer-wise lr decay, 1 epochs\): test accuracy ([\d.]+)%", out)
    # The multipliers follow lr * decay ** (L + 1 - layer id): embeddings 0.75 ** 5, the classifier 1.
    assert "embeddings x0.237" in out and "block_3 x0.75" in out and "classifier x1" in out


def test_dense_features_quick(tmp_path):
    png = tmp_path / "dense.png"
    out = run_example("dense_features.py", "--quick", "--out", str(png))
    accuracy, iou = percentages(
        r"probe on patch tokens: held-out per-patch accuracy ([\d.]+)%, coin IoU ([\d.]+)%", out)
    # Coins are bright on a dark background: even random patch tokens separate them linearly.
    assert accuracy > 75.0 and iou > 50.0
    percentages(r"Flip matching on astronaut \(12 x 12 patches\): ([\d.]+)%", out)
    with Image.open(png) as picture:
        assert picture.size[0] > 0 and picture.size[1] > 0


# Pretraining compiles the full DINOv2 step; even at 2 steps that takes minutes under JAX and TensorFlow's
# graph mode on a 2-core CPU, so the quick run of this example is checked on the torch backend only (the
# pretrain command itself is tested on every backend in test_cli.py).
@pytest.mark.skipif(keras.backend.backend() != "torch",
                    reason="the pretrain example runs on the torch backend only (compile time of the step)")
def test_pretrain_folder_quick(tmp_path):
    run = tmp_path / "run"
    out = run_example("pretrain_folder.py", "--quick", "--out", str(run))
    assert "Wrote 300 digit images as PNG files" in out
    assert os.path.isfile(run / "teacher_preset" / "config.json")
    # 30 images per class, a stratified 25% held out: 75 queries.
    percentages(r"k-NN top-1 \(k=20\) of the pretrained teacher on 75 held-out images: ([\d.]+)%", out)
    if "export is not available in this version yet" not in out:
        assert "keras_hub.models.Backbone.from_preset loads it as DINOV2Backbone" in out
        assert os.path.isfile(run / "export_keras_hub" / "config.json")
    assert "Done in" in out
