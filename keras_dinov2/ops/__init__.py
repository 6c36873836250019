"""The backend-specific kernels that the layers and the losses use, behind one interface.

Each function here is a Keras op (or a composition of Keras ops) with the same values on every backend; where a
backend has a faster formulation of it, the function dispatches to `keras_dinov2.ops.jax`,
`keras_dinov2.ops.tensorflow` or `keras_dinov2.ops.torch`. Nothing else in the layers, backbone, heads and losses
imports a backend package. Symbolic tensors (functional model construction) always take the plain Keras op.
"""

import contextlib
import functools
import importlib
import inspect

import keras
import numpy as np
from keras.src.backend import get_autocast_scope, in_stateless_scope  # not in the public API


def _backend_module():
    """`keras_dinov2.ops.<backend>` for the active Keras backend, or None for a backend without one."""
    return _module(keras.backend.backend())


@functools.cache
def _module(backend):
    if backend not in ("jax", "tensorflow", "torch"):
        return None
    return importlib.import_module(f"keras_dinov2.ops.{backend}")


# Depth of `plain_keras_ops()` contexts: while > 0, no backend kernel is used.
_plain_depth = [0]


@contextlib.contextmanager
def plain_keras_ops():
    """Within this context every function here takes its plain Keras formulation, never a backend kernel.

    For checking a kernel against the plain path in one process, and for debugging a suspected kernel. Read when a
    function runs (JAX and TensorFlow: when the step is traced).

    Example:
    >>> with keras_dinov2.ops.plain_keras_ops():
    ...     model.train_step(batch)   # per-variable AdamW, Keras EMA and attention on every backend
    """
    _plain_depth[0] += 1
    try:
        yield
    finally:
        _plain_depth[0] -= 1


def _cpu_function(backend, name):
    """`cpu_function(name)` of the backend's module: its CPU formulation of `name`, or None."""
    return None if _plain_depth[0] else _cached_cpu_function(backend, name)


@functools.cache
def _cached_cpu_function(backend, name):
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


def gelu(x):
    """The exact (erf) GELU, `keras.ops.gelu(x, approximate=False)`.

    On JAX and TensorFlow it is `keras_dinov2.ops.jax.gelu` / `keras_dinov2.ops.tensorflow.gelu`: the same values,
    and a gradient computed from x alone, as PyTorch's (XLA otherwise keeps three more forward intermediates of each
    MLP's hidden width for the backward pass). On PyTorch, and for symbolic tensors, the Keras op.
    """
    if not isinstance(x, keras.KerasTensor):
        function = _kernel(keras.backend.backend(), "gelu")
        if function is not None:
            return function(x)
    return keras.ops.gelu(x, approximate=False)


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
    same values; its reductions over the rows, forward and backward, in fast loops). On PyTorch,
    `keras_dinov2.ops.torch.weight_normalized_kernel` (torch's fused weight-norm kernel, forward and
    backward about half the time of square, sum, maximum and sqrt through autograd). Elsewhere
    keras.ops with autodiff.
    """
    if not isinstance(v, keras.KerasTensor) and _float32(v, g):
        function = _cpu_function(keras.backend.backend(), "weight_normalized_kernel")
        if function is not None:
            return function(v, g, float(floor))
    function = None if isinstance(v, keras.KerasTensor) else eager_kernel("weight_normalized_kernel")
    if function is not None:
        return function(keras.ops.convert_to_tensor(v), keras.ops.convert_to_tensor(g), float(floor))
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


def _kernel(backend, name):
    """The function `name` of the backend's module, or None (always None inside `plain_keras_ops()`)."""
    return None if _plain_depth[0] else getattr(_module(backend), name, None)


def eager_dispatch():
    """Whether ops run one by one from Python here (PyTorch), so that fewer, larger calls pay: then `run_heads` calls
    a head once over several parts. XLA (JAX) and tf.function compile a whole step, where separate calls cost no
    dispatch and the compiler already shares their common work; one JAX ViT-S step needed ~100 MB more temporaries
    with the head's parts concatenated (docs/performance.md). False within `plain_keras_ops()`."""
    return keras.backend.backend() == "torch" and not _plain_depth[0]


