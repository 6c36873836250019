"""Named recipes: `DATA_RECIPES` (read by `DataConfig.recipe`) and `SSL_RECIPES` (read by `SSLConfig.recipe`).

Each entry is a function returning a new config; the `recipe` classmethods return a fresh copy.
"""

from __future__ import annotations

from keras_dinov2.config.data import AugmentationConfig, CropConfig, DataConfig, MaskingConfig
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


def _dino_v1_data(crops: CropConfig) -> DataConfig:
    # DINO v1's DataAugmentationDINO: the blur really applied with 1.0 / 0.1 / 0.5 (global 1, global 2, locals;
    # "intended", not the DINOv2 wrapper's inverted "released"). v1 blurs with PIL at radius (= sigma) 0.1-2 over
    # the whole image; a 13-tap Gaussian reaches 3 sigma at sigma 2, where PIL's blur has all but ended. No
    # masking: v1 has no iBOT and its student sees whole global crops.
    return DataConfig(
        crops=crops,
        augmentation=AugmentationConfig(blur_probabilities="intended", blur_kernel_size=13),
        masking=MaskingConfig(mask_sample_probability=0.0),
    )


def _dino_v1_recipe(epochs=100, steps_per_epoch=2502, teacher_temp=0.04, warmup_teacher_temp_epochs=0,
                    norm_last_layer=True):
    # facebookresearch/dino main_dino.py's defaults (ViT-S/16). Its mechanics as config fields: DINO with
    # centering only (no iBOT, no KoLeo, no Sinkhorn-Knopp); the head of 3 layers (2048, bottleneck 256) with the
    # prototypes' norms fixed at 1 (norm_last_layer); lr 0.0005 scaled linearly by global batch / 256; clipping
    # of each parameter at 3.0; no layer-wise decay and no patch-embedding multiplier; the teacher temperature a
    # table per epoch (warmup_teacher_temp_epochs defaults to 0 in the code, though its help says 30); the last
    # layer's gradients dropped in the first epoch (AdamW keeps no state for it then); drop path 0.1 ramped over
    # the blocks; no LayerScale. An epoch is one ImageNet pass (1,281,167 images) at 8 GPUs x 64 (2502 steps).
    # batch_size is per replica, as v1's batch_size_per_gpu.
    return SSLConfig(
        batch_size=64,
        heads=HeadConfig(num_prototypes=65536, hidden_dim=2048, bottleneck_dim=256, num_layers=3,
                         norm_last_layer=norm_last_layer),
        loss=LossConfig(ibot_weight=0.0, koleo_weight=0.0, student_temp=0.1, centering="centering",
                        center_momentum=0.9),
        optim=OptimConfig(epochs=epochs, steps_per_epoch=steps_per_epoch, base_lr=0.0005, min_lr=1e-6,
                          warmup_epochs=10, weight_decay=0.04, weight_decay_end=0.4, momentum_teacher=0.996,
                          final_momentum_teacher=1.0, teacher_temp=teacher_temp, warmup_teacher_temp=0.04,
                          warmup_teacher_temp_epochs=warmup_teacher_temp_epochs, freeze_last_layer_epochs=1,
                          clip_grad=3.0, layer_decay=1.0, patch_embed_lr_mult=1.0, adamw_beta1=0.9,
                          adamw_beta2=0.999, lr_scaling="linear_wrt_256", clip_mode="per_parameter",
                          freeze_last_layer_mode="drop_grad", teacher_temp_per_epoch=True),
        data=_dino_v1_data(CropConfig(global_crops_size=224, global_crops_scale=(0.4, 1.0), local_crops_number=8,
                                      local_crops_size=96, local_crops_scale=(0.05, 0.4))),
        model=ModelConfig(patch_size=16, drop_path_rate=0.1, drop_path_uniform=False, layer_scale_init=None,
                          position_embedding_init_std=0.02),
    )


def _dino_v1_digits_recipe():
    # DINO v1's mechanics (every field _dino_v1_recipe sets as v1 does) at the digits recipe's sizes, for a CPU:
    # its crops, patch 4 and position init, and its head (256 prototypes, 512 wide, bottleneck 128, batch norm:
    # main_dino.py's --use_bn_in_head) at its fixed teacher temperature of 0.02; 14 epochs of 42 steps at batch
    # 32. base_lr 0.005 is 6.25e-4 at batch 32 under the linear rule (the digits recipe's peak is 7.1e-4). A
    # constant teacher momentum of 0.99, as the digits recipe: the cosine to 1 would freeze the teacher for the
    # second half of so short a run. v1's own head and temperature collapse here (seed 0, JAX): 1024 prototypes
    # without batch norm at 0.04 reach uniform targets by epoch 5 (k-NN 87.1%); 256 at 0.02 without batch norm
    # by epoch 14 (86.7%); with batch norm 0.04 stays flat (teacher entropy 6.1 of 6.9, 86.4%), 0.02 learns (88.7%).
    config = _dino_v1_recipe(epochs=14, steps_per_epoch=42, teacher_temp=0.02)
    digits = _digits_ssl_recipe()
    config.batch_size = 32
    config.heads = HeadConfig(num_prototypes=256, hidden_dim=512, bottleneck_dim=128, use_bn=True,
                              norm_last_layer=True)
    config.optim.base_lr, config.optim.warmup_epochs, config.optim.warmup_teacher_temp = 0.005, 1, 0.02
    config.optim.momentum_teacher = config.optim.final_momentum_teacher = 0.99
    config.data = _dino_v1_data(digits.data.crops)
    config.data.augmentation.blur_kernel_size = digits.data.augmentation.blur_kernel_size
    config.model = ModelConfig(patch_size=4, drop_path_rate=0.1, drop_path_uniform=False, layer_scale_init=None,
                               position_embedding_init_std=1.0)
    return config


SSL_RECIPES = {
    # configs/ssl_default_config.yaml (with the ViT-14 crops of the data default).
    "reference_default": SSLConfig,
    "vitl14": lambda: _paper_recipe(0.4),
    "vitg14": lambda: _paper_recipe(0.4),
    "digits": _digits_ssl_recipe,
    # DINO v1 (facebookresearch/dino): main_dino.py's defaults, ViT-S/16 ("dino_vit_small16").
    "dino": _dino_v1_recipe,
    # Its README's ViT-S/16 runs: vanilla, 100 epochs on 8 GPUs x 64 (69.3 k-NN / 74.0 linear) ...
    "dino_vits16_100ep": lambda: _dino_v1_recipe(epochs=100, steps_per_epoch=2502),
    # ... and boosted, 300 epochs, teacher temperature 0.07 warmed over 30 epochs, trained prototype norms, on
    # 16 GPUs x 64 (1251 steps an epoch; 73.3 / 76.0).
    "dino_vits16_300ep": lambda: _dino_v1_recipe(epochs=300, steps_per_epoch=1251, teacher_temp=0.07,
                                                 warmup_teacher_temp_epochs=30, norm_last_layer=False),
    # v1's mechanics on the bundled digits (patch 4, 24 / 12 px crops), for a CPU.
    "dino_digits": _dino_v1_digits_recipe,
}

register_recipes(DataConfig, DATA_RECIPES)
register_recipes(SSLConfig, SSL_RECIPES)
