"""The teacher role of self-distillation, and the diagnostics of its targets.

`EMATeacher` is DINOv2's teacher: a copy of the student's parts (backbone and heads) that never trains and follows
the student by an exponential moving average after each update. The pretrainer only asks the role for its parts'
forward passes (through the attributes it was built with) and calls `update(momentum)` after each step, so another
role (a frozen external model, for distillation) can take its place.
"""

import math

from keras import ops

from keras_dinov2 import losses
from keras_dinov2.losses.checks import check_center, static_shape
from keras_dinov2.losses.replicas import SINGLE_DEVICE
from keras_dinov2.ops import ema_update
from keras_dinov2.ops.eager import center_targets, collapse_entropies


class EMATeacher:
    """Teacher parts that start as exact copies of the student's and follow them by EMA.

    Args:
        pairs: list of (student_part, teacher_part) layers with the same trainable weights in the same order. The
            teacher parts' weights are set to the student's and the teacher parts are made non-trainable.
    """

    def __init__(self, pairs):
        self.pairs = []
        for student_part, teacher_part in pairs:
            for s, t in zip(student_part.trainable_weights, teacher_part.trainable_weights):
                t.assign(ops.copy(s))
                self.pairs.append((s, t))
        for _, teacher_part in pairs:
            teacher_part.trainable = False

    def update(self, momentum):
        """teacher = m * teacher + (1 - m) * student, for every weight pair (after the step).

        On a mixed_float16 step whose gradients overflow, the student does not move but the teacher still takes
        this step, as the reference's GradScaler step does. On PyTorch in multi-tensor kernels (`ema_update`).
        """
        ema_update([t for _, t in self.pairs], [s for s, _ in self.pairs], momentum)


class FrozenTeacher:
    """A teacher that never changes (distillation), with the spare EMA of the students that the run exports.

    Args:
        parts: the teacher's layers (backbone, heads). They are made non-trainable and `update` never touches them.
        ema: optional `EMATeacher` over (student, EMA copy) pairs, moved by `update`.
    """

    def __init__(self, parts, ema=None):
        self.parts = list(parts)
        for part in self.parts:
            part.trainable = False
        self.ema = ema
        self.pairs = [] if ema is None else ema.pairs

    def update(self, momentum):
        """Moves the students' EMA copies only: the teacher stays bit-identical."""
        if self.ema is not None:
            self.ema.update(momentum)


def centered_targets(teacher_logits, center, temperature, momentum, valid=None, reduction=None, update=True):
    """A head's centered targets, `losses.softmax_center` with the center variable as it is, then (`update`) the
    staged EMA update `losses.update_center` assigned to it: the reference's order (this update's mean is used by
    the next). `valid`: the rows that count in the mean (the masked-patch buffer's). PyTorch: one kernel, the center
    updated in place."""
    if update:
        check_center(center, static_shape(teacher_logits))
        probs = center_targets(teacher_logits, center, temperature, momentum, valid,
                               SINGLE_DEVICE if reduction is None else reduction)
        if probs is not None:
            return probs
    probs = losses.softmax_center(teacher_logits, center, temperature)
    if update:
        center.assign(losses.update_center(center, teacher_logits, momentum=momentum, valid=valid,
                                           reduction=reduction))
    return probs


def collapse_signals(teacher_probs, reduction=None):
    """Entropy diagnostics of the teacher targets (B, K), in float32.

    With a `reduction` (several replicas) the batch-mean target is the global batch's.

    Returns:
        dict with `teacher_entropy` (mean per-sample entropy; at log K the targets are uniform,
        one failure mode), `teacher_kl_uniform` (mean KL of each target to the uniform
        distribution, log K - entropy; near 0 means collapse to uniform), and
        `teacher_marginal_entropy` (entropy of the batch-mean target; near 0 means every image
        goes to the same prototype, the other failure mode).
    """
    p = ops.cast(teacher_probs, "float32")
    k = p.shape[-1]
    entropies = collapse_entropies(p, reduction)  # PyTorch: one kernel
    if entropies is not None:
        mean_entropy, marginal_entropy = entropies
    else:
        mean_entropy = ops.mean(-ops.sum(p * ops.log(ops.maximum(p, 1e-12)), axis=-1))
        marginal = ops.mean(p, axis=0)
        if reduction is not None:
            marginal = reduction.mean(marginal)
        marginal_entropy = -ops.sum(marginal * ops.log(ops.maximum(marginal, 1e-12)))
    return {
        "teacher_entropy": mean_entropy,
        "teacher_kl_uniform": math.log(k) - mean_entropy,
        "teacher_marginal_entropy": marginal_entropy,
    }
