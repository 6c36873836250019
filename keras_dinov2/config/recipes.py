"""Named recipes: `DATA_RECIPES` (read by `DataConfig.recipe`) and `SSL_RECIPES` (read by `SSLConfig.recipe`).

Each entry is a function returning a new config; the `recipe` classmethods return a fresh copy.
"""

from __future__ import annotations

from keras_dinov2.config.data import CropConfig, DataConfig
from keras_dinov2.config.fields import register_recipes
from keras_dinov2.config.model import ModelConfig
from keras_dinov2.config.ssl import SSLConfig
from keras_dinov2.config.training import HeadConfig, LossConfig, OptimConfig

__all__ = ["DATA_RECIPES", "SSL_RECIPES"]


def _digits_recipe() -> DataConfig:
    # 8x8 digits upsampled to 24 px: a 6x6 patch grid at patch 4 (N = 36), four locals of 3x3 patches. The 8x8
    # source holds no more detail than that, and fewer tokens make the CPU default fast (32 px globals and eight
    # 16 px locals cost 2.3x the tokens for a lower k-NN, see the README's "Small datasets"). Blur keeps the
    # reference's pixel sigma. Crops are larger than the reference's: a 5% crop of an 8x8 digit is a stroke or
    # two, which no view of the whole digit predicts, and a 32% global crop can cut a 7 into a 1. No flips: a
    # mirrored 2 or 5 is another symbol.
    return DataConfig(
        crops=CropConfig(global_crops_size=24, local_crops_size=12, local_crops_number=4,
                         global_crops_scale=(0.5, 1.0), local_crops_scale=(0.2, 0.5), flip_probability=0.0),
    )


DATA_RECIPES = {
    # The ViT-14 paper recipe (configs/train/vitl14.yaml): 2 x 224 + 8 x 98, for patch 14. The library default.
    "vit14": DataConfig,
    # The reference's ssl_default_config.yaml: 8 x 96 local crops, for patch 16 (`ModelConfig(patch_size=16)`).
    "reference_default": lambda: DataConfig(crops=CropConfig(local_crops_size=96)),
    # The bundled digits data set (no download): 24 px globals, four 12 px locals, for patch 4.
    "digits": _digits_recipe,
}


def _paper_recipe(drop_path_rate):
    # configs/train/vitl14.yaml and vitg14.yaml (the paper's large runs).
    return SSLConfig(
        batch_size=32,
        heads=HeadConfig(num_prototypes=131072, bottleneck_dim=384, ibot_separate_head=True,
                         ibot_num_prototypes=131072, ibot_bottleneck_dim=256),
        loss=LossConfig(centering="sinkhorn_knopp"),
        optim=OptimConfig(epochs=500, base_lr=2e-4, warmup_epochs=80, weight_decay_end=0.2,
                          momentum_teacher=0.994, layer_decay=1.0),
        model=ModelConfig(drop_path_rate=drop_path_rate),
    )


def _digits_ssl_recipe():
    # The bundled digits on a CPU in a few hundred steps (README, "Small datasets"). The reference's settings
    # collapse here to uniform targets: with LayerScale 1e-5 every image gets the same CLS token at init, so
    # centered targets carry nothing. LayerScale 1.0, Sinkhorn-Knopp at a fixed teacher temperature of 0.02 and
    # 256 prototypes keep the targets image-dependent. Position embeddings at the patch embeddings' scale (std
    # 1.0) let the untrained network see where each patch is (random-init k-NN 47-50% -> 66-71%); their common
    # part makes CLS tokens alike, which batch norm in the heads removes, so the targets stay sharp. A constant
    # teacher momentum of 0.99: on a 200-step schedule the cosine to 1.0 freezes the teacher for the second
    # half, and the student ends ahead of it. Batch 32 for 14 epochs (588 steps at 42 per pass): at equal time
    # more, smaller steps learn more (docs/performance.md, "digits recipe: batch size").
    return SSLConfig(
        batch_size=32,
        heads=HeadConfig(num_prototypes=256, hidden_dim=512, bottleneck_dim=128, use_bn=True),
        loss=LossConfig(centering="sinkhorn_knopp"),
        optim=OptimConfig(epochs=14, steps_per_epoch=42, base_lr=0.004, warmup_epochs=1,
                          teacher_temp=0.02, warmup_teacher_temp=0.02, warmup_teacher_temp_epochs=0,
                          momentum_teacher=0.99, final_momentum_teacher=0.99),
        data=_digits_recipe(),
        model=ModelConfig(patch_size=4, drop_path_rate=0.1, drop_path_uniform=False, layer_scale_init=1.0,
                          position_embedding_init_std=1.0),
    )


SSL_RECIPES = {
    # configs/ssl_default_config.yaml (with the ViT-14 crops of the data default).
    "reference_default": SSLConfig,
    "vitl14": lambda: _paper_recipe(0.4),
    "vitg14": lambda: _paper_recipe(0.4),
    "digits": _digits_ssl_recipe,
}

register_recipes(DataConfig, DATA_RECIPES)
register_recipes(SSLConfig, SSL_RECIPES)
