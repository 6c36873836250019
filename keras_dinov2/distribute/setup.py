"""The backend-agnostic part of a distributed run: `DistributedSetup`, which each engine module extends.

`keras_dinov2.distribute.setup()` returns the engine's subclass (`keras_dinov2.distribute.jax.JaxSetup`,
`...tensorflow.TensorFlowSetup`, `...torch.TorchSetup`); what this module holds reads no backend package.
"""

import contextlib

import keras
import numpy as np

from keras_dinov2.distribute.batches import stack_datasets


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

    def engine_name(self):
        """The engine in words, for `describe` (each engine module's subclass names its own)."""
        return self.backend

    def describe(self):
        """One line for logs: engine, replicas and devices."""
        if self.mode == "none":
            return f"one device ({self.devices or 'default'})"
        text = f"{self.engine_name()}: {self.num_replicas} data-parallel replica(s)"
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
        return contextlib.nullcontext()

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
            config: DataConfig (or the run's SSLConfig, which gives the patch size too), as
                `multicrop_dataset`.
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

        return self.combine_shards(shard)

    def combine_shards(self, shard):
        """The dataset this process feeds `fit`, from `shard(index)`: the dataset of data shard `index`.

        Here: this process's one shard as it is, or its shards' replica-stacked batches
        (`stack_datasets`). The engines' subclasses change it where their engine wants another form.
        """
        indices = self.shard_indices()
        if len(indices) == 1:
            return shard(indices[0])
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
        return model


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
