"""The pre-norm transformer block: LayerScale, stochastic depth, attention and feed-forward."""

import keras
from keras import ops

from keras_dinov2.layers.attention import Attention
from keras_dinov2.layers.feedforward import MLP, SwiGLU, swiglu_hidden_dim
from keras_dinov2.ops import attention_branch, call_layer, gradient_boundary, layer_norm, mlp_branch, replica_seed

FFN_TYPES = ("mlp", "swiglu")


@keras.saving.register_keras_serializable(package="keras_dinov2")
class LayerScale(keras.layers.Layer):
    """Multiplies each channel by a learned gamma (CaiT's LayerScale).

    Args:
        hidden_dim: int. Channel count.
        init_value: float, default 1e-5. The reference's training configs start at 1e-5.

    Example:
    >>> LayerScale(384)(ops.ones((1, 2, 384)))   # every entry 1e-5 at initialization
    """

    def __init__(self, hidden_dim, init_value=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = int(hidden_dim)
        self.init_value = float(init_value)

    def build(self, input_shape=None):
        self.gamma = self.add_weight(
            shape=(self.hidden_dim,),
            initializer=keras.initializers.Constant(self.init_value),
            name="gamma",
        )
        self.built = True

    def call(self, x):
        return x * ops.cast(self.gamma, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"hidden_dim": self.hidden_dim, "init_value": self.init_value})
        return config


class ReplicaSeedGenerator(keras.random.SeedGenerator):
    """A `keras.random.SeedGenerator` whose draws differ on every replica of a distributed step.

    Its state is the same on every replica (TensorFlow mirrors it, torch ranks start from rank
    0's); each draw is moved to the replica's own stream (`ops.replica_seed`), so
    replicas drop different samples, as the reference's differently seeded ranks do. On one
    device, and in a JAX program over the global batch, it is a plain SeedGenerator.
    """

    def __init__(self, seed=None, name=None, **kwargs):
        # The plain generator's name: checkpoints keep their variable paths.
        name = name or f"seed_generator_{keras.backend.get_uid('seed_generator')}"
        super().__init__(seed=seed, name=name, **kwargs)

    def next(self, ordered=True):
        return replica_seed(super().next(ordered=ordered))


@keras.saving.register_keras_serializable(package="keras_dinov2")
class DropPath(keras.layers.Layer):
    """Stochastic depth: drops the whole residual branch of random samples in training.

    Each sample keeps its branch with probability 1 - rate (a Bernoulli draw per sample) and a
    kept branch is divided by 1 - rate, so the expectation is unchanged. Identity in inference.
    Every replica of a distributed step draws its own samples (`ReplicaSeedGenerator`).

    Args:
        rate: float, default 0. Probability of dropping a sample's branch.
        seed: optional int.

    Example:
    >>> DropPath(0.2)(ops.ones((8, 4, 16)), training=True)   # rows of 0 or 1.25
    """

    def __init__(self, rate=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"`rate` must be in [0, 1), received {rate}.")
        self.rate = float(rate)
        self.seed = seed
        self.seed_generator = ReplicaSeedGenerator(seed)

    def call(self, x, training=None):
        if not training or self.rate == 0.0:
            return x
        keep_prob = 1.0 - self.rate
        shape = (ops.shape(x)[0],) + (1,) * (len(x.shape) - 1)
        draw = keras.random.uniform(shape, seed=self.seed_generator, dtype="float32")
        keep = ops.cast(draw < keep_prob, x.dtype)
        return x * keep / ops.cast(keep_prob, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"rate": self.rate, "seed": self.seed})
        return config


def residual_stream_policy(policy):
    """The dtype policy of the residual stream under `policy`: its variable dtype (float32 under mixed policies).

    torch.autocast, under which the reference trains, lowers only the matrix products and attention: the tokens
    the blocks add their branches to stay float32 (float32 parameters promote the sums), and LayerNorm reads them in
    float32. A Keras mixed policy would round them to the compute dtype at every layer: a branch scaled by
    LayerScale's 1e-5 then vanishes in the sum (bfloat16 keeps 8 significant bits), and at initialization the
    global CLS tokens of different images round to the same vector (KoLeo then measures rounding). So the
    stream's layers (the embeddings' sum, the blocks' LayerNorms, LayerScales, stochastic depth and residual sums,
    the final norm) run in this policy and the attention and feed-forward layers in the compute dtype.
    """
    policy = keras.config.dtype_policy() if policy is None else keras.dtype_policies.get(policy)
    return keras.DTypePolicy(policy.variable_dtype)


