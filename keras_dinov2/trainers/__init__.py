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