def call_layer(layer, *args, **kwargs):
    """`layer(*args, **kwargs)`; where ops dispatch eagerly (`eager_dispatch`) and Keras' `Layer.__call__` would
    change nothing, `layer.call(*args, **kwargs)` directly.

    `Layer.__call__` converts the inputs, checks the input spec, builds, resolves `training` from the outer call,
    enters name and autocast scopes and propagates masks: ~0.15 ms a call on PyTorch, ~5 ms of a small model's
    40 ms step (34 calls; docs/performance.md). It is skipped only when all of that is a no-op: the layer is built;
    no autocast scope is active and the layer enters none (its variables are in its compute dtype: Keras enters one
    for a mixed layer even where it does not autocast); every input is a backend tensor that the layer would not
    cast, a Python value or None (one level of dicts, lists and tuples); and `training`, where `call` takes it, is
    given explicitly. Keras masks (`_keras_mask`) are not propagated through the direct call, and torch module hooks
    registered on the layer do not fire; no code of this library uses either.
    """
    if not (eager_dispatch() and layer.built) or get_autocast_scope() is not None:
        return layer(*args, **kwargs)
    if layer.compute_dtype != layer.variable_dtype:  # Keras enters a scope for these, autocast or not
        return layer(*args, **kwargs)
    if _takes_training(type(layer)) and kwargs.get("training") is None:
        return layer(*args, **kwargs)
    cast_to = layer.input_dtype if layer.autocast else None
    if not all(_passes_unchanged(value, cast_to) for value in (*args, *kwargs.values())):
        return layer(*args, **kwargs)
    return layer.call(*args, **kwargs)


@functools.cache
def _takes_training(layer_class):
    return "training" in inspect.signature(layer_class.call).parameters


def _passes_unchanged(value, cast_to, nested=True):
    """Whether `Layer.__call__`'s input conversion (cast floating tensors to `cast_to`, arrays to tensors) leaves
    `value` as it is."""
    if isinstance(value, dict) and nested:
        return all(_passes_unchanged(v, cast_to, False) for v in value.values())
    if isinstance(value, (list, tuple)) and nested:
        return all(_passes_unchanged(v, cast_to, False) for v in value)
    if keras.ops.is_tensor(value):
        if cast_to is None:
            return True
        dtype = keras.backend.standardize_dtype(value.dtype)
        return dtype == cast_to or not keras.backend.is_float_dtype(dtype)
    return not hasattr(value, "__array__") and not isinstance(value, (dict, list, tuple, keras.KerasTensor))


def host_int(x):
    """int(x) where reading it costs no device synchronization and no trace: a Python or NumPy integer, or where ops
    dispatch eagerly (PyTorch) a one-element integer tensor or variable in host memory, outside a StatelessScope.
    None otherwise (a traced, symbolic or device value), and within `plain_keras_ops()`."""
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return int(x)
    if not eager_dispatch() or in_stateless_scope() or isinstance(x, keras.KerasTensor):
        return None
    return _kernel("torch", "host_int")(x.value if isinstance(x, keras.Variable) else x)


def eager_kernel(name, tensors=()):
    """The active backend's kernel `name` (`keras_dinov2.ops.<backend>.<name>`), or None: for symbolic `tensors`,
    inside a StatelessScope (`stateless_apply`, where the kernels' in-place updates would miss the scope's values),
    within `plain_keras_ops()`, or where the backend has none."""
    if in_stateless_scope() or any(isinstance(x, keras.KerasTensor) for x in tensors):
        return None
    return _kernel(keras.backend.backend(), name)


def has_multi_tensor_adamw():
    """Whether `multi_tensor_adamw` has a kernel here (PyTorch, outside a StatelessScope)."""
    return eager_kernel("multi_tensor_adamw") is not None


