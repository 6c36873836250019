"""JAX kernels: for XLA:CPU, the same values as the Keras ops laid out for its CPU code generator; on every platform,
the exact GELU with PyTorch's gradient rule (fewer saved intermediates)."""

import functools
import math

import jax
import jax.numpy as jnp
import keras


@jax.custom_vjp
def gradient_boundary(x):
    """Identity; its gradient is the incoming one, written to memory once (XLA:CPU only).

    A ViT's residual stream gets, in the backward pass, a running sum of gradients: block k's
    is block k+1's plus the LayerNorm terms of block k. XLA's CPU fusion duplicates cheap
    elementwise producers into each consumer, so every block's weight-gradient products
    recompute the whole sum from the top instead of reading it: quadratic in depth (what it cost
    is in docs/performance.md). Likewise at a linear
    layer's output: XLA computes the weight gradient as dy^T x and fuses dy's producers (the
    LayerNorm or GELU backward) into the copy that transposes dy, evaluating them in transposed
    order, slower than writing dy and transposing it. An optimization barrier
    does not stop it (XLA:CPU removes barriers before fusion); a while loop that XLA cannot
    prove runs once does: its carried value must be a buffer. The loop runs once and multiplies
    by a carried 1.0 (computed as 1 + 0 * the first element, which XLA cannot fold), so a
    gradient whose first element is finite comes out bitwise unchanged. A NaN first element
    skips the loop (unchanged); an infinite one turns the gradient into NaN: non-finite either
    way, which is all that loss scaling's overflow check looks at.
    """
    return x


def _boundary_fwd(x):
    return x, None


def _boundary_bwd(_, gradient):
    first = jnp.reshape(gradient, (-1,))[0]
    # 0 unless the gradient is NaN (then the loop runs zero times: still the identity).
    start = (first != first).astype(jnp.int32)
    one = jnp.ones((), gradient.dtype) + jnp.zeros((), gradient.dtype) * first

    def body(carry):
        i, factor, value = carry
        return i + 1, factor, value * factor

    _, _, gradient = jax.lax.while_loop(lambda c: c[0] < 1, body, (start, one, gradient))
    return (gradient,)


gradient_boundary.defvjp(_boundary_fwd, _boundary_bwd)


def _heads_first(x):
    """(batch, tokens, heads, head_dim) -> (batch * heads, tokens, head_dim)."""
    batch, tokens, heads, dim = x.shape
    return jnp.reshape(jnp.transpose(x, (0, 2, 1, 3)), (batch * heads, tokens, dim))


