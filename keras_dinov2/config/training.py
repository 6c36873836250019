"""The training sections of a run: the DINO and iBOT heads, the losses, and optimization."""

from __future__ import annotations

import dataclasses

from keras_dinov2.config.fields import ConfigBase

__all__ = ["HeadConfig", "LossConfig", "OptimConfig"]


@dataclasses.dataclass
class HeadConfig(ConfigBase):
    """The DINO and iBOT heads (the reference's `dino` and `ibot` sections).

    Args:
        num_prototypes: int, default 65536. DINO head outputs (`dino.head_n_prototypes`).
        hidden_dim: int, default 2048. MLP width of both heads.
        bottleneck_dim: int, default 256. DINO head bottleneck.
        num_layers: int, default 3. MLP layers of both heads.
        ibot_separate_head: bool, default False. Untied iBOT head (True in the paper recipes).
        ibot_num_prototypes: int, default 65536. iBOT head outputs when untied.
        ibot_bottleneck_dim: int, default 256. iBOT head bottleneck when untied.
        use_bn: bool, default False. Batch normalization in the heads' MLPs (`dino.head_use_bn`
            style; see `DINOHead`). Off in the reference's configs.
        norm_last_layer: bool, default False. Fix the prototypes' norms `weight_g` at 1 (not trained), so each
            logit is a cosine: DINO v1's `--norm_last_layer` (True by default there). DINOv2's head is v1's with
            False.
    """

    num_prototypes: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    num_layers: int = 3
    ibot_separate_head: bool = False
    ibot_num_prototypes: int = 65536
    ibot_bottleneck_dim: int = 256
    use_bn: bool = False
    norm_last_layer: bool = False


@dataclasses.dataclass
class LossConfig(ConfigBase):
    """Loss weights, temperatures and the teacher's target rule.

    Args:
        dino_weight: float, default 1.0 (`dino.loss_weight`).
        ibot_weight: float, default 1.0 (`ibot.loss_weight`).
        koleo_weight: float, default 0.1 (`dino.koleo_loss_weight`).
        student_temp: float, default 0.1.
        centering: str, default "centering". "centering" (softmax with an EMA center) or
            "sinkhorn_knopp" (the paper recipes).
        center_momentum: float, default 0.9.
        koleo_scope: str, default "global". Which rows KoLeo's nearest neighbours come from when
            training on several replicas: "global" gathers the student's CLS tokens of each global
            crop from every replica (as DINOv3's distributed KoLeo), so the loss does not depend on
            the device count; "replica" keeps the reference's per-replica KoLeo (each replica's
            own rows, averaged over replicas). The same on one device.
    """

    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    student_temp: float = 0.1
    centering: str = "centering"
    center_momentum: float = 0.9
    koleo_scope: str = "global"


@dataclasses.dataclass
class OptimConfig(ConfigBase):
    """Optimizer, schedules and regularization (the reference's `optim`, `teacher`, `train`).

    An "epoch" is `steps_per_epoch` optimizer updates (the reference's OFFICIAL_EPOCH_LENGTH
    is 1250), whatever the data size. The student's stochastic depth and initialization are
    `ModelConfig`'s.

    Args:
        epochs: int, default 100.
        steps_per_epoch: int, default 1250.
        base_lr: float, default 0.004. Scaled by the global batch (`lr_scaling`).
        min_lr: float, default 1e-6.
        warmup_epochs: float, default 10.
        weight_decay: float, default 0.04. Cosine to `weight_decay_end`.
        weight_decay_end: float, default 0.4.
        momentum_teacher: float, default 0.992. Cosine to `final_momentum_teacher`.
        final_momentum_teacher: float, default 1.0.
        teacher_temp: float, default 0.07.
        warmup_teacher_temp: float, default 0.04.
        warmup_teacher_temp_epochs: float, default 30.
        freeze_last_layer_epochs: float, default 1.
        clip_grad: float, default 3.0. Per part (backbone, each head) or per parameter (`clip_mode`); 0 disables.
        layer_decay: float, default 0.9.
        patch_embed_lr_mult: float, default 0.2.
        adamw_beta1: float, default 0.9.
        adamw_beta2: float, default 0.999.
        gradient_accumulation_steps: int, default 1. Micro-batches per optimizer update.
        lr_scaling: str, default "sqrt_wrt_1024". The peak lr from `base_lr` and the global batch B:
            "sqrt_wrt_1024" (DINOv2, base_lr * sqrt(B / 1024)) or "linear_wrt_256" (DINO v1, base_lr * B / 256).
        clip_mode: str, default "per_part". "per_part" clips each part's (backbone, each head) global gradient norm
            at `clip_grad` (DINOv2); "per_parameter" caps each variable's gradient norm at `clip_grad` (DINO v1).
        freeze_last_layer_mode: str, default "zero_lr". How the heads' last layers stay frozen for
            `freeze_last_layer_epochs`: "zero_lr" gives them lr 0 while AdamW's moments still take their
            gradients (DINOv2); "drop_grad" drops their gradients, so AdamW keeps no state for them (moments and
            step count start after the freeze) and leaves them untouched, weight decay included (DINO v1).
        teacher_temp_per_epoch: bool, default False. The teacher temperature's warmup as a table per epoch
            (constant within an epoch, linspace(warmup_teacher_temp, teacher_temp, warmup epochs), DINO v1)
            instead of per step (DINOv2).
    """

    epochs: int = 100
    steps_per_epoch: int = 1250
    base_lr: float = 0.004
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30
    freeze_last_layer_epochs: float = 1
    clip_grad: float = 3.0
    layer_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999
    gradient_accumulation_steps: int = 1
    lr_scaling: str = "sqrt_wrt_1024"
    clip_mode: str = "per_part"
    freeze_last_layer_mode: str = "zero_lr"
    teacher_temp_per_epoch: bool = False
