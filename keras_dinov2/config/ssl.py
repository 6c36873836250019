"""SSLConfig: every section of a DINOv2 run (model, heads, losses, optimization, data) and its stored layout."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from keras_dinov2.config.data import DataConfig
from keras_dinov2.config.fields import ConfigBase, named_recipe
from keras_dinov2.config.model import ModelConfig
from keras_dinov2.config.training import HeadConfig, LossConfig, OptimConfig

__all__ = ["SSLConfig", "MOVED_TO_MODEL", "upgrade_layout", "data_and_patch_size"]

# Where the model settings were stored before `SSLConfig.model` existed: section -> the ModelConfig fields it held.
MOVED_TO_MODEL = {
    ("optim",): ("drop_path_rate", "drop_path_uniform", "layer_scale_init", "position_embedding_init_std"),
    ("data", "masking"): ("patch_size",),
}


def upgrade_layout(values: dict[str, Any]) -> dict[str, Any]:
    """Return an `SSLConfig.to_dict()` dict in today's layout, reading the layout of older run directories too.

    Run directories written before `SSLConfig.model` existed store the model settings under "optim"
    (`MOVED_TO_MODEL`) and the patch size under "data" / "masking"; they move to "model". A dict that has a
    "model" section is returned unchanged. The argument is not modified.

    Example:
        >>> upgrade_layout({"optim": {"drop_path_rate": 0.1}})
        {'optim': {}, 'model': {'drop_path_rate': 0.1}}
    """
    if not isinstance(values, dict) or "model" in values:
        return values
    values = copy.deepcopy(values)
    model = {}
    for path, names in MOVED_TO_MODEL.items():
        section = values
        for key in path:
            section = section.get(key) if isinstance(section, dict) else None
        if isinstance(section, dict):
            model.update({name: section.pop(name) for name in names if name in section})
    values["model"] = model
    return values


@dataclasses.dataclass
class SSLConfig(ConfigBase):
    """Every knob of a DINOv2 run, with the reference's defaults; recipes via `SSLConfig.recipe`.

    Args:
        batch_size: int, default 64. Source images per replica per step (`train.batch_size_per_gpu`).
        heads: HeadConfig.
        loss: LossConfig.
        optim: OptimConfig.
        data: DataConfig, default the ViT-14 paper crops (2 x 224 + 8 x 98).
        seed: int, default 0.
        model: ModelConfig, default patch 14 with the reference's stochastic depth and initialization. Both crop
            sizes of `data` must be multiples of its patch size.

    Example:
        >>> config = SSLConfig.recipe("digits")
        >>> config.data.crops.global_crops_size, config.grid_size
        (24, (6, 6))
    """

    batch_size: int = 64
    heads: HeadConfig = dataclasses.field(default_factory=HeadConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    seed: int = 0
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)

    def __post_init__(self):
        super().__post_init__()
        patch = self.model.patch_size
        name = self.data.crop_not_a_multiple(patch)
        if name is not None:
            raise ValueError(
                f"{type(self).__name__}: data.crops.{name} must be a multiple of model.patch_size ({patch}); "
                f"received {getattr(self.data.crops, name)}."
            )

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, columns) of a global crop."""
        return self.data.patch_grid(self.model.patch_size)

    @property
    def num_patches(self) -> int:
        """N, the number of patches of a global crop (mask length)."""
        rows, cols = self.grid_size
        return rows * cols

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SSLConfig:
        """Build the config from `to_dict` output, or from a config.json of an older layout (`upgrade_layout`)."""
        return super().from_dict(upgrade_layout(values))

    @classmethod
    def recipe(cls, name: str) -> SSLConfig:
        """Return a fresh copy of a named recipe from `SSL_RECIPES`."""
        return named_recipe(cls, name)


def data_and_patch_size(config, patch_size: int | None = None) -> tuple[DataConfig, int]:
    """The data section and the patch size a data pipeline works with, from what its caller gave.

    Args:
        config: DataConfig; None for `DataConfig()`; or a whole-run config holding a DataConfig as `.data` and a
            ModelConfig as `.model` (SSLConfig), which gives the patch size too.
        patch_size: int or None, default None. Given: it wins. None: the run config's `.model.patch_size`, else
            `ModelConfig()`'s (14).

    Raises:
        ValueError: `config` is none of these, or `patch_size` is not an integer >= 1.

    Example:
        >>> data, patch = data_and_patch_size(SSLConfig.recipe("digits"))
        >>> data.patch_grid(patch)
        (6, 6)
    """
    config = DataConfig() if config is None else config
    if not isinstance(config, DataConfig) and isinstance(getattr(config, "data", None), DataConfig):
        # A whole-run config (e.g. SSLConfig): its data section, and its model's patch size.
        if patch_size is None:
            patch_size = getattr(getattr(config, "model", None), "patch_size", None)
        config = config.data
    if not isinstance(config, DataConfig):
        raise ValueError(
            f"config must be a DataConfig (or hold one as `.data`); received {type(config).__name__}."
        )
    patch_size = ModelConfig().patch_size if patch_size is None else patch_size
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be an integer >= 1; received {patch_size!r}.")
    return config, patch_size
