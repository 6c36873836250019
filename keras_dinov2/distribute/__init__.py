"""Distributed pretraining through each backend's own engine, and the cross-replica collectives of the losses.

One call, `setup()`, picks the engine for the active Keras backend:

- JAX: `keras.distribution`. `DataParallel` replicates the model over every device; `ModelParallel` adds a
  `model` mesh axis over which the large kernels of the backbones and heads (attention, MLP, head layers,
  prototypes, patch embedding), their optimizer moments and the teacher's copies are sharded (FSDP-like memory
  savings, for ViT-g with 131072-prototype heads). The train step is one SPMD program over the global batch:
  every global statistic (Sinkhorn-Knopp's sums, the centers, the masked-patch count, KoLeo's neighbours, the
  heads' batch norm) is computed over the global batch by XLA, with no collective written here, and
  stochastic depth draws once over the global batch, so every replica drops its own samples. Several hosts:
  `keras.distribution.initialize` (`jax.distributed`); every host reads its own shards of the data.
- TensorFlow: `tf.distribute.MirroredStrategy` (several GPUs, or logical CPU devices), `TPUStrategy` (a TPU VM)
  or `MultiWorkerMirroredStrategy` (several hosts, `TF_CONFIG`). Each replica runs the step on its own batch; the
  step binds a `CrossReplica` to the replica context's `all_reduce` / `all_gather`, so the losses' and the
  heads' batch-norm statistics are global, and averages the gradients over replicas before clipping. The
  seed generators are mirrored; each replica moves its draws to its own stream (its replica id).
- PyTorch: `torch.distributed` (launched with `torchrun`; gloo on CPU, nccl on GPU), one process per device.
  The step binds a `CrossReplica` to `torch.distributed` and all-reduces the gradients (their mean: every
  rank's loss is the mean over its own batch) before clipping; checkpoints are written by rank 0 only. Every
  rank starts from rank 0's state (`prepare`) and moves its random draws to its own stream (its rank).

One module per engine (`keras_dinov2.distribute.jax`, `.tensorflow`, `.torch`), each with the same functions
(`setup`, `replica_reduction`, `all_reduce_gradients`, `average_logs`, `broadcast_variables`, `is_chief`,
`to_numpy`) and its subclass of `DistributedSetup` (`keras_dinov2.distribute.setup`); the functions here call
the active backend's. Nothing is kept here between calls: the caller keeps what `setup()` returns, and the
functions read the backend's own state (the replica context, the process group, the JAX processes).

The data: every replica reads its own shard of the source (`multicrop_dataset(num_shards=..., shard_index=...)`),
with its own batch of `batch_size` images and its own masks, as the reference's per-rank collation. On JAX the
replicas of one host are stacked along the batch axis ("replica-stacked" batches: every array is the
concatenation of the replicas' batches and `n_masked_patches` has one entry per replica), which the pretrainer
recognizes and lays out as the global batch.

Example:
>>> from keras_dinov2 import distribute
>>> dist = distribute.setup("data")          # all visible devices
>>> with dist.scope():
...     model = DINOv2Pretrainer(backbone_fn(), config)
...     model.compile(global_batch_size=dist.global_batch_size(config.batch_size))
>>> dist.prepare(model)                      # torch: every rank starts from rank 0's weights
>>> model.fit(dist.dataset("digits", config.batch_size, config, repeat=True), ...)
"""

import functools
import importlib

import keras
import numpy as np

from keras_dinov2.distribute.batches import replica_count, stack_batches, stack_datasets
from keras_dinov2.distribute.setup import DistributedSetup, offset_seed_generators
from keras_dinov2.ops import active_replicas

__all__ = [
    "MODES",
    "DistributedSetup",
    "setup",
    "model_parallel_layout_map",
    "replica_reduction",
    "broadcast_variables",
    "offset_seed_generators",
    "all_reduce_gradients",
    "average_logs",
    "is_chief",
    "to_numpy",
    "active_replicas",
    "stack_batches",
    "stack_datasets",
    "replica_count",
]

MODES = ("auto", "none", "data", "model")


@functools.cache
def _engine(backend):
    """`keras_dinov2.distribute.<backend>`, or None for a backend without a distributed engine."""
    if backend not in ("jax", "tensorflow", "torch"):
        return None
    return importlib.import_module(f"keras_dinov2.distribute.{backend}")


def _active_engine():
    return _engine(keras.backend.backend())


