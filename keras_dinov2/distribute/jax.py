"""The JAX engine: `keras.distribution` meshes and layout maps; one SPMD program over the global batch.

`DataParallel` replicates the model over every device; `ModelParallel` adds a `model` mesh axis over which the
large kernels are sharded (`model_parallel_layout_map`). XLA inserts every collective of the step, so the
replica-step functions of this engine (`replica_reduction`, `all_reduce_gradients`, `average_logs`) leave their
input as it is. Several hosts: `keras.distribution.initialize` (`jax.distributed`).
"""

import os

import jax
import keras
import numpy as np

from keras_dinov2.distribute.batches import stack_datasets
from keras_dinov2.distribute.setup import DistributedSetup

BATCH_AXIS = "batch"
MODEL_AXIS = "model"


class JaxSetup(DistributedSetup):
    """`DistributedSetup` of the JAX engine: this host's replicas are fed replica-stacked batches."""

    def engine_name(self):
        """`keras.distribution.<the distribution's class>`."""
        return f"keras.distribution.{type(self.distribution).__name__}"

    def combine_shards(self, shard):
        """One device: its one shard as it is. Otherwise this host's shards as replica-stacked batches, one
        replica included (its `n_masked_patches` then has one entry)."""
        if self.mode == "none":
            return shard(0)
        return stack_datasets([shard(i) for i in self.shard_indices()])


def model_parallel_layout_map(device_mesh, axis=MODEL_AXIS):
    """A `keras.distribution.LayoutMap` that shards the large kernels of the backbones and heads over `axis`.

    Sharded (student and teacher alike; optimizer moments follow their variable): the attention's qkv and
    output projections, the MLP's (or SwiGLU's) two kernels, the heads' MLP kernels and weight-normalized
    prototypes (direction and gain), the patch-embedding kernel. Everything else (biases, norms,
    LayerScale, tokens, position table, centers) is small and replicated. Any kernel dimension that the
    axis does not divide stays replicated (see `setup`).

    Args:
        device_mesh: keras.distribution.DeviceMesh with an axis named `axis`.
        axis: str, default "model".

    Returns:
        keras.distribution.LayoutMap.

    Example:
    >>> mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "model"], jax.devices())
    >>> layout_map = model_parallel_layout_map(mesh)
    """
    layout_map = keras.distribution.LayoutMap(device_mesh)
    # Keys are regexes matched against the whole variable path, and must not overlap.
    layout_map[r".*attn/qkv/kernel"] = (None, axis)
    layout_map[r".*attn/proj/kernel"] = (axis, None)
    layout_map[r".*mlp/(fc1|w12)/kernel"] = (None, axis)
    layout_map[r".*mlp/(fc2|w3)/kernel"] = (axis, None)
    layout_map[r".*_head/mlp_\d+/kernel"] = (None, axis)
    layout_map[r".*_head/last_layer/weight_v"] = (None, axis)
    layout_map[r".*_head/last_layer/weight_g"] = (axis,)
    layout_map[r".*patch_embedding/projection/kernel"] = (None, None, None, axis)
    return layout_map


class DivisibleModelParallel(keras.distribution.ModelParallel):
    """ModelParallel whose variable layouts replicate any dimension the mesh axis does not divide."""

    def get_variable_layout(self, variable):
        layout = super().get_variable_layout(variable)
        axes = list(layout.axes)
        mesh = dict(zip(self.device_mesh.axis_names, self.device_mesh.shape))
        changed = False
        for i, name in enumerate(axes):
            if name is not None and variable.shape[i] % mesh[name]:
                axes[i] = None
                changed = True
        if not changed:
            return layout
        return keras.distribution.TensorLayout(axes, self.device_mesh)


def _multi_host_env():
    return bool(os.environ.get("KERAS_DISTRIBUTION_JOB_ADDRESSES")
                or os.environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES"))


def setup(mode, model_axis_size, multi_host):
    """`keras_dinov2.distribute.setup` on JAX: sets the keras.distribution and returns a `JaxSetup`."""
    if multi_host is None:
        multi_host = _multi_host_env()
    # Before anything asks JAX for its devices: jax.distributed must start first.
    if multi_host and not _jax_distributed_initialized():
        keras.distribution.initialize()
    devices = jax.devices()
    n, processes, index = len(devices), jax.process_count(), jax.process_index()
    kinds = sorted({d.device_kind for d in devices})
    described = f"{n} x {'/'.join(kinds)}"
    if mode == "auto":
        mode = "model" if model_axis_size else ("data" if n > 1 else "none")
    if mode == "none":
        keras.distribution.set_distribution(None)
        return JaxSetup("none", "jax", devices=described)
    if mode == "data":
        distribution = keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False)
        keras.distribution.set_distribution(distribution)
        return JaxSetup("data", "jax", n, n // processes, processes, index,
                        distribution=distribution, devices=described)
    m = int(model_axis_size or jax.local_device_count())
    if n % m:
        raise ValueError(
            f"`model_axis_size` must divide the {n} devices, received model_axis_size={m}."
        )
    replicas = n // m
    if replicas % processes:
        raise ValueError(
            f"With {processes} processes the model axis must stay within a host: "
            f"model_axis_size={m} leaves {replicas} data-parallel replicas, not a multiple of "
            f"{processes}."
        )
    mesh = keras.distribution.DeviceMesh((replicas, m), [BATCH_AXIS, MODEL_AXIS], devices)
    distribution = DivisibleModelParallel(
        layout_map=model_parallel_layout_map(mesh), batch_dim_name=BATCH_AXIS,
        auto_shard_dataset=False,
    )
    keras.distribution.set_distribution(distribution)
    return JaxSetup("model", "jax", replicas, replicas // processes, processes, index,
                    model_axis_size=m, distribution=distribution, devices=described)


def _jax_distributed_initialized():
    try:
        from jax._src import distributed

        return distributed.global_state.client is not None
    except Exception:  # private API moved: assume not initialized
        return False


# ---------------------------------------------------------------------------------------------------- the step


def replica_reduction():
    """None: a keras.distribution program holds the global batch and XLA inserts the collectives."""
    return None


def all_reduce_gradients(grads):
    """The gradients as they are (a list): they are already those of the global batch."""
    return list(grads)


def average_logs(logs):
    """The logs as they are: one program computes them over the global batch."""
    return logs


def broadcast_variables(model, source=0):
    """Nothing to do: every host creates the same variables on the mesh."""


# ---------------------------------------------------------------------------------------------------- files


def is_chief():
    """Whether this is JAX process 0."""
    return jax.process_index() == 0


def to_numpy(value):
    """A value as a NumPy array on this host; arrays spread over hosts are gathered (a collective)."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return np.asarray(keras.ops.convert_to_numpy(value))
