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
>>> model.fit(dist.dataset("digits", config.batch_size, config.data, repeat=True), ...)
"""

import contextlib
import os

import keras
import numpy as np

from keras_dinov2 import ops
from keras_dinov2.losses import CrossReplica

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
    "split_batch",
    "stack_batches",
    "stack_datasets",
    "replica_count",
]

MODES = ("auto", "none", "data", "model")
BATCH_AXIS = "batch"
MODEL_AXIS = "model"
# Gradients are all-reduced in buckets of at most this many elements (torch).
_BUCKET_ELEMENTS = 1 << 25


def _backend():
    return keras.backend.backend()


# ---------------------------------------------------------------------------------------------------- the setup


class DistributedSetup:
    """Where and how a run trains: the engine, the replicas, and this process's part.

    Made by `setup()`; not constructed directly.

    Attributes:
        mode: str. "none" (one device), "data" (data parallel) or "model" (JAX: sharded kernels too).
        backend: str. The Keras backend.
        num_replicas: int. Data-parallel replicas over all hosts: the global batch is
            `num_replicas * batch_size`.
        local_replicas: int. Replicas whose data this process reads.
        num_processes: int. Processes (hosts, or torch ranks).
        process_index: int. This process's index (torch: its rank).
        model_axis_size: int. Devices each kernel is sharded over (1 unless mode is "model").
        strategy: the tf.distribute strategy (TensorFlow), else None.
        distribution: the keras.distribution object (JAX), else None.
    """

    def __init__(self, mode, backend, num_replicas=1, local_replicas=1, num_processes=1,
                 process_index=0, model_axis_size=1, strategy=None, distribution=None,
                 devices=""):
        self.mode = mode
        self.backend = backend
        self.num_replicas = int(num_replicas)
        self.local_replicas = int(local_replicas)
        self.num_processes = int(num_processes)
        self.process_index = int(process_index)
        self.model_axis_size = int(model_axis_size)
        self.strategy = strategy
        self.distribution = distribution
        self.devices = devices

    def __repr__(self):
        return (f"DistributedSetup(mode={self.mode!r}, backend={self.backend!r}, "
                f"num_replicas={self.num_replicas}, model_axis_size={self.model_axis_size}, "
                f"num_processes={self.num_processes}, process_index={self.process_index})")

    def describe(self):
        """One line for logs: engine, replicas and devices."""
        if self.mode == "none":
            return f"one device ({self.devices or 'default'})"
        engine = {
            "jax": f"keras.distribution.{type(self.distribution).__name__}",
            "tensorflow": f"tf.distribute.{type(self.strategy).__name__}",
            "torch": f"torch.distributed ({_torch_backend_name()})",
        }[self.backend]
        text = f"{engine}: {self.num_replicas} data-parallel replica(s)"
        if self.model_axis_size > 1:
            text += f" x {self.model_axis_size}-way sharded kernels"
        if self.num_processes > 1:
            text += f", {self.num_processes} processes (this is {self.process_index})"
        return text + (f" on {self.devices}" if self.devices else "")

    @property
    def is_chief(self):
        """Whether this process writes files (checkpoints, logs): process / rank 0."""
        return self.process_index == 0

    def global_batch_size(self, batch_size):
        """Images per optimizer step over all replicas, for a per-replica `batch_size`."""
        return int(batch_size) * self.num_replicas

    def scope(self):
        """Context in which to build and compile the model (TensorFlow: the strategy's scope)."""
        if self.strategy is None:
            return contextlib.nullcontext()
        return _tf_scope(self.strategy)

    def shard_indices(self):
        """The data shards (one per replica) this process reads."""
        start = self.process_index * self.local_replicas
        return list(range(start, start + self.local_replicas))

    def dataset(self, source, batch_size, config=None, *, skip=0, micro_batches=1, **kwargs):
        """The multi-crop training data as this engine wants it, `batch_size` images per replica.

        Every replica reads its own shard (`num_shards = num_replicas`). For random-access sources (folders,
        arrays, digits) the images of one step over all replicas are those of one single-device batch of
        `num_replicas * batch_size`, each with the same augmentation, spread over the replicas; each
        replica samples its own masks.

        Args:
            source: as `multicrop_dataset`.
            batch_size: int. Images per replica per step.
            config: DataConfig (or a config holding one), as `multicrop_dataset`.
            skip: int, default 0. Batches to skip at the start of every shard (resume).
            micro_batches: int, default 1. Micro-batches per optimizer update (gradient
                accumulation): each replica's k consecutive batches are stacked into one
                (`keras_dinov2.data.group_micro_batches`), after `skip`.
            **kwargs: passed to `multicrop_dataset` (seed, repeat, start_epoch, ...).

        Returns:
            a tf.data.Dataset (JAX: replica-stacked batches of this host's replicas; torch: this rank's
            batches; one device: the plain dataset), or a tf.distribute DistributedDataset (TensorFlow).
        """
        from keras_dinov2.data import group_micro_batches, multicrop_dataset

        if "num_shards" in kwargs or "shard_index" in kwargs or "input_context" in kwargs:
            raise ValueError(
                "DistributedSetup.dataset sets the shards itself; do not pass num_shards, "
                f"shard_index or input_context (received {sorted(kwargs)})."
            )

        def shard(index):
            ds = multicrop_dataset(source, batch_size, config, num_shards=self.num_replicas,
                                   shard_index=index, **kwargs)
            return group_micro_batches(ds.skip(skip) if skip else ds, micro_batches)

        if self.backend == "tensorflow" and self.strategy is not None:
            import tensorflow as tf

            def dataset_fn(context):
                per_pipeline = context.num_replicas_in_sync // context.num_input_pipelines
                first = context.input_pipeline_id * per_pipeline
                shards = [shard(first + j) for j in range(per_pipeline)]
                if per_pipeline == 1:
                    return shards[0]
                # Replica j of this worker takes every per_pipeline-th element, from j on.
                order = tf.data.Dataset.range(per_pipeline).repeat()
                return tf.data.Dataset.choose_from_datasets(shards, order)

            return self.strategy.distribute_datasets_from_function(dataset_fn)
        indices = self.shard_indices()
        if len(indices) == 1 and self.backend != "jax":
            return shard(indices[0])
        if len(indices) == 1 and self.mode == "none":
            return shard(0)
        return stack_datasets([shard(i) for i in indices])

    def batches_per_pass(self, source, batch_size, config=None, **kwargs):
        """Steps in one pass over the data (one shard's batches), or -1 when unknown."""
        from keras_dinov2.data import multicrop_dataset

        ds = multicrop_dataset(source, batch_size, config, num_shards=self.num_replicas,
                               shard_index=0, repeat=False, **kwargs)
        return int(ds.cardinality())

    def prepare(self, model):
        """torch: every rank starts from rank 0's state; returns `model`.

        Call it after building (and after restoring a checkpoint). The weights, optimizer state,
        centers and seed-generator states come from rank 0. Every rank (and every TensorFlow
        replica) still draws its own stochastic depth, as the reference seeds each rank
        differently: the library's generators move each draw to the replica's stream
        (`keras_dinov2.layers.block.ReplicaSeedGenerator`), so rank 0's checkpoints resume
        every rank exactly.
        """
        if self.backend == "torch" and self.num_processes > 1:
            broadcast_variables(model)
        return model


def setup(mode="auto", model_axis_size=None, multi_host=None, tpu=None):
    """Sets up distributed training for the active Keras backend and returns a `DistributedSetup`.

    Call it first, before building the model (JAX places the variables when they are created; TensorFlow
    creates them in the strategy's scope; torch picks the process's GPU).

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
    global _ACTIVE
    _ACTIVE = _setup(mode, model_axis_size, multi_host, tpu)
    return _ACTIVE


_ACTIVE = None


def _setup(mode, model_axis_size, multi_host, tpu):
    backend = _backend()
    if backend == "jax":
        return _setup_jax(mode, model_axis_size, multi_host)
    if mode == "model":
        raise ValueError(
            f"mode='model' (sharded kernels) needs the JAX backend (keras.distribution); the "
            f"{backend} backend supports mode 'data' or 'none'."
        )
    if backend == "tensorflow":
        return _setup_tensorflow(mode, tpu)
    if backend == "torch":
        return _setup_torch(mode)
    raise ValueError(f"Distributed training supports jax, tensorflow and torch, not {backend!r}.")


# ---------------------------------------------------------------------------------------------------- JAX


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


def _divisible_model_parallel_class():
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

    return DivisibleModelParallel


def _multi_host_env():
    return bool(os.environ.get("KERAS_DISTRIBUTION_JOB_ADDRESSES")
                or os.environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES"))


def _setup_jax(mode, model_axis_size, multi_host):
    import jax

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
        return DistributedSetup("none", "jax", devices=described)
    if mode == "data":
        distribution = keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False)
        keras.distribution.set_distribution(distribution)
        return DistributedSetup("data", "jax", n, n // processes, processes, index,
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
    distribution = _divisible_model_parallel_class()(
        layout_map=model_parallel_layout_map(mesh), batch_dim_name=BATCH_AXIS,
        auto_shard_dataset=False,
    )
    keras.distribution.set_distribution(distribution)
    return DistributedSetup("model", "jax", replicas, replicas // processes, processes, index,
                            model_axis_size=m, distribution=distribution, devices=described)


def _jax_distributed_initialized():
    try:
        from jax._src import distributed

        return distributed.global_state.client is not None
    except Exception:  # private API moved: assume not initialized
        return False


# ---------------------------------------------------------------------------------------------------- TensorFlow


def _tpu_address(tpu):
    if tpu is not None:
        return tpu
    if os.environ.get("TPU_NAME"):
        return os.environ["TPU_NAME"]
    if os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0"):
        return "local"
    return None


def _setup_tensorflow(mode, tpu):
    import tensorflow as tf

    if mode == "none":
        return DistributedSetup("none", "tensorflow", devices=_tf_devices_text(tf))
    tpu = _tpu_address(tpu)
    if os.environ.get("TF_CONFIG"):
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        resolver = strategy.cluster_resolver
        workers = max(1, len(resolver.cluster_spec().as_dict().get("worker", [])))
        workers += len(resolver.cluster_spec().as_dict().get("chief", []))
        task_index = _tf_task_index(resolver)
    elif tpu is not None:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        strategy = tf.distribute.TPUStrategy(resolver)
        workers, task_index = 1, 0
    else:
        gpus = tf.config.list_logical_devices("GPU")
        cpus = tf.config.list_logical_devices("CPU")
        names = [d.name for d in gpus] if gpus else [d.name for d in cpus]
        if mode == "auto" and len(names) < 2:
            return DistributedSetup("none", "tensorflow", devices=_tf_devices_text(tf))
        strategy = tf.distribute.MirroredStrategy(names)
        workers, task_index = 1, 0
    replicas = strategy.num_replicas_in_sync
    return DistributedSetup("data", "tensorflow", replicas, replicas // workers, workers,
                            task_index, strategy=strategy, devices=_tf_devices_text(tf))


def _tf_devices_text(tf):
    for kind in ("TPU", "GPU", "CPU"):
        devices = tf.config.list_logical_devices(kind)
        if devices:
            return f"{len(devices)} x {kind}"
    return ""


def _tf_task_index(resolver):
    spec = resolver.cluster_spec().as_dict()
    task_type, task_id = resolver.task_type, int(resolver.task_id or 0)
    if task_type == "chief":
        return 0
    return task_id + len(spec.get("chief", []))


def _first_replica_aggregation(next_creator, **kwargs):
    import tensorflow as tf

    # Keras creates variables with aggregation NONE, which tf.distribute refuses to assign in a replica
    # context. Everything the step assigns there (teacher EMA, centers, step and seed counters) is the
    # same on every replica (the gradients are all-reduced first), so the first replica's value is exact.
    if kwargs.get("aggregation") in (None, tf.VariableAggregation.NONE):
        kwargs["aggregation"] = tf.VariableAggregation.ONLY_FIRST_REPLICA
    return next_creator(**kwargs)


@contextlib.contextmanager
def _tf_scope(strategy):
    import tensorflow as tf

    with strategy.scope(), tf.variable_creator_scope(_first_replica_aggregation):
        yield


def _tf_reduction():
    import tensorflow as tf

    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return None
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return CrossReplica(
        sum_fn=lambda x: context.all_reduce(tf.distribute.ReduceOp.SUM, x),
        # tf.distribute has no MAX all-reduce: gather one copy per replica and take the maximum.
        max_fn=lambda x: tf.reduce_max(context.all_gather(x[None], axis=0), axis=0),
        all_gather_fn=lambda x: context.all_gather(x, axis=0),
        num_replicas=context.num_replicas_in_sync,
    )


# ---------------------------------------------------------------------------------------------------- PyTorch


def _torch_backend_name():
    import torch.distributed as dist

    return dist.get_backend() if dist.is_available() and dist.is_initialized() else "none"


def _setup_torch(mode):
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    initialized = dist.is_available() and dist.is_initialized()
    if initialized:
        world = dist.get_world_size()
    if mode == "none" or (mode == "auto" and world < 2):
        return DistributedSetup("none", "torch", devices=_torch_device_text(torch))
    if not initialized:
        if world < 2 and "MASTER_ADDR" not in os.environ:
            raise ValueError(
                "mode='data' on the torch backend needs several processes: launch with "
                "`torchrun --nproc_per_node=N ...` (or call torch.distributed.init_process_group)."
            )
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    elif torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    world, rank = dist.get_world_size(), dist.get_rank()
    return DistributedSetup("data", "torch", world, 1, world, rank,
                            devices=_torch_device_text(torch, world))


def _torch_device_text(torch, world=1):
    if torch.cuda.is_available():
        return f"{world} x {torch.cuda.get_device_name()}"
    return f"{world} x CPU process"


def _torch_distributed():
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _torch_sum(x):
    import torch.distributed as dist

    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y


def _torch_max(x):
    import torch.distributed as dist

    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.MAX)
    return y


def _torch_all_gather_function():
    import torch
    import torch.distributed as dist

    class AllGather(torch.autograd.Function):
        """Concatenates every rank's rows; the gradient of a rank's rows sums over ranks."""

        @staticmethod
        def forward(ctx, x):
            x = x.contiguous()
            parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, x)
            ctx.rows, ctx.rank = x.shape[0], dist.get_rank()
            return torch.cat(parts, dim=0)

        @staticmethod
        def backward(ctx, grad):
            grad = grad.contiguous().clone()
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
            return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]

    return AllGather


_TORCH_ALL_GATHER = None


def _torch_all_gather(x):
    global _TORCH_ALL_GATHER
    if _TORCH_ALL_GATHER is None:
        _TORCH_ALL_GATHER = _torch_all_gather_function()
    return _TORCH_ALL_GATHER.apply(x)


def _torch_reduction():
    if not _torch_distributed():
        return None
    import torch.distributed as dist

    return CrossReplica(sum_fn=_torch_sum, max_fn=_torch_max, all_gather_fn=_torch_all_gather,
                        num_replicas=dist.get_world_size())


def broadcast_variables(model, source=0):
    """torch: copies rank `source`'s value of every variable of `model` (and its optimizer) to all ranks."""
    if _backend() != "torch" or not _torch_distributed():
        return
    import torch
    import torch.distributed as dist

    variables = list(model.variables)
    if getattr(model, "optimizer", None) is not None:
        variables += list(model.optimizer.variables)
    with torch.no_grad():
        for variable in variables:
            dist.broadcast(variable.value.data, src=source)


def offset_seed_generators(model, index, count):
    """Moves every `keras.random.SeedGenerator` state of `model` to replica `index`'s own stream.

    For plain Keras generators of one's own layers (torch ranks); the library's stochastic depth
    needs no call (its draws already differ per replica) and must not get one: its offset would
    be applied twice.
    """
    if index == 0:
        return
    step = 2**32 // max(int(count), 1)
    for variable in model.variables:
        if variable.path.endswith("seed_generator_state"):
            dtype = np.dtype(variable.dtype)
            value = np.asarray(keras.ops.convert_to_numpy(variable.value)).astype(np.int64)
            value[0] = (value[0] + index * step) % 2**32
            value = value.astype(np.uint32)  # the generator reads the state's 32 bits
            variable.assign(value.view(np.int32) if dtype == np.int32 else value.astype(dtype))


# ---------------------------------------------------------------------------------------------------- the step


def replica_reduction():
    """The `CrossReplica` of the running replica step, or None on one replica (and in a JAX program).

    TensorFlow: bound to the replica context's all_reduce / all_gather (call it inside the replica step).
    torch: bound to torch.distributed when several processes take part. JAX: None, since a
    keras.distribution program holds the global batch and XLA inserts the collectives.
    """
    backend = _backend()
    if backend == "tensorflow":
        return _tf_reduction()
    if backend == "torch":
        return _torch_reduction()
    return None


def active_replicas():
    """Data-parallel replicas of the distribution in force now (1 without one); see
    `keras_dinov2.ops.active_replicas`."""
    return ops.active_replicas()


def all_reduce_gradients(grads):
    """The mean over replicas of each gradient (None stays None), inside the replica step.

    Every replica's loss is the mean over its own batch, so the mean of the replicas' gradients is the
    gradient of the global-batch loss (KoLeo over gathered rows included: the gather's gradient sums over
    replicas, see `losses.koleo`).
    """
    backend = _backend()
    present = [i for i, g in enumerate(grads) if g is not None]
    if not present:
        return list(grads)
    out = list(grads)
    if backend == "tensorflow":
        import tensorflow as tf

        context = tf.distribute.get_replica_context()
        n = context.num_replicas_in_sync
        if n == 1:
            return out
        summed = context.all_reduce(tf.distribute.ReduceOp.SUM, [grads[i] for i in present])
        for i, g in zip(present, summed):
            out[i] = g / tf.cast(n, g.dtype)
        return out
    if backend == "torch":
        if not _torch_distributed():
            return out
        import torch
        import torch.distributed as dist

        n = dist.get_world_size()
        buckets, current, size = [], [], 0
        for i in present:
            g = grads[i]
            if current and (size + g.numel() > _BUCKET_ELEMENTS or g.dtype != grads[current[0]].dtype):
                buckets.append(current)
                current, size = [], 0
            current.append(i)
            size += g.numel()
        buckets.append(current)
        for bucket in buckets:
            flat = torch.cat([grads[i].reshape(-1) for i in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= n
            offset = 0
            for i in bucket:
                numel = grads[i].numel()
                out[i] = flat[offset:offset + numel].view_as(grads[i])
                offset += numel
        return out
    return out


def average_logs(logs):
    """torch: the mean over ranks of each logged scalar, in one all-reduce (rank 0 writes the logs)."""
    if _backend() != "torch" or not _torch_distributed() or not logs:
        return logs
    import torch
    import torch.distributed as dist

    names = list(logs)
    values = [keras.ops.convert_to_tensor(logs[k], "float32").reshape(()) for k in names]
    stacked = torch.stack(values).detach()
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    stacked /= dist.get_world_size()
    return {k: stacked[i] for i, k in enumerate(names)}


# ---------------------------------------------------------------------------------------------------- files


def is_chief():
    """Whether this process is the one that writes files: JAX process 0, torch rank 0, TF chief."""
    if _ACTIVE is not None and _ACTIVE.backend == _backend():
        return _ACTIVE.is_chief
    backend = _backend()
    if backend == "jax":
        import jax

        return jax.process_index() == 0
    if backend == "torch":
        import torch.distributed as dist

        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    if backend == "tensorflow":
        import tensorflow as tf

        if not tf.distribute.has_strategy():
            return True
        resolver = getattr(tf.distribute.get_strategy(), "cluster_resolver", None)
        if resolver is None or not resolver.task_type:
            return True
        return _tf_task_index(resolver) == 0
    return True


def to_numpy(value):
    """A variable's value as a NumPy array on this host; JAX arrays spread over hosts are gathered.

    On several JAX hosts every process must call it in the same order (it is a collective there).
    """
    if _backend() == "jax":
        import jax

        if isinstance(value, jax.Array) and not value.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return np.asarray(keras.ops.convert_to_numpy(value))


# ---------------------------------------------------------------------------------------------------- batches


def _is_scalar(x):
    return len(getattr(x, "shape", ())) == 0


def stack_batches(batches):
    """Replica-stacked batch from per-replica multi-crop batches (NumPy or tensors).

    Every array is concatenated along axis 0; `n_masked_patches` (a scalar per batch) becomes a vector with
    one entry per replica, which tells the pretrainer how many replicas the batch holds.

    Example:
    >>> stacked = stack_batches([batch_replica_0, batch_replica_1])
    """
    if not batches:
        raise ValueError("`batches` must hold at least one batch, received an empty list.")
    out = {}
    for key in batches[0]:
        values = [np.asarray(keras.ops.convert_to_numpy(b[key])) for b in batches]
        out[key] = np.stack(values) if _is_scalar(values[0]) else np.concatenate(values, 0)
    return out


def stack_datasets(datasets):
    """tf.data: zips per-replica datasets into one of replica-stacked batches (see `stack_batches`)."""
    import tensorflow as tf

    if len(datasets) == 1:
        single = datasets[0]

        def expand(batch):
            return {k: (tf.reshape(v, [1]) if v.shape.rank == 0 else v) for k, v in batch.items()}

        return single.map(expand)

    def stack(*batches):
        out = {}
        for key in batches[0]:
            values = [b[key] for b in batches]
            out[key] = tf.stack(values) if values[0].shape.rank == 0 else tf.concat(values, 0)
        return out

    return tf.data.Dataset.zip(tuple(datasets)).map(stack).prefetch(tf.data.AUTOTUNE)


def split_batch(batch, num_replicas, buffer_size=None):
    """Splits one global multi-crop batch (NumPy) into `num_replicas` per-replica batches.

    Replica r gets images r*b .. (r+1)*b - 1 (b = B / num_replicas) of every crop, and the masked patches of
    those images in its own buffer (indices renumbered into its own crops, weights unchanged), padded to
    `buffer_size` entries (default: the global buffer's length, which always fits). Stacking the result
    (`stack_batches`) or feeding one part to each replica reproduces the single-device step on `batch`, so
    this is how the tests compare N replicas with one device.

    Args:
        batch: dict of NumPy arrays as `multicrop_dataset` yields (view-major crops).
        num_replicas: int. Must divide the batch's images.
        buffer_size: optional int. Length of each replica's masked-patch buffer.

    Returns:
        list of `num_replicas` dicts.
    """
    batch = {k: np.asarray(v) for k, v in batch.items()}
    n = int(num_replicas)
    two_b = batch["global_crops"].shape[0]
    images = two_b // 2
    if n < 1 or images % n:
        raise ValueError(
            f"`num_replicas` must divide the batch's {images} images, received num_replicas={num_replicas}."
        )
    b = images // n
    num_patches = batch["masks"].shape[1]
    local = batch.get("local_crops")
    n_local = 0 if local is None else local.shape[0] // images
    weights = batch["masks_weight"]
    indices = batch["mask_indices"]
    buffer_size = int(buffer_size or indices.shape[0])
    real = np.flatnonzero(weights > 0)
    image = indices[real] // num_patches
    view, k = image // images, image % images
    owner = k // b
    local_index = ((view * b + k % b) * num_patches + indices[real] % num_patches).astype(indices.dtype)

    def rows(x, views, r):
        return np.concatenate([x[v * images + r * b: v * images + (r + 1) * b] for v in range(views)])

    parts = []
    for r in range(n):
        mine = owner == r
        count = int(mine.sum())
        if count > buffer_size:
            raise ValueError(
                f"Replica {r} has {count} masked patches, more than buffer_size={buffer_size}."
            )
        part_indices = np.zeros(buffer_size, indices.dtype)
        part_weights = np.zeros(buffer_size, weights.dtype)
        part_indices[:count] = local_index[mine]
        part_weights[:count] = weights[real][mine]
        part = {
            "global_crops": rows(batch["global_crops"], 2, r),
            "masks": rows(batch["masks"], 2, r),
            "mask_indices": part_indices,
            "masks_weight": part_weights,
            "n_masked_patches": np.asarray(count, "int32"),
        }
        if local is not None:
            part["local_crops"] = rows(local, n_local, r)
        parts.append({k: part[k] for k in batch if k in part})
    return parts


def replica_count(batch):
    """Replicas held by a batch: the length of its `n_masked_patches` vector when stacked, else 1."""
    counts = batch.get("n_masked_patches") if isinstance(batch, dict) else None
    if counts is None or len(counts.shape) == 0:
        return 1
    return int(counts.shape[0])
