"""DistillationPretrainer: a frozen teacher with its heads trains one or several smaller students.

The DINOv2 paper's recipe (Sec. 5, App. B; no code released) as DINOv3's released code runs it: the larger model is a
frozen teacher; each student gets new heads with the teacher's prototype counts and learns the full SSL objective
(DINO over all crops, iBOT at the collated mask positions of the two global crops, KoLeo) against the teacher's
Sinkhorn-Knopp (or centered) targets; the students see unmasked crops; a spare EMA of every student backbone is kept,
and that EMA is the model to export.
"""

import keras

from keras_dinov2 import losses
from keras_dinov2.backbone import DINOv2Backbone
from keras_dinov2.data.batch import GLOBAL_CROPS
from keras_dinov2.layers.dino_head import DINOHead
from keras_dinov2.optim import merge_param_groups, param_groups
from keras_dinov2.pretrainer.heads import StudentParts, build_head
from keras_dinov2.pretrainer.model import DINOv2Pretrainer
from keras_dinov2.pretrainer.registry import trainer_module
from keras_dinov2.pretrainer.teacher import EMATeacher, FrozenTeacher


def as_students(students):
    """The students as a list of DINOv2Backbone, checked (one backbone or a sequence of them)."""
    students = [students] if isinstance(students, DINOv2Backbone) else list(students or [])
    if not students:
        raise ValueError("`students` must hold at least one DINOv2Backbone, received none.")
    for i, student in enumerate(students):
        if not isinstance(student, DINOv2Backbone):
            raise ValueError(f"`students[{i}]` must be a DINOv2Backbone, received {type(student).__name__}.")
    if len({id(s) for s in students}) != len(students):
        raise ValueError("`students` holds the same backbone twice; give every student its own backbone.")
    return students


def ema_copy(backbone, name):
    """A drop-path-free copy of `backbone` for its EMA (the weights are set by `EMATeacher`)."""
    return DINOv2Backbone.from_config({**backbone.get_config(), "drop_path_rate": 0.0, "name": name})


def check_teacher_heads(teacher, heads, config):
    """Checks that the teacher's heads fit the teacher and the run's config; returns (dino_head, ibot_head).

    One `ValueError` names the first mismatch (head input width, prototype counts, tied or untied heads), before
    anything is built or trained.
    """
    if not isinstance(heads, dict) or not isinstance(heads.get("dino_head"), DINOHead):
        raise ValueError(
            "Head distillation needs the teacher's heads: `teacher_heads` must be a dict with a built DINOHead "
            "under 'dino_head' (a run directory or a preset exported with --heads has them). Released backbones "
            "have none: use FeatureDistiller (keras-dinov2 distill --mode features)."
        )
    dino = heads["dino_head"]
    ibot = heads.get("ibot_head") or dino
    for name, head in (("dino_head", dino), ("ibot_head", ibot)):
        width = int(head.mlp_layers[0].kernel.shape[0])
        if width != teacher.hidden_dim:
            raise ValueError(f"The teacher's {name} takes {width}-wide features, the teacher backbone gives "
                             f"{teacher.hidden_dim}: the heads do not belong to this backbone.")
    wanted = config.heads
    separate = ibot is not dino
    if config.loss.ibot_weight > 0 and separate != bool(wanted.ibot_separate_head):
        raise ValueError(
            f"The teacher has {'untied' if separate else 'tied'} DINO and iBOT heads, the config asks for "
            f"ibot_separate_head={wanted.ibot_separate_head}: the students' head layout must be the teacher's.")
    if dino.num_prototypes != wanted.num_prototypes:
        raise ValueError(f"The teacher's DINO head has {dino.num_prototypes} prototypes, config.heads."
                         f"num_prototypes is {wanted.num_prototypes}: they must be equal.")
    if separate and ibot.num_prototypes != wanted.ibot_num_prototypes:
        raise ValueError(f"The teacher's iBOT head has {ibot.num_prototypes} prototypes, config.heads."
                         f"ibot_num_prototypes is {wanted.ibot_num_prototypes}: they must be equal.")
    return dino, ibot