def _plain_sublayers(norm, *denses):
    """Whether a LayerNormalization over the last axis and plain Dense layers (no activation, LoRA or quantization)
    are all a fused branch kernel has to reproduce."""
    if norm.rms_scaling or list(norm.axis) != [-1]:
        return False
    return all(plain_dense(d) for d in denses)


def plain_dense(layer):
    """Whether a Dense layer is x @ kernel + bias and nothing more (no activation, LoRA or quantization)."""
    return layer.activation is keras.activations.linear and not layer.lora_enabled and layer.quantization_mode is None


def _norm(layer):
    return layer.gamma if layer.scale else None, layer.beta if layer.center else None, layer.epsilon


def apply_layer_norm(layer, x):
    """`layer(x)` for a LayerNormalization: one kernel call (`keras_dinov2.ops.layer_norm`) where the backend has one
    and the layer is a plain one over the last axis, else the layer (through `call_layer`)."""
    if layer.built and not layer.rms_scaling and list(layer.axis) in ([-1], [len(x.shape) - 1]):
        y = layer_norm(x, *_norm(layer))
        if y is not None:
            return y
    return call_layer(layer, x)


def _dense(layer):
    return layer.kernel, layer.bias


def _gamma(layer_scale):
    return None if layer_scale is None else layer_scale.gamma


