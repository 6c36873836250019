"""Which module holds the train and test steps of each Keras backend.

The pretrainer sits below the trainers in the package's layers, so it does not import them: `keras_dinov2.trainers`
registers its modules here when it is imported (`import keras_dinov2` does it).
"""

import importlib

import keras

_TRAINERS = {}


def register_trainer(backend, module_name):
    """Names the module that holds `train_step` and `test_step` for a Keras backend.

    `keras_dinov2.trainers` registers its three modules when the package is imported (`import keras_dinov2`
    does it). The module is imported on first use, so a backend's framework is only imported when it runs.
    """
    _TRAINERS[backend] = module_name


def trainer_module(backend=None):
    """The registered trainer module of `backend` (default: the active Keras backend), imported."""
    backend = backend or keras.backend.backend()
    if backend not in _TRAINERS:
        raise ValueError(
            f"DINOv2Pretrainer supports the {', '.join(sorted(_TRAINERS)) or 'registered'} backends, not {backend!r}."
        )
    return importlib.import_module(_TRAINERS[backend])


class TrainerHooks:
    """The two places where Keras' backend trainers call into a model during `fit`, routed to the trainer module.

    A mixin before `keras.Model` in the pretrainers' bases, which also keeps the variable list of the eager step
    (`update_variables`). `make_train_function` lets the module prepare the model first (`prepare_train_function`:
    TensorFlow builds the optimizer before tracing, see `keras_dinov2.trainers.tensorflow`).
    `_maybe_symbolic_build` is called by Keras' TensorFlow trainer only; `_make_function` by
    the JAX and TensorFlow trainers, with the (compiled) step function, which the module may wrap
    (`wrap_step_function`: JAX compiles the step ahead of its first run, see `keras_dinov2.trainers.jax`), and
    the function Keras makes of it likewise (`wrap_made_function`: TensorFlow hands the host memory of its first
    call's compilation back, see `keras_dinov2.trainers.tensorflow`).
    """

    def compile(self, *args, **kwargs):
        self.__dict__.pop("_update_variables", None)  # a recompile takes `trainable` changes into account
        super().compile(*args, **kwargs)

    def update_variables(self):
        """`trainable_variables`, the list an eager step (PyTorch) differentiates and updates, read once per compile.

        Keras walks every layer each time `trainable_variables` is read (~0.25 ms at a small model's step). Once the
        optimizer is built the list is kept until the next `compile`: the JAX and TensorFlow trainers fix it at the
        same point (their compiled steps), so a change of `trainable` takes effect after a recompile on every
        backend, as Keras documents. Until the optimizer is built (the first step) the list is read each time.
        """
        optimizer = getattr(self, "optimizer", None)
        kept = self.__dict__.get("_update_variables")
        if kept is not None and kept[0] is optimizer:
            return kept[1]
        variables = self.trainable_variables
        if optimizer is not None and optimizer.built:
            # Past Keras' attribute tracking: the list is a cache, not state of the model.
            object.__setattr__(self, "_update_variables", (optimizer, variables))
        return variables

    def make_train_function(self, force=False):
        prepare = getattr(trainer_module(), "prepare_train_function", None)
        if prepare is not None:
            prepare(self)
        return super().make_train_function(force=force)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        return trainer_module().maybe_symbolic_build(self, super()._maybe_symbolic_build, iterator, data_batch)

    def _make_function(self, step_function, *args, **kwargs):
        module = trainer_module()
        wrap = getattr(module, "wrap_step_function", None)
        function = super()._make_function(step_function if wrap is None else wrap(step_function), *args, **kwargs)
        after = getattr(module, "wrap_made_function", None)
        return function if after is None else after(self, function)
