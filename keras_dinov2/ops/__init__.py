"""The backend-specific kernels that the layers and the losses use, behind one interface.

Each function here is a Keras op (or a composition of Keras ops) with the same values on every backend; where a
backend has a faster formulation of it, the function dispatches to `keras_dinov2.ops.jax`,
`keras_dinov2.ops.tensorflow` or `keras_dinov2.ops.torch`. Nothing else in the layers, backbone, heads and losses
imports a backend package. Symbolic tensors (functional model construction) always take the plain Keras op.
"""

import functools
import importlib

import keras


def _backend_module():
    """`keras_dinov2.ops.<backend>` for the active Keras backend, or None for a backend without one."""
    return _module(keras.backend.backend())


@functools.cache
def _module(backend):
    if backend not in ("jax", "tensorflow", "torch"):
        return None
    return importlib.import_module(f"keras_dinov2.ops.{backend}")


@functools.cache
def _cpu_function(backend, name):
    """`cpu_function(name)` of the backend's module: its CPU formulation of `name`, or None."""
    module = _module(backend)
    lookup = getattr(module, "cpu_function", None)
    return None if lookup is None else lookup(name)


def _float32(*tensors):
    return all(keras.backend.standardize_dtype(x.dtype) == "float32" for x in tensors)


def gradient_boundary(x):
    """Identity whose gradient is written to memory once, in its own layout (JAX on CPU).

    Called on each block's residual stream and on the outputs of the linear layers. On JAX's CPU backend, XLA
    otherwise fuses cheap elementwise producers of a gradient into each of its consumers, recomputing the running
    sum of residual gradients for every block (quadratic in depth) and the LayerNorm and GELU backward passes inside
    the transposing copies of each weight-gradient product (docs/performance.md has the measured cost). Elsewhere
    (other backends, JAX on GPU and TPU, symbolic tensors) it returns `x` unchanged. See
    `keras_dinov2.ops.jax.gradient_boundary`.
    """
    if isinstance(x, keras.KerasTensor):
        return x
    function = _cpu_function(keras.backend.backend(), "gradient_boundary")
    return x if function is None else function(x)


def dot_product_attention(query, key, value, scale):
    """`keras.ops.dot_product_attention(query, key, value, scale=scale)`, inputs (batch, tokens, heads, head_dim).

    On JAX's CPU backend with float32 inputs it is `keras_dinov2.ops.jax.cpu_dot_product_attention`: the same values,
    laid out for XLA's CPU kernels. On TensorFlow without a GPU or TPU it is
    `keras_dinov2.ops.tensorflow.cpu_dot_product_attention` (q scaled instead of the logits). Everywhere else (torch,
    GPU and TPU with their fused kernels, mixed precision, symbolic tensors) it is the Keras op. docs/performance.md
    has what each formulation gains.
    """
    if not isinstance(query, keras.KerasTensor) and _float32(query, key, value):
        function = _cpu_function(keras.backend.backend(), "dot_product_attention")
        if function is not None:
            return function(query, key, value, float(scale))
    return keras.ops.dot_product_attention(query, key, value, scale=scale)


def sum_over_rows(x):
    """`keras.ops.sum(x, axis=0)`; on JAX's CPU backend in float32 a loop over the rows, which XLA:CPU runs much
    faster for wide matrices (`keras_dinov2.ops.jax.cpu_sum_over_rows`; figures in docs/performance.md)."""
    if not isinstance(x, keras.KerasTensor) and _float32(x):
        function = _cpu_function(keras.backend.backend(), "sum_over_rows")
        if function is not None:
            return function(x)
    return keras.ops.sum(x, axis=0)


def max_over_rows(x):
    """`keras.ops.max(x, axis=0)`; on JAX's CPU backend in float32 a loop over the rows, as
    `sum_over_rows`."""
    if not isinstance(x, keras.KerasTensor) and _float32(x) and x.shape[0]:
        function = _cpu_function(keras.backend.backend(), "max_over_rows")
        if function is not None:
            return function(x)
    return keras.ops.max(x, axis=0)


def weight_normalized_kernel(v, g, floor):
    """g * v / sqrt(max(sum(v^2, axis=0), floor)): the column-normalized kernel of weight normalization.

    On JAX's CPU backend in float32, `keras_dinov2.ops.jax.cpu_weight_normalized_kernel` (the
    same values; its reductions over the rows, forward and backward, in fast loops). Elsewhere
    keras.ops with autodiff.
    """
    if not isinstance(v, keras.KerasTensor) and _float32(v, g):
        function = _cpu_function(keras.backend.backend(), "weight_normalized_kernel")
        if function is not None:
            return function(v, g, float(floor))
    ops = keras.ops
    v, g = ops.convert_to_tensor(v), ops.convert_to_tensor(g)
    return v * (g / ops.sqrt(ops.maximum(ops.sum(ops.square(v), axis=0), floor)))


def replica_seed(seed):
    """A drawn (2,) seed moved to this replica's own stream, where each replica runs its own program.

    A `tf.distribute` replica context (its `replica_id_in_sync_group`) and `torch.distributed`
    ranks hold identical seed-generator states (mirrored, or broadcast from rank 0), so without
    this every replica would draw the same stochastic-depth pattern. Elsewhere (one device, a
    JAX program over the global batch, whose draws already cover every replica's rows) the
    seed is returned unchanged. Replica 0 keeps the plain seed.
    """
    module = _backend_module()
    return seed if module is None else module.replica_seed(seed)


def active_replicas():
    """Data-parallel replicas of the distribution in force now (1 without one).

    JAX: the batch axis of the active `keras.distribution` mesh; TensorFlow: the current tf.distribute strategy's
    replicas in sync; torch: the torch.distributed world size. The pretrainer scales the learning rate by the
    global batch, as the reference scales by its per-GPU batch times the world size.
    """
    module = _backend_module()
    return 1 if module is None else module.active_replicas()
