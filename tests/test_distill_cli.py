"""`keras-dinov2 distill`: the run directory, k-NN of teacher / student / EMA student, resume on the same
trajectory, the exported EMA students, both modes, and bad input refused before anything trains."""

import csv
import dataclasses
import json
import os
import shutil

import keras
import numpy as np
import pytest
from conftest import to_numpy

from keras_dinov2.backbone import DINOv2Backbone, build_backbone
from keras_dinov2.cli import main
from keras_dinov2.config import SSLConfig
from keras_dinov2.pretrainer import DINOv2Pretrainer
from keras_dinov2.run import RunDirectory, save_checkpoint

FAST = ["--steps-per-epoch", "2", "--batch-size", "8"]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _weights(backbone):
    return [to_numpy(w).copy() for w in backbone.weights]


def _teacher_config():
    """The digits recipe with small heads (the students copy the teacher's head sizes)."""
    config = SSLConfig.recipe("digits")
    heads = dataclasses.replace(config.heads, num_prototypes=64, hidden_dim=32, bottleneck_dim=16,
                                ibot_num_prototypes=64, ibot_bottleneck_dim=16)
    return dataclasses.replace(config, heads=heads)


def write_teacher_run(path, seed=0):
    """A pretraining run directory as `pretrain` leaves it (config.json, one checkpoint), with a random teacher."""
    config = _teacher_config()
    keras.utils.set_random_seed(seed)
    model = DINOv2Pretrainer(build_backbone("dinov2_vit_tiny4", config), config)
    model.compile()
    model.optimizer.build(model.trainable_variables)
    run = RunDirectory(str(path))
    run.create()
    with open(run.config_path, "w") as f:
        json.dump({"command": "pretrain", "ssl": config.to_dict(), "model": "dinov2_vit_tiny4", "data": "digits",
                   "recipe": "digits"}, f)
    save_checkpoint(model, run.checkpoint_path(1), {"epoch": 1})
    return run.path, model


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    return write_teacher_run(tmp_path_factory.mktemp("teacher") / "run")


def test_distill_run_resumes_on_the_same_trajectory_and_exports_the_ema_student(teacher_run, tmp_path, capsys):
    teacher_dir, teacher_model = teacher_run
    run = str(tmp_path / "student")
    assert main(["distill", "--teacher", teacher_dir, "--out", run, "--epochs", "2", "--knn-every", "2",
                 "--verbose", "0"] + FAST) == 0
    out = capsys.readouterr().out
    assert "heads mode" in out and "k-NN top-1 (k=20) of the teacher" in out
    for name in ("config.json", "metrics.csv", "epochs.csv", "metrics.png", "checkpoint-00002.npz",
                 "student_preset/config.json", "knn.json"):
        assert os.path.exists(os.path.join(run, name)), name
    with open(os.path.join(run, "config.json")) as f:
        stored = json.load(f)
    assert (stored["command"], stored["teacher"], stored["students"], stored["mode"]) == (
        "distill", teacher_dir, ["dinov2_vit_micro4"], "heads")
    # The distillation recipe: the teacher's heads and targets, students without stochastic depth.
    config = SSLConfig.from_dict(stored["ssl"])
    assert config.heads == _teacher_config().heads and config.model.drop_path_rate == 0.0
    epochs = _rows(os.path.join(run, "epochs.csv"))
    assert len(epochs) == 2 and epochs[0]["knn_top1_student"] == ""  # every 2 epochs: not after the first
    for column in ("knn_top1_teacher", "knn_top1_student", "knn_top1_ema_student"):
        assert 0.0 <= float(epochs[-1][column]) <= 100.0, column
    with open(os.path.join(run, "knn.json")) as f:
        knn = json.load(f)
    assert float(epochs[-1]["knn_top1_teacher"]) == pytest.approx(knn["teacher"]["20"])
    assert float(epochs[-1]["knn_top1_ema_student"]) == pytest.approx(knn["students"][0]["ema_student"]["20"])
    student = DINOv2Backbone.from_preset(os.path.join(run, "student_preset"))
    assert student.count_params() == 89_424
    final = _weights(student)
    rows = _rows(os.path.join(run, "metrics.csv"))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]

    # Lose the last epoch as a kill would, then resume: the redone steps and the final EMA student match.
    os.remove(os.path.join(run, "checkpoint-00002.npz"))
    shutil.rmtree(os.path.join(run, "student_preset"))
    # (No k-NN this time: the monitors' compiles are the slow part of this test, and the trajectory is the point.)
    assert main(["distill", "--out", run, "--resume", "--knn-every", "0", "--verbose", "0"]) == 0
    redone = _rows(os.path.join(run, "metrics.csv"))
    assert [int(r["step"]) for r in redone] == [0, 1, 2, 3]
    for first, again in zip(rows[2:], redone[2:]):
        for key in ("loss", "dino_local", "dino_global", "ibot", "koleo"):
            np.testing.assert_allclose(float(again[key]), float(first[key]), rtol=1e-4, err_msg=key)
    resumed = _weights(DINOv2Backbone.from_preset(os.path.join(run, "student_preset")))
    for a, b in zip(resumed, final):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

    # `export --run` of a distillation run exports its EMA student from the newest checkpoint.
    exported = str(tmp_path / "export")
    assert main(["export", "--run", run, "--out", exported]) == 0
    assert "EMA student dinov2_vit_micro4" in capsys.readouterr().out
    for a, b in zip(_weights(DINOv2Backbone.from_preset(exported)), resumed):
        np.testing.assert_array_equal(a, b)
    with open(os.path.join(exported, "README.md")) as f:
        assert "distilled from the teacher" in f.read()
    # The teacher did not move.
    from keras_dinov2.run import load_teacher

    teacher, _, _ = load_teacher(teacher_dir)
    for a, b in zip(teacher.weights, teacher_model.teacher.weights):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


