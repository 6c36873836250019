"""FeatureDistiller: students learn a head-less teacher's CLS and patch tokens (released backbones have no heads)."""

import keras
from keras import ops

from keras_dinov2 import losses
from keras_dinov2.backbone import DINOv2Backbone
from keras_dinov2.data.batch import GLOBAL_CROPS, LOCAL_CROPS
from keras_dinov2.layers.projector import FeatureProjector
from keras_dinov2.ops import call_layer
from keras_dinov2.pretrainer.batches import replica_count, unpack
from keras_dinov2.pretrainer.distill import DistillationPretrainer, as_students, ema_copy
from keras_dinov2.pretrainer.registry import trainer_module
from keras_dinov2.pretrainer.teacher import EMATeacher, FrozenTeacher


def micro_slice(rows, index, k, replicas):
    """The rows of micro-batch `index` of rows stacked (replicas, k, per, ...) as the pipeline stacks them."""
    if k == 1:
        return rows
    shape = tuple(rows.shape)
    x = ops.reshape(rows, (replicas, k, -1) + shape[1:])
    return ops.reshape(x[:, index], (-1,) + shape[1:])


def on_grid(patches, grid, target_grid):
    """(B, h*w, D) patch tokens resampled bilinearly to the (H, W) grid of the teacher (unchanged when equal)."""
    if tuple(grid) == tuple(target_grid):
        return patches
    b, d = patches.shape[0], patches.shape[-1]
    x = ops.reshape(patches, (-1, grid[0], grid[1], d))
    x = ops.image.resize(x, target_grid, interpolation="bilinear", antialias=False, data_format="channels_last")
    return ops.reshape(x, (b if b is not None else -1, target_grid[0] * target_grid[1], d))


