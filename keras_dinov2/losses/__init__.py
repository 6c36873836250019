"""The DINOv2 objectives in keras.ops: DINO and iBOT cross-entropy, centering, Sinkhorn-Knopp, KoLeo.

Everything here is backend-agnostic and computes in float32 whatever the inputs' dtype (the reference runs its
losses in float32 under mixed precision too). Teacher-side quantities are constants: every function that takes
teacher logits or probabilities applies `stop_gradient` to them.

Functions that need a statistic over the *global* batch (Sinkhorn-Knopp, the center update) take an optional
`reduction=` argument, a `CrossReplica`, which the training step binds to its backend's collective (KoLeo
takes one too, to gather the CLS rows of every replica). The default
is the single-device identity, which is also right for a JAX program that holds the global batch as one sharded
array (`keras.distribution`): XLA inserts the collectives itself there.

Reference: facebookresearch/dinov2 `loss/dino_clstoken_loss.py`, `loss/ibot_patch_loss.py`, `loss/koleo_loss.py`
and the loss bookkeeping of `train/ssl_meta_arch.py`.
"""

from keras_dinov2.losses.centering import sinkhorn_knopp, softmax_center, update_center
from keras_dinov2.losses.cross_entropy import dino_cross_entropy, ibot_cross_entropy
from keras_dinov2.losses.dinov2 import dinov2_loss
from keras_dinov2.losses.features import (
    FEATURE_LOSSES,
    feature_distillation_loss,
    standardize_tokens,
    token_regression,
)
from keras_dinov2.losses.regularizers import koleo
from keras_dinov2.losses.replicas import CrossReplica

__all__ = [
    "FEATURE_LOSSES",
    "feature_distillation_loss",
    "standardize_tokens",
    "token_regression",
    "CrossReplica",
    "softmax_center",
    "sinkhorn_knopp",
    "update_center",
    "dino_cross_entropy",
    "ibot_cross_entropy",
    "koleo",
    "dinov2_loss",
]