@pytest.mark.skipif(keras.backend.backend() == "jax",
                    reason="features mode trains on jax in test_distill.py; the jax job is CI's longest")
def test_distill_features_from_a_transformers_folder_into_two_students(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    folder = str(tmp_path / "hf_teacher")
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=24,
                                       patch_size=4, intermediate_size=64)
    transformers.Dinov2Model(config).eval().save_pretrained(folder)
    run = str(tmp_path / "students")
    assert main(["distill", "--teacher", folder, "--students", "dinov2_vit_micro4,dinov2_vit_micro4",
                 "--out", run, "--epochs", "1", "--knn-every", "0", "--verbose", "0"] + FAST) == 0
    assert "features mode" in capsys.readouterr().out
    with open(os.path.join(run, "config.json")) as f:
        stored = json.load(f)
    assert (stored["mode"], stored["feature_loss"]) == ("features", "cosine")
    rows = _rows(os.path.join(run, "metrics.csv"))
    for column in ("student_0/loss", "student_1/loss", "student_0/cls", "student_1/patch"):
        assert np.isfinite(float(rows[-1][column])), column
    np.testing.assert_allclose(float(rows[-1]["loss"]),
                               float(rows[-1]["student_0/loss"]) + float(rows[-1]["student_1/loss"]), rtol=1e-5)
    first = _weights(DINOv2Backbone.from_preset(os.path.join(run, "student_0_preset")))
    second = _weights(DINOv2Backbone.from_preset(os.path.join(run, "student_1_preset")))
    assert any(not np.array_equal(a, b) for a, b in zip(first, second))  # two students, drawn apart
    exported = str(tmp_path / "second")
    assert main(["export", "--run", run, "--student-index", "1", "--out", exported]) == 0
    for a, b in zip(_weights(DINOv2Backbone.from_preset(exported)), second):
        np.testing.assert_array_equal(a, b)


def _error(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.once
def test_distill_refuses_bad_input_before_training(teacher_run, tmp_path, capsys):
    teacher_dir, teacher_model = teacher_run
    headless = str(tmp_path / "headless")
    teacher_model.teacher.save_to_preset(headless)
    out = str(tmp_path / "out")
    _error(capsys, ["distill", "--out", out], "--teacher is required")
    _error(capsys, ["distill", "--teacher", headless, "--mode", "heads", "--out", out],
           "--mode heads needs a teacher with DINO/iBOT heads", "--mode features")
    _error(capsys, ["distill", "--teacher", teacher_dir, "--students", "dinov2_vit_micro4,,dinov2_vit_micro4",
                    "--out", out], "empty name")
    _error(capsys, ["distill", "--teacher", teacher_dir, "--student", "no_such_arch", "--out", out], "--student")
    _error(capsys, ["distill", "--teacher", teacher_dir, "--data", str(tmp_path), "--out", out],
           "--student ARCH")
    # A student whose patch size differs from the teacher's cannot learn its iBOT targets (patch positions).
    _error(capsys, ["distill", "--teacher", teacher_dir, "--student", "dinov2_vit_small14", "--out", out],
           "patch")
    assert not os.path.exists(os.path.join(out, "metrics.csv"))  # nothing trained
    # Resuming: a pretraining run is not a distillation run, and a distillation run keeps its teacher.
    _error(capsys, ["distill", "--out", teacher_dir, "--resume"], "keras-dinov2 pretrain --out")
    run = RunDirectory(str(tmp_path / "distilled"))
    run.create()
    with open(run.config_path, "w") as f:
        json.dump({"command": "distill", "ssl": _teacher_config().to_dict(), "teacher": teacher_dir,
                   "students": ["dinov2_vit_micro4"], "mode": "heads", "feature_loss": "cosine",
                   "data": "digits", "recipe": "digits"}, f)
    _error(capsys, ["distill", "--out", run.path, "--resume", "--teacher", headless], "--resume cannot change",
           "--teacher")
    _error(capsys, ["distill", "--out", run.path, "--resume", "--mode", "features"], "--mode")
    _error(capsys, ["distill", "--out", run.path, "--resume"], "no checkpoint")


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the data-parallel run uses JAX's virtual CPU devices")
def test_distill_runs_data_parallel_on_two_devices(teacher_run, tmp_path):
    """The distribution engines carry distillation unchanged: two replicas, one teacher pass per replica's shard."""
    import subprocess
    import sys

    teacher_dir, _ = teacher_run
    run = str(tmp_path / "parallel")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"}
    out = subprocess.run([sys.executable, "-m", "keras_dinov2.cli", "distill", "--teacher", teacher_dir, "--out", run,
                          "--epochs", "1", "--knn-every", "0", "--verbose", "0", "--distribution", "data"] + FAST,
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "batch 8 per replica x 2 replicas" in out.stdout, out.stdout
    rows = _rows(os.path.join(run, "metrics.csv"))
    assert len(rows) == 2 and all(np.isfinite(float(r["loss"])) for r in rows)
    assert DINOv2Backbone.from_preset(os.path.join(run, "student_preset")).count_params() == 89_424
