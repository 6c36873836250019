"""The named backbone architectures: DINOv2Backbone arguments and the official weights of each.

`ARCHITECTURES` maps a name to `{"config": DINOv2Backbone arguments, "hub_name": the torch.hub entry
point (or None), "weights": the file name of its official checkpoint (or None), "url": where that file
is served (or None)}`. `DINOv2Backbone.from_preset(name)` builds `config`; with `load_weights=True` the
readers download `url` once and convert it.

Two families: the DINOv2 releases (patch 14, trained at 518 px, LayerScale, optionally four
registers) and the DINO v1 releases (Caron et al., 2021; facebookresearch/dino): ViT-S and ViT-B at
patch 16 and 8, trained at 224 px, with no LayerScale, no registers and no mask token in the
checkpoint. Both keep qkv biases and LayerNorm epsilon 1e-6, and both resample the position table
by scale factor with the 0.1 offset and no antialias ("original"), the rule DINOv2's first release
took from DINO v1.

Example:
>>> ARCHITECTURES["dino_vit_small16"]["config"]["patch_size"]   # 16
"""

OFFICIAL_WEIGHTS_URL = "https://dl.fbaipublicfiles.com/dinov2"
DINO_V1_WEIGHTS_URL = "https://dl.fbaipublicfiles.com/dino"

_SIZES = {
    # name: (hidden_dim, num_layers, num_heads, ffn_type, official hub name)
    "small14": (384, 12, 6, "mlp", "vits14"),
    "base14": (768, 12, 12, "mlp", "vitb14"),
    "large14": (1024, 24, 16, "mlp", "vitl14"),
    "giant14": (1536, 40, 24, "swiglu", "vitg14"),
}

_V1_SIZES = {
    # name: (hidden_dim, num_heads, hub letter, the word in the released file names)
    "small": (384, 6, "s", "deitsmall"),
    "base": (768, 12, "b", "vitbase"),
}


def _dinov2(table):
    for size, (dim, depth, heads, ffn, hub) in _SIZES.items():
        for registers in (0, 4):
            weights = f"dinov2_{hub}" + ("_reg4" if registers else "") + "_pretrain.pth"
            table[f"dinov2_vit_{size}" + ("_reg4" if registers else "")] = {
                "config": {
                    "patch_size": 14,
                    "hidden_dim": dim,
                    "num_layers": depth,
                    "num_heads": heads,
                    "mlp_ratio": 4.0,
                    "ffn_type": ffn,
                    "num_register_tokens": registers,
                    # The released models were trained at 518 px: a 37 x 37 position grid.
                    "image_size": 518,
                    "interpolation": "registers" if registers else "original",
                    "layer_scale_init": 1.0,
                },
                "hub_name": f"dinov2_{hub}",
                "weights": weights,
                "url": f"{OFFICIAL_WEIGHTS_URL}/dinov2_{hub}/{weights}",
            }


def _dino_v1(table):
    for size, (dim, heads, letter, word) in _V1_SIZES.items():
        for patch in (16, 8):
            stem = f"dino_{word}{patch}_pretrain"
            table[f"dino_vit_{size}{patch}"] = {
                "config": {
                    "patch_size": patch,
                    "hidden_dim": dim,
                    "num_layers": 12,
                    "num_heads": heads,
                    "mlp_ratio": 4.0,
                    "ffn_type": "mlp",
                    "num_register_tokens": 0,
                    # Trained at 224 px: a 14 x 14 (patch 16) or 28 x 28 (patch 8) position grid.
                    "image_size": 224,
                    "interpolation": "original",
                    "layer_scale_init": None,
                    # v1 draws its CLS token like the position table (trunc-normal, std 0.02).
                    "cls_token_init_std": 0.02,
                },
                "hub_name": f"dino_vit{letter}{patch}",
                "weights": f"{stem}.pth",
                "url": f"{DINO_V1_WEIGHTS_URL}/{stem}/{stem}.pth",
            }


def _architectures():
    table = {}
    _dinov2(table)
    unreleased = {"hub_name": None, "weights": None, "url": None}
    table["dinov2_vit_tiny4"] = {
        # For tests and the CPU default on 32 x 32 images (an 8 x 8 patch grid).
        "config": {
            "patch_size": 4,
            "hidden_dim": 96,
            "num_layers": 4,
            "num_heads": 3,
            "mlp_ratio": 4.0,
            "ffn_type": "mlp",
            "num_register_tokens": 0,
            "image_size": 32,
            "interpolation": "transformers",
            "layer_scale_init": 1e-5,
        },
        **unreleased,
    }
    # The digits distillation student: under a fifth of dinov2_vit_tiny4's parameters (89,424 against 456,768 at
    # the digits recipe's 24 px), for `keras-dinov2 distill --student dinov2_vit_micro4`.
    table["dinov2_vit_micro4"] = {
        "config": {**table["dinov2_vit_tiny4"]["config"], "hidden_dim": 48, "num_layers": 3, "num_heads": 3},
        **unreleased,
    }
    _dino_v1(table)
    return table


ARCHITECTURES = _architectures()
