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
`train/train.py` (apply_optim_scheduler, clip_grad_norm_ per part), torch.optim.AdamW.
"""

import dataclasses
import math
import numbers

import keras
from keras import ops

from keras_dinov2.layers.block import LayerScale

__all__ = [
    "ParamGroup",
    "ParamGroups",
    "param_groups",
    "DINOv2AdamW",
    "clip_by_global_norm",
    "clip_by_part",
]

_LearningRateSchedule = keras.optimizers.schedules.LearningRateSchedule

# Layers whose every variable is a normalization scale or shift: the reference exempts them from weight decay
# through the "norm" in their parameter names.
_NORMALIZATION_LAYERS = tuple(
    cls
    for cls in (
        getattr(keras.layers, name, None)
        for name in (
            "LayerNormalization",
            "BatchNormalization",
            "GroupNormalization",
            "RMSNormalization",
        )
    )
    if cls is not None
)


@dataclasses.dataclass(frozen=True)
class ParamGroup:
    """How the optimizer treats one variable.

    Args:
        name: str. Readable group label, e.g. "backbone/block_3" or "dino_head/last_layer"; a "/no_wd" suffix
            marks variables without weight decay.
        part: str. "backbone" or the head's name: the unit of gradient clipping.
        layer_id: int. 0 for the embeddings, i + 1 for block i, num_layers + 1 for the final norm and heads.
        lr_multiplier: float. Multiplies the (last-layer or base) learning rate.
        wd_multiplier: float. Multiplies the weight decay (0.0 or 1.0 in the reference).
        is_last_layer: bool. Use the last-layer learning rate schedule.
    """

    name: str
    part: str
    layer_id: int
    lr_multiplier: float
    wd_multiplier: float
    is_last_layer: bool


class ParamGroups:
    """Per-variable `ParamGroup`s, looked up by variable identity (then by `variable.path`).

    Built by `param_groups()`. Holds references to the variables, so identities stay valid. Lookup by path is
    the fallback for groups restored from a config (`from_config`), where only paths exist.

    Args:
        entries: list of (variable or None, path str, ParamGroup).

    Example:
    >>> groups = param_groups(backbone, heads=[dino_head])
    >>> groups[backbone.transformer_blocks[0].attn.qkv.kernel].lr_multiplier   # 0.9 ** 12 for ViT-S
    >>> print(groups.summary())
    """

    def __init__(self, entries):
        self._entries = list(entries)
        self._by_id = {}
        self._by_path = {}
        for variable, path, group in self._entries:
            if variable is not None:
                self._by_id.setdefault(id(variable), group)
            # A path seen with two different groups (student and teacher copies share paths) cannot be
            # resolved by path: mark it ambiguous.
            if self._by_path.get(path, group) != group:
                self._by_path[path] = None
            else:
                self._by_path[path] = group

    def get(self, variable, default=None):
        """The variable's group: by identity, else by `variable.path` when unambiguous, else `default`."""
        group = self._by_id.get(id(variable))
        if group is None:
            group = self._by_path.get(getattr(variable, "path", None))
        return default if group is None else group

    def __getitem__(self, variable):
        group = self.get(variable)
        if group is None:
            raise KeyError(getattr(variable, "path", variable))
        return group

    def __contains__(self, variable):
        return self.get(variable) is not None

    def __len__(self):
        return len(self._entries)

    def __iter__(self):
        return iter(self.items())

    def items(self):
        """[(variable, ParamGroup)] in the order the groups were built (variable None after `from_config`)."""
        return [(variable, group) for variable, _, group in self._entries]

    @property
    def variables(self):
        return [variable for variable, _, _ in self._entries if variable is not None]

    @property
    def parts(self):
        """Part names in order of first appearance ("backbone", then the heads)."""
        return list(dict.fromkeys(group.part for _, _, group in self._entries))

    def fused(self):
        """Variables merged by (lr_multiplier, wd_multiplier, is_last_layer), like the reference's fused groups.

        Returns:
            list of dicts with keys "lr_multiplier", "wd_multiplier", "is_last_layer", "variables".
        """
        fused = {}
        for variable, _, group in self._entries:
            key = (group.lr_multiplier, group.wd_multiplier, group.is_last_layer)
            entry = fused.setdefault(
                key,
                {
                    "lr_multiplier": key[0],
                    "wd_multiplier": key[1],
                    "is_last_layer": key[2],
                    "variables": [],
                },
            )
            entry["variables"].append(variable)
        return list(fused.values())

    def summary(self):
        """One line per variable: path, group, lr and wd multipliers, last-layer flag (for logs)."""
        lines = []
        for _, path, g in self._entries:
            last = " last_layer" if g.is_last_layer else ""
            lines.append(
                f"{path}: {g.name} lr_mult={g.lr_multiplier:.6g} wd_mult={g.wd_multiplier:g}{last}"
            )
        return "\n".join(lines)

    def to_config(self):
        """{path: group fields} for serialization; raises when one path maps to two different groups."""
        config = {}
        for _, path, group in self._entries:
            fields = dataclasses.asdict(group)
            if config.setdefault(path, fields) != fields:
                raise ValueError(
                    f"`param_groups` cannot be serialized by path: variable path {path!r} appears with two "
                    f"different groups ({config[path]} and {fields}). Give the layers distinct names."
                )
        return config

    @classmethod
    def from_config(cls, config):
        return cls([(None, path, ParamGroup(**fields)) for path, fields in config.items()])


