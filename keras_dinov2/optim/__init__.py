"""DINOv2 parameter groups, the AdamW that applies them, and per-part gradient clipping.

The reference gives every student parameter an lr multiplier (layer-wise decay, times 0.2 for the patch
embedding), a weight-decay multiplier (0 for biases, norms and LayerScale) and an "is last layer" flag (the
prototype layers follow their own lr schedule, 0 in the first epoch), then sets each torch param group's lr to
`schedule_lr * lr_multiplier` and its weight decay to `schedule_wd * wd_multiplier` every iteration. Keras
optimizers have one learning rate and one weight decay for all variables, so `DINOv2AdamW` carries the
multipliers itself and applies them to the *update*: under Adam, scaling the gradient would cancel out in
m / sqrt(v).

Groups are resolved by object identity (which layer of the backbone owns a variable), not by parsing variable
paths: a student and a teacher backbone have identical paths, and user-chosen layer names must not change the
optimization.

Reference: facebookresearch/dinov2 `utils/param_groups.py`, `train/ssl_meta_arch.py` (get_params_groups),
`train/train.py` (apply_optim_scheduler, clip_grad_norm_ per part), torch.optim.AdamW; DINO v1's main_dino.py
and utils.py (clipping per parameter, the last layer's gradients dropped in the first epoch).
"""

from keras_dinov2.optim.adamw import DINOv2AdamW
from keras_dinov2.optim.clipping import clip_by_global_norm, clip_by_part, clip_gradients, clip_per_parameter
from keras_dinov2.optim.groups import ParamGroup, ParamGroups, merge_param_groups, param_groups

__all__ = [
    "ParamGroup",
    "ParamGroups",
    "param_groups",
    "merge_param_groups",
    "DINOv2AdamW",
    "clip_by_global_norm",
    "clip_by_part",
    "clip_per_parameter",
    "clip_gradients",
]
