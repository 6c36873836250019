"""Resumed runs: which flags may change a run, how the change is recorded, and the cleanup of a killed run."""

import csv
import json
import os
import shutil
import types

import numpy as np
import pytest

from keras_dinov2.cli import main
from keras_dinov2.config import SSLConfig
from keras_dinov2.run import RunDirectory, TrainingMonitor, data_position, resumed_config
from keras_dinov2.schedules import dinov2_schedules

# Resume bookkeeping is backend-independent (tests/test_cli.py resumes exactly on every backend).
pytestmark = pytest.mark.once

# A folder of 18 random images at the digits recipe's sizes: no k-NN passes, so a run is its compile and
# a few steps. Batches of 4 run across passes of 18 images: epoch 3 starts at image 16 of pass 0.
RUN = ["--model", "dinov2_vit_tiny4", "--recipe", "digits", "--steps-per-epoch", "2", "--batch-size", "4",
       "--verbose", "0"]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _config(run):
    with open(os.path.join(run, "config.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished run of 3 epochs x 2 steps on the folder; tests copy it."""
    from PIL import Image

    root = tmp_path_factory.mktemp("resume")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(18):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
    run = str(root / "run")
    assert main(["pretrain", "--data", str(images), "--out", run, "--epochs", "3"] + RUN) == 0
    return run


def _copy(run, tmp_path):
    copy = str(tmp_path / "run")
    shutil.copytree(run, copy)
    return copy


def test_resume_extends_a_finished_run_with_new_epochs_and_lr(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    before = _config(run)
    assert before["ssl"]["optim"]["epochs"] == 3 and before["ssl"]["optim"]["base_lr"] == 0.004

    assert main(["pretrain", "--out", run, "--resume", "--epochs", "4", "--lr", "1e-4",
                 "--verbose", "0"]) == 0
    assert "--lr 0.004 -> 0.0001" in capsys.readouterr().out
    assert os.path.exists(os.path.join(run, "checkpoint-00004.npz"))
    rows = _rows(os.path.join(run, "metrics.csv"))
    assert [int(r["step"]) for r in rows] == list(range(8))
    # The extra epoch runs on the new schedules: 8 steps in all, peak lr from the new base lr.
    optim = before["ssl"]["optim"]
    schedule = dinov2_schedules(total_steps=8, steps_per_epoch=2, global_batch_size=4, base_lr=1e-4,
                                min_lr=optim["min_lr"], warmup_epochs=optim["warmup_epochs"]).learning_rate
    old = dinov2_schedules(total_steps=8, steps_per_epoch=2, global_batch_size=4, base_lr=0.004,
                           min_lr=optim["min_lr"], warmup_epochs=optim["warmup_epochs"]).learning_rate
    for row in rows[6:]:
        step = int(row["step"])
        np.testing.assert_allclose(float(row["lr"]), schedule.value_at(step), rtol=1e-5)
        assert abs(float(row["lr"]) - old.value_at(step)) > 1e-5

    after = _config(run)
    assert after["ssl"]["optim"]["epochs"] == 4 and after["ssl"]["optim"]["base_lr"] == 1e-4
    record = after["resumes"][-1]
    assert record["changes"] == {"optim.base_lr": [0.004, 1e-4], "optim.epochs": [3, 4]}
    assert (record["epoch"], record["step"], record["checkpoint"]) == (3, 6, "checkpoint-00003.npz")
    # The rest of the config is the run's.
    assert {**after["ssl"], "optim": None} == {**before["ssl"], "optim": None}


def test_resume_reads_a_run_directory_written_before_model_config(finished_run, tmp_path, capsys):
    """Runs written before `SSLConfig.model` kept the model settings under "optim" and the patch size
    under "data" / "masking" (tests/fixtures/config_json holds such a file); they resume, and the
    resumed run stores today's layout."""
    run = _copy(finished_run, tmp_path)
    today = _config(run)
    old = json.loads(json.dumps(today))
    model = old["ssl"].pop("model")
    old["ssl"]["data"]["masking"]["patch_size"] = model.pop("patch_size")
    old["ssl"]["optim"].update(model)
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump(old, f)

    assert main(["pretrain", "--out", run, "--resume", "--epochs", "4", "--verbose", "0"]) == 0
    assert "Resuming" in capsys.readouterr().out
    assert os.path.exists(os.path.join(run, "checkpoint-00004.npz"))
    assert [int(r["step"]) for r in _rows(os.path.join(run, "metrics.csv"))] == list(range(8))
    after = _config(run)
    assert after["resumes"][-1]["changes"] == {"optim.epochs": [3, 4]}
    today["ssl"]["optim"]["epochs"] = 4
    assert after["ssl"] == today["ssl"]


def test_resume_refuses_flags_that_fix_the_run(finished_run, capsys):
    with open(os.path.join(finished_run, "config.json"), "rb") as f:
        stored = f.read()
    code = main(["pretrain", "--out", finished_run, "--resume", "--seed", "3", "--steps-per-epoch", "5",
                 "--lr", "1e-4", "--verbose", "0"])
    assert code == 2
    error = capsys.readouterr().err
    assert "--seed 3 (the run has 0)" in error and "--steps-per-epoch 5 (the run has 2)" in error
    assert "--lr" in error  # named among what may change
    with open(os.path.join(finished_run, "config.json"), "rb") as f:
        assert f.read() == stored  # nothing applied, nothing recorded


def test_resume_cuts_the_logs_back_to_the_checkpoint_and_removes_temporary_files(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    # Killed during epoch 3: its steps are logged, its checkpoint is not written (a temporary file
    # is left), and the kill cut a CSV line short.
    os.remove(os.path.join(run, "checkpoint-00003.npz"))
    original = _rows(os.path.join(run, "metrics.csv"))
    with open(os.path.join(run, "metrics.csv"), "a") as f:
        f.write("6,2,0.25")
    for name in (".checkpoint-00003.npz.tmp", "epochs.csv.tmp"):
        with open(os.path.join(run, name), "wb") as f:
            f.write(b"partial")

    assert main(["pretrain", "--out", run, "--resume", "--verbose", "0"]) == 0
    rows = _rows(os.path.join(run, "metrics.csv"))
    assert [int(r["step"]) for r in rows] == list(range(6))
    assert [int(r["epoch"]) for r in _rows(os.path.join(run, "epochs.csv"))] == [1, 2, 3]
    # The redone steps are the lost ones, from image 16 of the first pass on: the first batch holds
    # images of both passes.
    for first, again in zip(original[4:], rows[4:]):
        np.testing.assert_allclose(float(again["loss"]), float(first["loss"]), rtol=1e-4)
    assert not [n for n in os.listdir(run) if n.endswith(".tmp")]
    assert _config(run)["resumes"][-1]["changes"] == {}


def test_resume_with_a_new_batch_size_warns_and_records_it(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    os.remove(os.path.join(run, "checkpoint-00003.npz"))
    assert main(["pretrain", "--out", run, "--resume", "--batch-size", "8", "--verbose", "0"]) == 0
    assert "warning: --batch-size 8 changes the run's batch from 4" in capsys.readouterr().err
    config = _config(run)
    assert config["ssl"]["batch_size"] == 8
    assert config["resumes"][-1]["changes"] == {"batch_size": [4, 8]}
    with np.load(os.path.join(run, "checkpoint-00003.npz")) as data:
        start = json.loads(str(data["__metadata__"]))["data_start"]
    # Epochs 1-2 read 4 batches of 4 images: the new session started at image 16.
    assert start == {"images": 16, "epoch": 2, "batch_size": 8}


def test_data_position_counts_images_across_passes():
    # Checkpoints written before the start was recorded: one batch size throughout. The default digits run
    # reads 21 x 64 = 1,344 of the 1,347 training images per epoch: after 5 epochs it is inside pass 4.
    assert data_position({}, epoch=5, micro_steps=21, batch_size=64, pass_images=1347) == (4, 1332)
    start = {"images": 16, "epoch": 2, "batch_size": 8}
    assert data_position({"data_start": start}, 3, 2, 4, 18) == (1, 14)
    assert data_position({"data_start": start}, 2, 2, 4, 18) == (0, 16)


def test_nan_message_names_the_runs_global_step(capsys):
    monitor = TrainingMonitor(initial_step=40, resume_hint="keras-dinov2 pretrain --resume --lr 0.001")
    monitor.set_model(types.SimpleNamespace(stop_training=False))
    monitor.on_train_batch_end(0, {"loss": 1.0})
    monitor.on_train_batch_end(1, {"loss": float("nan")})
    out = capsys.readouterr().out
    assert "at step 41" in out and "--resume --lr 0.001" in out
    assert monitor.stopped_for_nan and monitor.model.stop_training


def test_trim_run_logs_keeps_rows_before_the_checkpoint(tmp_path):
    with open(tmp_path / "metrics.csv", "w") as f:
        f.write("step,epoch,loss\n0,0,1\n1,0,2\n2,1,3\n3,1")
    with open(tmp_path / "epochs.csv", "w") as f:
        f.write("epoch,step,knn_top1\n1,2,50\n2,4,\n")
    assert RunDirectory(tmp_path).trim_logs(step=2, epoch=1) == {"metrics.csv": 2, "epochs.csv": 1}
    assert [r["step"] for r in _rows(tmp_path / "metrics.csv")] == ["0", "1"]
    assert [r["epoch"] for r in _rows(tmp_path / "epochs.csv")] == ["1"]
    assert RunDirectory(tmp_path).trim_logs(step=2, epoch=1) == {}


def test_stored_config_round_trips_through_the_resume_check():
    # A resume with no flags changes nothing: the stored config comes back as it was.
    stored = {"ssl": SSLConfig.recipe("digits").to_dict(), "model": "dinov2_vit_tiny4", "data": "digits",
              "recipe": "digits"}
    args = types.SimpleNamespace(data=None, model=None, recipe=None, steps_per_epoch=None, accumulation=None,
                                 seed=None, lr=None, weight_decay=None, weight_decay_end=None, epochs=None,
                                 batch_size=None)
    config, changes = resumed_config(args, stored, "runs/x")
    assert changes == {} and config.to_dict() == stored["ssl"]
    args.recipe, args.data = "digits", "digits"  # the run's own values are no change
    assert resumed_config(args, stored, "runs/x")[1] == {}


def test_stream_resumed_at_an_image_continues_across_the_pass_boundary():
    from keras_dinov2.data import multicrop_dataset

    images = np.random.default_rng(0).integers(0, 256, (18, 32, 32, 3)).astype("uint8")
    config = SSLConfig.recipe("digits")

    def stream(**kwargs):
        return multicrop_dataset(images, 4, config, seed=3, repeat=True, **kwargs)

    uninterrupted = [b["local_crops"].numpy() for b, _ in zip(stream(), range(5))]
    # Batch 4 holds images 16-17 of pass 0 and 0-1 of pass 1: a resume at a pass boundary misses it.
    resumed = next(iter(stream(skip_images=16)))["local_crops"].numpy()
    np.testing.assert_array_equal(resumed, uninterrupted[4])
    assert not np.array_equal(next(iter(stream(start_epoch=1)))["local_crops"].numpy(), uninterrupted[4])
    with pytest.raises(ValueError, match="skip_images"):
        multicrop_dataset(images, 4, config, skip_images=2)
