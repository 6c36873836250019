"""The one table of field rules, the validation that reads it, and the base class of every config.

Every field of every config dataclass has exactly one rule in `FIELD_RULES` (a class missing a rule, or a rule naming
no field, is a programming error that the first construction reports). `validate(config)` applies the rules in field
order; a failing rule raises a ValueError that names the class, the field, what it expects and the value received,
e.g. ``CropConfig.local_crops_number must be an integer >= 0; received -1.`` Rules may normalize a value (pairs and
triples become tuples of floats, dict sections become their config class). Rules across fields (crop sizes against
the patch size, the blur kernel against the crop side) are the classes' own `__post_init__` checks.

This module imports nothing of keras_dinov2, like the rest of the config package.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = [
    "BLUR_PROBABILITY_PRESETS",
    "INTERPOLATIONS",
    "CENTERING_MODES",
    "KOLEO_SCOPES",
    "LR_SCALING_RULES",
    "CLIP_MODES",
    "FREEZE_LAST_LAYER_MODES",
    "Rule",
    "Int",
    "Number",
    "Probability",
    "Bool",
    "Choice",
    "Pair",
    "Triple",
    "PresetOrProbabilities",
    "Section",
    "FIELD_RULES",
    "validate",
    "ConfigBase",
    "register_recipes",
    "named_recipe",
]

# Gaussian-blur probabilities for (global crop 1, global crop 2, each local crop).
# "intended": what the DINOv2 paper and the reference's call sites ask for.
# "released": what the reference code really applied, and so what the published checkpoints saw: its GaussianBlur
# wrapper hands 1 - p to torchvision's RandomApply, turning 1.0 / 0.1 / 0.5 into 0.0 / 0.9 / 0.5.
BLUR_PROBABILITY_PRESETS = {
    "intended": (1.0, 0.1, 0.5),
    "released": (0.0, 0.9, 0.5),
}

# Resize methods of the crops (any `tf.image.resize` method).
INTERPOLATIONS = ("bilinear", "bicubic", "area", "lanczos3", "lanczos5", "gaussian", "mitchellcubic", "nearest")
CENTERING_MODES = ("centering", "sinkhorn_knopp")
KOLEO_SCOPES = ("global", "replica")
# DINOv2's rules first (the defaults), then DINO v1's (main_dino.py).
LR_SCALING_RULES = ("sqrt_wrt_1024", "linear_wrt_256")
CLIP_MODES = ("per_part", "per_parameter")
FREEZE_LAST_LAYER_MODES = ("zero_lr", "drop_grad")


def _is_number(value):
    return not isinstance(value, bool) and isinstance(value, (int, float))


class Rule:
    """One field's rule: `check` returns the (possibly normalized) value or raises a ValueError naming the field."""

    def check(self, value, owner: str, name: str, config, field: dataclasses.Field):
        """Return `value` as the config stores it; raise a ValueError "{owner}.{name} must be ...; received ...".

        Args:
            value: what the field received.
            owner: str. The config class's name.
            name: str. The field's name.
            config: the config being validated (rules that compare with another field read it).
            field: dataclasses.Field. The field (sections take their class from its default factory).
        """
        raise NotImplementedError

    @staticmethod
    def fail(owner, name, expected, value):
        """Raise the ValueError of a field that received `value` where it expects `expected`."""
        raise ValueError(f"{owner}.{name} must be {expected}; received {value!r}.")


@dataclasses.dataclass(frozen=True)
class Int(Rule):
    """An integer (not a bool) >= `minimum`; odd too when `odd`."""

    minimum: int
    odd: bool = False

    def check(self, value, owner, name, config, field):
        ok = not isinstance(value, bool) and isinstance(value, int) and value >= self.minimum
        if not ok or (self.odd and value % 2 == 0):
            self.fail(owner, name, f"an {'odd ' if self.odd else ''}integer >= {self.minimum}", value)
        return value


@dataclasses.dataclass(frozen=True)
class Number(Rule):
    """A real number (int or float, not a bool) within optional bounds, stored as given.

    `low` may name another field of the same config (`max_aspect >= min_aspect`); `optional` admits None.
    """

    low: float | str | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    label: str | None = None

    def check(self, value, owner, name, config, field):
        if value is None and self.optional:
            return value
        low = getattr(config, self.low) if isinstance(self.low, str) else self.low
        ok = _is_number(value)
        if ok and low is not None:
            ok = value > low if self.low_open else value >= low
        if ok and self.high is not None:
            ok = value < self.high if self.high_open else value <= self.high
        if not ok:
            self.fail(owner, name, self.describe(low), value)
        return value

    def describe(self, low):
        """What the rule expects, in words."""
        if self.label:
            return self.label
        if isinstance(self.low, str):
            text = f"a number {'>' if self.low_open else '>='} {self.low} ({low})"
        elif low is not None and self.high is not None:
            text = f"a number in {'(' if self.low_open else '['}{low}, {self.high}{')' if self.high_open else ']'}"
        elif low is not None:
            text = f"a number {'>' if self.low_open else '>='} {low}"
        else:
            text = "a number"
        return f"None or {text}" if self.optional else text


