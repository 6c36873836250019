"""Cross-replica collectives for the objectives (`CrossReplica`) and the single-device identity."""


class CrossReplica:
    """Cross-replica collectives for the objectives; the identity on one device.

    A training step that runs one program per replica (a `tf.distribute` replica context, `torch.distributed`,
    `jax.shard_map` / `pmap`) binds the callables to its collective and passes the object as `reduction=` to
    `sinkhorn_knopp` and `update_center`. Every replica must make the same calls in the same order, as with any
    collective. A JAX program that holds the global batch as one sharded array needs no binding.

    Args:
        sum_fn: callable or None, default None. All-reduce sum of a tensor over replicas (same shape out).
            None means the identity.
        max_fn: callable or None, default None. All-reduce maximum over replicas. None means the identity.
        all_gather_fn: callable or None, default None. Concatenation of every replica's tensor along axis 0,
            in replica order. None means the identity. KoLeo differentiates through it: its gradient must
            be the sum over replicas of the incoming gradient, sliced back to this replica's rows (what
            `ReplicaContext.all_gather` and `torch.distributed.nn.functional.all_gather` do).
        num_replicas: int, default 1. Number of replicas taking part.

    Example:
    >>> CrossReplica().sum(ops.ones((2,)))   # one device: [1., 1.]
    >>> # tf.distribute, inside strategy.run:
    >>> ctx = tf.distribute.get_replica_context()
    >>> r = CrossReplica(lambda x: ctx.all_reduce("sum", x), lambda x: ctx.all_reduce("max", x),
    ...                  lambda x: ctx.all_gather(x, axis=0), ctx.num_replicas_in_sync)
    """

    def __init__(self, sum_fn=None, max_fn=None, all_gather_fn=None, num_replicas=1):
        self._sum_fn = sum_fn
        self._max_fn = max_fn
        self._all_gather_fn = all_gather_fn
        self.num_replicas = int(num_replicas)
        if self.num_replicas < 1:
            raise ValueError(f"`num_replicas` must be at least 1, received {num_replicas}.")

    def sum(self, x):
        """Sum of `x` over replicas."""
        return x if self._sum_fn is None else self._sum_fn(x)

    def max(self, x):
        """Element-wise maximum of `x` over replicas."""
        return x if self._max_fn is None else self._max_fn(x)

    def mean(self, x):
        """Mean of `x` over replicas."""
        return self.sum(x) / float(self.num_replicas)

    def all_gather(self, x):
        """Every replica's `x`, concatenated along axis 0."""
        return x if self._all_gather_fn is None else self._all_gather_fn(x)


SINGLE_DEVICE = CrossReplica()
