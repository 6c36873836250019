"""Parameter groups: each student variable's lr multiplier (layer-wise decay, patch embedding x 0.2), weight-decay
multiplier (0 for biases, norms and LayerScale) and last-layer flag, resolved by which layer owns the variable."""

import dataclasses
import math
import numbers

import keras

from keras_dinov2.layers.block import LayerScale

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


def merge_param_groups(named_groups):
    """One `ParamGroups` from several models' groups, each part renamed "<prefix>/<part>" (several students).

    Args:
        named_groups: sequence of (prefix str, ParamGroups built with variables).

    Returns:
        `ParamGroups` whose clipping units stay per model: "student_0/backbone", "student_1/dino_head", ...

    Example:
    >>> groups = merge_param_groups([("student_0", param_groups(small)), ("student_1", param_groups(base))])
    """
    entries = []
    for prefix, groups in named_groups:
        for variable, group in groups.items():
            if variable is None:
                raise ValueError(f"{prefix}'s groups were restored from a config; merge groups built from variables.")
            renamed = dataclasses.replace(group, name=f"{prefix}/{group.name}", part=f"{prefix}/{group.part}")
            entries.append((variable, f"{prefix}/{variable.path}", renamed))
    return ParamGroups(entries)
