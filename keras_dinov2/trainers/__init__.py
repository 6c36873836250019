"""The backend-specific halves of DINOv2Pretrainer.train_step: gradients and state plumbing.

Each module exposes `train_step(model, ...)` and `test_step(model, ...)` with the signature its Keras backend trainer
expects. Everything else of the step (clipping, optimizer update, EMA, centers, logs) is
backend-agnostic and lives in the pretrainer as stateful keras.ops code.
"""

import keras

_BOUNDARY = {}


def residual_gradient_boundary(x):
    """Identity whose gradient is materialized once: called on each block's residual stream.

    On JAX's CPU backend, XLA otherwise fuses the backward pass's running sum of residual
    gradients (one term per LayerNorm above) into every consumer of it, recomputing it for each
    block: quadratic in depth, and 40% of a ViT-S/14 training step. Elsewhere (other backends,
    JAX on GPU and TPU, symbolic tensors) it returns `x` unchanged. See
    `keras_dinov2.trainers.jax.residual_gradient_boundary`.
    """
    if isinstance(x, keras.KerasTensor):
        return x
    backend = keras.backend.backend()
    if backend not in _BOUNDARY:
        function = None
        if backend == "jax":
            from keras_dinov2.trainers import jax as module

            function = module.residual_gradient_boundary_for_platform()
        _BOUNDARY[backend] = function
    function = _BOUNDARY[backend]
    return x if function is None else function(x)


_ATTENTION = {}


def dot_product_attention(query, key, value, scale):
    """`keras.ops.dot_product_attention(query, key, value, scale=scale)`, inputs (batch, tokens, heads, head_dim).

    On JAX's CPU backend with float32 inputs it is
    `keras_dinov2.trainers.jax.cpu_dot_product_attention`: the same values, laid out for XLA's
    CPU kernels (~24% faster forward, ~32% faster forward + backward at 257 tokens). Everywhere
    else (other backends, GPU and TPU with their fused kernels, mixed precision, symbolic tensors)
    it is the Keras op.
    """
    backend = keras.backend.backend()
    if backend == "jax" and not isinstance(query, keras.KerasTensor):
        if backend not in _ATTENTION:
            from keras_dinov2.trainers import jax as module

            _ATTENTION[backend] = module.dot_product_attention_for_platform()
        function = _ATTENTION[backend]
        if function is not None and all(
            keras.backend.standardize_dtype(x.dtype) == "float32" for x in (query, key, value)
        ):
            return function(query, key, value, float(scale))
    return keras.ops.dot_product_attention(query, key, value, scale=scale)


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
