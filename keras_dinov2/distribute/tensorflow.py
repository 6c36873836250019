"""The TensorFlow engine: `tf.distribute` strategies, their scope, and the replica context's collectives.

`MirroredStrategy` (several GPUs, or logical CPU devices), `TPUStrategy` (a TPU VM) or
`MultiWorkerMirroredStrategy` (several hosts, `TF_CONFIG`). Each replica runs the step on its own batch; the
step binds a `CrossReplica` to the replica context (`replica_reduction`) and averages the gradients over
replicas before clipping (`all_reduce_gradients`).
"""

import contextlib
import os

import keras
import numpy as np
import tensorflow as tf

from keras_dinov2.distribute.setup import DistributedSetup
from keras_dinov2.losses import CrossReplica


class TensorFlowSetup(DistributedSetup):
    """`DistributedSetup` of the TensorFlow engine: the model is built in the strategy's scope and every
    worker's input pipeline feeds its replicas through the strategy."""

    def engine_name(self):
        """`tf.distribute.<the strategy's class>`."""
        return f"tf.distribute.{type(self.strategy).__name__}"

    def scope(self):
        """The strategy's scope (`strategy_scope`), or no scope on one device."""
        if self.strategy is None:
            return super().scope()
        return strategy_scope(self.strategy)

    def combine_shards(self, shard):
        """A tf.distribute DistributedDataset whose replica j of each worker reads its own shard."""
        if self.strategy is None:
            return super().combine_shards(shard)

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


def _tpu_address(tpu):
    if tpu is not None:
        return tpu
    if os.environ.get("TPU_NAME"):
        return os.environ["TPU_NAME"]
    if os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0"):
        return "local"
    return None


def setup(mode, tpu):
    """`keras_dinov2.distribute.setup` on TensorFlow: makes the strategy and returns a `TensorFlowSetup`."""
    if mode == "none":
        return TensorFlowSetup("none", "tensorflow", devices=_devices_text())
    tpu = _tpu_address(tpu)
    if os.environ.get("TF_CONFIG"):
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        resolver = strategy.cluster_resolver
        workers = max(1, len(resolver.cluster_spec().as_dict().get("worker", [])))
        workers += len(resolver.cluster_spec().as_dict().get("chief", []))
        task_index = _task_index(resolver)
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
            return TensorFlowSetup("none", "tensorflow", devices=_devices_text())
        strategy = tf.distribute.MirroredStrategy(names)
        workers, task_index = 1, 0
    replicas = strategy.num_replicas_in_sync
    return TensorFlowSetup("data", "tensorflow", replicas, replicas // workers, workers,
                           task_index, strategy=strategy, devices=_devices_text())


def _devices_text():
    for kind in ("TPU", "GPU", "CPU"):
        devices = tf.config.list_logical_devices(kind)
        if devices:
            return f"{len(devices)} x {kind}"
    return ""


def _task_index(resolver):
    spec = resolver.cluster_spec().as_dict()
    task_type, task_id = resolver.task_type, int(resolver.task_id or 0)
    if task_type == "chief":
        return 0
    return task_id + len(spec.get("chief", []))


def _first_replica_aggregation(next_creator, **kwargs):
    # See `strategy_scope`.
    if kwargs.get("aggregation") in (None, tf.VariableAggregation.NONE):
        kwargs["aggregation"] = tf.VariableAggregation.ONLY_FIRST_REPLICA
    return next_creator(**kwargs)


@contextlib.contextmanager
def strategy_scope(strategy):
    """`strategy.scope()` in which the variables created get the aggregation the replica step needs.

    Keras creates variables with aggregation NONE, which tf.distribute refuses to assign in a replica
    context; here they get ONLY_FIRST_REPLICA. Everything the step assigns there (teacher EMA, centers,
    step and seed counters) is the same on every replica (the gradients are all-reduced first), so the
    first replica's value is exact. Build the model and its optimizer in it.

    Example:
    >>> with strategy_scope(tf.distribute.MirroredStrategy()):
    ...     model.optimizer.build(model.trainable_variables)
    """
    with strategy.scope(), tf.variable_creator_scope(_first_replica_aggregation):
        yield


# ---------------------------------------------------------------------------------------------------- the step


def replica_reduction():
    """The `CrossReplica` bound to the replica context's all_reduce / all_gather (call it inside the
    replica step), or None outside a strategy's replica step and on one replica."""
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


def all_reduce_gradients(grads):
    """The mean over the replicas in sync of each gradient (None stays None), in one all-reduce."""
    out = list(grads)
    present = [i for i, g in enumerate(grads) if g is not None]
    if not present:
        return out
    context = tf.distribute.get_replica_context()
    n = context.num_replicas_in_sync
    if n == 1:
        return out
    summed = context.all_reduce(tf.distribute.ReduceOp.SUM, [grads[i] for i in present])
    for i, g in zip(present, summed):
        out[i] = g / tf.cast(n, g.dtype)
    return out


def average_logs(logs):
    """The logs as they are: Keras reduces each replica's logs itself."""
    return logs


def broadcast_variables(model, source=0):
    """Nothing to do: the strategy mirrors the variables it creates."""


# ---------------------------------------------------------------------------------------------------- files


def is_chief():
    """Whether this worker writes files: the chief, or worker 0 without one; True without a cluster.

    The cluster is the strategy in scope, else TF_CONFIG (what `setup` gives MultiWorkerMirroredStrategy):
    `fit` calls the callbacks outside the strategy's scope.
    """
    if tf.distribute.has_strategy():
        resolver = getattr(tf.distribute.get_strategy(), "cluster_resolver", None)
    elif os.environ.get("TF_CONFIG"):
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    else:
        return True
    if resolver is None or not resolver.task_type:
        return True
    return _task_index(resolver) == 0


def to_numpy(value):
    """A value as a NumPy array on this host."""
    return np.asarray(keras.ops.convert_to_numpy(value))
