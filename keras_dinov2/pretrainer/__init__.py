"""The training model: student, teacher role, heads and objectives, trained with model.fit."""

from keras_dinov2.pretrainer.distill import DistillationPretrainer
from keras_dinov2.pretrainer.features import FeatureDistiller
from keras_dinov2.pretrainer.heads import StudentParts
from keras_dinov2.pretrainer.model import DINOv2Pretrainer
from keras_dinov2.pretrainer.registry import register_trainer, trainer_module
from keras_dinov2.pretrainer.teacher import EMATeacher, FrozenTeacher, collapse_signals

__all__ = [
    "DINOv2Pretrainer",
    "DistillationPretrainer",
    "EMATeacher",
    "FeatureDistiller",
    "FrozenTeacher",
    "StudentParts",
    "collapse_signals",
    "register_trainer",
    "trainer_module",
]