def multi_tensor_adamw(variables, grads, momentums, velocities, lr, weight_decay, step, beta_1, beta_2, epsilon):
    """One AdamW update of a group of variables sharing lr and weight decay, in multi-tensor kernels, in place.

    With b1 = 1 - beta_1^step, b2 = 1 - beta_2^step: m <- m + (1 - beta_1)(g - m), v <- beta_2 v + (1 - beta_2) g^2,
    p <- p (1 - lr wd) - lr / b1 * m / (sqrt(v) / sqrt(b2) + epsilon): torch.optim.AdamW's foreach step, with lr,
    weight_decay and step (tensors or numbers, read as Python floats) shared by the group.

    Only PyTorch has it (`keras_dinov2.ops.torch.multi_tensor_adamw`: `torch._foreach_*`, one call per group
    instead of a dozen eager Keras ops per variable); it returns False elsewhere and changes nothing, and the caller
    takes its per-variable Keras update, which XLA and tf.function compile into one program anyway.
    """
    function = eager_kernel("multi_tensor_adamw")
    if function is None:
        return False
    return function(variables, grads, momentums, velocities, lr, weight_decay, step, beta_1, beta_2, epsilon)


def ema_update(teacher, student, momentum):
    """teacher <- momentum * teacher + (1 - momentum) * student for each pair of variables, in place.

    On PyTorch the reference's multi-tensor form (`keras_dinov2.ops.torch.ema_update`: `_foreach_mul_`,
    `_foreach_add_` with the momentum as a Python float); elsewhere one Keras assign per pair (inside the compiled
    JAX and TF steps, the momentum a traced tensor).
    """
    function = eager_kernel("ema_update")
    if function is not None:
        return function(teacher, student, momentum)
    for t, s in zip(teacher, student):
        t.assign(keras.ops.cast(momentum, t.dtype) * t + keras.ops.cast(1.0 - momentum, t.dtype) * s)


def scaled_by_global_norm(grads, max_norm, in_place=False):
    """(grads * min(max_norm / (norm + 1e-6), 1), norm) for a non-empty list of tensors, norm = the float32 L2 norm
    of all of them together (torch's `clip_grad_norm_`).

    On PyTorch `keras_dinov2.ops.torch.scaled_by_global_norm` (`_foreach_norm`, `_foreach_mul`); elsewhere Keras ops.
    `in_place=True` lets the kernel scale the tensors themselves, as `clip_grad_norm_` does (a caller that no longer
    needs them unscaled: the PyTorch step's own gradient buffers); new tensors otherwise, and always on the plain path.
    """
    function = eager_kernel("scaled_by_global_norm", grads)
    if function is not None:
        return function(grads, max_norm, in_place)
    ops = keras.ops
    squared = [ops.sum(ops.square(ops.cast(g, "float32"))) for g in grads]
    norm = ops.sqrt(ops.sum(ops.stack(squared)))
    scale = ops.minimum(max_norm / (norm + 1e-6), 1.0)
    return [g * ops.cast(scale, g.dtype) for g in grads], norm


def _block_kernel(name, x):
    """`eager_kernel(name)` for float32, bfloat16 or float16 x (float32 or a mixed policy); the kernel itself
    returns None unless the variables are float32."""
    if isinstance(x, keras.KerasTensor) or keras.backend.standardize_dtype(x.dtype) not in (
            "float32", "bfloat16", "float16"):
        return None
    return eager_kernel(name)


