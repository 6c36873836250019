"""Feed-forward sublayers of the transformer block: GELU MLP and fused SwiGLU."""

import keras
from keras import ops

from keras_dinov2.layers.attention import torch_linear_init
from keras_dinov2.ops import gelu, gradient_boundary


def swiglu_hidden_dim(hidden_dim, mlp_ratio):
    """Hidden width of the reference's fused SwiGLU: 2/3 of the MLP width, rounded up to 8.

    Example:
    >>> swiglu_hidden_dim(1536, 4.0)   # 4096, ViT-g/14
    """
    hidden = int(hidden_dim * mlp_ratio)
    return (int(hidden * 2 / 3) + 7) // 8 * 8


@keras.saving.register_keras_serializable(package="keras_dinov2")
class MLP(keras.layers.Layer):
    """Linear -> exact (erf) GELU -> Linear, the reference's `Mlp`.

    Args:
        hidden_dim: int. Input and output width.
        intermediate_dim: int. Hidden width (hidden_dim * mlp_ratio).
        use_bias: bool, default True.

    Example:
    >>> MLP(384, 1536)(ops.zeros((2, 5, 384))).shape   # (2, 5, 384)
    """

    def __init__(self, hidden_dim, intermediate_dim, use_bias=True, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = int(hidden_dim)
        self.intermediate_dim = int(intermediate_dim)
        self.use_bias = use_bias
        self.fc1 = keras.layers.Dense(
            self.intermediate_dim, use_bias=use_bias, kernel_initializer=torch_linear_init(),
            dtype=self.dtype_policy, name="fc1",
        )
        self.fc2 = keras.layers.Dense(
            self.hidden_dim, use_bias=use_bias, kernel_initializer=torch_linear_init(),
            dtype=self.dtype_policy, name="fc2",
        )

    def build(self, input_shape):
        self.fc1.build(input_shape)
        self.fc2.build((*input_shape[:-1], self.intermediate_dim))
        self.built = True

    def call(self, x):
        # The boundaries only change how XLA:CPU schedules the backward pass (see its docstring).
        hidden = gradient_boundary(self.fc1(x))
        return gradient_boundary(self.fc2(gelu(hidden)))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim,
                "use_bias": self.use_bias,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_dinov2")
class SwiGLU(keras.layers.Layer):
    """SwiGLU feed-forward with one fused input projection, the reference's `SwiGLUFFNFused`.

    out = w3(silu(a) * b) where [a | b] = w12(x), each half `intermediate_dim` wide.

    Args:
        hidden_dim: int. Input and output width.
        intermediate_dim: int. Width of each half; `swiglu_hidden_dim` gives the reference's.
        use_bias: bool, default True.

    Example:
    >>> SwiGLU(1536, 4096)(ops.zeros((1, 5, 1536))).shape   # (1, 5, 1536)
    """

    def __init__(self, hidden_dim, intermediate_dim, use_bias=True, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = int(hidden_dim)
        self.intermediate_dim = int(intermediate_dim)
        self.use_bias = use_bias
        self.w12 = keras.layers.Dense(
            2 * self.intermediate_dim, use_bias=use_bias, kernel_initializer=torch_linear_init(),
            dtype=self.dtype_policy, name="w12",
        )
        self.w3 = keras.layers.Dense(
            self.hidden_dim, use_bias=use_bias, kernel_initializer=torch_linear_init(),
            dtype=self.dtype_policy, name="w3",
        )

    def build(self, input_shape):
        self.w12.build(input_shape)
        self.w3.build((*input_shape[:-1], self.intermediate_dim))
        self.built = True

    def call(self, x):
        gate, value = ops.split(gradient_boundary(self.w12(x)), 2, axis=-1)
        return gradient_boundary(self.w3(ops.silu(gate) * value))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim,
                "use_bias": self.use_bias,
            }
        )
        return config
