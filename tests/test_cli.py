"""The keras-dinov2 command line."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import to_numpy

from keras_dinov2.backbone import DINOv2Backbone
from keras_dinov2.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def test_help_lists_every_command_and_the_command_starts_quietly():
    # As a user runs it: no TF_CPP_MIN_LOG_LEVEL of their own (the tests' conftest sets one).
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    result = subprocess.run([sys.executable, "-m", "keras_dinov2.cli", "--help"],
                            capture_output=True, text=True, check=True, env=env)
    for command in ("pretrain", "distill", "curate", "evaluate", "export", "convert", "visualize"):
        assert command in result.stdout
    # TensorFlow's start-up lines (cuda drivers, cuInit, absl) are not shown.
    assert result.stderr == "", result.stderr


def test_startup_quieting_is_for_the_command_line_only(monkeypatch):
    from keras_dinov2 import startup

    monkeypatch.setattr(sys, "argv", ["/usr/bin/keras-dinov2", "pretrain"])
    assert startup.is_command_line()
    monkeypatch.setattr(sys, "argv", ["-m"])
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "keras_dinov2.cli", "pretrain"])
    assert startup.is_command_line()
    monkeypatch.setattr(sys, "argv", ["train.py"])
    monkeypatch.setattr(sys, "orig_argv", ["python", "train.py"])
    assert not startup.is_command_line()
    noise = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1.0 7346 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.",
        "E0000 00:00:1.0 7346 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: UNKNOWN ERROR (303)",
    ]
    assert all(startup.NOISE.search(line) for line in noise)
    assert not startup.NOISE.search("E0000 op_kernel.cc:1] OOM when allocating tensor with shape[4096,4096]")


def run_cli(capsys, argv):
    """(exit status, stderr lines) of `keras-dinov2 argv`, in this process (argparse errors exit)."""
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def assert_short_error(capsys, argv, *words):
    code, lines = run_cli(capsys, argv)
    assert code == 2, (code, lines)
    assert 1 <= len(lines) <= 2, lines
    text = " ".join(lines)
    assert "error" in text
    for word in words:
        assert word in text, (word, text)
    assert "Traceback" not in text


@pytest.mark.parametrize("flags, words", [
    (["--batch-size", "0"], ["--batch-size", ">= 1", "0"]),
    (["--batch-size", "-1"], ["--batch-size", ">= 1", "-1"]),
    (["--batch-size", "many"], ["--batch-size", "'many'"]),
    (["--epochs", "0"], ["--epochs", ">= 1"]),
    (["--steps-per-epoch", "0"], ["--steps-per-epoch", ">= 1"]),
    (["--lr", "-1"], ["--lr", "positive"]),
    (["--lr", "nan"], ["--lr", "positive"]),
    (["--knn-every", "-1"], ["--knn-every", ">= 0"]),
    (["--max-image-pixels", "0"], ["--max-image-pixels", ">= 1"]),
    (["--recipe", "fast"], ["--recipe", "'fast'", "digits"]),
    (["--model", "dinov2_vit_smal14"], ["--model", "'dinov2_vit_smal14'", "did you mean dinov2_vit_small14"]),
    (["--model", "resnet50"], ["--model", "'resnet50'", "architectures", "dinov2_vit_tiny4"]),
])
def test_pretrain_rejects_bad_flags_in_one_or_two_lines(tmp_path, capsys, flags, words):
    assert_short_error(capsys, ["pretrain", "--out", str(tmp_path / "run")] + flags, *words)
    assert not os.path.exists(tmp_path / "run" / "config.json")


def test_xla_flag_compiles_the_step_with_xla_and_is_refused_on_torch(tmp_path, capsys, monkeypatch):
    import keras

    from keras_dinov2.cli.parser import build_parser
    from keras_dinov2.run.session import Session, compile_model, compile_options

    class Model:
        def compile(self, **kwargs):
            self.kwargs = kwargs

    class Single:
        num_replicas = 1

    for flags, expected in (([], {}), (["--xla"], {"jit_compile": True})):
        args = build_parser().parse_args(["pretrain", "--out", str(tmp_path / "run")] + flags)
        if keras.backend.backend() != "torch":
            session = Session("pretrain", None, Single(), None, "digits", None, compile_options=compile_options(args))
            model = Model()
            compile_model(session, model)
            assert model.kwargs == expected
    monkeypatch.setattr(keras.backend, "backend", lambda: "torch")
    with pytest.raises(ValueError, match="--xla.*tensorflow"):
        compile_options(args)
    assert_short_error(capsys, ["pretrain", "--xla", "--out", str(tmp_path / "run")], "--xla", "tensorflow")
    assert not os.path.exists(tmp_path / "run")


def test_pretrain_rejects_missing_empty_and_unknown_data(tmp_path, capsys, monkeypatch):
    run = ["pretrain", "--out", str(tmp_path / "run"), "--batch-size", "2", "--verbose", "0"]
    assert_short_error(capsys, run + ["--data", str(tmp_path / "missing")], "missing", "does not exist")
    (tmp_path / "empty").mkdir()
    assert_short_error(capsys, run + ["--data", str(tmp_path / "empty")], "empty", "holds no images")
    assert_short_error(capsys, run + ["--resume"], "nothing to resume", "drop --resume")


def test_tfds_data_fails_at_once_without_the_network(tmp_path, capsys, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")

    def no_network(*args, **kwargs):
        raise AssertionError("download_and_prepare was called")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_network)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    run = ["pretrain", "--out", str(tmp_path / "run"), "--verbose", "0"]
    assert_short_error(capsys, run + ["--data", "tfds:nonexistent"], "'nonexistent'", "catalog")
    assert_short_error(capsys, run + ["--data", "tfds:mnist"], "'mnist' is not prepared",
                       "tfds build mnist", "TFDS_DATA_DIR")
    # `evaluate --data` resolves its splits through the same check.
    from keras_dinov2.evaluation import labelled_splits

    with pytest.raises(ValueError, match="did you mean mnist"):
        labelled_splits("tfds:mnsit")
    with pytest.raises(ValueError, match="tfds build mnist"):
        labelled_splits("tfds:mnist")


def test_convert_errors_are_one_line(tmp_path, capsys):
    out = ["--out", str(tmp_path / "preset")]
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "folder").mkdir()
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text('{"model_type": "dinov2"}')
    (tmp_path / "bad_json").mkdir()
    (tmp_path / "bad_json" / "config.json").write_text("{")
    cases = [
        (["torch-hub", str(tmp_path / "missing.pth")], ["missing.pth"]),
        (["torch-hub", str(tmp_path / "garbage.pth")], ["garbage.pth"]),
        (["torch-hub", str(tmp_path / "empty.pth")], ["empty.pth"]),
        (["torch-hub", str(tmp_path / "folder")], ["expects a .pth file"]),
        (["transformers", str(tmp_path / "folder")], ["config.json"]),
        (["transformers", str(tmp_path / "missing")], ["expects a folder"]),
        (["transformers", str(tmp_path / "config_only")], ["config_only"]),
        (["transformers", str(tmp_path / "bad_json")], ["bad_json"]),
        (["keras", str(tmp_path / "folder")], ["torch-hub or transformers", "'keras'"]),
    ]
    for source, words in cases:
        assert_short_error(capsys, ["convert", "--from", *source] + out, *words)
    assert not os.path.exists(tmp_path / "preset")


def test_evaluate_and_export_errors_are_one_line(tmp_path, capsys):
    assert_short_error(capsys, ["evaluate", "--preset", str(tmp_path)], "neither a preset folder")
    assert_short_error(capsys, ["evaluate", "--preset", "dinov2_vit_tiny"], "did you mean dinov2_vit_tiny4")
    assert_short_error(capsys, ["evaluate", "--preset", "dinov2_vit_tiny4", "--batch-size", "0"],
                       "--batch-size")
    assert_short_error(capsys, ["evaluate", "--preset", "dinov2_vit_tiny4", "--linear-lrs", "0.1,-1"],
                       "--linear-lrs")
    assert_short_error(capsys, ["export", "--preset", "no_such_model", "--out", str(tmp_path / "x")],
                       "'no_such_model'")
    assert_short_error(capsys, ["export", "--run", str(tmp_path / "no_run"), "--out", str(tmp_path / "x")],
                       "no_run")


# Every log of a pretraining step, as the pretrainer returns them.
STEP_LOGS = {"dino_global": 10.8198, "dino_local": 10.3937, "grad_norm_backbone": 2.3613,
             "grad_norm_dino_head": 2.9283, "ibot": 10.8217, "koleo": -0.123456, "loss": 21.2134,
             "lr": 3.5355e-04, "momentum": 0.9921, "teacher_entropy": 4.1896, "teacher_kl_uniform": 1.3555,
             "teacher_marginal_entropy": 5.5382, "teacher_temp": 0.04, "wd": 0.0412}


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("stream_class", [_Terminal, io.StringIO])
def test_progress_bar_fits_80_columns_with_the_loss_its_parts_and_lr(stream_class):
    from keras_dinov2.run import ProgressBar

    stream = stream_class()
    bar = ProgressBar(stream=stream, columns=80)
    bar.set_params({"verbose": 1, "epochs": 100, "steps": 1000})
    for epoch in range(2):
        bar.on_epoch_begin(epoch)
        for step in range(1000):
            bar.on_train_batch_end(step, dict(STEP_LOGS))
        bar.on_epoch_end(epoch, dict(STEP_LOGS, knn_top1=71.3))
    text = stream.getvalue()
    drawn = [segment for line in text.split("\n") for segment in line.split("\r") if segment.strip()]
    assert all(len(segment) <= 79 for segment in drawn), max(drawn, key=len)
    finals = [line.split("\r")[-1] for line in text.split("\n") if line.split("\r")[-1].startswith("1000/")]
    assert len(finals) == 2
    for final in finals:
        assert final.startswith("1000/1000")
        # At 1000 steps the bar, then a digit, make room for every value.
        for shown in ("loss 21.2", "local 10.4", "global 10.8", "ibot 10.8", "koleo -0.123", "lr 3.5e-4"):
            assert shown in final, final
        for hidden in ("teacher", "grad_norm", "wd", "momentum", "knn"):
            assert hidden not in final
    assert text.count("Epoch ") == 2
    if stream_class is io.StringIO:  # a log file: one line per epoch, no redrawing
        assert "\r" not in text and len(text.splitlines()) == 4
    # With room, 4 digits and the bar.
    wide = ProgressBar(stream=io.StringIO(), columns=120)
    wide.set_params({"verbose": 1, "epochs": 1, "steps": 10})
    wide.on_epoch_begin(0)
    line = wide.line(5, STEP_LOGS)
    assert line.startswith(" 5/10 \u2501") and "loss 21.21 local 10.39" in line and "lr 3.5e-4" in line
    # verbose=0 draws nothing.
    quiet = io.StringIO()
    bar = ProgressBar(stream=quiet, columns=80)
    bar.set_params({"verbose": 0, "epochs": 1, "steps": 3})
    bar.on_epoch_begin(0)
    bar.on_train_batch_end(0, dict(STEP_LOGS))
    bar.on_epoch_end(0, dict(STEP_LOGS))
    assert quiet.getvalue() == ""


def _rows(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _baselines(out):
    """The random-init k-NN (k=20) as printed at the start of a run and in its final table."""
    import re

    start = re.findall(r"k-NN top-1 \(k=20\) of a randomly initialized backbone: ([\d.]+)%", out)
    end = re.findall(r"k=20 +teacher +[\d.]+% +random init +([\d.]+)%", out)
    return [float(v) for v in start], [float(v) for v in end]


def test_pretrain_writes_a_run_directory_and_resumes_exactly(tmp_path, capsys, monkeypatch, recwarn):
    run = str(tmp_path / "run")
    monkeypatch.setenv("COLUMNS", "80")
    args = ["pretrain", "--out", run, "--epochs", "2", "--steps-per-epoch", "2",
            "--batch-size", "8", "--knn-every", "1", "--verbose", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "k-NN top-1 on the held-out digits" in out and "random init" in out
    # The progress lines fit 80 columns and show the loss, its parts and lr; the rest goes to the CSV.
    bars = [line for line in out.splitlines() if line.startswith("2/2 ")]
    assert len(bars) == 2, out
    for line in bars:
        assert len(line) <= 79 and "loss " in line and "ibot " in line and " lr " in line, line
        assert "teacher" not in line and "grad_norm" not in line, line
    # One random-init baseline: the same number at the start and in the final table.
    (start,), (end,) = _baselines(out)
    assert round(start, 1) == end
    assert not [w for w in recwarn if "shuffle" in str(w.message)]  # fit is told the data shuffles itself
    for name in ("config.json", "metrics.csv", "epochs.csv", "metrics.png",
                 "checkpoint-00002.npz", "teacher_preset/config.json", "knn.json"):
        assert os.path.exists(os.path.join(run, name)), name
    rows = _rows(os.path.join(run, "metrics.csv"))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    assert set(rows[0]) >= {"step", "epoch", "loss", "dino_local", "dino_global", "ibot", "koleo", "lr", "wd",
                            "momentum", "teacher_temp", "teacher_entropy", "teacher_kl_uniform",
                            "teacher_marginal_entropy", "grad_norm_backbone", "grad_norm_dino_head"}
    epochs = _rows(os.path.join(run, "epochs.csv"))
    assert "knn_top1" in epochs[0]
    assert {round(float(r["knn_top1_random_init"]), 2) for r in epochs} == {start}
    DINOv2Backbone.from_preset(os.path.join(run, "teacher_preset"))

    # Lose the last epoch as a kill would, then resume: the redone steps replace the lost ones
    # in metrics.csv, and match them.
    os.remove(os.path.join(run, "checkpoint-00002.npz"))
    assert main(["pretrain", "--out", run, "--resume", "--verbose", "0"]) == 0
    assert _baselines(capsys.readouterr().out) == ([start], [end])  # the same baseline after a resume
    redone = _rows(os.path.join(run, "metrics.csv"))
    assert [int(r["step"]) for r in redone] == [0, 1, 2, 3]
    for first, again in zip(rows[2:4], redone[2:4]):
        np.testing.assert_allclose(float(again["loss"]), float(first["loss"]), rtol=1e-4)
    assert main(["pretrain", "--out", run, "--resume", "--verbose", "0"]) == 0
    assert "already finished" in capsys.readouterr().out

    # The run directory evaluates directly (its teacher_preset/), with the random-init comparison.
    report = str(tmp_path / "eval.json")
    assert main(["evaluate", "--preset", run, "--linear", "--linear-epochs", "2", "--linear-lrs", "0.01,1",
                 "--output", report]) == 0
    out = capsys.readouterr().out
    assert "k-NN k=20" in out and "random init" in out and "linear" in out
    import json

    with open(report) as f:
        result = json.load(f)
    assert set(result["knn"]) == {"10", "20", "100", "200"}
    assert result["num_train"] == 1347 and result["num_test"] == 450
    assert 0.0 <= result["linear"]["accuracy"] <= 100.0 and "knn" in result["random_init"]
    assert set(result["linear"]["accuracies"]) == {"0.01", "1.0"}  # --linear-lrs is the probe's grid


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
    assert_short_error(capsys, ["convert", "--from", "torch-hub", str(tmp_path / "missing.pth"),
                                "--out", str(tmp_path / "x")], "expects a .pth file")