class DistillationPretrainer(DINOv2Pretrainer):
    """Distillation from a frozen teacher with heads into one or several students, through `model.fit`.

    One step: the teacher (inference mode, no gradients, its own dtype policy) sees the unmasked global crops once,
    and its DINO and iBOT heads give the targets (Sinkhorn-Knopp or softmax centering at the scheduled teacher
    temperature, as `config.loss.centering` says), shared by every student. Each student sees the same crops
    unmasked (global and local), and its loss is the pretraining objective (`DINOv2Pretrainer.objective`) against
    those targets: DINO on all crops, iBOT at the collated mask positions of the global crops, KoLeo. The students'
    losses are summed; their parameters are disjoint, so each gets its own gradients, its own AdamW moments and its
    own gradient clipping (parts "student_i/backbone", "student_i/dino_head", ...). Then every student's EMA
    backbone (`ema_students`) follows it with the scheduled teacher momentum; the EMA is what `export` saves.

    As DINOv3's `MultiDistillationMetaArch`, the teacher runs once per batch for all students; unlike it, the
    students train on the same devices in turn (Keras has one program per step) and share the run's schedules and
    batch. As DINOv3's distillation, the teacher's centers start at zero (they are not loaded) and the loss
    composition is DINOv2's (DINO global without the diagonal, weights from `config.loss`). The EMA covers the
    backbones only (DINOv3 keeps an EMA of the heads too, which nothing uses).

    The teacher is never updated: it is not trainable, the update leaves it alone and the heads' batch norm (if any)
    keeps no running statistics, so its weights are bit-identical after `fit`.

    Args:
        teacher: DINOv2Backbone. The frozen teacher.
        teacher_heads: dict with "dino_head" (a built DINOHead) and optionally "ibot_head" (a second one when
            untied); `keras_dinov2.interop.load_heads` and `keras_dinov2.run.load_teacher` return it.
        students: DINOv2Backbone or a sequence of them (several students in one run). Their patch size must be
            the teacher's (iBOT compares patch positions); build them without stochastic depth (the recipe).
        config: SSLConfig. `heads` must have the teacher's prototype counts and head tying (see
            `check_teacher_heads`); `heads.hidden_dim`, `bottleneck_dim`, `num_layers` and `use_bn` shape the
            students' new heads.
        steps_per_epoch, reduction: as `DINOv2Pretrainer`.

    Example:
    >>> teacher, heads = load_teacher("runs/digits_teacher")
    >>> students = [build_backbone("dinov2_vit_micro4", config)]
    >>> model = DistillationPretrainer(teacher, heads, students, config)
    >>> model.compile(); model.fit(multicrop_dataset("digits", 32, config=config), epochs=...)
    >>> model.ema_students[0].save_to_preset("student")
    """

    def __init__(self, teacher, teacher_heads, students, config=None, steps_per_epoch=None, reduction=None,
                 **kwargs):
        from keras_dinov2.config import SSLConfig

        kwargs.setdefault("name", "distillation_pretrainer")
        keras.Model.__init__(self, **kwargs)
        if not isinstance(teacher, DINOv2Backbone):
            raise ValueError(f"`teacher` must be a DINOv2Backbone, received {type(teacher).__name__}.")
        students = as_students(students)
        self.config = config or SSLConfig()
        self.reduction = reduction or losses.CrossReplica()
        loss = self.config.loss
        self.do_dino = loss.dino_weight > 0
        self.do_ibot = loss.ibot_weight > 0
        self.do_koleo = self.do_dino and loss.koleo_weight > 0
        if not (self.do_dino or self.do_ibot):
            raise ValueError("At least one of `config.loss.dino_weight` and `config.loss.ibot_weight` must be > 0.")
        teacher_dino, teacher_ibot = check_teacher_heads(teacher, teacher_heads, self.config)
        for i, student in enumerate(students):
            if student.patch_size != teacher.patch_size:
                raise ValueError(
                    f"Student {i} has patch size {student.patch_size}, the teacher {teacher.patch_size}: head "
                    "distillation compares patch positions (iBOT), so they must be equal. Feature distillation "
                    "(FeatureDistiller, --mode features) matches different patch grids.")
        self.teacher = teacher
        self.teacher_dino_head, self.teacher_ibot_head = teacher_dino, teacher_ibot
        self.students = students
        self.student = students[0]
        heads = self.config.heads
        separate = teacher_ibot is not teacher_dino
        self.student_parts = []
        for i, student in enumerate(students):
            dino = build_head(heads, f"student_{i}_dino_head", heads.num_prototypes, heads.bottleneck_dim,
                              student.hidden_dim, student.dtype_policy)
            ibot = dino
            if separate:
                ibot = build_head(heads, f"student_{i}_ibot_head", heads.ibot_num_prototypes,
                                  heads.ibot_bottleneck_dim, student.hidden_dim, student.dtype_policy)
            self.student_parts.append(StudentParts(student, dino, ibot))
        # Keras tracks the heads through these lists (their variables are the model's).
        self.student_dino_heads = [p.dino_head for p in self.student_parts]
        self.student_ibot_heads = [p.ibot_head for p in self.student_parts if p.ibot_head is not p.dino_head]
        self.student_dino_head, self.student_ibot_head = self.student_parts[0][1:]
        self.ema_students = [ema_copy(s, f"ema_student_{i}") for i, s in enumerate(students)]
        self.teacher_role = FrozenTeacher([teacher, teacher_dino, teacher_ibot],
                                          EMATeacher(list(zip(students, self.ema_students))))
        self.dino_center = self.add_weight(shape=(1, teacher_dino.num_prototypes), initializer="zeros",
                                           trainable=False, name="dino_center", dtype="float32")
        self.ibot_center = self.add_weight(shape=(1, 1, teacher_ibot.num_prototypes), initializer="zeros",
                                           trainable=False, name="ibot_center", dtype="float32")
        self.steps_per_epoch = int(steps_per_epoch or self.config.optim.steps_per_epoch)
        self.built = True
        trainer = trainer_module()
        self._train_step, self._test_step = trainer.train_step, trainer.test_step

    def call(self, inputs, training=False):
        """The first student's EMA features (the model a distillation run exports)."""
        if isinstance(inputs, dict) and GLOBAL_CROPS in inputs:
            inputs = inputs[GLOBAL_CROPS]
        return self.ema_students[0](inputs, training=False)

    def build_param_groups(self):
        """Every student's parameter groups in one AdamW: each keeps its own layer-wise decay (by its depth) and
        clipping units ("student_i/backbone", "student_i/dino_head", "student_i/ibot_head")."""
        optim = self.config.optim
        groups = [(f"student_{i}", param_groups(student, heads=self.student_heads(i), layer_decay=optim.layer_decay,
                                                patch_embed_lr_mult=optim.patch_embed_lr_mult))
                  for i, student in enumerate(self.students)]
        return merge_param_groups(groups)

    def student_heads(self, i):
        """{part name: layer} of student `i`'s trainable heads (its clipping units besides the backbone)."""
        parts = self.student_parts[i]
        heads = {"dino_head": parts.dino_head}
        if parts.ibot_head is not parts.dino_head:
            heads["ibot_head"] = parts.ibot_head
        return heads

    def student_loss(self, data, targets, index=0, training=True, reduction=None):
        """The sum of every student's objective on micro-batch `index`, against the shared teacher targets.

        With one student the logs are the pretraining names (dino_local, dino_global, ibot, koleo, loss); with
        several, each student's parts are prefixed "student_i/" and "loss" is their sum.
        """
        total, logs = None, {}
        for i, parts in enumerate(self.student_parts):
            loss, part_logs = self.objective(parts, data, targets, index=index, training=training,
                                             reduction=reduction, mask_inputs=False)
            total = loss if total is None else total + loss
            if len(self.student_parts) == 1:
                logs.update(part_logs)
            else:
                logs.update({f"student_{i}/{name}": value for name, value in part_logs.items()})
        logs["loss"] = total
        return total, logs
