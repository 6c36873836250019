"""One compiled forward pass giving what the pictures need: final-norm patch tokens and the CLS attention."""

import keras
import numpy as np


class _PictureModel(keras.Model):
    """Images -> final-norm patch tokens and the CLS attention of the last block, as one compiled forward."""

    def __init__(self, backbone, **kwargs):
        super().__init__(name="picture_model", **kwargs)
        self.backbone = backbone

    def call(self, images):
        # The backbone's forward pass, spelled out to read the last block's attention on the way (the
        # functional model's outputs do not include it): one pass instead of the two that calling the
        # backbone and `last_attention_weights` would take.
        backbone = self.backbone
        x = backbone.embeddings(images)
        for block in backbone.transformer_blocks[:-1]:
            x = block(x, training=False)
        last = backbone.transformer_blocks[-1]
        first_patch = 1 + backbone.num_register_tokens
        attention = last.attn.attention_weights(last.norm1(x))[:, :, 0, first_patch:]
        tokens = backbone.norm(last(x, training=False))[:, first_patch:]
        return {"patch_tokens": keras.ops.cast(tokens, "float32"),
                "attention": keras.ops.cast(attention, "float32")}


_LAST_MODEL = []  # the _PictureModel of the last backbone drawn (it keeps that backbone alive)


def tokens_and_attention(backbone, images):
    """(patch tokens (B, h, w, D), CLS attention (B, heads, h, w)) as float32 NumPy arrays, from one forward.

    The patch tokens are after the final norm; the attention is the last block's CLS query over the patch keys
    (CLS and register keys left out, not renormalized). The compiled model of the last backbone is kept, so
    repeated calls with one backbone compile once per input shape.

    Args:
        backbone: `DINOv2Backbone`.
        images: float array (B, H, W, 3), already normalized (see `prepare_images`); H and W multiples of the
            patch size.
    """
    # predict_on_batch compiles the forward (once per input shape under JAX and TensorFlow), which is several
    # times faster than op-by-op execution for a new shape; the model is kept so the next call reuses it.
    if not _LAST_MODEL or _LAST_MODEL[0].backbone is not backbone:
        _LAST_MODEL[:] = [_PictureModel(backbone)]
    model = _LAST_MODEL[0]
    images = np.asarray(images, np.float32)
    patch = int(backbone.patch_size)
    grid = (images.shape[1] // patch, images.shape[2] // patch)
    out = model.predict_on_batch(images)
    tokens = np.asarray(keras.ops.convert_to_numpy(out["patch_tokens"]))
    attention = np.asarray(keras.ops.convert_to_numpy(out["attention"]))
    return (tokens.reshape((len(images),) + grid + (tokens.shape[-1],)),
            attention.reshape(attention.shape[:2] + grid))


def patch_features(backbone, images):
    """Final-norm patch tokens on the patch grid, float32 NumPy (B, H / p, W / p, D).

    Args:
        backbone: `DINOv2Backbone`.
        images: float array (B, H, W, 3), already normalized (see `prepare_images`); H and W multiples of the
            patch size.
    """
    return tokens_and_attention(backbone, images)[0]
