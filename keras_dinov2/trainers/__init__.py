"""The backend-specific halves of DINOv2Pretrainer.train_step: gradients and state plumbing.

Each module exposes `train_step(model, ...)` and `test_step(model, ...)` with the signature its Keras backend trainer
expects. Everything else of the step (clipping, optimizer update, EMA, centers, logs) is backend-agnostic and lives in
the pretrainer as stateful keras.ops code. The pretrainer finds these modules through the registry that importing
this package fills (`keras_dinov2.pretrainer.register_trainer`), so the pretrainer never imports a trainer.
"""

from keras_dinov2.pretrainer import register_trainer

for _backend in ("jax", "tensorflow", "torch"):
    register_trainer(_backend, f"keras_dinov2.trainers.{_backend}")