def setup(mode="auto", model_axis_size=None, multi_host=None, tpu=None):
    """Sets up distributed training for the active Keras backend and returns a `DistributedSetup`.

    Call it first, before building the model (JAX places the variables when they are created; TensorFlow
    creates them in the strategy's scope; torch picks the process's GPU). Keep what it returns: it is the
    run's record of the engine, the replicas and this process's part.

    Args:
        mode: str, default "auto". "none": one device. "data": data parallel over every visible device
            (JAX, TensorFlow) or every torchrun process (torch). "model" (JAX only): a (batch, model) device
            mesh; the large kernels are sharded over the model axis and the data over the batch axis.
            "auto": "data" when several devices (JAX, TensorFlow: GPUs, a TPU, TF_CONFIG or several
            logical CPUs) or several torchrun processes are visible, else "none".
        model_axis_size: optional int. Size of the model axis for mode "model"; default the number of
            devices of one host (shard within a host, data parallel across hosts).
        multi_host: optional bool. JAX: call `keras.distribution.initialize()` (jax.distributed) first.
            Default: when KERAS_DISTRIBUTION_JOB_ADDRESSES or KERAS_DISTRIBUTION_NUM_PROCESSES is set.
            TPU pods need it (True); `jax.distributed` then finds the hosts itself.
        tpu: optional str. TensorFlow: the TPU to connect to ("local" on a TPU VM). Default: "local"
            when a TPU VM's devices (/dev/accel0 or /dev/vfio/0) exist or TPU_NAME is set.

    Returns:
        DistributedSetup.

    Example:
    >>> dist = setup("data")
    >>> dist.num_replicas, dist.describe()
    """
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, received {mode!r}.")
    if model_axis_size is not None and (int(model_axis_size) < 1 or mode not in ("model", "auto")):
        raise ValueError(
            f"`model_axis_size` is for mode 'model' and must be >= 1, received "
            f"model_axis_size={model_axis_size!r} with mode={mode!r}."
        )
    backend = keras.backend.backend()
    if backend == "jax":
        return _engine(backend).setup(mode, model_axis_size, multi_host)
    if mode == "model":
        raise ValueError(
            f"mode='model' (sharded kernels) needs the JAX backend (keras.distribution); the "
            f"{backend} backend supports mode 'data' or 'none'."
        )
    if backend == "tensorflow":
        return _engine(backend).setup(mode, tpu)
    if backend == "torch":
        return _engine(backend).setup(mode)
    raise ValueError(f"Distributed training supports jax, tensorflow and torch, not {backend!r}.")


def model_parallel_layout_map(device_mesh, axis="model"):
    """A `keras.distribution.LayoutMap` that shards the large kernels of the backbones and heads over `axis`
    (JAX); see `keras_dinov2.distribute.jax.model_parallel_layout_map`."""
    return _engine("jax").model_parallel_layout_map(device_mesh, axis)


# ---------------------------------------------------------------------------------------------------- the step


def replica_reduction():
    """The `CrossReplica` of the running replica step, or None on one replica (and in a JAX program).

    TensorFlow: bound to the replica context's all_reduce / all_gather (call it inside the replica step).
    torch: bound to torch.distributed when several processes take part. JAX: None, since a
    keras.distribution program holds the global batch and XLA inserts the collectives.
    """
    engine = _active_engine()
    return None if engine is None else engine.replica_reduction()


def all_reduce_gradients(grads):
    """The mean over replicas of each gradient (None stays None), inside the replica step.

    Every replica's loss is the mean over its own batch, so the mean of the replicas' gradients is the
    gradient of the global-batch loss (KoLeo over gathered rows included: the gather's gradient sums over
    replicas, see `losses.koleo`).
    """
    engine = _active_engine()
    return list(grads) if engine is None else engine.all_reduce_gradients(grads)


def average_logs(logs):
    """torch: the mean over ranks of each logged scalar, in one all-reduce (rank 0 writes the logs)."""
    engine = _active_engine()
    return logs if engine is None else engine.average_logs(logs)


def broadcast_variables(model, source=0):
    """torch: copies rank `source`'s value of every variable of `model` (and its optimizer) to all ranks."""
    engine = _active_engine()
    if engine is not None:
        engine.broadcast_variables(model, source)


# ---------------------------------------------------------------------------------------------------- files


def is_chief():
    """Whether this process is the one that writes files: JAX process 0, torch rank 0, TF chief."""
    engine = _active_engine()
    return True if engine is None else engine.is_chief()


def to_numpy(value):
    """A variable's value as a NumPy array on this host; JAX arrays spread over hosts are gathered.

    On several JAX hosts every process must call it in the same order (it is a collective there).
    """
    engine = _active_engine()
    if engine is None:
        return np.asarray(keras.ops.convert_to_numpy(value))
    return engine.to_numpy(value)
