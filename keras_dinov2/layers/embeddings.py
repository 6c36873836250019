"""Patch embedding, CLS / register / mask tokens and interpolated position embeddings."""

import math

import keras
from keras import ops

from keras_dinov2.layers.interpolation import INTERPOLATION_MODES, resample_grid
from keras_dinov2.ops import call_layer, patch_embedding
from keras_dinov2.ops.eager import assemble_tokens


@keras.saving.register_keras_serializable(package="keras_dinov2")
class PatchEmbedding(keras.layers.Layer):
    """Splits images into non-overlapping patches and projects each to `hidden_dim`.

    A convolution with kernel = stride = `patch_size`, flattened row-major (rows over the
    image height), as the reference's `PatchEmbed`.

    Args:
        hidden_dim: int. Embedding width.
        patch_size: int. Side of a square patch in pixels.

    Example:
    >>> PatchEmbedding(384, 14)(ops.zeros((2, 224, 224, 3))).shape   # (2, 256, 384)
    """

    def __init__(self, hidden_dim, patch_size, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = int(hidden_dim)
        self.patch_size = int(patch_size)
        # PyTorch's default Conv2d initialization (kaiming uniform with a = sqrt(5)), which the
        # reference keeps for its patch projection: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        torch_default = keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform")
        self.projection = keras.layers.Conv2D(
            self.hidden_dim,
            self.patch_size,
            strides=self.patch_size,
            padding="valid",
            kernel_initializer=torch_default,
            bias_initializer=torch_default,
            dtype=self.dtype_policy,
            name="projection",
        )

    def build(self, input_shape):
        self.projection.build(input_shape)
        self.built = True

    def call(self, images):
        conv = self.projection
        if conv.data_format == "channels_last":  # the backend's one-call kernel (PyTorch; float32 variables)
            x = patch_embedding(images, conv.kernel, conv.bias, self.patch_size, conv.compute_dtype)
            if x is not None:
                return x
        x = conv(images)
        shape = ops.shape(x)
        return ops.reshape(x, (shape[0], shape[1] * shape[2], self.hidden_dim))

    def compute_output_shape(self, input_shape):
        batch, height, width, _ = input_shape
        if height is None or width is None:
            return (batch, None, self.hidden_dim)
        return (batch, (height // self.patch_size) * (width // self.patch_size), self.hidden_dim)

    def get_config(self):
        config = super().get_config()
        config.update({"hidden_dim": self.hidden_dim, "patch_size": self.patch_size})
        return config


@keras.saving.register_keras_serializable(package="keras_dinov2")
class DINOv2Embeddings(keras.layers.Layer):
    """Turns images (and optional iBOT masks) into the token sequence the blocks read.

    The reference's token path: patch embedding, masked patches replaced by `mask_token`,
    CLS prepended, position embeddings added (resampled bicubically to the input's patch grid
    unless the grid matches the stored one and the image is square), then register tokens
    inserted between CLS and the patches without position embeddings.

    Args:
        hidden_dim: int. Embedding width.
        patch_size: int. Patch side in pixels.
        image_size: int. Side of the square image the position table was trained for; the
            table holds (image_size // patch_size) ** 2 patch positions plus one for CLS.
        num_register_tokens: int, default 0.
        interpolation: str, default "original". How the position table is resampled to other
            grids; see `keras_dinov2.layers.interpolation.resample_grid`.
        position_embedding_init_std: float, default 0.02. Std of the position table's normal
            init (the reference's 0.02).
        cls_token_init_std: float, default 1e-6. Std of the CLS token's normal init (DINOv2's
            1e-6; DINO v1 uses 0.02).

    Example:
    >>> emb = DINOv2Embeddings(384, 14, 224, num_register_tokens=4)
    >>> emb(ops.zeros((2, 98, 98, 3))).shape   # (2, 1 + 4 + 49, 384)
    """

    def __init__(
        self,
        hidden_dim,
        patch_size,
        image_size,
        num_register_tokens=0,
        interpolation="original",
        position_embedding_init_std=0.02,
        cls_token_init_std=1e-6,
        **kwargs,
    ):
        # Tokens leave in the variable dtype (float32 under mixed policies): the residual stream, see
        # keras_dinov2.layers.block.residual_stream_policy. The patch embedding runs in the compute dtype.
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        if interpolation not in INTERPOLATION_MODES:
            raise ValueError(
                f"`interpolation` must be one of {INTERPOLATION_MODES}, received "
                f"{interpolation!r}."
            )
        if image_size % patch_size:
            raise ValueError(
                f"`image_size` must be a multiple of `patch_size` ({patch_size}), received "
                f"{image_size}."
            )
        self.hidden_dim = int(hidden_dim)
        self.patch_size = int(patch_size)
        self.image_size = int(image_size)
        self.num_register_tokens = int(num_register_tokens)
        self.interpolation = interpolation
        self.position_embedding_init_std = float(position_embedding_init_std)
        self.cls_token_init_std = float(cls_token_init_std)
        for name, value in (("position_embedding_init_std", position_embedding_init_std),
                            ("cls_token_init_std", cls_token_init_std)):
            if not float(value) > 0:
                raise ValueError(f"`{name}` must be positive, received {value!r}.")
        self.grid_size = self.image_size // self.patch_size
        self.patch_embedding = PatchEmbedding(
            hidden_dim, patch_size, dtype=self.dtype_policy, name="patch_embedding"
        )

    def build(self, input_shape=None):
        self.patch_embedding.build((None, None, None, 3))
        num_positions = self.grid_size * self.grid_size + 1
        self.cls_token = self.add_weight(
            shape=(1, 1, self.hidden_dim),
            # DINO v1's trunc_normal_(std=0.02) is in effect untruncated too.
            initializer=keras.initializers.RandomNormal(stddev=self.cls_token_init_std),
            name="cls_token",
        )
        self.mask_token = self.add_weight(
            shape=(1, self.hidden_dim), initializer="zeros", name="mask_token"
        )
        self.position_embedding = self.add_weight(
            shape=(1, num_positions, self.hidden_dim),
            # The reference's trunc_normal_(std=0.02) is in effect untruncated.
            initializer=keras.initializers.RandomNormal(stddev=self.position_embedding_init_std),
            name="position_embedding",
        )
        if self.num_register_tokens:
            self.register_tokens = self.add_weight(
                shape=(1, self.num_register_tokens, self.hidden_dim),
                initializer=keras.initializers.RandomNormal(stddev=1e-6),
                name="register_tokens",
            )
        self.built = True

    def interpolated_position_embedding(self, height, width):
        """Position embeddings (1, 1 + gh * gw, D) in float32 for an image of height x width."""
        table = ops.cast(self.position_embedding, "float32")
        grid_h = height // self.patch_size
        grid_w = width // self.patch_size
        static = isinstance(height, int) and isinstance(width, int)
        if static and grid_h == grid_w == self.grid_size and height == width:
            return table
        grid = ops.reshape(table[0, 1:], (self.grid_size, self.grid_size, self.hidden_dim))
        resampled = ops.reshape(resample_grid(grid, grid_h, grid_w, self.interpolation),
                                (1, -1, self.hidden_dim))
        interpolated = ops.concatenate([table[:, :1], resampled], axis=1)
        if static:
            return interpolated
        # Unknown sizes inside a traced graph: choose between the table and its resampling at
        # run time with the same rule.
        keep = ops.logical_and(
            ops.equal(grid_h * grid_w, self.grid_size * self.grid_size), ops.equal(height, width)
        )
        return ops.cond(keep, lambda: table, lambda: interpolated)

    def _validate(self, images, masks):
        shape = tuple(images.shape)
        if len(shape) != 4 or shape[-1] != 3:
            raise ValueError(
                "`images` must have shape (batch, height, width, 3), received shape "
                f"{shape}."
            )
        for side, name in ((shape[1], "height"), (shape[2], "width")):
            if side is not None and side % self.patch_size:
                raise ValueError(
                    f"The image {name} must be a multiple of the patch size "
                    f"{self.patch_size}, received images of shape {shape}."
                )
        if masks is None:
            return
        if "bool" not in str(masks.dtype):
            raise ValueError(
                f"`masks` must be boolean (True = masked patch), received dtype {masks.dtype}."
            )
        mask_shape = tuple(masks.shape)
        patches = None
        if shape[1] is not None and shape[2] is not None:
            patches = (shape[1] // self.patch_size) * (shape[2] // self.patch_size)
        if len(mask_shape) != 2 or (
            patches is not None and mask_shape[1] is not None and mask_shape[1] != patches
        ) or (None not in (shape[0], mask_shape[0]) and shape[0] != mask_shape[0]):
            raise ValueError(
                f"`masks` must have shape (batch, num_patches) = ({shape[0]}, {patches}) for "
                f"images of shape {shape}, received shape {mask_shape}."
            )

    def call(self, images, masks=None):
        self._validate(images, masks)
        shape = ops.shape(images)
        height, width = shape[1], shape[2]
        x = call_layer(self.patch_embedding, images)
        positions = self.interpolated_position_embedding(height, width)
        if self.variable_dtype == "float32":  # PyTorch: one kernel
            tokens = assemble_tokens(x, masks, self.mask_token, self.cls_token, positions,
                                     self.register_tokens if self.num_register_tokens else None)
            if tokens is not None:
                return tokens
        if masks is not None:
            mask_token = ops.cast(self.mask_token, x.dtype)[None]
            x = ops.where(ops.expand_dims(masks, -1), mask_token, x)
        x = ops.cast(x, self.variable_dtype)  # the compute dtype's patches, summed in the stream's dtype
        batch = ops.shape(x)[0]
        cls = ops.broadcast_to(ops.cast(self.cls_token, x.dtype), (batch, 1, self.hidden_dim))
        x = ops.concatenate([cls, x], axis=1)
        x = x + ops.cast(positions, x.dtype)
        if self.num_register_tokens:
            registers = ops.broadcast_to(
                ops.cast(self.register_tokens, x.dtype),
                (batch, self.num_register_tokens, self.hidden_dim),
            )
            x = ops.concatenate([x[:, :1], registers, x[:, 1:]], axis=1)
        return x

    def compute_output_shape(self, input_shape):
        batch, height, width, _ = input_shape
        tokens = None
        if height is not None and width is not None:
            tokens = (height // self.patch_size) * (width // self.patch_size)
            tokens += 1 + self.num_register_tokens
        return (batch, tokens, self.hidden_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "patch_size": self.patch_size,
                "image_size": self.image_size,
                "num_register_tokens": self.num_register_tokens,
                "interpolation": self.interpolation,
                "position_embedding_init_std": self.position_embedding_init_std,
                "cls_token_init_std": self.cls_token_init_std,
            }
        )
        return config


def grid_side(num_positions):
    """Side M of the square grid behind a position table of 1 + M * M rows."""
    side = int(round(math.sqrt(num_positions - 1)))
    if side * side != num_positions - 1:
        raise ValueError(
            f"A position table must hold 1 + M * M rows, received {num_positions} rows."
        )
    return side