def _owners(root):
    """Maps id(variable) to the deepest layer under `root` (included) whose `weights` contain it."""
    owners = {}

    def visit(layer, depth, seen):
        if id(layer) in seen:
            return
        seen.add(id(layer))
        for variable in layer.weights:
            previous = owners.get(id(variable))
            if previous is None or previous[0] <= depth:
                owners[id(variable)] = (depth, layer)
        # Direct sublayers; Keras has no public accessor for a layer's own children.
        for child in layer._flatten_layers(include_self=False, recursive=False):
            visit(child, depth + 1, seen)

    visit(root, 0, set())
    return {key: layer for key, (_, layer) in owners.items()}


def _without_weight_decay(variable, owner):
    # The reference's rule is on torch names: `name.endswith(".bias") or "norm" in name or "gamma" in name`.
    # Here the layer types carry the "norm" and LayerScale "gamma" parts, and the variable's own name (not
    # its path, which holds user-chosen layer names) carries the rest.
    leaf = variable.name.rsplit("/", 1)[-1]
    if leaf.endswith("bias") or "norm" in leaf.lower() or "gamma" in leaf:
        return True
    return isinstance(owner, (*_NORMALIZATION_LAYERS, LayerScale))


def _ids(variables):
    return {id(v) for v in variables}


