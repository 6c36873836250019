"""FeatureProjector: the small MLP that maps a student's tokens to a teacher's width (feature distillation)."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_dinov2")
class FeatureProjector(keras.layers.Layer):
    """`num_layers` Dense layers with GELU between them, from the student's width to `output_dim`.

    Args:
        output_dim: int. The teacher's width.
        hidden_dim: optional int. Width of the hidden layers; default `output_dim`.
        num_layers: int, default 2. 1 is a linear map.
    """

    def __init__(self, output_dim, hidden_dim=None, num_layers=2, **kwargs):
        super().__init__(**kwargs)
        if int(num_layers) < 1:
            raise ValueError(f"`num_layers` must be >= 1, received {num_layers}.")
        self.output_dim = int(output_dim)
        self.hidden_dim = int(hidden_dim or output_dim)
        self.num_layers = int(num_layers)
        widths = [self.hidden_dim] * (self.num_layers - 1) + [self.output_dim]
        self.dense_layers = [keras.layers.Dense(w, dtype=self.dtype_policy, name=f"dense_{i}")
                             for i, w in enumerate(widths)]

    def build(self, input_shape):
        shape = tuple(input_shape)
        for layer in self.dense_layers:
            layer.build(shape)
            shape = shape[:-1] + (layer.units,)
        self.built = True

    def call(self, x):
        for i, layer in enumerate(self.dense_layers):
            x = layer(x)
            if i < len(self.dense_layers) - 1:
                x = ops.gelu(x, approximate=False)
        return x

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.output_dim)

    def get_config(self):
        config = super().get_config()
        config.update({"output_dim": self.output_dim, "hidden_dim": self.hidden_dim, "num_layers": self.num_layers})
        return config
