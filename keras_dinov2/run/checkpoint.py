"""Checkpoints of a pretraining run: the full training state in one .npz file, written atomically."""

import json
import math
import os
import re

import keras
import numpy as np

from keras_dinov2 import distribute
from keras_dinov2.run.directory import RunDirectory


def _sync(model):
    # On JAX, fit() keeps the state outside the variables until the end of the epoch loop.
    if hasattr(model, "jax_state_sync"):
        model.jax_state_sync()


def _state_variables(model):
    variables = list(model.variables)
    if getattr(model, "optimizer", None) is not None:
        variables += list(model.optimizer.variables)
    return variables


def save_checkpoint(model, path, metadata=None):
    """Writes every variable of `model` and its optimizer to `path` (.npz), atomically.

    The file is written under a temporary name and moved into place, so a kill during the
    save leaves the previous checkpoint intact and never a truncated one under `path`.

    Distributed runs: every process calls it (on several JAX hosts, reading sharded variables
    is a collective), and only the chief (JAX process 0, torch rank 0, the TF chief) writes.

    Args:
        model: keras.Model (a DINOv2Pretrainer: students, teachers, heads, centers, optimizer
            moments and step, and the random-generator states of stochastic depth).
        path: str. Destination file.
        metadata: optional dict, stored as JSON inside the file (epoch, step, config...).

    Example:
    >>> save_checkpoint(pretrainer, "runs/x/checkpoint-0003.npz", {"epoch": 3})
    """
    _sync(model)
    variables = _state_variables(model)
    arrays = {f"v{i:05d}": distribute.to_numpy(v.value) for i, v in enumerate(variables)}
    if not distribute.is_chief():
        return
    arrays["__paths__"] = np.array([v.path for v in variables])
    arrays["__metadata__"] = np.array(json.dumps(metadata or {}))
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(model, path):
    """Restores what `save_checkpoint` wrote into `model` (built and compiled); returns metadata.

    Raises:
        ValueError: naming the first variable whose path or shape does not match.
    """
    if getattr(model, "optimizer", None) is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    variables = _state_variables(model)
    with np.load(path, allow_pickle=False) as data:
        paths = [str(p) for p in data["__paths__"]]
        if len(paths) != len(variables):
            raise ValueError(
                f"Checkpoint {path} holds {len(paths)} variables, the model has "
                f"{len(variables)}: it was written by a different configuration."
            )
        for i, (variable, stored_path) in enumerate(zip(variables, paths)):
            value = data[f"v{i:05d}"]
            same_path = _generic(stored_path) == _generic(variable.path)
            if not same_path or tuple(value.shape) != tuple(variable.shape):
                raise ValueError(
                    f"Checkpoint {path} does not fit the model at variable {i}: it holds "
                    f"{stored_path!r} {tuple(value.shape)}, the model has {variable.path!r} "
                    f"{tuple(variable.shape)}."
                )
            variable.assign(value)
        return json.loads(str(data["__metadata__"]))


def _generic(path):
    # Auto-generated names carry a process-wide counter ("seed_generator_12"): ignore it.
    return re.sub(r"_\d+(?=/|$)", "", path)


class CheckpointCallback(keras.callbacks.Callback):
    """Saves the full training state every `every_n_epochs` epochs; keeps the newest `keep`.

    Args:
        run_dir: str. Folder of the run (a `RunDirectory`'s path).
        every_n_epochs: int, default 1.
        keep: int, default 2.
        metadata: optional dict added to every checkpoint.
    """

    def __init__(self, run_dir, every_n_epochs=1, keep=2, metadata=None):
        super().__init__()
        self.run_dir = run_dir
        self.every_n_epochs = int(every_n_epochs)
        self.keep = int(keep)
        self.metadata = dict(metadata or {})

    def on_epoch_end(self, epoch, logs=None):
        if self.model.stop_training and _bad(logs):
            return  # never overwrite a good checkpoint with a diverged state
        if (epoch + 1) % self.every_n_epochs:
            return
        run = RunDirectory(self.run_dir)
        save_checkpoint(self.model, run.checkpoint_path(epoch + 1), {**self.metadata, "epoch": epoch + 1})
        if not distribute.is_chief():
            return
        run.remove_old_checkpoints(self.keep)


def _bad(logs):
    return any(isinstance(v, (int, float)) and not math.isfinite(v) for v in (logs or {}).values())
