"""The model section of a run: the student backbone's patch size, stochastic depth and initialization."""

from __future__ import annotations

import dataclasses
from typing import Any

from keras_dinov2.config.fields import ConfigBase

__all__ = ["ModelConfig"]


@dataclasses.dataclass
class ModelConfig(ConfigBase):
    """The student backbone settings a run fixes (the architecture itself is the run's model name or preset).

    Args:
        patch_size: int, default 14. Patch size of the student backbone; the crop sizes must be multiples of it,
            and the iBOT mask grid is (global_crops_size / patch_size)^2.
        drop_path_rate: float, default 0.3. Student stochastic depth.
        drop_path_uniform: bool, default True. The same `drop_path_rate` in every block, as the
            reference's `drop_path_uniform: true` (ssl_default_config.yaml); False ramps the rate
            linearly from 0 in the first block to `drop_path_rate` in the last (DINO v1's rule).
        layer_scale_init: float or None, default 1e-5. LayerScale's initial value of a new backbone
            (None: no LayerScale).
        position_embedding_init_std: float, default 0.02. Std of the position table's init for a
            new backbone (not in the reference's configs, which fix 0.02).

    Example:
        >>> ModelConfig(patch_size=4).stochastic_depth()
        {'drop_path_rate': 0.3, 'drop_path_uniform': True}
    """

    patch_size: int = 14
    drop_path_rate: float = 0.3
    drop_path_uniform: bool = True
    layer_scale_init: float | None = 1e-5
    position_embedding_init_std: float = 0.02

    def stochastic_depth(self) -> dict[str, Any]:
        """The student backbone's stochastic-depth arguments (`DINOv2Backbone(**...)`).

        Example:
            >>> ModelConfig().stochastic_depth()
            {'drop_path_rate': 0.3, 'drop_path_uniform': True}
        """
        return {"drop_path_rate": self.drop_path_rate, "drop_path_uniform": self.drop_path_uniform}

    def new_backbone_init(self) -> dict[str, Any]:
        """The initialization arguments of a new (randomly initialized) student backbone."""
        return {"layer_scale_init": self.layer_scale_init,
                "position_embedding_init_std": self.position_embedding_init_std}