def param_groups(backbone, heads=(), layer_decay=0.9, patch_embed_lr_mult=0.2):
    """The reference's per-parameter lr / weight-decay multipliers and last-layer flags, for the student.

    Rules (reference `get_params_groups_with_decay`, applied to the backbone and to each head separately):

    - layer id: 0 for everything in `backbone.embeddings` (patch embedding, position embedding, CLS, mask and
      register tokens), i + 1 for `backbone.transformer_blocks[i]`, L + 1 for the rest of the backbone (the final
      norm); lr multiplier `layer_decay ** (L + 1 - layer_id)`, with L = number of blocks. Heads get 1.
    - the patch embedding's lr multiplier is further multiplied by `patch_embed_lr_mult`;
    - weight-decay multiplier 0 for biases, normalization layers and LayerScale gammas, 1 for everything else
      (kernels, tokens, position embeddings, the prototypes' `weight_v` and `weight_g`);
    - `is_last_layer` for a head's prototype layer (`head.last_layer_variables`, or the weights of
      `head.last_layer`), which follows the last-layer lr schedule.

    Only trainable variables are grouped (the reference skips parameters without `requires_grad`).

    Args:
        backbone: `DINOv2Backbone` (anything with `embeddings.patch_embedding` and `transformer_blocks`).
        heads: sequence of built `keras.layers.Layer`, or dict {part name: layer}, default (). The student's
            DINO and iBOT heads. Parts are named by the dict keys or the layers' names.
        layer_decay: float, default 0.9 (the reference's `optim.layerwise_decay`; its ViT-L/g recipes use 1.0).
        patch_embed_lr_mult: float, default 0.2.

    Returns:
        `ParamGroups`.

    Example:
    >>> groups = param_groups(backbone, heads={"dino_head": dino_head, "ibot_head": ibot_head})
    >>> optimizer = DINOv2AdamW(learning_rate=lr, weight_decay=wd, last_layer_learning_rate=last_lr,
    ...                         param_groups=groups)
    """
    for name, value in (("layer_decay", layer_decay), ("patch_embed_lr_mult", patch_embed_lr_mult)):
        if (
            isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or not 0 <= value < math.inf
        ):
            raise ValueError(f"`{name}` must be a finite number >= 0, received {value!r}.")
    embeddings = getattr(backbone, "embeddings", None)
    blocks = getattr(backbone, "transformer_blocks", None)
    patch_embedding = getattr(embeddings, "patch_embedding", None)
    if not isinstance(backbone, keras.layers.Layer) or blocks is None or patch_embedding is None:
        raise ValueError(
            "`backbone` must be a DINOv2Backbone (a Keras layer with `embeddings.patch_embedding` and "
            f"`transformer_blocks`), received {type(backbone).__name__}."
        )
    if isinstance(heads, dict):
        named_heads = list(heads.items())
    elif isinstance(heads, keras.layers.Layer):
        named_heads = [(heads.name, heads)]
    else:
        named_heads = [(getattr(head, "name", None), head) for head in heads]
    for name, head in named_heads:
        if not isinstance(head, keras.layers.Layer):
            raise ValueError(f"`heads` must hold Keras layers, received {head!r} for {name!r}.")
        if not head.built or not head.weights:
            raise ValueError(
                f"`heads` must be built (have variables) before grouping, received unbuilt head {name!r}. "
                "Call the head once or `head.build(input_shape)`."
            )
    part_names = ["backbone"] + [name for name, _ in named_heads]
    if len(set(part_names)) != len(part_names):
        raise ValueError(
            f"`heads` must have distinct names other than 'backbone', received {part_names[1:]}."
        )

    num_layers = len(blocks)
    layer_ids = {key: 0 for key in _ids(embeddings.weights)}
    for i, block in enumerate(blocks):
        layer_ids.update({key: i + 1 for key in _ids(block.weights)})
    patch_ids = _ids(patch_embedding.weights)

    entries = []
    seen = set()

    def add(part, variable, layer_id, lr_multiplier, is_last_layer, owner, section):
        if id(variable) in seen:  # a variable shared between parts keeps its first group
            return
        seen.add(id(variable))
        wd_multiplier = 0.0 if _without_weight_decay(variable, owner) else 1.0
        name = f"{part}/{section}" + ("/no_wd" if wd_multiplier == 0.0 else "")
        group = ParamGroup(
            name=name,
            part=part,
            layer_id=layer_id,
            lr_multiplier=float(lr_multiplier),
            wd_multiplier=wd_multiplier,
            is_last_layer=is_last_layer,
        )
        entries.append((variable, variable.path, group))

    owners = _owners(backbone)
    for variable in backbone.trainable_variables:
        layer_id = layer_ids.get(id(variable), num_layers + 1)
        multiplier = layer_decay ** (num_layers + 1 - layer_id)
        if id(variable) in patch_ids:
            multiplier *= patch_embed_lr_mult
            section = "patch_embed"
        elif layer_id == 0:
            section = "embeddings"
        elif layer_id <= num_layers:
            section = f"block_{layer_id - 1}"
        else:
            section = "top"
        add("backbone", variable, layer_id, multiplier, False, owners.get(id(variable)), section)

    for part, head in named_heads:
        if hasattr(head, "last_layer_variables"):
            last_ids = _ids(head.last_layer_variables)
        elif isinstance(getattr(head, "last_layer", None), keras.layers.Layer):
            last_ids = _ids(head.last_layer.weights)
        else:
            last_ids = set()
        owners = _owners(head)
        for variable in head.trainable_variables:
            is_last = id(variable) in last_ids
            section = "last_layer" if is_last else "mlp"
            add(part, variable, num_layers + 1, 1.0, is_last, owners.get(id(variable)), section)
    return ParamGroups(entries)


