"""The backend-specific halves of DINOv2Pretrainer.train_step: gradients and state plumbing.

Each module exposes `train_step(model, ...)` and `test_step(model, ...)` with the signature its Keras backend trainer
expects. Everything else of the step (clipping, optimizer update, EMA, centers, logs) is
backend-agnostic and lives in the pretrainer as stateful keras.ops code.
"""

import keras


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