@keras.saving.register_keras_serializable(package="keras_dinov2")
class TransformerBlock(keras.layers.Layer):
    """Pre-norm ViT block: x += ls1 * attn(norm1(x)); x += ls2 * ffn(norm2(x)).

    Stochastic depth follows the reference: at rates above `subset_threshold` (0.1) in
    training, each residual branch is computed only for a random subset of
    max(int(B * (1 - rate)), 1) samples and added back scaled by B / subset, which saves the
    dropped samples' compute; at lower rates, or when the batch size is not static, an
    ordinary per-sample drop path is used. Both keep the expectation of the branch.

    Under a mixed policy the residual stream stays in the variable dtype, as under torch.autocast
    (`residual_stream_policy`): the block takes x as it comes (no input autocast), its norms,
    LayerScales and stochastic depth run in float32, attention and feed-forward in the compute
    dtype; the output is in the variable dtype (float32).

    Args:
        hidden_dim: int. Token width.
        num_heads: int. Attention heads.
        mlp_ratio: float, default 4.0. Feed-forward width over `hidden_dim`.
        ffn_type: str, default "mlp". "mlp" (GELU) or "swiglu" (the giant model's fused
            SwiGLU, hidden width `swiglu_hidden_dim(hidden_dim, mlp_ratio)`).
        layer_scale_init: float or None, default 1e-5. None disables LayerScale.
        drop_path_rate: float, default 0.
        subset_drop_path: bool, default True. Use the subset form above its threshold.
        layer_norm_epsilon: float, default 1e-6.
        seed: optional int for stochastic depth.

    Example:
    >>> TransformerBlock(384, 6)(ops.zeros((2, 257, 384))).shape   # (2, 257, 384)
    """

    subset_threshold = 0.1

    def __init__(
        self,
        hidden_dim,
        num_heads,
        mlp_ratio=4.0,
        ffn_type="mlp",
        layer_scale_init=1e-5,
        drop_path_rate=0.0,
        subset_drop_path=True,
        layer_norm_epsilon=1e-6,
        seed=None,
        **kwargs,
    ):
        # The block takes its input as it comes (the residual stream; see the class docstring).
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        if ffn_type not in FFN_TYPES:
            raise ValueError(f"`ffn_type` must be one of {FFN_TYPES}, received {ffn_type!r}.")
        self.hidden_dim = int(hidden_dim)
        self.num_heads = int(num_heads)
        self.mlp_ratio = float(mlp_ratio)
        self.ffn_type = ffn_type
        self.layer_scale_init = None if layer_scale_init is None else float(layer_scale_init)
        self.drop_path_rate = float(drop_path_rate)
        self.subset_drop_path = bool(subset_drop_path)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.seed = seed
        policy = self.dtype_policy
        stream = residual_stream_policy(policy)
        self.norm1 = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=stream, name="norm1"
        )
        self.attn = Attention(hidden_dim, num_heads, dtype=policy, name="attn")
        self.norm2 = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=stream, name="norm2"
        )
        if ffn_type == "mlp":
            self.mlp = MLP(hidden_dim, int(hidden_dim * mlp_ratio), dtype=policy, name="mlp")
        else:
            self.mlp = SwiGLU(
                hidden_dim, swiglu_hidden_dim(hidden_dim, mlp_ratio), dtype=policy, name="mlp"
            )
        if self.layer_scale_init is not None:
            self.ls1 = LayerScale(hidden_dim, self.layer_scale_init, dtype=stream, name="ls1")
            self.ls2 = LayerScale(hidden_dim, self.layer_scale_init, dtype=stream, name="ls2")
        else:
            self.ls1 = self.ls2 = None
        self.drop_path = DropPath(self.drop_path_rate, seed=seed, dtype=stream, name="drop_path")

    def build(self, input_shape):
        for layer in (self.norm1, self.attn, self.norm2, self.mlp):
            layer.build(input_shape)
        if self.ls1 is not None:
            self.ls1.build(input_shape)
            self.ls2.build(input_shape)
        self.built = True

    def _kernel_arguments(self, branch):
        """The sublayer arguments of a fused branch kernel ("attention" or "ffn"), built once.

        Built, they are the same variables at every call while the sublayers stay plain (`_plain_sublayers`,
        checked at each call: LoRA or quantization turn the Keras layers back on); building them reads Dense's
        `kernel` property and a dozen attributes, ~12 us a call on PyTorch. Kept outside Keras' attribute
        tracking, which would otherwise count the variables in the tuple as the block's own.
        """
        cache = self.__dict__.get("_fused_arguments")
        if cache is None:
            cache = {}
            object.__setattr__(self, "_fused_arguments", cache)
        arguments = cache.get(branch)
        if arguments is None:
            if branch == "attention":
                arguments = (_norm(self.norm1), _dense(self.attn.qkv), _dense(self.attn.proj), self.num_heads,
                             self.attn.head_dim**-0.5, _gamma(self.ls1), self.compute_dtype)
            else:
                arguments = (_norm(self.norm2), _dense(self.mlp.fc1), _dense(self.mlp.fc2), _gamma(self.ls2),
                             self.compute_dtype)
            cache[branch] = arguments
        return arguments

    def _attention_branch(self, x):
        if _plain_sublayers(self.norm1, self.attn.qkv, self.attn.proj):
            y = attention_branch(x, *self._kernel_arguments("attention"))
            if y is not None:  # the backend's one-call kernel (PyTorch; float32 variables)
                return y
        y = self.attn(self.norm1(x))
        return y if self.ls1 is None else self.ls1(y)

    def _ffn_branch(self, x):
        if self.ffn_type == "mlp" and _plain_sublayers(self.norm2, self.mlp.fc1, self.mlp.fc2):
            y = mlp_branch(x, *self._kernel_arguments("ffn"))
            if y is not None:
                return y
        y = self.mlp(self.norm2(x))
        return y if self.ls2 is None else self.ls2(y)

    def _residual(self, x, branch, training):
        y = branch(x)
        if y.dtype != x.dtype:  # the compute dtype without LayerScale: the sum is the stream's
            y = ops.cast(y, x.dtype)
        # DropPath is the identity unless it draws: skip its layer call then.
        return x + (self.drop_path(y, training=training) if training and self.drop_path_rate else y)

    def _subset_residual(self, x, branch):
        batch = x.shape[0]
        kept = max(int(batch * (1.0 - self.drop_path_rate)), 1)
        order = keras.random.shuffle(
            ops.arange(batch, dtype="int32"), seed=self.drop_path.seed_generator
        )
        index = order[:kept]
        kept_x = ops.take(x, index, axis=0)
        residual = ops.cast(branch(kept_x), x.dtype) * ops.cast(batch / kept, x.dtype)
        # The reference's index_add: kept rows x + residual, the others x. Not x + ops.scatter(...): Keras' torch
        # scatter loops over the rows in Python with a host sync each (on an H200 that made ViT-L's step host-bound).
        return ops.scatter_update(x, index[:, None], kept_x + residual)

    def call(self, x, training=None):
        # A no-op except in the backward pass on JAX's CPU backend (see its docstring).
        x = gradient_boundary(x)
        subset = (
            training
            and self.subset_drop_path
            and self.drop_path_rate > self.subset_threshold
            and x.shape[0] is not None
        )
        if subset:
            x = self._subset_residual(x, self._attention_branch)
            return self._subset_residual(x, self._ffn_branch)
        x = self._residual(x, self._attention_branch, training)
        return self._residual(x, self._ffn_branch, training)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "num_heads": self.num_heads,
                "mlp_ratio": self.mlp_ratio,
                "ffn_type": self.ffn_type,
                "layer_scale_init": self.layer_scale_init,
                "drop_path_rate": self.drop_path_rate,
                "subset_drop_path": self.subset_drop_path,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "seed": self.seed,
            }
        )
        return config