def _check_rate(name, value, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, _LearningRateSchedule):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
        raise ValueError(
            f"`{name}` must be a finite number >= 0 or a LearningRateSchedule"
            + (" or None" if allow_none else "")
            + f", received {value!r}."
        )
    return float(value)


def _at_step(value, step):
    if isinstance(value, _LearningRateSchedule):
        return ops.cast(value(step), "float32")
    return ops.convert_to_tensor(value, "float32")


def _bias_correction(beta, step):
    """1 - beta^step without float32 cancellation: 1 - 0.999 is off by 1.3e-5 in float32, -expm1 is not.

    torch evaluates it in Python float64; this keeps DINOv2AdamW within float32 rounding of torch's steps.
    """
    if beta == 0.0:
        return ops.ones_like(step)
    return -ops.expm1(step * math.log(beta))


@keras.saving.register_keras_serializable(package="keras_dinov2")
class DINOv2AdamW(keras.optimizers.Optimizer):
    """AdamW with the reference's per-variable lr / weight-decay multipliers and last-layer lr schedule.

    For a variable in group g at step t (`optimizer.iterations`, 0 at the first update):

        lr = (last_layer_learning_rate(t) if g.is_last_layer else learning_rate(t)) * g.lr_multiplier
        wd = weight_decay(t) * g.wd_multiplier
        m = beta_1 m + (1 - beta_1) grad;  v = beta_2 v + (1 - beta_2) grad^2
        param = param * (1 - lr wd) - lr / (1 - beta_1^(t+1)) * m / (sqrt(v / (1 - beta_2^(t+1))) + epsilon)

    which is torch.optim.AdamW's update (epsilon added after the bias correction, decay scaled by the group's
    lr) with the schedules the reference writes into each param group before the step. The multiplier scales
    the whole update, not the gradient. A variable with lr 0 (the last layer in the first epoch) does not move,
    but its moments still accumulate, as in the reference.

    The schedules are evaluated inside the update from the step variable, so one compiled train step serves
    the whole run on every backend, including JAX's `stateless_apply`. With `param_groups=None` every
    variable gets multipliers 1 (a plain AdamW); with groups, every variable the optimizer is built on must be
    in them (a `ValueError` lists the others). `exclude_from_weight_decay()` is honoured on top of the groups.

    Args:
        learning_rate: float or `LearningRateSchedule`, default 0.001. Base lr (multiplied per group).
        weight_decay: float or `LearningRateSchedule`, default 0.04. Base weight decay (multiplied per group).
        last_layer_learning_rate: float, `LearningRateSchedule` or None, default None. Lr of the last-layer
            groups; None uses `learning_rate`.
        param_groups: `ParamGroups`, dict {path: ParamGroup fields} or None, default None.
        beta_1: float, default 0.9.
        beta_2: float, default 0.999.
        epsilon: float, default 1e-8 (torch's AdamW default; Keras's AdamW uses 1e-7).
        name: str, default "dinov2_adamw".
        **kwargs: other `keras.optimizers.Optimizer` arguments (e.g. `gradient_accumulation_steps`,
            `loss_scale_factor`). Its own `weight_decay` mechanism is not used.

    Example:
    >>> s = dinov2_schedules(total_steps=125000, steps_per_epoch=1250, global_batch_size=1024)
    >>> optimizer = DINOv2AdamW.from_schedules(s, param_groups(backbone, heads=[dino_head]))
    >>> optimizer.apply(grads, variables)
    """

    def __init__(
        self,
        learning_rate=0.001,
        weight_decay=0.04,
        last_layer_learning_rate=None,
        param_groups=None,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-8,
        name="dinov2_adamw",
        **kwargs,
    ):
        if isinstance(learning_rate, numbers.Real) and not isinstance(learning_rate, bool):
            learning_rate = float(learning_rate)
        super().__init__(learning_rate=learning_rate, weight_decay=None, name=name, **kwargs)
        self.base_weight_decay = _check_rate("weight_decay", weight_decay)
        self.last_layer_learning_rate = _check_rate(
            "last_layer_learning_rate", last_layer_learning_rate, allow_none=True
        )
        if isinstance(param_groups, dict):
            param_groups = ParamGroups.from_config(param_groups)
        if param_groups is not None and not isinstance(param_groups, ParamGroups):
            raise ValueError(
                "`param_groups` must be a ParamGroups (from `param_groups()`), a dict of its config or None, "
                f"received {type(param_groups).__name__}."
            )
        self.param_groups = param_groups
        for arg, value in (("beta_1", beta_1), ("beta_2", beta_2)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
                raise ValueError(f"`{arg}` must be in [0, 1), received {value!r}.")
        if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not epsilon > 0:
            raise ValueError(f"`epsilon` must be a number > 0, received {epsilon!r}.")
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = float(epsilon)

    @classmethod
    def from_schedules(cls, schedules, param_groups=None, **kwargs):
        """An optimizer reading the lr, last-layer lr and weight decay of a `DINOv2Schedules`."""
        return cls(
            learning_rate=schedules.learning_rate,
            weight_decay=schedules.weight_decay,
            last_layer_learning_rate=schedules.last_layer_learning_rate,
            param_groups=param_groups,
            **kwargs,
        )

    def build(self, var_list):
        if self.built:
            return
        multipliers, missing = [], []
        for variable in var_list:
            if self.param_groups is None:
                group = ParamGroup("all", "all", 0, 1.0, 1.0, False)
            else:
                group = self.param_groups.get(variable)
                if group is None:
                    missing.append(getattr(variable, "path", repr(variable)))
                    continue
            wd_multiplier = group.wd_multiplier if self._use_weight_decay(variable) else 0.0
            multipliers.append((group.lr_multiplier, wd_multiplier, group.is_last_layer))
        if missing:
            raise ValueError(
                "Every variable given to DINOv2AdamW must be in its `param_groups`; received "
                f"{len(missing)} that are not: {missing[:10]}"
                + (" ..." if len(missing) > 10 else "")
                + ". Build the groups from the same student backbone and heads whose variables are trained."
            )
        super().build(var_list)
        # A tuple of plain floats: the multipliers are trace-time constants, not tracked state.
        self._multipliers = tuple(multipliers)
        self._momentums, self._velocities = self.add_optimizer_variables(
            var_list, ["momentum", "velocity"]
        )

    def current_hyperparameters(self):
        """(learning rate, last-layer learning rate, weight decay) at the current step, float32 tensors."""
        step = self.iterations
        if isinstance(self._learning_rate, _LearningRateSchedule):
            learning_rate = _at_step(self._learning_rate, step)
        else:
            learning_rate = ops.cast(self._get_current_learning_rate(), "float32")
        if self.last_layer_learning_rate is None:
            last_layer_learning_rate = learning_rate
        else:
            last_layer_learning_rate = _at_step(self.last_layer_learning_rate, step)
        return learning_rate, last_layer_learning_rate, _at_step(self.base_weight_decay, step)

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        # Evaluate the schedules once per step, not once per variable, and hand them to `update_step`
        # through its `learning_rate` argument, which every backend (tf.distribute included) forwards.
        hyper = ops.stack(self.current_hyperparameters())
        super()._backend_update_step(grads, trainable_variables, hyper)

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        lr_multiplier, wd_multiplier, is_last_layer = self._multipliers[index]
        dtype = variable.dtype
        hyper = ops.cast(learning_rate, dtype)
        if len(hyper.shape) == 0:  # called directly with a plain learning rate
            lr, weight_decay = (
                hyper,
                ops.cast(_at_step(self.base_weight_decay, self.iterations), dtype),
            )
        else:
            lr, weight_decay = hyper[1 if is_last_layer else 0], hyper[2]
        lr = lr * lr_multiplier
        weight_decay = weight_decay * wd_multiplier
        gradient = ops.cast(gradient, dtype)
        step = ops.cast(self.iterations + 1, dtype)
        bias_correction_1 = _bias_correction(self.beta_1, step)
        bias_correction_2 = _bias_correction(self.beta_2, step)

        m = self._momentums[index]
        v = self._velocities[index]
        new_m = m + (1.0 - self.beta_1) * (gradient - m)
        new_v = self.beta_2 * v + (1.0 - self.beta_2) * ops.square(gradient)
        self.assign(m, new_m)
        self.assign(v, new_v)
        denominator = ops.sqrt(new_v) / ops.sqrt(bias_correction_2) + self.epsilon
        update = (lr / bias_correction_1) * new_m / denominator
        self.assign(variable, variable * (1.0 - lr * weight_decay) - update)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "weight_decay": keras.saving.serialize_keras_object(self.base_weight_decay),
                "last_layer_learning_rate": keras.saving.serialize_keras_object(
                    self.last_layer_learning_rate
                ),
                "param_groups": None
                if self.param_groups is None
                else self.param_groups.to_config(),
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for key in ("weight_decay", "last_layer_learning_rate"):
            if isinstance(config.get(key), dict):
                config[key] = keras.saving.deserialize_keras_object(
                    config[key], custom_objects=custom_objects
                )
        return super().from_config(config, custom_objects=custom_objects)


def clip_by_global_norm(grads, max_norm):
    """Scales gradients so that their joint L2 norm is at most `max_norm`, as torch's `clip_grad_norm_`.

    norm = sqrt(sum over tensors of sum(g^2)), computed in float32; every gradient is multiplied by
    min(max_norm / (norm + 1e-6), 1). `None` entries are skipped and returned as `None`; an all-zero or empty
    list has norm 0 and is returned unscaled. A non-finite norm propagates (like torch with its default
    `error_if_nonfinite=False`).

    Args:
        grads: list of tensors or None.
        max_norm: float > 0. The reference clips at 3.0 (`optim.clip_grad`).

    Returns:
        (list of clipped gradients in their own dtypes, float32 scalar norm before clipping).

    Example:
    >>> clipped, norm = clip_by_global_norm([ops.ones((4,)) * 3.0], 3.0)   # norm 6.0, clipped to 1.5 each
    """
    if (
        isinstance(max_norm, bool)
        or not isinstance(max_norm, numbers.Real)
        or not 0 < max_norm < math.inf
    ):
        raise ValueError(f"`max_norm` must be a finite number > 0, received {max_norm!r}.")
    present = [g for g in grads if g is not None]
    if not present:
        return list(grads), ops.zeros((), "float32")
    squared = [ops.sum(ops.square(ops.cast(g, "float32"))) for g in present]
    norm = ops.sqrt(ops.sum(ops.stack(squared)))
    scale = ops.minimum(max_norm / (norm + 1e-6), 1.0)
    clipped = [None if g is None else g * ops.cast(scale, g.dtype) for g in grads]
    return clipped, norm


def clip_by_part(grads, variables, param_groups, max_norm=3.0):
    """Clips the gradients of each part (backbone, each head) by its own global norm, as the reference.

    Args:
        grads: list of tensors or None, aligned with `variables`.
        variables: list of variables (the ones `param_groups` was built from).
        param_groups: `ParamGroups`. Each variable's `part` decides its clipping unit.
        max_norm: float, default 3.0.

    Returns:
        (list of clipped gradients aligned with `variables`, dict {part: float32 norm before clipping}).

    Example:
    >>> grads, norms = clip_by_part(grads, model.trainable_variables, groups, 3.0)
    >>> norms["backbone"]
    """
    grads, variables = list(grads), list(variables)
    if len(grads) != len(variables):
        raise ValueError(
            f"`grads` and `variables` must have the same length, received {len(grads)} and {len(variables)}."
        )
    indices = {}
    for i, variable in enumerate(variables):
        group = param_groups.get(variable)
        if group is None:
            raise ValueError(
                f"`variables` must all be in `param_groups`, received {getattr(variable, 'path', variable)!r}."
            )
        indices.setdefault(group.part, []).append(i)
    clipped, norms = list(grads), {}
    for part, part_indices in indices.items():
        part_grads, norms[part] = clip_by_global_norm([grads[i] for i in part_indices], max_norm)
        for i, g in zip(part_indices, part_grads):
            clipped[i] = g
    return clipped, norms