@dataclasses.dataclass(frozen=True)
class Probability(Number):
    """A number in [0, 1]."""

    low: float = 0
    high: float = 1
    label: str = "a probability in [0, 1]"


@dataclasses.dataclass(frozen=True)
class Bool(Rule):
    """True or False."""

    def check(self, value, owner, name, config, field):
        if not isinstance(value, bool):
            self.fail(owner, name, "True or False", value)
        return value


@dataclasses.dataclass(frozen=True)
class Choice(Rule):
    """One of a fixed tuple of values."""

    options: tuple

    def check(self, value, owner, name, config, field):
        if value not in self.options:
            self.fail(owner, name, f"one of {self.options}", value)
        return value


@dataclasses.dataclass(frozen=True)
class Pair(Rule):
    """An ordered pair (min, max) of numbers, stored as a tuple of floats; optional bounds, optionally min > 0."""

    low: float | None = None
    high: float | None = None
    positive: bool = False

    def check(self, value, owner, name, config, field):
        try:
            a, b = (float(v) for v in value)
        except (TypeError, ValueError):
            a = b = None
        if a is None:
            self.fail(owner, name, "a pair (min, max) of numbers", value)
        bad = a > b or (self.low is not None and a < self.low) or (self.high is not None and b > self.high)
        if bad or (self.positive and a <= 0):
            bounds = f" within [{self.low}, {self.high}]" if self.low is not None or self.high is not None else ""
            positive = " and > 0" if self.positive else ""
            self.fail(owner, name, f"an ordered pair (min, max) with min <= max{bounds}{positive}", value)
        return (a, b)


@dataclasses.dataclass(frozen=True)
class Triple(Rule):
    """Three numbers (one per RGB channel), stored as a tuple of floats; each > `low` when given."""

    low: float | None = None

    def check(self, value, owner, name, config, field):
        try:
            out = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            out = ()
        if len(out) != 3 or (self.low is not None and min(out) <= self.low):
            limit = f" > {self.low}" if self.low is not None else ""
            self.fail(owner, name, f"3 numbers{limit} (one per RGB channel)", value)
        return out


@dataclasses.dataclass(frozen=True)
class PresetOrProbabilities(Rule):
    """A preset name of `presets`, or three probabilities (stored as a tuple of floats)."""

    presets: dict

    def check(self, value, owner, name, config, field):
        if isinstance(value, str):
            if value not in self.presets:
                self.fail(owner, name, f"one of {sorted(self.presets)} or three probabilities "
                          "(global 1, global 2, local)", value)
            return value
        try:
            probs = tuple(float(p) for p in value)
        except (TypeError, ValueError):
            probs = ()
        if len(probs) != 3 or not all(0.0 <= p <= 1.0 for p in probs):
            names = ", ".join(repr(p) for p in self.presets)
            self.fail(owner, name, f"{names} or three probabilities (global 1, global 2, local) in [0, 1]", value)
        return probs


@dataclasses.dataclass(frozen=True)
class Section(Rule):
    """A nested config: an instance of the field's default factory (its class), or a dict for its `from_dict`."""

    def check(self, value, owner, name, config, field):
        cls = field.default_factory
        if isinstance(value, dict):
            return cls.from_dict(value)
        if not isinstance(value, cls):
            raise ValueError(f"{owner}.{name} must be a {cls.__name__} or a dict; received {type(value).__name__}.")
        return value


NON_NEGATIVE = Number(0)
POSITIVE = Number(0, low_open=True)

