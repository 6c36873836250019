"""The backend-specific halves of DINOv2Pretrainer.train_step: gradients and state plumbing.

Each module exposes `train_step(model, ...)` and `test_step(model, ...)` with the signature its Keras backend trainer
expects. Everything else of the step (clipping, optimizer update, EMA, centers, logs) is
backend-agnostic and lives in the pretrainer as stateful keras.ops code.
"""

import keras

_CPU_FUNCTIONS = {}


def _cpu_function(name):
    """`cpu_function(name)` of the JAX or TensorFlow trainer module for the active backend, else
    None (cached)."""
    backend = keras.backend.backend()
    key = (backend, name)
    if key not in _CPU_FUNCTIONS:
        function = None
        if backend == "jax":
            from keras_dinov2.trainers import jax as module

            function = module.cpu_function(name)
        elif backend == "tensorflow":
            from keras_dinov2.trainers import tensorflow as module

            function = module.cpu_function(name)
        _CPU_FUNCTIONS[key] = function
    return _CPU_FUNCTIONS[key]


def _float32(*tensors):
    return all(keras.backend.standardize_dtype(x.dtype) == "float32" for x in tensors)


def gradient_boundary(x):
    """Identity whose gradient is written to memory once, in its own layout (JAX on CPU).

    Called on each block's residual stream and on the outputs of the linear layers. On JAX's
    CPU backend, XLA otherwise fuses cheap elementwise producers of a gradient into each of its
    consumers: the backward pass's running sum of residual gradients (one term per LayerNorm
    above) was recomputed for every block (quadratic in depth, 40% of a ViT-S/14 training
    step), and the LayerNorm and GELU backward passes were recomputed inside the transposing
    copies that feed each weight-gradient product, in transposed order (~0.3 s of a 4.5 s step).
    Elsewhere (other backends, JAX on GPU and TPU, symbolic tensors) it returns `x` unchanged.
    See `keras_dinov2.trainers.jax.gradient_boundary`.
    """
    if isinstance(x, keras.KerasTensor):
        return x
    function = _cpu_function("gradient_boundary")
    return x if function is None else function(x)


def dot_product_attention(query, key, value, scale):
    """`keras.ops.dot_product_attention(query, key, value, scale=scale)`, inputs (batch, tokens, heads, head_dim).

    On JAX's CPU backend with float32 inputs it is
    `keras_dinov2.trainers.jax.cpu_dot_product_attention`: the same values, laid out for XLA's
    CPU kernels (~24% faster forward, ~32% faster forward + backward at 257 tokens). On
    TensorFlow without a GPU or TPU it is
    `keras_dinov2.trainers.tensorflow.cpu_dot_product_attention` (q scaled instead of the
    logits: 3-4% faster ViT-S/14 inference). Everywhere else (torch, GPU and TPU with their
    fused kernels, mixed precision, symbolic tensors) it is the Keras op.
    """
    if not isinstance(query, keras.KerasTensor) and _float32(query, key, value):
        function = _cpu_function("dot_product_attention")
        if function is not None:
            return function(query, key, value, float(scale))
    return keras.ops.dot_product_attention(query, key, value, scale=scale)


def sum_over_rows(x):
    """`keras.ops.sum(x, axis=0)`; on JAX's CPU backend in float32 a loop over the rows (~25x faster
    there for a (256, 65536) matrix; see `keras_dinov2.trainers.jax._sum_rows`)."""
    if not isinstance(x, keras.KerasTensor) and _float32(x):
        function = _cpu_function("sum_over_rows")
        if function is not None:
            return function(x)
    return keras.ops.sum(x, axis=0)


def max_over_rows(x):
    """`keras.ops.max(x, axis=0)`; on JAX's CPU backend in float32 a loop over the rows, as
    `sum_over_rows`."""
    if not isinstance(x, keras.KerasTensor) and _float32(x) and x.shape[0]:
        function = _cpu_function("max_over_rows")
        if function is not None:
            return function(x)
    return keras.ops.max(x, axis=0)


def weight_normalized_kernel(v, g, floor):
    """g * v / sqrt(max(sum(v^2, axis=0), floor)): the column-normalized kernel of weight normalization.

    On JAX's CPU backend in float32, `keras_dinov2.trainers.jax.cpu_weight_normalized_kernel` (the
    same values; its reductions over the rows, forward and backward, in fast loops). Elsewhere
    keras.ops with autodiff.
    """
    if not isinstance(v, keras.KerasTensor) and _float32(v, g):
        function = _cpu_function("weight_normalized_kernel")
        if function is not None:
            return function(v, g, float(floor))
    ops = keras.ops
    v, g = ops.convert_to_tensor(v), ops.convert_to_tensor(g)
    return v * (g / ops.sqrt(ops.maximum(ops.sum(ops.square(v), axis=0), floor)))


def replica_seed(seed):
    """A drawn (2,) seed moved to this replica's own stream, where each replica runs its own program.

    A `tf.distribute` replica context (its `replica_id_in_sync_group`) and `torch.distributed`
    ranks hold identical seed-generator states (mirrored, or broadcast from rank 0), so without
    this every replica would draw the same stochastic-depth pattern. Elsewhere (one device, a
    JAX program over the global batch, whose draws already cover every replica's rows) the
    seed is returned unchanged. Replica 0 keeps the plain seed.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        from keras_dinov2.trainers import tensorflow as module
    elif backend == "torch":
        from keras_dinov2.trainers import torch as module
    else:
        return seed
    return module.replica_seed(seed)


def step_functions():
    """The (train_step, test_step) implementations for the active Keras backend."""
    backend = keras.backend.backend()
    if backend == "jax":
        from keras_dinov2.trainers import jax as module
    elif backend == "tensorflow":
        from keras_dinov2.trainers import tensorflow as module
    elif backend == "torch":
        from keras_dinov2.trainers import torch as module
    else:
        raise ValueError(
            f"DINOv2Pretrainer supports the jax, tensorflow and torch backends, not {backend!r}."
        )
    return module.train_step, module.test_step
