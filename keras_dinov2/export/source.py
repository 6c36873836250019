"""What an export starts from: a run directory's latest checkpoint, or a preset.

From a run directory the exported network is the EMA teacher, as the reference releases its
teacher (the student is the network being optimized; the teacher averages it and gives the
better features). The run is rebuilt from its config.json exactly as `keras-dinov2 pretrain`
built it, the newest complete checkpoint is restored into it (every variable path and shape
checked), and the teacher backbone, the teacher heads and the centers are taken from it. From a
distillation run it is an EMA student (the model distillation trains for release).
"""

import csv
import dataclasses
import os
import warnings

import keras
import numpy as np

from keras_dinov2.backbone import DINOv2Backbone, build_backbone
from keras_dinov2.config import IMAGENET_MEAN, IMAGENET_STD, SSLConfig
from keras_dinov2.interop import load_backbone, read_json


@dataclasses.dataclass
class ExportSource:
    """A backbone to export and what is known about where it came from.

    Attributes:
        backbone: DINOv2Backbone, float32, no stochastic depth, trainable.
        heads: optional dict with "dino_head", "ibot_head" (None when tied), "dino_center",
            "ibot_center" (from a run's teacher).
        info: dict for the model card (source kind and path, model, data, recipe, epoch,
            steps, backend, k-NN accuracy, ...).
        mean: (3,) normalization mean of RGB values in [0, 1].
        std: (3,) normalization standard deviation.
    """

    backbone: object
    heads: dict | None = None
    info: dict = dataclasses.field(default_factory=dict)
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD


def clean_backbone(backbone):
    """A float32, trainable copy of `backbone` without stochastic depth, named "dinov2_backbone"."""
    config = {**backbone.get_config(), "drop_path_rate": 0.0, "name": "dinov2_backbone",
              "trainable": True, "dtype": "float32"}
    copy = DINOv2Backbone.from_config(config)
    if [tuple(v.shape) for v in copy.weights] != [tuple(v.shape) for v in backbone.weights]:
        raise ValueError(f"Could not copy the backbone {backbone.name!r}: its variables do not "
                         "match a backbone built from its own config.")
    for target, variable in zip(copy.weights, backbone.weights):
        target.assign(np.asarray(keras.ops.convert_to_numpy(variable), dtype="float32"))
    return copy


def load_preset_source(preset):
    """An ExportSource for a preset (no heads, no run information).

    Example:
    >>> source = load_preset_source("runs/latest/teacher_preset")
    """
    backbone = clean_backbone(load_backbone(preset))
    return ExportSource(backbone=backbone, info={"kind": "preset", "path": str(preset)})


def _knn(run_dir):
    """The run's k-NN accuracy: knn.json (final, every k) or the last epochs.csv k-NN value."""
    path = os.path.join(run_dir, "knn.json")
    if os.path.exists(path):
        stored = read_json(path)
        return {"source": "knn.json", "teacher": stored.get("teacher", {}),
                "random_init": stored.get("random_init", {})}
    path = os.path.join(run_dir, "epochs.csv")
    if os.path.exists(path):
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("knn_top1") not in (None, "")]
        if rows:
            last = rows[-1]
            out = {"source": "epochs.csv", "epoch": int(float(last["epoch"])),
                   "teacher": {"20": float(last["knn_top1"])}}
            if last.get("knn_top1_random_init") not in (None, ""):
                out["random_init"] = {"20": float(last["knn_top1_random_init"])}
            return out
    return None


def _load_distillation_run(run_dir, stored, student):
    """An ExportSource for EMA student `student` of a distillation run (its newest checkpoint, else its final
    preset)."""
    from keras_dinov2.run.directory import RunDirectory
    from keras_dinov2.run.distillation import distiller_from_run, preset_path

    names = stored.get("students") or []
    if not 0 <= student < len(names):
        raise ValueError(f"--student-index {student} does not exist: {run_dir} distilled {len(names)} student(s) "
                         f"({', '.join(names)}), numbered from 0.")
    ssl = SSLConfig.from_dict(stored["ssl"])
    aug = ssl.data.augmentation
    info = {"kind": "distillation", "path": str(run_dir), "model": names[student], "teacher": stored.get("teacher"),
            "mode": stored.get("mode"), "data": stored.get("data"), "backend": stored.get("backend"),
            "ssl": ssl.to_dict(), "knn": _student_knn(run_dir, student, len(names))}
    run = RunDirectory(run_dir)
    if run.latest_checkpoint() is None:
        preset = preset_path(run, student, len(names))
        if not os.path.isdir(preset):
            raise ValueError(f"{run_dir} holds no checkpoint-*.npz and no {os.path.basename(preset)}/: nothing to "
                             "export yet.")
        return ExportSource(clean_backbone(load_backbone(preset)), None, {**info, "checkpoint": None},
                            aug.mean, aug.std)
    model, _, metadata = distiller_from_run(run_dir)
    info.update({"checkpoint": os.path.basename(run.latest_checkpoint()), "epoch": metadata.get("epoch"),
                 "steps": int(keras.ops.convert_to_numpy(model.optimizer.iterations))})
    return ExportSource(clean_backbone(model.ema_students[student]), None, info, aug.mean, aug.std)