class FeatureDistiller(DistillationPretrainer):
    """Feature distillation: every student, through two small projectors, regresses a frozen teacher's tokens.

    For teachers without heads (official torch-hub and transformers DINOv2, keras-hub presets): the teacher and the
    students see the same multi-crop views (both global and all local crops, unmasked); the student's CLS token and
    patch tokens, projected to the teacher's width (`FeatureProjector`), regress the teacher's tokens standardized
    per token (`keras_dinov2.losses.feature_distillation_loss`, cosine or smooth-L1). When the patch sizes differ,
    the student's projected patch map is resampled bilinearly to the teacher's grid. Each crop counts once: the
    loss is the mean of the global crops' and the local crops' losses weighted by their number of crops. As in
    head distillation, a spare EMA of each student backbone follows it (the model to export), the students are
    trained together against one teacher pass, and the teacher never changes.

    Use head distillation (`DistillationPretrainer`) when the teacher has heads (our runs, exports with
    `--heads`): it transfers the teacher's prototype assignments (DINOv2's recipe). Use this when it has none, or
    when the student's patch size differs from the teacher's.

    Args:
        teacher: DINOv2Backbone, frozen.
        students: DINOv2Backbone or a sequence of them. Every crop size of `config.data.crops` must be a multiple
            of each student's and the teacher's patch size.
        config: SSLConfig (optimizer, schedules, crops; `loss` and `heads` are not used).
        loss: "cosine" (default) or "smooth_l1".
        cls_weight, patch_weight: floats, default 1.0.
        projector_layers: int, default 2. Dense layers of each projector (hidden width: the teacher's).
        steps_per_epoch, reduction: as `DINOv2Pretrainer`.
    """

    def __init__(self, teacher, students, config=None, loss="cosine", cls_weight=1.0, patch_weight=1.0,
                 projector_layers=2, steps_per_epoch=None, reduction=None, **kwargs):
        from keras_dinov2.config import SSLConfig

        kwargs.setdefault("name", "feature_distiller")
        keras.Model.__init__(self, **kwargs)
        if not isinstance(teacher, DINOv2Backbone):
            raise ValueError(f"`teacher` must be a DINOv2Backbone, received {type(teacher).__name__}.")
        if loss not in losses.FEATURE_LOSSES:
            raise ValueError(f"`loss` must be one of {losses.FEATURE_LOSSES}, received {loss!r}.")
        students = as_students(students)
        self.config = config or SSLConfig()
        crops = self.config.data.crops
        sizes = [crops.global_crops_size] + ([crops.local_crops_size] if crops.local_crops_number else [])
        for who, backbone in [("the teacher", teacher)] + [(f"student {i}", s) for i, s in enumerate(students)]:
            for size in sizes:
                if size % backbone.patch_size:
                    raise ValueError(
                        f"Crops of {size} px do not divide into {who}'s {backbone.patch_size}-px patches: choose "
                        "crop sizes that are multiples of every patch size (config.data.crops).")
        self.reduction = reduction or losses.CrossReplica()
        self.loss_kind, self.cls_weight, self.patch_weight = loss, float(cls_weight), float(patch_weight)
        self.teacher = teacher
        self.students = students
        self.student = students[0]
        width = teacher.hidden_dim
        self.cls_projectors, self.patch_projectors = [], []
        for i, student in enumerate(students):
            for kind, projectors in (("cls", self.cls_projectors), ("patch", self.patch_projectors)):
                projector = FeatureProjector(width, num_layers=projector_layers, dtype=student.dtype_policy,
                                             name=f"student_{i}_{kind}_projector")
                projector.build((None, student.hidden_dim))
                projectors.append(projector)
        self.ema_students = [ema_copy(s, f"ema_student_{i}") for i, s in enumerate(students)]
        self.teacher_role = FrozenTeacher([teacher], EMATeacher(list(zip(students, self.ema_students))))
        self.steps_per_epoch = int(steps_per_epoch or self.config.optim.steps_per_epoch)
        self.built = True
        trainer = trainer_module()
        self._train_step, self._test_step = trainer.train_step, trainer.test_step

    def student_heads(self, i):
        return {"cls_projector": self.cls_projectors[i], "patch_projector": self.patch_projectors[i]}

    def teacher_targets(self, data, update_centers=True, reduction=None):
        """The teacher's CLS and patch tokens of every crop of the update, in the batch's row order (no gradient).

        Returns:
            ({"global": (cls, patches, grid), "local": ... or None}, {}).
        """
        data = unpack(data)
        targets = {}
        for key, name in ((GLOBAL_CROPS, "global"), (LOCAL_CROPS, "local")):
            crops = data.get(key)
            if crops is None or not crops.shape[0]:
                targets[name] = None
                continue
            out = call_layer(self.teacher, {"images": crops}, training=False)
            grid = (crops.shape[1] // self.teacher.patch_size, crops.shape[2] // self.teacher.patch_size)
            targets[name] = (ops.stop_gradient(out["cls_token"]), ops.stop_gradient(out["patch_tokens"]), grid)
        return targets, {}

    def student_loss(self, data, targets, index=0, training=True, reduction=None):
        """The students' summed feature losses on micro-batch `index` (logs: cls, patch, loss; per student
        prefixed "student_i/" when there are several)."""
        k = self.accumulation_steps
        replicas = replica_count(data)
        total, logs = None, {}
        for i, student in enumerate(self.students):
            parts, weights = [], []
            for key, name in ((GLOBAL_CROPS, "global"), (LOCAL_CROPS, "local")):
                if targets.get(name) is None:
                    continue
                crops = data[key]
                teacher_cls, teacher_patches, grid = targets[name]
                # call_layer: without Keras' __call__ where it changes nothing (PyTorch: ~0.15 ms a call).
                out = call_layer(student, {"images": crops}, training=training)
                own = (crops.shape[1] // student.patch_size, crops.shape[2] // student.patch_size)
                patches = on_grid(call_layer(self.patch_projectors[i], out["patch_tokens"]), own, grid)
                parts.append(losses.feature_distillation_loss(
                    call_layer(self.cls_projectors[i], out["cls_token"]), micro_slice(teacher_cls, index, k, replicas),
                    patches, micro_slice(teacher_patches, index, k, replicas), kind=self.loss_kind,
                    cls_weight=self.cls_weight, patch_weight=self.patch_weight))
                weights.append(float(crops.shape[0]))
            share = [w / sum(weights) for w in weights]
            student_logs = {name: sum(w * p[name] for w, p in zip(share, parts)) for name in ("cls", "patch")}
            student_logs["loss"] = sum(w * p["total"] for w, p in zip(share, parts))
            total = student_logs["loss"] if total is None else total + student_logs["loss"]
            prefix = "" if len(self.students) == 1 else f"student_{i}/"
            logs.update({prefix + name: value for name, value in student_logs.items()})
        logs["loss"] = total
        return total, logs
