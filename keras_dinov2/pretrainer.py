"""DINOv2Pretrainer: self-distillation with an EMA teacher, iBOT and KoLeo, through model.fit."""

import math

import keras
from keras import ops

from keras_dinov2 import losses
from keras_dinov2.backbone import DINOv2Backbone
from keras_dinov2.layers.dino_head import DINOHead
from keras_dinov2.optim import clip_by_part
from keras_dinov2.trainers import step_functions


class DINOv2Pretrainer(keras.Model):
    """The DINOv2 meta-architecture: student and EMA teacher backbones, DINO and iBOT heads.

    One training step, as the reference's `SSLMetaArch`: the teacher (no drop path, no
    gradients) sees the unmasked global crops and gives targets, centered (softmax centering
    with a staged EMA center) or balanced (Sinkhorn-Knopp), at the scheduled teacher
    temperature; the student sees the masked global crops and the local crops (several
    resolutions through one backbone); the loss combines DINO over crop pairs, iBOT over the
    masked patches and KoLeo over the student's global CLS tokens; gradients are clipped per
    part (backbone, each head); AdamW with layer-wise learning-rate decay steps; then the
    teacher follows the student by EMA with the scheduled momentum.

    Differences from the reference, on purpose: gradient accumulation is available (the
    teacher, the step counter and the schedules advance once per optimizer update); during
    the frozen first epoch the head's last layer gets learning rate 0 (the reference drops
    its gradients, so its Adam moments also stay untouched there).

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
    ...                          load_weights=False), config=SSLConfig.digits())
    >>> model.compile()
    >>> model.fit(multicrop_dataset("digits", batch_size=64, config=model.config.data))
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
        dim = backbone.hidden_dim

        def head(name, prototypes, bottleneck):
            layer = DINOHead(
                num_prototypes=prototypes, hidden_dim=heads.hidden_dim,
                bottleneck_dim=bottleneck, num_layers=heads.num_layers,
                use_bn=heads.use_bn, dtype=backbone.dtype_policy, name=name,
            )
            layer.build((None, dim))
            return layer

        self.student_dino_head = head("student_dino_head", heads.num_prototypes,
                                      heads.bottleneck_dim)
        self.teacher_dino_head = head("teacher_dino_head", heads.num_prototypes,
                                      heads.bottleneck_dim)
        if heads.ibot_separate_head:
            self.student_ibot_head = head("student_ibot_head", heads.ibot_num_prototypes,
                                          heads.ibot_bottleneck_dim)
            self.teacher_ibot_head = head("teacher_ibot_head", heads.ibot_num_prototypes,
                                          heads.ibot_bottleneck_dim)
        else:
            self.student_ibot_head = self.student_dino_head
            self.teacher_ibot_head = self.teacher_dino_head
        ibot_prototypes = (heads.ibot_num_prototypes if heads.ibot_separate_head
                           else heads.num_prototypes)

        # The teacher starts as an exact copy of the student and never trains.
        self._ema_pairs = []
        for student_part, teacher_part in self._student_teacher_parts():
            for s, t in zip(student_part.trainable_weights, teacher_part.trainable_weights):
                t.assign(ops.copy(s))
                self._ema_pairs.append((s, t))
        for _, teacher_part in self._student_teacher_parts():
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
        self._train_step, self._test_step = step_functions()

    def _student_teacher_parts(self):
        parts = [(self.student, self.teacher),
                 (self.student_dino_head, self.teacher_dino_head)]
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
        if isinstance(inputs, dict) and "global_crops" in inputs:
            inputs = inputs["global_crops"]
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
                sqrt(batch / 1024). Default: `config.data.batch_size * accumulation`.
            total_steps: optional int. Optimizer updates in the whole run. Default:
                `config.optim.epochs * steps_per_epoch`.
            **kwargs: passed to `keras.Model.compile` (e.g. `jit_compile`).
        """
        from keras_dinov2.optim import DINOv2AdamW, param_groups
        from keras_dinov2.schedules import dinov2_schedules

        optim = self.config.optim
        accumulation = int(optim.gradient_accumulation_steps)
        if global_batch_size is None:
            global_batch_size = self.config.batch_size * accumulation
        if total_steps is None:
            total_steps = optim.epochs * self.steps_per_epoch
        self.schedules = dinov2_schedules(
            total_steps=total_steps,
            steps_per_epoch=self.steps_per_epoch,
            global_batch_size=global_batch_size,
            base_lr=optim.base_lr,
            min_lr=optim.min_lr,
            warmup_epochs=optim.warmup_epochs,
            weight_decay=optim.weight_decay,
            weight_decay_end=optim.weight_decay_end,
            momentum_teacher=optim.momentum_teacher,
            final_momentum_teacher=optim.final_momentum_teacher,
            teacher_temp=optim.teacher_temp,
            warmup_teacher_temp=optim.warmup_teacher_temp,
            warmup_teacher_temp_epochs=optim.warmup_teacher_temp_epochs,
            freeze_last_layer_epochs=optim.freeze_last_layer_epochs,
        )
        heads = {"dino_head": self.student_dino_head}
        if self.student_ibot_head is not self.student_dino_head:
            heads["ibot_head"] = self.student_ibot_head
        self.param_groups = param_groups(self.student, heads=heads,
                                         layer_decay=optim.layer_decay,
                                         patch_embed_lr_mult=optim.patch_embed_lr_mult)
        if optimizer is None:
            optimizer = DINOv2AdamW.from_schedules(
                self.schedules, self.param_groups,
                beta_1=optim.adamw_beta1, beta_2=optim.adamw_beta2,
                gradient_accumulation_steps=accumulation if accumulation > 1 else None,
            )
        super().compile(optimizer=optimizer, **kwargs)

    # ------------------------------------------------------------------ the step

    def compute_dinov2_loss(self, data, training=True, update_centers=True, reduction=None):
        """Forward pass of teacher and student and the combined loss (backend-agnostic).

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
        config = self.config
        reduction = reduction or self.reduction
        if isinstance(data, (tuple, list)):
            # (x,) from a generator or PyDataset; targets are not used.
            data = keras.utils.unpack_x_y_sample_weight(tuple(data))[0]
        global_crops = data["global_crops"]
        local_crops = data.get("local_crops")
        masks = data["masks"]
        mask_indices = ops.cast(data["mask_indices"], "int32")
        masks_weight = ops.cast(data["masks_weight"], "float32")
        two_b = global_crops.shape[0]
        shards = _replica_count(data)
        if shards > 1:
            mask_indices = _stacked_patch_indices(mask_indices, shards, two_b // shards,
                                                  masks.shape[1])
        temperature = self.schedules.teacher_temperature(self.step)

        # Teacher: unmasked global crops, inference mode, constant targets.
        teacher = self.teacher({"images": global_crops}, training=False)
        teacher_cls = ops.stop_gradient(_view_major(teacher["cls_token"], shards, 2))
        teacher_patches = ops.stop_gradient(_gather_rows(teacher["patch_tokens"], mask_indices))
        teacher_logits = self.teacher_dino_head(teacher_cls, reduction=reduction)
        valid = masks_weight > 0
        # Padding rows of the masked-patch buffer stay out of the heads' batch statistics.
        teacher_patch_logits = self.teacher_ibot_head(teacher_patches, row_weights=valid,
                                                      reduction=reduction)
        if config.loss.centering == "sinkhorn_knopp":
            teacher_probs = losses.sinkhorn_knopp(teacher_logits, temperature,
                                                  reduction=reduction)
            teacher_patch_probs = losses.sinkhorn_knopp(
                teacher_patch_logits, temperature, valid=valid, reduction=reduction)
        else:
            teacher_probs = losses.softmax_center(teacher_logits, self.dino_center, temperature)
            teacher_patch_probs = losses.softmax_center(
                teacher_patch_logits, ops.reshape(self.ibot_center, (1, -1)), temperature)
            # The reference stages the center update: this step's mean is used next step.
            if update_centers:
                momentum = config.loss.center_momentum
                self.dino_center.assign(losses.update_center(
                    self.dino_center, teacher_logits, momentum=momentum,
                    reduction=reduction))
                # The mean over every masked patch of the global batch (see update_center).
                self.ibot_center.assign(losses.update_center(
                    self.ibot_center, teacher_patch_logits, momentum=momentum,
                    valid=valid, reduction=reduction))

        # Student: masked global crops and the local crops.
        student = self.student({"images": global_crops, "masks": masks}, training=training)
        student_cls = _view_major(student["cls_token"], shards, 2)
        student_logits = self.student_dino_head(student_cls, reduction=reduction)
        student_local_logits = None
        n_local = 0
        if local_crops is not None and local_crops.shape[0]:
            n_local = local_crops.shape[0] // (two_b // 2)
            local = self.student({"images": local_crops}, training=training)
            student_local_logits = self.student_dino_head(
                _view_major(local["cls_token"], shards, n_local), reduction=reduction)
        student_patches = _gather_rows(student["patch_tokens"], mask_indices)
        student_patch_logits = self.student_ibot_head(student_patches, row_weights=valid,
                                                      reduction=reduction)

        parts = losses.dinov2_loss(
            student_logits, teacher_probs,
            student_local_logits=student_local_logits,
            student_patch_logits=student_patch_logits,
            teacher_patch_probs=teacher_patch_probs,
            masks_weight=masks_weight,
            student_global_cls=student_cls,
            num_images=two_b,
            n_local_crops=n_local,
            dino_weight=config.loss.dino_weight,
            ibot_weight=config.loss.ibot_weight,
            koleo_weight=config.loss.koleo_weight,
            student_temperature=config.loss.student_temp,
            # KoLeo over the global batch (gathered rows), or the reference's per replica.
            reduction=reduction if config.loss.koleo_scope == "global" else None,
            koleo_groups=shards if config.loss.koleo_scope == "replica" else 1,
        )
        logs = {
            "loss": parts["total"],
            "dino_local": parts["dino_local"],
            "dino_global": parts["dino_global"],
            "ibot": parts["ibot"],
            "koleo": parts["koleo"],
            "teacher_temp": temperature,
        }
        logs.update(collapse_signals(teacher_probs, reduction=reduction))
        return parts["total"], logs

    def scale_loss(self, loss):
        """The loss to differentiate: scaled under mixed_float16 (Keras' LossScaleOptimizer)."""
        return self.optimizer.scale_loss(loss)

    def _inner_optimizer(self):
        return getattr(self.optimizer, "inner_optimizer", self.optimizer)

    def apply_dinov2_update(self, grads, logs, optimizer=None):
        """Clipping per part, the optimizer step, the teacher's EMA and the step counter.

        Written with stateful keras.ops; the JAX trainer runs it inside a StatelessScope.
        `optimizer` replaces `self.optimizer` for the update (the JAX trainer passes the inner
        optimizer of a LossScaleOptimizer with gradients it has already unscaled).
        """
        optimizer = self.optimizer if optimizer is None else optimizer
        # Read every schedule before the optimizer advances its step counter (on torch the
        # counter's tensor is updated in place).
        step = self.step
        momentum = self.schedules.teacher_momentum(step)
        logs["lr"] = self.schedules.learning_rate(step)
        logs["wd"] = self.schedules.weight_decay(step)
        logs["momentum"] = momentum
        clip = self.config.optim.clip_grad
        if clip:
            # Under loss scaling (mixed_float16) the gradients carry the scale: clip the
            # unscaled values and hand them back scaled to the LossScaleOptimizer.
            scale = getattr(optimizer, "dynamic_scale", None)
            if scale is not None:
                scale = ops.convert_to_tensor(scale)
                grads = [None if g is None else g / ops.cast(scale, g.dtype) for g in grads]
            grads, norms = clip_by_part(grads, self.trainable_variables, self.param_groups, clip)
            if scale is not None:
                grads = [None if g is None else g * ops.cast(scale, g.dtype) for g in grads]
            for part, norm in norms.items():
                logs[f"grad_norm_{part}"] = norm
        optimizer.apply(grads, self.trainable_variables)
        inner = self._inner_optimizer()
        accumulation = inner.gradient_accumulation_steps or 1
        if accumulation > 1:
            # Keras counts micro-batches in `_iterations`; the update lands on multiples of N.
            updated = ops.equal(ops.mod(inner._iterations, accumulation), 0)
        else:
            updated = ops.convert_to_tensor(True)
        # Between accumulation boundaries the student has not moved: keep the teacher.
        m = ops.where(updated, momentum, 1.0)
        for s, t in self._ema_pairs:
            t.assign(ops.cast(m, t.dtype) * t + ops.cast(1.0 - m, t.dtype) * s)
        return logs

    def _trainable_parts(self):
        parts = [self.student, self.student_dino_head]
        if self.student_ibot_head is not self.student_dino_head:
            parts.append(self.student_ibot_head)
        return parts

    def train_step(self, *args):
        return self._train_step(self, *args)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Called by Keras' TensorFlow trainer only (see trainers/tensorflow.py).
        from keras_dinov2.trainers.tensorflow import maybe_symbolic_build

        return maybe_symbolic_build(self, super()._maybe_symbolic_build, iterator, data_batch)

    def test_step(self, *args):
        """The loss on a multi-crop validation batch, without any update (`validation_data`).

        For the quality of the features, use `keras_dinov2.evaluation.KNNMonitor` (k-NN on
        held-out labelled images): the DINOv2 loss itself says little about them.
        """
        return self._test_step(self, *args)


def _replica_count(data):
    # A replica-stacked batch carries one masked-patch count per replica.
    counts = data.get("n_masked_patches")
    if counts is None or len(counts.shape) != 1:
        return 1
    return int(counts.shape[0])


def _view_major(rows, shards, views):
    """Rows of `shards` stacked replica batches (each view-major) in global view-major order.

    (shards * views * b, ...) -> (views * shards * b, ...): view v's rows become those of every
    replica in turn, as one batch of shards * b images.
    """
    if shards == 1:
        return rows
    shape = tuple(rows.shape)
    per_view = shape[0] // (shards * views)
    x = ops.reshape(rows, (shards, views, per_view) + shape[1:])
    x = ops.swapaxes(x, 0, 1)
    return ops.reshape(x, (shape[0],) + shape[1:])


def _stacked_patch_indices(mask_indices, shards, crops_per_shard, num_patches):
    """Replica-local flat patch indices -> indices into the stacked (shards * 2b * N) patch rows."""
    per_shard = mask_indices.shape[0] // shards
    offsets = ops.arange(shards, dtype="int32")[:, None] * (crops_per_shard * num_patches)
    return ops.reshape(ops.reshape(mask_indices, (shards, per_shard)) + offsets, (-1,))


def _gather_rows(tokens, flat_indices):
    """Rows of (B, N, D) tokens at flat indices into the B * N patches."""
    shape = ops.shape(tokens)
    return ops.take(ops.reshape(tokens, (-1, shape[-1])), flat_indices, axis=0)


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
    entropy = -ops.sum(p * ops.log(ops.maximum(p, 1e-12)), axis=-1)
    mean_entropy = ops.mean(entropy)
    marginal = ops.mean(p, axis=0)
    if reduction is not None:
        marginal = reduction.mean(marginal)
    marginal_entropy = -ops.sum(marginal * ops.log(ops.maximum(marginal, 1e-12)))
    return {
        "teacher_entropy": mean_entropy,
        "teacher_kl_uniform": math.log(k) - mean_entropy,
        "teacher_marginal_entropy": marginal_entropy,
    }