def _student_knn(run_dir, student, count):
    """The EMA student's k-NN of a distillation run: knn.json (final) or the last epochs.csv value."""
    path = os.path.join(run_dir, "knn.json")
    if os.path.exists(path):
        stored = read_json(path)
        students = stored.get("students") or []
        if student < len(students) and students[student].get("ema_student"):
            return {"source": "knn.json", "student": students[student]["ema_student"],
                    "teacher": stored.get("teacher", {})}
    column = "knn_top1_ema_student" + ("" if count == 1 else f"_{student}")
    path = os.path.join(run_dir, "epochs.csv")
    if os.path.exists(path):
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get(column) not in (None, "")]
        if rows:
            last = rows[-1]
            out = {"source": "epochs.csv", "epoch": int(float(last["epoch"])), "student": {"20": float(last[column])}}
            if last.get("knn_top1_teacher") not in (None, ""):
                out["teacher"] = {"20": float(last["knn_top1_teacher"])}
            return out
    return None


def load_run(run_dir, student=0):
    """An ExportSource for the teacher of a run directory's newest checkpoint.

    Reads `config.json` (recipe, model, data), rebuilds the DINOv2Pretrainer as the run did,
    restores the newest `checkpoint-*.npz`, and takes the teacher backbone, the teacher's
    DINO (and untied iBOT) head and the centers. A run directory without a checkpoint but
    with a finished `teacher_preset/` exports that preset (without heads).

    A distillation run (`keras-dinov2 distill`) exports the EMA backbone of student `student`
    (0 for the first), without heads: rebuilt with its teacher from the newest checkpoint, or,
    without one, its final preset.

    Raises:
        ValueError: naming what is missing or does not fit.

    Example:
    >>> source = load_run("runs/latest")
    >>> source.info["steps"]
    """
    from keras_dinov2.pretrainer import DINOv2Pretrainer
    from keras_dinov2.run import latest_checkpoint, load_checkpoint

    if not os.path.isdir(run_dir):
        raise ValueError(f"{run_dir!r} is not a run directory (not a folder).")
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.exists(config_path):
        raise ValueError(f"{config_path} is missing: a run directory written by "
                         "`keras-dinov2 pretrain` holds config.json.")
    stored = read_json(config_path)
    if stored.get("command") == "distill":
        return _load_distillation_run(run_dir, stored, int(student))
    for key in ("ssl", "model"):
        if key not in stored:
            raise ValueError(f"{config_path} has no {key!r} entry: not a keras-dinov2 run.")
    ssl = SSLConfig.from_dict(stored["ssl"])
    aug = ssl.data.augmentation
    info = {"kind": "run", "path": str(run_dir), "model": stored["model"],
            "data": stored.get("data"), "backend": stored.get("backend"), "ssl": ssl.to_dict(),
            "knn": _knn(run_dir)}
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        preset = os.path.join(run_dir, "teacher_preset")
        if not os.path.isdir(preset):
            raise ValueError(f"{run_dir} holds no checkpoint-*.npz and no teacher_preset/: "
                             "nothing to export yet.")
        warnings.warn(f"{run_dir} holds no checkpoint; exporting {preset} without heads.",
                      stacklevel=2)
        backbone = clean_backbone(load_backbone(preset))
        return ExportSource(backbone, None, {**info, "checkpoint": None}, aug.mean, aug.std)

    # The student exactly as `keras-dinov2 pretrain` built it; its weights come from the checkpoint.
    student = build_backbone(stored["model"], ssl, load_weights=False)
    model = DINOv2Pretrainer(student, ssl, steps_per_epoch=ssl.optim.steps_per_epoch)
    model.compile()
    try:
        metadata = load_checkpoint(model, checkpoint)
    except ValueError as error:
        raise ValueError(f"Could not restore {checkpoint} into the run described by "
                         f"{config_path}: {error}") from error
    info.update({
        "checkpoint": os.path.basename(checkpoint),
        "epoch": metadata.get("epoch"),
        "steps": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
    })
    separate = model.teacher_ibot_head is not model.teacher_dino_head
    heads = {
        "dino_head": model.teacher_dino_head,
        "ibot_head": model.teacher_ibot_head if separate else None,
        "dino_center": np.asarray(keras.ops.convert_to_numpy(model.dino_center)),
        "ibot_center": np.asarray(keras.ops.convert_to_numpy(model.ibot_center)),
    }
    return ExportSource(clean_backbone(model.teacher), heads, info, aug.mean, aug.std)
