"""DINOv2Pretrainer: self-distillation with an EMA teacher, iBOT and KoLeo, through model.fit."""


import keras
from keras import ops

from keras_dinov2 import losses
from keras_dinov2.backbone import DINOv2Backbone
from keras_dinov2.data.batch import GLOBAL_CROPS, LOCAL_CROPS, MASK_INDICES, MASKS, MASKS_WEIGHT
from keras_dinov2.ops import active_replicas, call_layer
from keras_dinov2.optim import DINOv2AdamW, clip_gradients, param_groups
from keras_dinov2.pretrainer.batches import (
    batch_layout,
    gather_rows,
    micro_batch,
    micro_rows,
    replica_count,
    stacked_patch_indices,
    unpack,
    view_major,
)
from keras_dinov2.pretrainer.heads import StudentParts, projection_heads, run_heads
from keras_dinov2.pretrainer.registry import TrainerHooks, trainer_module
from keras_dinov2.pretrainer.teacher import EMATeacher, centered_targets, collapse_signals
from keras_dinov2.schedules import schedules_from_config


class DINOv2Pretrainer(TrainerHooks, keras.Model):
    """The DINOv2 meta-architecture: student and EMA teacher backbones, DINO and iBOT heads.

    One training step, as the reference's `SSLMetaArch`: the teacher (no drop path, no
    gradients) sees the unmasked global crops and gives targets, centered (softmax centering
    with a staged EMA center) or balanced (Sinkhorn-Knopp), at the scheduled teacher
    temperature; the student sees the masked global crops and the local crops (several
    resolutions through one backbone); the loss combines DINO over crop pairs, iBOT over the
    masked patches and KoLeo over the student's global CLS tokens; gradients are clipped per
    part (backbone, each head); AdamW with layer-wise learning-rate decay steps; then the
    teacher follows the student by EMA with the scheduled momentum.

    During the frozen first epoch the heads' last layers get learning rate 0, as the
    reference's DINOv2 does (their gradients still reach AdamW's moments), or their gradients are
    dropped (`optim.freeze_last_layer_mode="drop_grad"`, DINO v1's rule). A loss term whose
    weight is 0 is switched off as in the reference: no DINO, iBOT or KoLeo computation, and no
    separate iBOT head without iBOT.

    Differences from the reference, on purpose: gradient accumulation is available, and k
    micro-batches of b images take the step of one batch of k * b (the teacher sees the whole
    update first, so Sinkhorn-Knopp and the centers use the whole update's statistics; the
    gradients are summed, clipped once, and the optimizer, the centers, the EMA and the
    schedules advance once per update), KoLeo and head batch norm aside (within a
    micro-batch). Under mixed_float16 a step whose gradients overflow leaves the student and
    the optimizer (and with it the schedules' step counter) where they were, while the centers
    and the teacher's EMA are updated as in the reference's GradScaler step; the reference's
    counter advances on such a step, ours does not, since Keras' loss scaling skips the whole
    optimizer step.

    Args:
        backbone: DINOv2Backbone. The student; the teacher is a copy without drop path.
        config: SSLConfig, default `SSLConfig()`. Every knob, with the reference's defaults.
        steps_per_epoch: optional int. Steps in one epoch of the data; defaults to
            `config.optim.steps_per_epoch`.
        reduction: optional `keras_dinov2.losses.CrossReplica` for multi-replica statistics.
            Not needed with `keras_dinov2.distribute`: the distributed steps bind their own.

    Several devices: build and compile the model after `keras_dinov2.distribute.setup()`
    (in its `scope()`); the objectives' statistics then cover the global batch on every
    backend, and N replicas take the step of one device with the global batch.

    Example:
    >>> model = DINOv2Pretrainer(DINOv2Backbone.from_preset("dinov2_vit_tiny4",
    ...                          load_weights=False), config=SSLConfig.recipe("digits"))
    >>> model.compile()
    >>> model.fit(multicrop_dataset("digits", batch_size=64, config=model.config))
    """

    def __init__(self, backbone, config=None, steps_per_epoch=None, reduction=None, **kwargs):
        from keras_dinov2.config import SSLConfig

        kwargs.setdefault("name", "dinov2_pretrainer")
        super().__init__(**kwargs)
        if not isinstance(backbone, DINOv2Backbone):
            raise ValueError(
                f"`backbone` must be a DINOv2Backbone, received {type(backbone).__name__}."
            )
        self.config = config or SSLConfig()
        self.reduction = reduction or losses.CrossReplica()
        heads = self.config.heads
        self.student = backbone
        teacher_config = {**backbone.get_config(), "drop_path_rate": 0.0,
                          "name": "teacher_backbone"}
        self.teacher = DINOv2Backbone.from_config(teacher_config)
        # The reference's switches: a term with weight 0 is not computed; KoLeo lives inside the
        # DINO term. The DINO head is built whenever a term is on (as the reference builds it),
        # and is frozen when only a separate iBOT head trains; an iBOT head of its own only
        # when iBOT is on.
        loss = self.config.loss
        self.do_dino = loss.dino_weight > 0
        self.do_ibot = loss.ibot_weight > 0
        self.do_koleo = self.do_dino and loss.koleo_weight > 0
        if not (self.do_dino or self.do_ibot):
            raise ValueError(
                "At least one of `config.loss.dino_weight` and `config.loss.ibot_weight` must be "
                f"> 0, received dino_weight={loss.dino_weight} and ibot_weight={loss.ibot_weight}."
            )
        (self.student_dino_head, self.teacher_dino_head, self.student_ibot_head,
         self.teacher_ibot_head) = projection_heads(heads, self.do_ibot, backbone.hidden_dim, backbone.dtype_policy)
        if not self.do_dino and self.student_ibot_head is not self.student_dino_head:
            self.student_dino_head.trainable = False
        ibot_prototypes = (heads.ibot_num_prototypes
                           if self.student_ibot_head is not self.student_dino_head
                           else heads.num_prototypes)

        # The teacher starts as an exact copy of the student and never trains.
        self.teacher_role = EMATeacher(self._student_teacher_parts())
        for teacher_part in (self.teacher, self.teacher_dino_head, self.teacher_ibot_head):
            teacher_part.trainable = False

        self.dino_center = self.add_weight(
            shape=(1, heads.num_prototypes), initializer="zeros", trainable=False,
            name="dino_center", dtype="float32",
        )
        self.ibot_center = self.add_weight(
            shape=(1, 1, ibot_prototypes), initializer="zeros", trainable=False,
            name="ibot_center", dtype="float32",
        )
        self.steps_per_epoch = int(steps_per_epoch or self.config.optim.steps_per_epoch)
        self.built = True
        trainer = trainer_module()
        self._train_step, self._test_step = trainer.train_step, trainer.test_step

    def _student_teacher_parts(self):
        parts = [(self.student, self.teacher)]
        if self.student_dino_head.trainable:
            parts.append((self.student_dino_head, self.teacher_dino_head))
        if self.student_ibot_head is not self.student_dino_head:
            parts.append((self.student_ibot_head, self.teacher_ibot_head))
        return parts

    @property
    def step(self):
        """Optimizer updates done so far (the schedules' clock), as a tensor."""
        return ops.convert_to_tensor(self.optimizer.iterations)

    def call(self, inputs, training=False):
        """The teacher's features (the network the reference releases).

        Takes images, `{"images": ...}`, or a multi-crop batch (its global crops are used).
        """
        if isinstance(inputs, dict) and GLOBAL_CROPS in inputs:
            inputs = inputs[GLOBAL_CROPS]
        return self.teacher(inputs, training=False)

    # ------------------------------------------------------------------ compile / schedules

    def compile(self, optimizer=None, global_batch_size=None, total_steps=None, **kwargs):
        """Sets up the reference optimizer and schedules unless an optimizer is given.

        Args:
            optimizer: optional keras optimizer. Default: AdamW with the reference's parameter
                groups (layer-wise lr decay, patch-embedding lr x 0.2, no weight decay on
                biases, norms and LayerScale) and per-step schedules.
            global_batch_size: optional int. Images per optimizer update across replicas
                (micro-batch x accumulation x replicas); scales the learning rate by
                `config.optim.lr_scaling` (sqrt(batch / 1024); v1: batch / 256). Default:
                `config.batch_size * gradient_accumulation_steps * replicas`, the replicas
                of the active distribution (`keras_dinov2.ops.active_replicas`).
            total_steps: optional int. Optimizer updates in the whole run. Default:
                `config.optim.epochs * steps_per_epoch`.
            **kwargs: passed to `keras.Model.compile` (e.g. `jit_compile`).
        """
        optim = self.config.optim
        if global_batch_size is None:
            global_batch_size = (self.config.batch_size * self.accumulation_steps
                                 * active_replicas())
        if total_steps is None:
            total_steps = optim.epochs * self.steps_per_epoch
        self.schedules = schedules_from_config(optim, total_steps, self.steps_per_epoch, global_batch_size)
        self.param_groups = self.build_param_groups()
        if optimizer is None:
            # DINO v1 drops the last layers' gradients in the frozen epochs instead of giving them lr 0.
            frozen = round(optim.freeze_last_layer_epochs * self.steps_per_epoch)
            optimizer = DINOv2AdamW.from_schedules(
                self.schedules, self.param_groups, beta_1=optim.adamw_beta1, beta_2=optim.adamw_beta2,
                frozen_last_layer_steps=frozen if optim.freeze_last_layer_mode == "drop_grad" else 0)
        super().compile(optimizer=optimizer, **kwargs)

    def build_param_groups(self):
        """The AdamW parameter groups of the student and its trainable heads (a distiller: every student's)."""
        optim, heads = self.config.optim, {}
        if self.student_dino_head.trainable:
            heads["dino_head"] = self.student_dino_head
        if self.student_ibot_head is not self.student_dino_head:
            heads["ibot_head"] = self.student_ibot_head
        return param_groups(self.student, heads=heads, layer_decay=optim.layer_decay,
                            patch_embed_lr_mult=optim.patch_embed_lr_mult)

    # ------------------------------------------------------------------ the step

    @property
    def accumulation_steps(self):
        """Micro-batches per optimizer update (`config.optim.gradient_accumulation_steps`)."""
        return int(self.config.optim.gradient_accumulation_steps)

    def micro_batch(self, data, index):
        """Micro-batch `index` of an update's batch (all replicas' share of it); the batch if k = 1."""
        return micro_batch(unpack(data), index, self.accumulation_steps)

    def teacher_targets(self, data, update_centers=True, reduction=None):
        """The teacher's pass over a whole update: targets for every micro-batch, centers updated once.

        The teacher (unmasked global crops, inference mode) sees every micro-batch of the update
        before any student pass, so Sinkhorn-Knopp's sums and the centers' means cover the whole
        update, as one step on the large batch would: k micro-batches of b images give the
        targets of one batch of k * b. Nothing here is differentiated.

        Args:
            data: a multi-crop batch (dict), or a tuple holding it first.
            update_centers: bool, default True. Assign the staged center update (once per update).
            reduction: optional `CrossReplica`. Default `self.reduction` (the identity).

        Returns:
            (targets, logs): targets for `student_loss`; logs with the teacher temperature and the
            collapse signals of the whole update's targets.
        """
        config = self.config
        reduction = reduction or self.reduction
        data = unpack(data)
        global_crops = data[GLOBAL_CROPS]
        masks_weight = ops.cast(data[MASKS_WEIGHT], "float32")
        shards = replica_count(data)
        batch_layout(data, self.accumulation_steps)  # checks the stacked micro-batches
        temperature = self.schedules.teacher_temperature(self.step)
        teacher = call_layer(self.teacher, {"images": global_crops}, training=False)
        targets = {"dino": None, "ibot": None}
        logs = {"teacher_temp": temperature}
        momentum = config.loss.center_momentum
        centering = config.loss.centering == "sinkhorn_knopp"
        calls = {}  # the teacher's head calls, one call where the heads are one (`run_heads`)
        if self.do_dino:
            calls["dino"] = (self.teacher_dino_head, ops.stop_gradient(view_major(teacher["cls_token"], shards, 2)),
                             None)
        if self.do_ibot:
            crops = global_crops.shape[0] // shards
            indices = ops.cast(data[MASK_INDICES], "int32")
            if shards > 1:
                indices = stacked_patch_indices(indices, shards, crops, data[MASKS].shape[1])
            valid = masks_weight > 0
            # Padding rows of the masked-patch buffer stay out of the heads' batch statistics.
            calls["ibot"] = (self.teacher_ibot_head, ops.stop_gradient(gather_rows(teacher["patch_tokens"], indices)),
                             valid)
        logits = dict(zip(calls, run_heads(list(calls.values()), reduction=reduction)))
        if self.do_dino:
            if centering:
                probs = losses.sinkhorn_knopp(logits["dino"], temperature, reduction=reduction)
            else:  # the center's staged update assigned once per update
                probs = centered_targets(logits["dino"], self.dino_center, temperature, momentum,
                                         reduction=reduction, update=update_centers)
            targets["dino"] = ops.stop_gradient(probs)
            logs.update(collapse_signals(probs, reduction=reduction))
        if self.do_ibot:
            if centering:
                probs = losses.sinkhorn_knopp(logits["ibot"], temperature, valid=valid, reduction=reduction)
            else:  # the center (1, 1, K) moves by the mean over every masked patch of the update (update_center)
                probs = centered_targets(logits["ibot"], self.ibot_center, temperature, momentum, valid=valid,
                                         reduction=reduction, update=update_centers)
            targets["ibot"] = ops.stop_gradient(probs)
        return targets, logs

    def student_loss(self, data, targets, index=0, training=True, reduction=None):
        """The student's loss on micro-batch `index` of an update, against the teacher's targets.

        Args:
            data: the micro-batch (`micro_batch(update, index)`).
            targets: `teacher_targets(update)[0]`.
            index: int, default 0. Which micro-batch of the update `data` is.
            training: bool, default True. Drop path in the student.
            reduction: optional `CrossReplica`. Default `self.reduction`.

        Returns:
            (loss of this micro-batch, dict of its float32 loss parts). The update's loss is the mean over its
            micro-batches, which equals the large batch's loss except for KoLeo, whose nearest neighbours are
            searched within a micro-batch (the reference has no accumulation; within a micro-batch is what its
            per-GPU KoLeo does on a GPU of that batch), and for batch norm in the heads (`HeadConfig.use_bn`),
            whose student-side statistics are a micro-batch's.
        """
        return self.objective(StudentParts(self.student, self.student_dino_head, self.student_ibot_head), data,
                              targets, index=index, training=training, reduction=reduction)

    def objective(self, parts, data, targets, index=0, training=True, reduction=None, mask_inputs=True):
        """`student_loss` of one student's `StudentParts` (backbone, DINO head, iBOT head): the DINO, iBOT and KoLeo
        loss. `mask_inputs=False` (distillation, as DINOv3's code): the student sees whole global crops and iBOT
        still scores the collated mask positions."""
        config = self.config
        reduction = reduction or self.reduction
        k = self.accumulation_steps
        global_crops = data[GLOBAL_CROPS]
        masks = data[MASKS]
        two_b = global_crops.shape[0]
        shards = replica_count(data)
        inputs = {"images": global_crops, "masks": masks} if mask_inputs else {"images": global_crops}
        student = call_layer(parts.backbone, inputs, training=training)
        student_cls = view_major(student["cls_token"], shards, 2)
        dino, calls = {}, {}  # calls: the student's head calls, in the reference's order (`run_heads`)
        if self.do_dino:
            teacher_probs = micro_rows(targets["dino"], index, k, shards, views=2)
            local_crops = data.get(LOCAL_CROPS)
            if local_crops is not None and local_crops.shape[0]:
                n_local = local_crops.shape[0] // (two_b // 2)
                local = call_layer(parts.backbone, {"images": local_crops}, training=training)
                calls["student_local_logits"] = (parts.dino_head, view_major(local["cls_token"], shards, n_local),
                                                 None)
                dino["n_local_crops"] = n_local
            calls["student_global_logits"] = (parts.dino_head, student_cls, None)
            dino["teacher_global_probs"] = teacher_probs
            if self.do_koleo:
                dino["student_global_cls"] = student_cls
        ibot = {}
        if self.do_ibot:
            mask_indices = ops.cast(data[MASK_INDICES], "int32")
            if shards > 1:
                mask_indices = stacked_patch_indices(mask_indices, shards, two_b // shards,
                                                      masks.shape[1])
            masks_weight = ops.cast(data[MASKS_WEIGHT], "float32")
            patches = gather_rows(student["patch_tokens"], mask_indices)
            calls["student_patch_logits"] = (parts.ibot_head, patches, masks_weight > 0)
            ibot["teacher_patch_probs"] = micro_rows(targets["ibot"], index, k, shards)
            ibot["masks_weight"] = masks_weight
        for name, logits in zip(calls, run_heads(list(calls.values()), reduction=reduction)):
            (ibot if name == "student_patch_logits" else dino)[name] = logits
        parts = losses.dinov2_loss(
            **dino, **ibot,
            num_images=two_b,
            dino_weight=config.loss.dino_weight,
            ibot_weight=config.loss.ibot_weight,
            koleo_weight=config.loss.koleo_weight,
            student_temperature=config.loss.student_temp,
            # KoLeo over the global batch (gathered rows), or the reference's per replica.
            reduction=reduction if config.loss.koleo_scope == "global" else None,
            koleo_groups=shards if config.loss.koleo_scope == "replica" else 1,
        )
        logs = {name: parts[name] for name in ("dino_local", "dino_global", "ibot", "koleo")}
        logs["loss"] = parts["total"]
        return parts["total"], logs

    def compute_dinov2_loss(self, data, training=True, update_centers=True, reduction=None):
        """Forward pass of teacher and student and the update's loss (backend-agnostic).

        The teacher's targets for the whole update (`teacher_targets`), then the student's loss on
        each micro-batch (`student_loss`), averaged. The trainers differentiate the micro-batches
        one at a time; this method is the same computation in one call, for evaluation and tests.

        Several replicas: a replica step (TensorFlow, torch) passes its `reduction`, bound to the
        backend's collectives, and the statistics of the objectives (Sinkhorn-Knopp's sums, the
        centers' means, the masked-patch count, KoLeo's rows by default) cover the global batch;
        the returned loss is this replica's mean, whose average over replicas is the global one.
        A replica-stacked batch (JAX under keras.distribution: `n_masked_patches` holds one count
        per replica, see `keras_dinov2.distribute.stack_batches`) is laid out as the global batch
        here, with the same semantics.

        Args:
            data: a multi-crop batch (dict), or a tuple holding it first.
            training: bool, default True. Drop path in the student.
            update_centers: bool, default True. Assign the staged center update.
            reduction: optional `CrossReplica`. Default `self.reduction` (the identity).

        Returns:
            (total loss, dict of float32 scalars to log). Updates the centers in place.
        """
        data = unpack(data)
        targets, teacher_logs = self.teacher_targets(data, update_centers=update_centers,
                                                     reduction=reduction)
        micro_logs = []
        for index in range(self.accumulation_steps):
            _, logs = self.student_loss(self.micro_batch(data, index), targets, index,
                                        training=training, reduction=reduction)
            micro_logs.append(logs)
        logs = self.merge_logs(micro_logs, teacher_logs)
        return logs["loss"], logs

    @staticmethod
    def merge_logs(micro_logs, teacher_logs):
        """One update's logs: the micro-batches' loss parts averaged, then the teacher's logs."""
        count = float(len(micro_logs))
        logs = {key: sum(item[key] for item in micro_logs) / count for key in micro_logs[0]}
        logs.update(teacher_logs)
        return logs

    def scale_loss(self, loss):
        """The loss to differentiate: scaled under mixed_float16 (Keras' LossScaleOptimizer)."""
        return self.optimizer.scale_loss(loss)

    def apply_dinov2_update(self, grads, logs, optimizer=None, variables=None, in_place=False):
        """Clipping per part, the optimizer step, then the teacher's EMA (`apply_gradients`,
        `update_teacher`). `grads` are the whole update's (the mean over its micro-batches)."""
        logs = self.apply_gradients(grads, logs, optimizer=optimizer, variables=variables, in_place=in_place)
        self.update_teacher(logs["momentum"])
        return logs

    def apply_gradients(self, grads, logs, optimizer=None, variables=None, in_place=False):
        """Clipping per part (once per update, on the accumulated gradients) and the optimizer step.

        Written with stateful keras.ops; the JAX trainer runs it inside a StatelessScope.
        `optimizer` replaces `self.optimizer` for the update (the JAX trainer passes the inner
        optimizer of a LossScaleOptimizer with gradients it has already unscaled). Reads every
        schedule at the update's step into `logs` (lr, wd, momentum) before the step counter
        advances. `variables`: `self.trainable_variables` (default) if the caller has the list (an eager step).
        `in_place`: the gradients are the step's own buffers, which clipping may scale in place (PyTorch).
        """
        optimizer = self.optimizer if optimizer is None else optimizer
        variables = self.trainable_variables if variables is None else variables
        # Read every schedule before the optimizer advances its step counter (on torch the
        # counter's tensor is updated in place).
        step = self.step
        logs["lr"] = self.schedules.learning_rate(step)
        logs["wd"] = self.schedules.weight_decay(step)
        logs["momentum"] = self.schedules.teacher_momentum(step)
        optim = self.config.optim
        if optim.clip_grad:
            # Under loss scaling (mixed_float16) the unscaled gradients are clipped.
            grads, norms = clip_gradients(grads, variables, self.param_groups, optim.clip_grad,
                                          optim.clip_mode, getattr(optimizer, "dynamic_scale", None), in_place)
            for part, norm in norms.items():
                logs[f"grad_norm_{part}"] = norm
        optimizer.apply(grads, variables)
        return logs

    def update_teacher(self, momentum):
        """Moves the teacher after the step: its role's update (the EMA of the student, `EMATeacher.update`)."""
        self.teacher_role.update(momentum)

    def train_step(self, *args):
        return self._train_step(self, *args)

    def test_step(self, *args):
        """The loss on a multi-crop validation batch, without any update (`validation_data`).

        For the quality of the features, use `keras_dinov2.evaluation.KNNMonitor` (k-NN on
        held-out labelled images): the DINOv2 loss itself says little about them.
        """
        return self._test_step(self, *args)
