"""The teacher of a distillation run: a backbone with its heads (our runs, exports with heads) or without."""

import os

from keras_dinov2.backbone import build_backbone
from keras_dinov2.config import SSLConfig
from keras_dinov2.pretrainer import DINOv2Pretrainer
from keras_dinov2.run.checkpoint import load_checkpoint
from keras_dinov2.run.directory import RunDirectory, is_run_directory


def teacher_from_run(run_dir):
    """(teacher backbone, heads, SSLConfig) of a pretraining run directory, from its newest checkpoint.

    The run's own EMA teacher and its teacher heads, as training left them; the centers are not used (DINOv3's
    distillation does not load them either).

    Raises:
        ValueError: `run_dir` has no config.json or no checkpoint.
    """
    run = RunDirectory(run_dir)
    stored = run.read_config()
    checkpoint = run.latest_checkpoint()
    if stored is None or checkpoint is None:
        raise ValueError(f"{run_dir} is not a pretraining run with a checkpoint (config.json and checkpoint-*.npz): "
                         "give a run directory, a preset, a transformers folder or a .pth file as the teacher.")
    config = SSLConfig.from_dict(stored["ssl"])
    model = DINOv2Pretrainer(build_backbone(stored["model"], config, load_weights=False), config)
    model.compile()
    load_checkpoint(model, checkpoint)
    heads = {"dino_head": model.teacher_dino_head, "ibot_head": model.teacher_ibot_head}
    return model.teacher, heads, config


def load_teacher(source):
    """(backbone, heads or None, the teacher's SSLConfig or None) of any teacher source.

    A pretraining run directory gives its EMA teacher with heads (`teacher_from_run`); a preset folder exported
    with heads (`keras-dinov2 export --heads`) gives them too; every other `load_backbone` source (presets,
    transformers folders, torch-hub .pth files, keras-hub presets) gives a head-less backbone, for
    `FeatureDistiller`.

    Example:
    >>> teacher, heads, _ = load_teacher("runs/digits_teacher")
    """
    from keras_dinov2.interop import load_backbone, load_heads
    from keras_dinov2.interop.checks import HEADS_CONFIG_FILE

    path = os.fspath(source)
    if is_run_directory(path):
        return teacher_from_run(path)
    backbone = load_backbone(source)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, HEADS_CONFIG_FILE)):
        return backbone, load_heads(path), None
    return backbone, None, None
