"""TensorFlow kernels: the CPU attention formulation, the exact GELU with PyTorch's gradient rule and the per-replica
seed."""

import math

import tensorflow as tf


def cpu_dot_product_attention(query, key, value, scale):
    """softmax(q k^T * scale) v for (batch, tokens, heads, head_dim) float32 inputs, for TF on CPU.

    Keras' TensorFlow op scales the (batch, heads, tokens, tokens) logits; scaling q, a fraction
    of their size, before the product gives the same values (bitwise where the scale is a power
    of two, as for every 64-wide head) and a faster forward under XLA on CPU (docs/performance.md).
    """
    logits = tf.einsum("btnh,bsnh->bnts", query * scale, key)
    return tf.einsum("bnts,bsnh->btnh", tf.nn.softmax(logits, axis=-1), value)


@tf.custom_gradient
def gelu(x):
    """`keras_dinov2.ops.gelu` on TensorFlow: `tf.nn.gelu(x, approximate=False)` (what Keras runs), with a gradient
    computed from x alone, as PyTorch's gelu_backward: g * (Phi(x) + x * phi(x)), in float32. Differentiating the
    composite keeps its intermediates alive from the forward pass to the backward one."""

    def gradient(upstream):
        x32 = tf.cast(x, tf.float32)
        cdf = 0.5 * (1.0 + tf.math.erf(x32 * (1.0 / math.sqrt(2.0))))
        pdf = tf.exp(-0.5 * x32 * x32) * (1.0 / math.sqrt(2.0 * math.pi))
        return tf.cast(tf.cast(upstream, tf.float32) * (cdf + x32 * pdf), upstream.dtype)

    return tf.nn.gelu(x, approximate=False), gradient


def cpu_function(name):
    """The CPU formulation called `name`; None where TensorFlow sees a GPU or a TPU (neither was
    measured), and for the names that have no TensorFlow formulation."""
    if tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"):
        return None
    return {"dot_product_attention": cpu_dot_product_attention}.get(name)


# Keras folds TensorFlow's int64 seeds into [0, 2**31 - 2) (`floormod`) before the stateless ops.
_TF_SEED_MODULUS = 2**31 - 2


def replica_seed(seed):
    """`keras_dinov2.ops.replica_seed` on TensorFlow: offsets the seed by the replica's id in its sync group."""
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return seed
    context = tf.distribute.get_replica_context()
    count = context.num_replicas_in_sync
    if count < 2:
        return seed
    # Offsets spread over the seed range stay distinct after Keras' fold into int32.
    index = tf.cast(context.replica_id_in_sync_group, seed.dtype)
    offset = index * tf.cast(_TF_SEED_MODULUS // count, seed.dtype)
    return seed + tf.stack([offset, tf.zeros_like(offset)])


def active_replicas():
    """Replicas in sync of the tf.distribute strategy in force (1 under the default strategy)."""
    return int(tf.distribute.get_strategy().num_replicas_in_sync)