def attention_branch(x, norm, qkv, proj, num_heads, scale, layer_scale=None, compute_dtype="float32"):
    """ls * proj(attention(qkv(layer_norm(x)))) as one kernel call where the backend has one, else None.

    `norm` is (gamma, beta, epsilon) of a LayerNormalization, `qkv` and `proj` are (kernel, bias or None) of Dense
    layers (kernels (in, out), qkv columns [q | k | v], each head-major), `layer_scale` a gamma variable or None.
    The dtypes of `TransformerBlock` under its policy: LayerNorm in float32 on x, the products and attention in
    `compute_dtype`, LayerScale in float32 (the result is then float32; without LayerScale, `compute_dtype`).
    PyTorch with float32 variables: `keras_dinov2.ops.torch.attention_branch`, the same torch kernels, without Keras'
    per-layer dispatch (docs/performance.md has what it saves). Elsewhere
    None, and the caller runs its Keras layers: XLA (JAX) and tf.function trace that dispatch away.
    """
    function = _block_kernel("attention_branch", x)
    return None if function is None else function(x, norm, qkv, proj, int(num_heads), float(scale), layer_scale,
                                                  keras.backend.standardize_dtype(compute_dtype))


def mlp_branch(x, norm, fc1, fc2, layer_scale=None, compute_dtype="float32"):
    """ls * fc2(gelu(fc1(layer_norm(x)))) (exact erf GELU) as one kernel call where the backend has one, else None;
    the arguments, dtypes and backends as `attention_branch`."""
    function = _block_kernel("mlp_branch", x)
    return None if function is None else function(x, norm, fc1, fc2, layer_scale,
                                                  keras.backend.standardize_dtype(compute_dtype))


def layer_norm(x, gamma, beta, epsilon):
    """LayerNormalization over the last axis of float32 x with float32 `gamma` and `beta` variables (or None), as
    one kernel call where the backend has one, else None. PyTorch: `F.layer_norm` (the reference's nn.LayerNorm; the
    Keras layer's eager call is ~0.14 ms against ~0.02 ms at a tiny backbone's final norm). Elsewhere None."""
    if isinstance(x, keras.KerasTensor) or keras.backend.standardize_dtype(x.dtype) != "float32":
        return None
    function = eager_kernel("layer_norm")
    return None if function is None else function(x, gamma, beta, float(epsilon))


def projection_head(x, layers, prototypes, epsilon, floor):
    """A DINO head without batch norm in float32 as one kernel call where the backend has one, else None.

    x through the Dense `layers` [(kernel (in, out), bias or None), ...] with the exact GELU between them, then
    x / sqrt(max(sum(x^2), epsilon^2)) per row, then x @ (g * v / ||v||) with `prototypes` = (v, g) and `floor`
    under the squared column norms (`weight_normalized_kernel`): `DINOHead.call` for float32 x and variables.
    PyTorch: F.linear (addmm, the reference's nn.Linear) and the other ops as torch calls, without Keras' dispatch
    (about half a millisecond per head call of a small model; docs/performance.md). Elsewhere None, and the caller
    runs its layers.
    """
    if isinstance(x, keras.KerasTensor) or keras.backend.standardize_dtype(x.dtype) != "float32":
        return None
    function = eager_kernel("projection_head")
    return None if function is None else function(x, layers, prototypes, float(epsilon), float(floor))


def patch_embedding(images, kernel, bias, patch_size, compute_dtype="float32"):
    """A Conv2D of stride = kernel = `patch_size` on (B, H, W, C) images as (B, N, D) tokens, row-major, as one
    kernel call where the backend has one, else None.

    `kernel` (p, p, C, D) and `bias` (D,) or None are a Keras Conv2D's float32 variables; the products run in
    `compute_dtype`. PyTorch: `keras_dinov2.ops.torch.patch_embedding`, the patches gathered by a view and one
    `F.linear` (each patch's pixels in the kernel's (row, column, channel) order; the convolution's sums), without
    Keras' layer dispatch and its layout transposes (docs/performance.md has what it saves). Elsewhere None, and the
    caller runs its Conv2D layer.
    """
    function = _block_kernel("patch_embedding", images)
    return None if function is None else function(images, kernel, bias, int(patch_size),
                                                  keras.backend.standardize_dtype(compute_dtype))


def float32_kernel(name, *tensors):
    """`eager_kernel(name)` where every one of `tensors` is a float32 backend tensor (not symbolic), else None."""
    if not all(keras.ops.is_tensor(x) for x in tensors) or not _float32(*tensors):
        return None
    return eager_kernel(name, tensors)
