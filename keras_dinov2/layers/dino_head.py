"""The DINO / iBOT projection head: MLP -> L2 normalization -> weight-normalized prototypes."""

import math

import keras
from keras import ops

from keras_dinov2.layers.attention import torch_linear_init
from keras_dinov2.layers.block import plain_dense
from keras_dinov2.ops import call_layer, gelu, gradient_boundary, projection_head, weight_normalized_kernel

_MIXED_COMPUTE_DTYPES = ("float16", "bfloat16")
# Under the squared norm of each prototype column: only an all-zero column meets it (the reference has none).
_COLUMN_NORM_FLOOR = 1e-24


@keras.saving.register_keras_serializable(package="keras_dinov2")
class WeightNormPrototypes(keras.layers.Layer):
    """Bias-free linear layer with weight normalization: W[:, k] = g_k * v[:, k] / ||v[:, k]||.

    The reference's `weight_norm(nn.Linear(bottleneck, K, bias=False))`. The variables are `weight_v`
    (bottleneck, K), the direction, initialized like torch's default Linear (uniform in +-1/sqrt(bottleneck)),
    and `weight_g` (K,), the per-prototype norm, initialized to 1. Like the reference, `weight_g` is trainable
    (the reference fills it with 1 but does not freeze it, and its weight decay applies to it). With
    `fixed_norm`, `weight_g` stays 1 and is not trainable, so each output is a cosine (DINO v1's default
    `norm_last_layer`).

    Args:
        units: int. Number of prototypes K.
        fixed_norm: bool, default False. `weight_g` non-trainable (fixed at its initial 1).

    Example:
    >>> WeightNormPrototypes(1024)(ops.zeros((4, 256))).shape   # (4, 1024)
    """

    def __init__(self, units, fixed_norm=False, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.fixed_norm = bool(fixed_norm)

    def build(self, input_shape):
        fan_in = int(input_shape[-1])
        limit = 1.0 / math.sqrt(fan_in)
        self.weight_v = self.add_weight(
            name="weight_v",
            shape=(fan_in, self.units),
            initializer=keras.initializers.RandomUniform(-limit, limit),
        )
        self.weight_g = self.add_weight(name="weight_g", shape=(self.units,), initializer="ones",
                                        trainable=not self.fixed_norm)
        self.built = True

    def effective_kernel(self):
        """The kernel the layer applies, g * v / ||v|| per prototype (column), (bottleneck, K)."""
        v = ops.cast(self.weight_v, self.compute_dtype)
        g = ops.cast(self.weight_g, self.compute_dtype)
        return weight_normalized_kernel(v, g, _COLUMN_NORM_FLOOR)

    def call(self, x):
        return ops.matmul(x, self.effective_kernel())

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def get_config(self):
        config = super().get_config()
        config.update({"units": self.units, "fixed_norm": self.fixed_norm})
        return config


# torch.nn.BatchNorm1d's default.
_BN_EPSILON = 1e-5


def _global_sum(x, reduction):
    """`x` (1, ...) summed over replicas, differentiably (the gather's gradient reaches every replica)."""
    if reduction is None:
        return x
    return ops.sum(reduction.all_gather(x), axis=0, keepdims=True)


@keras.saving.register_keras_serializable(package="keras_dinov2")
class DINOHead(keras.layers.Layer):
    """DINO head: MLP -> L2 normalization -> weight-normalized linear layer onto the prototypes.

    As the reference's `DINOHead` (batch norm optional): `num_layers` Dense layers with exact GELU between them
    (in -> hidden -> ... -> hidden -> bottleneck; one layer is a single Dense in -> bottleneck), kernels
    Normal(0, 0.02) kernels and zero biases; then x / max(||x||, 1e-12); then
    `WeightNormPrototypes` (sublayer "last_layer", variables `weight_v` and `weight_g`, with g trainable like
    the reference's). Under a mixed policy the MLP runs in the compute dtype, while the normalization and the
    last layer run in float32 and the logits come out in float32 (so the reference's fp16 epsilon 1e-6 is
    not needed). The reference's `trunc_normal_(std=0.02)` cuts at +-2 in absolute value, so it is in
    effect an untruncated normal, which is what is used here.

    The trainer can tell the last layer apart by `last_layer_variables` (frozen during the first epoch in the
    reference) and the variable paths ".../last_layer/weight_v", ".../last_layer/weight_g"; biases end in
    "bias". The reference decays `weight_g` like any weight.

    Args:
        num_prototypes: int, default 65536. Output width K.
        hidden_dim: int, default 2048. Width of the hidden MLP layers.
        bottleneck_dim: int, default 256. Width before the L2 normalization.
        num_layers: int, default 3. Dense layers in the MLP (at least 1).
        use_bias: bool, default True. Biases in the MLP layers (the last layer never has one).
        epsilon: float, default 1e-12. Floor of the norm in the L2 normalization.
        use_bn: bool, default False. Batch normalization after each hidden Dense layer, before the
            GELU (the reference's `use_bn`). The heads only run in training, where the reference's
            BatchNorm1d uses batch statistics in both networks, so statistics always come from the
            rows of the call (in float32; rows of weight 0 in `row_weights`, such as padding, are
            left out) and no running averages are kept. Scale and shift are learned, without
            weight decay. Statistics are per call (the reference normalizes its concatenated crops
            together) and over the global batch: with a `reduction` (each replica running its
            own program) the sums behind the mean and the variance cover every replica's rows,
            as DINO's SyncBatchNorm, so N replicas normalize as one device with the global batch.
        norm_last_layer: bool, default False. The prototypes' norms fixed at 1 (`weight_g` not trained), each
            logit a cosine: DINO v1's `norm_last_layer` (its default True). DINOv2 trains them.

    Call arguments:
        x: (N, in_dim) tensor.
        row_weights: optional (N,) tensor; with `use_bn`, rows of weight 0 do not enter the
            statistics.
        reduction: optional `keras_dinov2.losses.CrossReplica`, default None. With `use_bn` and
            several replicas, the batch statistics are summed over replicas through its
            `all_gather` (which passes gradients back to each replica, so the statistics'
            gradients are those of the global batch too).

    Example:
    >>> head = DINOHead(num_prototypes=4096)
    >>> head(ops.zeros((8, 384))).shape   # (8, 4096), float32
    """

    def __init__(
        self,
        num_prototypes=65536,
        hidden_dim=2048,
        bottleneck_dim=256,
        num_layers=3,
        use_bias=True,
        epsilon=1e-12,
        use_bn=False,
        norm_last_layer=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        for name, value in (
            ("num_prototypes", num_prototypes),
            ("hidden_dim", hidden_dim),
            ("bottleneck_dim", bottleneck_dim),
            ("num_layers", num_layers),
        ):
            if int(value) < 1:
                raise ValueError(f"`{name}` must be a positive integer, received {value}.")
        self.num_prototypes = int(num_prototypes)
        self.hidden_dim = int(hidden_dim)
        self.bottleneck_dim = int(bottleneck_dim)
        self.num_layers = int(num_layers)
        self.use_bias = bool(use_bias)
        self.epsilon = float(epsilon)
        self.use_bn = bool(use_bn)
        self.norm_last_layer = bool(norm_last_layer)

        widths = [self.hidden_dim] * (self.num_layers - 1) + [self.bottleneck_dim]
        self.mlp_layers = [
            keras.layers.Dense(
                width,
                use_bias=self.use_bias,
                kernel_initializer=torch_linear_init(),
                bias_initializer="zeros",
                dtype=self.dtype_policy,
                name=f"mlp_{i}",
            )
            for i, width in enumerate(widths)
        ]
        # The prototype logits are softmaxed at temperatures down to 0.04: keep them in float32.
        if self.dtype_policy.compute_dtype in _MIXED_COMPUTE_DTYPES:
            last_policy = keras.DTypePolicy("float32")
        else:
            last_policy = self.dtype_policy
        self.last_layer = WeightNormPrototypes(
            self.num_prototypes, fixed_norm=self.norm_last_layer, dtype=last_policy, name="last_layer"
        )

    def build(self, input_shape):
        shape = tuple(input_shape)
        for layer in self.mlp_layers:
            layer.build(shape)
            shape = (*shape[:-1], layer.units)
        self.last_layer.build(shape)
        self.bn_scales, self.bn_offsets = [], []
        if self.use_bn:
            for i in range(self.num_layers - 1):
                self.bn_scales.append(self.add_weight(
                    shape=(self.hidden_dim,), initializer="ones", dtype="float32",
                    name=f"bn_{i}_norm_scale"))
                self.bn_offsets.append(self.add_weight(
                    shape=(self.hidden_dim,), initializer="zeros", dtype="float32",
                    name=f"bn_{i}_norm_offset"))
        self.built = True

    def _batch_norm(self, i, x, row_weights, reduction=None):
        x32 = ops.cast(x, "float32")
        if row_weights is None:
            w = ops.ones((ops.shape(x32)[0], 1), "float32")
        else:
            w = ops.reshape(ops.cast(row_weights, "float32"), (-1, 1))
        count = _global_sum(ops.sum(w, axis=0, keepdims=True), reduction)
        mean = _global_sum(ops.sum(w * x32, axis=0, keepdims=True), reduction)
        mean = mean / ops.maximum(count, 1.0)
        # Two passes, as one device computes it: the variance around the global mean.
        var = _global_sum(ops.sum(w * ops.square(x32 - mean), axis=0, keepdims=True), reduction)
        var = var / ops.maximum(count, 1.0)
        y = (x32 - mean) / ops.sqrt(var + _BN_EPSILON)
        y = y * self.bn_scales[i] + self.bn_offsets[i]
        return ops.cast(y, x.dtype)

    @property
    def last_layer_variables(self):
        """The prototype layer's variables, [weight_v, weight_g]."""
        return list(self.last_layer.weights)

    def _fused(self, x):
        """The backend's one-call head (PyTorch, float32, no batch norm), or None."""
        if self.use_bn or self.compute_dtype != "float32" or self.last_layer.compute_dtype != "float32":
            return None
        if not all(plain_dense(layer) for layer in self.mlp_layers):
            return None
        # The variables, read once (Dense's `kernel` property checks its quantization at each read); kept outside
        # Keras' attribute tracking, as TransformerBlock keeps its kernels' arguments.
        arguments = self.__dict__.get("_fused_arguments")
        if arguments is None:
            arguments = ([(layer.kernel, layer.bias) for layer in self.mlp_layers],
                         (self.last_layer.weight_v, self.last_layer.weight_g))
            object.__setattr__(self, "_fused_arguments", arguments)
        return projection_head(x, *arguments, self.epsilon, _COLUMN_NORM_FLOOR)

    def call(self, x, row_weights=None, reduction=None):
        fused = self._fused(x)
        if fused is not None:
            return fused
        if reduction is not None and getattr(reduction, "num_replicas", 1) < 2:
            reduction = None
        for i, layer in enumerate(self.mlp_layers):
            # Dense ignores `training`; given, it lets `call_layer` skip `Layer.__call__` where that is a no-op.
            x = gradient_boundary(call_layer(layer, x, training=False))
            if i < len(self.mlp_layers) - 1:
                if self.use_bn:
                    x = self._batch_norm(i, x, row_weights, reduction)
                x = gelu(x)
        x = ops.cast(x, self.last_layer.compute_dtype)
        squared = ops.sum(ops.square(x), axis=-1, keepdims=True)
        # sqrt(max(|x|^2, eps^2)) == max(|x|, eps) and keeps a finite gradient at x = 0.
        x = x / ops.sqrt(ops.maximum(squared, self.epsilon**2))
        return call_layer(self.last_layer, x)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.num_prototypes)

    def compute_output_spec(self, x, row_weights=None, reduction=None):
        return keras.KerasTensor(
            self.compute_output_shape(x.shape), dtype=self.last_layer.compute_dtype
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_prototypes": self.num_prototypes,
                "hidden_dim": self.hidden_dim,
                "bottleneck_dim": self.bottleneck_dim,
                "num_layers": self.num_layers,
                "use_bias": self.use_bias,
                "epsilon": self.epsilon,
                "use_bn": self.use_bn,
                "norm_last_layer": self.norm_last_layer,
            }
        )
        return config