def _tokens_first(x, heads):
    """(batch * heads, tokens, head_dim) -> (batch, tokens, heads, head_dim)."""
    rows, tokens, dim = x.shape
    return jnp.transpose(jnp.reshape(x, (rows // heads, heads, tokens, dim)), (0, 2, 1, 3))


def _attention_parts(query, key, value, scale):
    """Heads-first q (scaled), k, v; the exponentiated logits e (row max subtracted) and 1 / row sums."""
    q, k, v = _heads_first(query) * scale, _heads_first(key), _heads_first(value)
    logits = jnp.matmul(q, jnp.swapaxes(k, 1, 2))
    e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    return q, k, v, e, 1.0 / jnp.sum(e, axis=-1, keepdims=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def cpu_dot_product_attention(query, key, value, scale):
    """softmax(q k^T * scale) v for (batch, tokens, heads, head_dim) float32 inputs, shaped for XLA:CPU.

    The same values as `jax.nn.dot_product_attention` (to float rounding), faster on XLA's CPU
    backend: heads are moved ahead of tokens once, so every product is a plain batched matrix
    product; the output is normalized after the product with v (a (tokens, head_dim) division per
    row instead of (tokens, tokens)); and the gradient is written by hand so that each of its
    four products also reads its operands in the layout XLA's CPU kernels take directly
    (docs/performance.md has the measured gain). Not used on GPU or TPU, which have fused attention kernels.
    """
    q, k, v, e, inverse_sum = _attention_parts(query, key, value, scale)
    return _tokens_first(jnp.matmul(e, v) * inverse_sum, query.shape[2])


def _attention_fwd(query, key, value, scale):
    q, k, v, e, inverse_sum = _attention_parts(query, key, value, scale)
    probabilities = e * inverse_sum
    out = jnp.matmul(probabilities, v)
    return _tokens_first(out, query.shape[2]), (q, k, v, probabilities, out)


def _attention_bwd(scale, residuals, gradient):
    q, k, v, probabilities, out = residuals
    heads = gradient.shape[2]
    d_out = _heads_first(gradient)
    d_value = jnp.matmul(jnp.swapaxes(probabilities, 1, 2), d_out)
    d_probabilities = jnp.matmul(d_out, jnp.swapaxes(v, 1, 2))
    # softmax backward: p * (dp - sum_j p_j dp_j), with sum_j p_j dp_j = sum_d out_d d_out_d.
    d_logits = probabilities * (d_probabilities - jnp.sum(d_out * out, axis=-1, keepdims=True))
    d_query = jnp.matmul(d_logits, k) * scale  # q was scaled before the product
    d_key = jnp.matmul(jnp.swapaxes(d_logits, 1, 2), q)
    return (
        _tokens_first(d_query, heads),
        _tokens_first(d_key, heads),
        _tokens_first(d_value, heads),
    )


cpu_dot_product_attention.defvjp(_attention_fwd, _attention_bwd)


def _sum_rows(x):
    """sum(x, axis=0), accumulated one row at a time in a loop.

    XLA:CPU's reduction over the leading axis of a wide matrix is slower than this loop (figures in
    docs/performance.md): each step adds one contiguous row into an accumulator that stays in cache.
    Sequential float32 summation: the rounding error
    grows with the row count (hundreds here), not with the row length.
    """
    x = jnp.asarray(x)
    return jax.lax.fori_loop(0, x.shape[0], lambda i, total: total + x[i], jnp.zeros(x.shape[1:], x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _cpu_sum_over_rows(x, rows):
    return _sum_rows(x)


def _sum_over_rows_fwd(x, rows):
    return _sum_rows(x), None


def _sum_over_rows_bwd(rows, _, gradient):
    return (jnp.broadcast_to(gradient, (rows, *gradient.shape)),)


_cpu_sum_over_rows.defvjp(_sum_over_rows_fwd, _sum_over_rows_bwd)


def cpu_sum_over_rows(x):
    """`sum(x, axis=0)` through `_sum_rows`, with the broadcast gradient."""
    return _cpu_sum_over_rows(x, x.shape[0])


def cpu_max_over_rows(x):
    """`max(x, axis=0)` one row at a time, like `_sum_rows` (differentiable as a loop)."""
    x = jnp.asarray(x)
    return jax.lax.fori_loop(1, x.shape[0], lambda i, peak: jnp.maximum(peak, x[i]), x[0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def cpu_weight_normalized_kernel(v, g, floor):
    """g * v / sqrt(max(sum(v^2, axis=0), floor)) per column, its two reductions over rows done by `_sum_rows`.

    The gradient is written by hand so that its one reduction over rows, sum(dK * v), also runs in
    the loop (autodiff would emit XLA's slow leading-axis reduction).
    """
    return v * (g / jnp.sqrt(jnp.maximum(_sum_rows(v * v), floor)))


def _weight_norm_fwd(v, g, floor):
    squares = _sum_rows(v * v)
    norm = jnp.sqrt(jnp.maximum(squares, floor))
    return v * (g / norm), (v, g, norm, squares > floor)


def _weight_norm_bwd(floor, residuals, d_kernel):
    v, g, norm, above_floor = residuals
    # K = v g / n with n = sqrt(sum_i v_i^2): dK/dv_k = g / n - v_k (sum_i dK_i v_i) g / n^3.
    t = _sum_rows(d_kernel * v)
    d_v = d_kernel * (g / norm) - v * jnp.where(above_floor, t * g / norm**3, 0.0)
    return d_v, t / norm


cpu_weight_normalized_kernel.defvjp(_weight_norm_fwd, _weight_norm_bwd)


@jax.custom_vjp
def gelu(x):
    """`keras_dinov2.ops.gelu` on JAX: `jax.nn.gelu(x, approximate=False)` (what Keras runs), with a gradient computed
    from x alone, as PyTorch's gelu_backward: g * (Phi(x) + x * phi(x)), in float32.

    Differentiating the formula instead leaves XLA three (N, hidden) forward intermediates per MLP for the backward
    pass besides x (the erf term, the exponential and a select); with this rule only x and the output (the next
    product's input) stay live. docs/performance.md has the temporaries it saves.
    """
    return jax.nn.gelu(x, approximate=False)


def _gelu_fwd(x):
    return jax.nn.gelu(x, approximate=False), x


def _gelu_bwd(x, gradient):
    x32 = x.astype(jnp.float32)
    cdf = 0.5 * (1.0 + jax.lax.erf(x32 * (1.0 / math.sqrt(2.0))))
    pdf = jnp.exp(-0.5 * x32 * x32) * (1.0 / math.sqrt(2.0 * math.pi))
    return ((gradient.astype(jnp.float32) * (cdf + x32 * pdf)).astype(gradient.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def cpu_function(name):
    """The XLA:CPU formulation called `name`, or None off JAX's CPU platform (GPUs and TPUs keep
    the plain operations, where none of these was measured to help)."""
    if jax.default_backend() != "cpu":
        return None
    return {
        "gradient_boundary": gradient_boundary,
        "dot_product_attention": cpu_dot_product_attention,
        "sum_over_rows": cpu_sum_over_rows,
        "max_over_rows": cpu_max_over_rows,
        "weight_normalized_kernel": cpu_weight_normalized_kernel,
    }[name]


def replica_seed(seed):
    """The seed unchanged: a JAX program holds the global batch, so its draws already cover every replica's rows."""
    return seed


def active_replicas():
    """Size of the batch axis of the active `keras.distribution` mesh (1 without a distribution)."""
    distribution = keras.distribution.distribution()
    mesh = getattr(distribution, "device_mesh", None)
    if mesh is None:
        return 1
    names = list(mesh.axis_names)
    axis = getattr(distribution, "batch_dim_name", None) or names[0]
    return int(mesh.shape[names.index(axis)]) if axis in names else 1
