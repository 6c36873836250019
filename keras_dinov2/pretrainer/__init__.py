"""The training model: student, teacher role, heads and objectives, trained with model.fit."""

from keras_dinov2.pretrainer.model import DINOv2Pretrainer
from keras_dinov2.pretrainer.registry import register_trainer, trainer_module
from keras_dinov2.pretrainer.teacher import EMATeacher, collapse_signals

__all__ = ["DINOv2Pretrainer", "EMATeacher", "collapse_signals", "register_trainer", "trainer_module"]
