"""DINOv2Backbone: the reference DinoVisionTransformer as a functional keras-hub Backbone.

The same class is DINO v1's VisionTransformer (the `dino_vit_*` architectures): no LayerScale, no
registers, its own CLS-token init; the named architectures live in `keras_dinov2.config.architectures`.
"""

import keras
import keras_hub
from keras import ops

from keras_dinov2.config.architectures import ARCHITECTURES
from keras_dinov2.layers.block import TransformerBlock, apply_layer_norm, residual_stream_policy
from keras_dinov2.layers.embeddings import DINOv2Embeddings
from keras_dinov2.ops import call_layer


@keras.saving.register_keras_serializable(package="keras_dinov2")
class DINOv2Backbone(keras_hub.models.Backbone):
    """The DINOv2 Vision Transformer (the reference's DinoVisionTransformer).

    A functional model taking `{"images": (B, H, W, 3), "masks": (B, N) bool (optional)}` and
    returning a dict: `cls_token` (B, D), `register_tokens` (B, R, D) and `patch_tokens`
    (B, N, D) after the final LayerNorm, and `prenorm` (B, 1 + R + N, D) before it. H and W
    can be any multiples of the patch size, different from call to call (224 x 224 global
    and 98 x 98 local crops in one training step): the position table is resampled to the
    input's grid exactly as the `interpolation` source does. Masked patches (True) are
    replaced by the learned mask token before position embeddings are added (iBOT).

    Args:
        patch_size: int, default 14.
        hidden_dim: int, default 384. Token width D.
        num_layers: int, default 12.
        num_heads: int, default 6. The reference uses hidden_dim / 64.
        mlp_ratio: float, default 4.0.
        ffn_type: str, default "mlp". "swiglu" for the giant model's fused SwiGLU.
        num_register_tokens: int, default 0.
        image_size: int, default 224. Square size the position table is stored for.
        interpolation: str, default "original". "original" (first release: scale offset 0.1,
            no antialias), "registers" (registers release: antialias) or "transformers"
            (Hugging Face's Dinov2Model: no offset, no antialias).
        layer_scale_init: float or None, default 1e-5. Initial LayerScale gamma (the
            reference's training configs use 1e-5; None disables LayerScale).
        position_embedding_init_std: float, default 0.02. Std of the position table's init
            (the reference's 0.02). Small models trained from scratch on small images learn
            faster from about the patch embeddings' scale (the digits recipe uses 1.0): at 0.02
            the untrained network hardly sees where a patch is.
        cls_token_init_std: float, default 1e-6. Std of the CLS token's normal init: DINOv2's
            1e-6, or DINO v1's 0.02 (its trunc-normal at the position table's scale).
        drop_path_rate: float, default 0.0. Stochastic depth rate of the last block.
        drop_path_uniform: bool, default False. Same rate in every block instead of a linear
            ramp from 0, as the reference's `drop_path_uniform`.
        subset_drop_path: bool, default True. Compute residual branches only for the kept
            samples at rates above 0.1, as the reference does; see `TransformerBlock`.
        layer_norm_epsilon: float, default 1e-6.
        dtype: optional dtype policy, e.g. "mixed_bfloat16". Position interpolation and the
            attention softmax always run in float32; under a mixed policy the residual stream (and so
            every output) stays float32, as under torch.autocast: only attention and the feed-forward
            layers run in the compute dtype.

    Example:
    >>> backbone = DINOv2Backbone.from_preset("dinov2_vit_small14", load_weights=False)
    >>> out = backbone({"images": np.zeros((2, 224, 224, 3), "float32")})
    >>> out["cls_token"].shape   # (2, 384)
    >>> DINOv2Backbone.from_preset("dino_vit_small16", load_weights=False)   # DINO v1's ViT-S/16
    """

    def __init__(
        self,
        patch_size=14,
        hidden_dim=384,
        num_layers=12,
        num_heads=6,
        mlp_ratio=4.0,
        ffn_type="mlp",
        num_register_tokens=0,
        image_size=224,
        interpolation="original",
        layer_scale_init=1e-5,
        position_embedding_init_std=0.02,
        cls_token_init_std=1e-6,
        drop_path_rate=0.0,
        drop_path_uniform=False,
        subset_drop_path=True,
        layer_norm_epsilon=1e-6,
        dtype=None,
        **kwargs,
    ):
        for name, value in (
            ("patch_size", patch_size),
            ("hidden_dim", hidden_dim),
            ("num_layers", num_layers),
            ("num_heads", num_heads),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, received {value!r}.")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"`drop_path_rate` must be in [0, 1), received {drop_path_rate}.")
        # === Layers ===
        self.embeddings = DINOv2Embeddings(
            hidden_dim,
            patch_size,
            image_size,
            num_register_tokens=num_register_tokens,
            interpolation=interpolation,
            position_embedding_init_std=position_embedding_init_std,
            cls_token_init_std=cls_token_init_std,
            dtype=dtype,
            name="embeddings",
        )
        if drop_path_uniform or num_layers == 1:
            rates = [float(drop_path_rate)] * num_layers
        else:
            rates = [drop_path_rate * i / (num_layers - 1) for i in range(num_layers)]
        self.transformer_blocks = [
            TransformerBlock(
                hidden_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                ffn_type=ffn_type,
                layer_scale_init=layer_scale_init,
                drop_path_rate=rates[i],
                subset_drop_path=subset_drop_path,
                layer_norm_epsilon=layer_norm_epsilon,
                dtype=dtype,
                name=f"block_{i}",
            )
            for i in range(num_layers)
        ]
        # On the residual stream: float32 under mixed policies (see `residual_stream_policy`).
        self.norm = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=residual_stream_policy(dtype), name="norm"
        )

        # === Functional model ===
        images = keras.Input(shape=(None, None, 3), name="images")
        masks = keras.Input(shape=(None,), dtype="bool", name="masks", optional=True)
        x = self.embeddings(images, masks)
        for block in self.transformer_blocks:
            x = block(x)
        normed = self.norm(x)
        first_patch = 1 + num_register_tokens
        outputs = {
            "cls_token": normed[:, 0],
            "register_tokens": normed[:, 1:first_patch],
            "patch_tokens": normed[:, first_patch:],
            "prenorm": x,
        }
        super().__init__(
            inputs={"images": images, "masks": masks}, outputs=outputs, dtype=dtype, **kwargs
        )

        # === Config ===
        self.patch_size = patch_size
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.ffn_type = ffn_type
        self.num_register_tokens = num_register_tokens
        self.image_size = image_size
        self.interpolation = interpolation
        self.layer_scale_init = layer_scale_init
        self.position_embedding_init_std = float(position_embedding_init_std)
        self.cls_token_init_std = float(cls_token_init_std)
        self.drop_path_rate = drop_path_rate
        self.drop_path_uniform = drop_path_uniform
        self.subset_drop_path = subset_drop_path
        self.layer_norm_epsilon = layer_norm_epsilon

    @staticmethod
    def _standardize(inputs):
        """Accepts {"images": x}, {"images": x, "masks": m} or a bare image tensor."""
        if isinstance(inputs, dict):
            masks = inputs.get("masks")
            if masks is not None and "bool" not in str(getattr(masks, "dtype", "")):
                raise ValueError(
                    "`masks` must be boolean (True = masked patch), received dtype "
                    f"{getattr(masks, 'dtype', type(masks))}."
                )
            if "masks" not in inputs:
                inputs = {**inputs, "masks": None}
            return inputs
        if inputs is not None and not isinstance(inputs, (list, tuple)):
            return {"images": inputs, "masks": None}
        return inputs

    def __call__(self, inputs, *args, **kwargs):
        return super().__call__(self._standardize(inputs), *args, **kwargs)

    def call(self, inputs, training=None, mask=None):
        inputs = self._standardize(inputs)
        if not isinstance(inputs, dict):
            return super().call(inputs, training=training, mask=mask)
        # The Functional graph's layers called in its order, without Keras' graph walk: the same ops, and on an eager
        # backend (PyTorch) a fifth less time per call of a small backbone (docs/performance.md). As Functional
        # does, the images become tensors of the `images` input's dtype.
        images = ops.convert_to_tensor(inputs["images"], dtype=self._inputs_struct["images"].dtype)
        masks = inputs.get("masks")
        x = call_layer(self.embeddings, images, None if masks is None else ops.convert_to_tensor(masks, "bool"))
        for block in self.transformer_blocks:
            x = call_layer(block, x, training=training)
        normed = apply_layer_norm(self.norm, x)
        first_patch = 1 + self.num_register_tokens
        return {
            "cls_token": normed[:, 0],
            "register_tokens": normed[:, 1:first_patch],
            "patch_tokens": normed[:, first_patch:],
            "prenorm": x,
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "patch_size": self.patch_size,
                "hidden_dim": self.hidden_dim,
                "num_layers": self.num_layers,
                "num_heads": self.num_heads,
                "mlp_ratio": self.mlp_ratio,
                "ffn_type": self.ffn_type,
                "num_register_tokens": self.num_register_tokens,
                "image_size": self.image_size,
                "interpolation": self.interpolation,
                "layer_scale_init": self.layer_scale_init,
                "position_embedding_init_std": self.position_embedding_init_std,
                "cls_token_init_std": self.cls_token_init_std,
                "drop_path_rate": self.drop_path_rate,
                "drop_path_uniform": self.drop_path_uniform,
                "subset_drop_path": self.subset_drop_path,
                "layer_norm_epsilon": self.layer_norm_epsilon,
            }
        )
        return config

    def get_intermediate_layers(self, images, n=1, masks=None, norm=True, training=False):
        """Outputs of the last `n` blocks (or of the blocks listed in `n`), for probes.

        The reference's `get_intermediate_layers`: each output is split into the CLS token
        (B, D), the register tokens (B, R, D) and the patch tokens (B, N, D), optionally
        through the final LayerNorm.

        Args:
            images: tensor (B, H, W, 3).
            n: int or sequence of int, default 1. The last n blocks, or these block indices.
            masks: optional bool tensor (B, N).
            norm: bool, default True. Apply the final LayerNorm.
            training: bool, default False.

        Returns:
            A list of dicts with keys "cls_token", "register_tokens", "patch_tokens",
            ordered from the earliest block to the last.

        Example:
        >>> feats = backbone.get_intermediate_layers(images, n=4)
        >>> ops.concatenate([f["cls_token"] for f in feats], axis=-1)   # linear-probe input
        """
        if isinstance(n, int):
            if not 1 <= n <= self.num_layers:
                raise ValueError(f"`n` must be in [1, {self.num_layers}], received {n}.")
            wanted = set(range(self.num_layers - n, self.num_layers))
        else:
            wanted = {int(i) % self.num_layers for i in n}
        x = self.embeddings(ops.convert_to_tensor(images), masks)
        first_patch = 1 + self.num_register_tokens
        results = []
        for i, block in enumerate(self.transformer_blocks):
            x = block(x, training=training)
            if i in wanted:
                y = self.norm(x) if norm else x
                results.append(
                    {
                        "cls_token": y[:, 0],
                        "register_tokens": y[:, 1:first_patch],
                        "patch_tokens": y[:, first_patch:],
                    }
                )
        return results

    def last_attention_weights(self, images):
        """CLS-query attention of the last block, (B, heads, N) in float32, for pictures.

        Example:
        >>> attn = backbone.last_attention_weights(images)   # reshape to the patch grid
        """
        x = self.embeddings(ops.convert_to_tensor(images))
        for block in self.transformer_blocks[:-1]:
            x = block(x)
        last = self.transformer_blocks[-1]
        weights = last.attn.attention_weights(last.norm1(x))
        return weights[:, :, 0, 1 + self.num_register_tokens :]

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Builds a backbone from an architecture name, a local preset folder or a hub URI.

        Architecture names (`dinov2_vit_small14`, `_base14`, `_large14`, `_giant14`, each also
        with `_reg4`, `dinov2_vit_tiny4`, and DINO v1's `dino_vit_small16`, `_small8`,
        `_base16`, `_base8`) build the reference's dimensions. With
        `load_weights=True` they download the official torch-hub checkpoint once (into the
        Keras cache) and convert it; this needs network access to Meta's file server. A folder
        may be one written by `save_to_preset`, a keras-hub DINOV2Backbone preset (imported), a
        transformers Dinov2 or ViT (DINO v1) folder (converted) or a finished run directory (its teacher_preset/);
        `hf://user/repo` and `kaggle://...` go to keras-hub's loader.

        The weight readers live a layer above the backbone (`keras_dinov2.interop`): this
        reaches their `load_backbone` through `register_preset_loader`, which
        `import keras_dinov2` fills. A class without a registered loader gets keras-hub's own.

        Args:
            preset: str. An architecture name, a folder or a URI.
            load_weights: bool, default True.
            **kwargs: overrides of the constructor arguments (e.g. `drop_path_rate`).

        Example:
        >>> DINOv2Backbone.from_preset("dinov2_vit_small14_reg4", load_weights=False)
        """
        loader = _PRESET_LOADERS.get(cls)
        if loader is None:
            return super().from_preset(preset, load_weights=load_weights, **kwargs)
        return loader(preset, load_weights=load_weights, **kwargs)


# Backbone class -> the function its `from_preset` calls. Filled by the weight readers when they are
# imported (keras_dinov2.interop registers its load_backbone for DINOv2Backbone), so the backbone
# reaches them without importing them, as keras-hub's classes reach their preset loaders.
_PRESET_LOADERS = {}


def register_preset_loader(backbone_class, loader):
    """Makes `backbone_class.from_preset(preset, load_weights, **kwargs)` call `loader` with the same arguments.

    Args:
        backbone_class: a DINOv2Backbone class.
        loader: callable `(preset, load_weights=True, **overrides) -> backbone`.

    Example:
    >>> register_preset_loader(DINOv2Backbone, load_backbone)   # what keras_dinov2.interop does
    """
    _PRESET_LOADERS[backbone_class] = loader


def build_backbone(model_name, config, load_weights=True):
    """The student backbone of a training run, from its model name and its SSLConfig.

    An architecture name builds a new network for the run: stochastic depth and initialization
    from `config.optim`, the position table stored for the global crop size, and the antialiased
    interpolation rule of the registers release. Any other name (a preset folder or URI) continues
    from that preset, with the run's stochastic depth.

    Args:
        model_name: str. An architecture name (`ARCHITECTURES`), a preset folder or a URI.
        config: SSLConfig.
        load_weights: bool, default True. Whether a preset's weights are loaded (False when a
            checkpoint will overwrite them).

    Raises:
        ValueError: the recipe's masking patch size differs from the architecture's.

    Example:
    >>> build_backbone("dinov2_vit_tiny4", SSLConfig.recipe("digits"))
    """
    overrides = config.model.stochastic_depth()
    if model_name in ARCHITECTURES:
        patch = ARCHITECTURES[model_name]["config"]["patch_size"]
        overrides.update(config.model.new_backbone_init())
        # Store the position table for the global crop size: no resampling at 224 / 32.
        overrides["image_size"] = config.data.crops.global_crops_size
        # A new run picks the antialiased rule of the registers release: our preset, keras-hub (any
        # backend) and transformers all resample its position table alike, so every export matches
        # at every input size. The released weights keep the rule they were trained with.
        overrides["interpolation"] = "registers"
        if config.model.patch_size != patch:
            raise ValueError(
                f"the recipe's patch size {config.model.patch_size} does not "
                f"match {model_name}'s {patch}; choose a matching --recipe or --model."
            )
        return DINOv2Backbone.from_preset(model_name, load_weights=False, **overrides)
    # A preset folder or URI: continue pretraining from its weights.
    return DINOv2Backbone.from_preset(model_name, load_weights=load_weights, **overrides)