FIELD_RULES: dict[str, dict[str, Rule]] = {
    "CropConfig": {
        "global_crops_size": Int(1),
        "global_crops_scale": Pair(0.0, 1.0, positive=True),
        "local_crops_number": Int(0),
        "local_crops_size": Int(1),
        "local_crops_scale": Pair(0.0, 1.0, positive=True),
        "aspect_ratio": Pair(positive=True),
        "flip_probability": Probability(),
        "interpolation": Choice(INTERPOLATIONS),
    },
    "AugmentationConfig": {
        "color_jitter_probability": Probability(),
        "brightness": NON_NEGATIVE,
        "contrast": NON_NEGATIVE,
        "saturation": NON_NEGATIVE,
        "hue": Number(0, 0.5),
        "grayscale_probability": Probability(),
        "blur_probabilities": PresetOrProbabilities(BLUR_PROBABILITY_PRESETS),
        "blur_kernel_size": Int(1, odd=True),
        "blur_sigma": Pair(positive=True),
        "solarize_probability": Probability(),
        "solarize_threshold": NON_NEGATIVE,
        "mean": Triple(),
        "std": Triple(low=0.0),
    },
    "MaskingConfig": {
        "mask_sample_probability": Probability(),
        "mask_ratio_min_max": Pair(0.0, 1.0),
        "max_block_ratio": Number(0, 1, low_open=True),
        "min_block_patches": Int(1),
        "min_aspect": POSITIVE,
        "max_aspect": Number("min_aspect", optional=True),
        "max_attempts": Int(1),
    },
    "DataConfig": {"crops": Section(), "augmentation": Section(), "masking": Section()},
    "ModelConfig": {
        "patch_size": Int(1),
        "drop_path_rate": Number(0, 1, high_open=True),
        "drop_path_uniform": Bool(),
        "layer_scale_init": Number(0, low_open=True, optional=True),
        "position_embedding_init_std": POSITIVE,
    },
    "HeadConfig": {
        "num_prototypes": Int(1),
        "hidden_dim": Int(1),
        "bottleneck_dim": Int(1),
        "num_layers": Int(1),
        "ibot_separate_head": Bool(),
        "ibot_num_prototypes": Int(1),
        "ibot_bottleneck_dim": Int(1),
        "use_bn": Bool(),
        "norm_last_layer": Bool(),
    },
    "LossConfig": {
        "dino_weight": NON_NEGATIVE,
        "ibot_weight": NON_NEGATIVE,
        "koleo_weight": NON_NEGATIVE,
        "student_temp": POSITIVE,
        "centering": Choice(CENTERING_MODES),
        "center_momentum": Probability(),
        "koleo_scope": Choice(KOLEO_SCOPES),
    },
    "OptimConfig": {
        "epochs": Int(1),
        "steps_per_epoch": Int(1),
        "base_lr": NON_NEGATIVE,
        "min_lr": NON_NEGATIVE,
        "warmup_epochs": NON_NEGATIVE,
        "weight_decay": NON_NEGATIVE,
        "weight_decay_end": NON_NEGATIVE,
        "momentum_teacher": Probability(),
        "final_momentum_teacher": Probability(),
        "teacher_temp": POSITIVE,
        "warmup_teacher_temp": POSITIVE,
        "warmup_teacher_temp_epochs": NON_NEGATIVE,
        "freeze_last_layer_epochs": NON_NEGATIVE,
        "clip_grad": NON_NEGATIVE,
        "layer_decay": POSITIVE,
        "patch_embed_lr_mult": NON_NEGATIVE,
        "adamw_beta1": Number(0, 1, high_open=True),
        "adamw_beta2": Number(0, 1, high_open=True),
        "gradient_accumulation_steps": Int(1),
        "lr_scaling": Choice(LR_SCALING_RULES),
        "clip_mode": Choice(CLIP_MODES),
        "freeze_last_layer_mode": Choice(FREEZE_LAST_LAYER_MODES),
        "teacher_temp_per_epoch": Bool(),
    },
    "SSLConfig": {
        "batch_size": Int(1),
        "heads": Section(),
        "loss": Section(),
        "optim": Section(),
        "data": Section(),
        "seed": Int(0),
        "model": Section(),
    },
}


def _rules_of(cls):
    for klass in cls.__mro__:
        if klass.__name__ in FIELD_RULES:
            return klass.__name__, FIELD_RULES[klass.__name__]
    raise TypeError(f"{cls.__name__} has no entry in FIELD_RULES.")


def validate(config) -> None:
    """Check every field of the config dataclass `config` against its rule, storing normalized values.

    Raises:
        ValueError: a field breaks its rule (the message names the class, the field and the value).
        TypeError: the class and its rules do not cover the same fields (a programming error).
    """
    table_name, rules = _rules_of(type(config))
    fields = dataclasses.fields(config)
    names = [f.name for f in fields]
    if set(names) != set(rules):
        raise TypeError(f"FIELD_RULES[{table_name!r}] covers {sorted(rules)} but {type(config).__name__} has the "
                        f"fields {sorted(names)}.")
    owner = type(config).__name__
    for f in fields:
        value = getattr(config, f.name)
        checked = rules[f.name].check(value, owner, f.name, config, f)
        if checked is not value:
            setattr(config, f.name, checked)


class ConfigBase:
    """Base of the config dataclasses: validation from `FIELD_RULES`, and the dictionary round trip.

    Subclasses are dataclasses; their `__post_init__` (this one, or an override that calls it first and then checks
    rules across fields) validates every field.
    """

    def __post_init__(self):
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-friendly dict of the fields (nested configs become dicts, tuples lists)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, ConfigBase):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        """Build the config from `to_dict` output; unknown keys raise a ValueError."""
        if not isinstance(values, dict):
            raise ValueError(f"{cls.__name__}.from_dict expects a dict; received {type(values).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(
                f"{cls.__name__}.from_dict received unknown keys {unknown}; expected a subset of {sorted(names)}."
            )
        return cls(**values)


# Named recipes per config class: name -> a function returning a new config. recipes.py fills it.
_RECIPES: dict[type, dict] = {}


def register_recipes(cls: type, table: dict) -> None:
    """Make `table` (name -> function returning a `cls`) the named recipes `cls.recipe(name)` reads.

    The table is kept, not copied: entries added to it later are recipes too.
    """
    _RECIPES[cls] = table


def named_recipe(cls: type, name: str):
    """Return a fresh copy of the recipe `name` of `cls` (a round trip through `to_dict`)."""
    table = _RECIPES.get(cls, {})
    if name not in table:
        raise ValueError(f"{cls.__name__}.recipe: name must be one of {sorted(table)}; received {name!r}.")
    return cls.from_dict(table[name]().to_dict())
