"""Multi-head self-attention with a fused qkv projection."""

import keras
from keras import ops

from keras_dinov2.ops import dot_product_attention, gradient_boundary


def torch_linear_init():
    """Normal(0, 0.02) kernels: the reference's `trunc_normal_(std=0.02)` cuts at +-2 in
    absolute value (100 standard deviations), so it is in effect untruncated, whereas Keras'
    TruncatedNormal would cut at 2 standard deviations and shrink the spread by 12%."""
    return keras.initializers.RandomNormal(stddev=0.02)


@keras.saving.register_keras_serializable(package="keras_dinov2")
class Attention(keras.layers.Layer):
    """Multi-head self-attention through `keras.ops.dot_product_attention`.

    One fused (D, 3D) qkv projection with bias (columns [q | k | v], each head-major, the
    layout of the reference's `qkv` Linear), scaled dot-product attention with scale
    head_dim ** -0.5 (the backend's fused kernel where it has one; the softmax runs in
    float32 under mixed precision) and an output projection.

    Args:
        hidden_dim: int. Token width D.
        num_heads: int. Number of heads; must divide `hidden_dim`.
        qkv_bias: bool, default True.
        proj_bias: bool, default True.

    Example:
    >>> Attention(384, 6)(ops.zeros((2, 257, 384))).shape   # (2, 257, 384)
    """

    def __init__(self, hidden_dim, num_heads, qkv_bias=True, proj_bias=True, **kwargs):
        super().__init__(**kwargs)
        if hidden_dim % num_heads:
            raise ValueError(
                f"`num_heads` must divide `hidden_dim`, received hidden_dim={hidden_dim} "
                f"and num_heads={num_heads}."
            )
        self.hidden_dim = int(hidden_dim)
        self.num_heads = int(num_heads)
        self.head_dim = self.hidden_dim // self.num_heads
        self.qkv_bias = qkv_bias
        self.proj_bias = proj_bias
        self.qkv = keras.layers.Dense(
            3 * self.hidden_dim,
            use_bias=qkv_bias,
            kernel_initializer=torch_linear_init(),
            dtype=self.dtype_policy,
            name="qkv",
        )
        self.proj = keras.layers.Dense(
            self.hidden_dim,
            use_bias=proj_bias,
            kernel_initializer=torch_linear_init(),
            dtype=self.dtype_policy,
            name="proj",
        )

    def build(self, input_shape):
        self.qkv.build(input_shape)
        self.proj.build(input_shape)
        self.built = True

    def call(self, x):
        shape = ops.shape(x)
        qkv = gradient_boundary(self.qkv(x))
        qkv = ops.reshape(qkv, (shape[0], shape[1], 3, self.num_heads, self.head_dim))
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out = dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        out = ops.reshape(out, (shape[0], shape[1], self.hidden_dim))
        return gradient_boundary(self.proj(out))

    def attention_weights(self, x):
        """Softmax attention probabilities (batch, heads, tokens, tokens) in float32."""
        shape = ops.shape(x)
        qkv = ops.reshape(self.qkv(x), (shape[0], shape[1], 3, self.num_heads, self.head_dim))
        q = ops.cast(qkv[:, :, 0], "float32")
        k = ops.cast(qkv[:, :, 1], "float32")
        logits = ops.einsum("bqhd,bkhd->bhqk", q, k) * (self.head_dim**-0.5)
        return ops.softmax(logits, axis=-1)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "num_heads": self.num_heads,
                "qkv_bias": self.qkv_bias,
                "proj_bias": self.proj_bias,
            }
        )
        return config
