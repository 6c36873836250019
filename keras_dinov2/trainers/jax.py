"""JAX train_step: stateless, with teacher, centers and step counter in the returned state."""

import functools
import warnings

import jax
import jax.numpy as jnp
from keras import StatelessScope


@jax.custom_vjp
def gradient_boundary(x):
    """Identity; its gradient is the incoming one, written to memory once (XLA:CPU only).

    A ViT's residual stream gets, in the backward pass, a running sum of gradients: block k's
    is block k+1's plus the LayerNorm terms of block k. XLA's CPU fusion duplicates cheap
    elementwise producers into each consumer, so every block's weight-gradient products
    recompute the whole sum from the top instead of reading it: quadratic in depth (on
    ViT-S/14, 12 blocks, these fusions took 40% of the training step). Likewise at a linear
    layer's output: XLA computes the weight gradient as dy^T x and fuses dy's producers (the
    LayerNorm or GELU backward) into the copy that transposes dy, evaluating them in transposed
    order, several times slower than writing dy and transposing it. An optimization barrier
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
    four products also reads its operands in the layout XLA's CPU kernels take directly. On
    ViT-S/14 with 257 tokens and batch 8 the forward takes ~24% less time and forward + backward
    ~32% less (measured on 2 cores). Not used on GPU or TPU, which have fused attention kernels.
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

    XLA:CPU's reduction over the leading axis of a (256, 65536) matrix takes ~85 ms (YNNPACK),
    a matrix-vector product with ones ~20 ms, this loop ~3.5 ms: each step adds one contiguous
    row into an accumulator that stays in cache. Sequential float32 summation: the rounding error
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


def _values(scope, variables, fallback):
    out = []
    for variable, old in zip(variables, fallback):
        new = scope.get_current_value(variable)
        out.append(old if new is None else new)
    return out


def _mapping(variables, values):
    return list(zip(variables, values))


def train_step(model, state, data):
    """One DINOv2 update on JAX: `state` = (trainable, non_trainable, optimizer, metrics).

    The teacher's pass over the whole update first (targets, centers), then one gradient per
    micro-batch, summed in order (the micro-batches' activations are never alive together),
    then one clipped optimizer step and the teacher's EMA.

    Under mixed_float16, Keras wraps the optimizer in a LossScaleOptimizer, whose `apply`
    updates its scale inside a cond that cannot run in the StatelessScope of this step. The
    step does the same dynamic loss scaling itself: gradients of the scaled loss are unscaled;
    when one is not finite, the student and the optimizer keep their values (the step counter
    included) while the centers and the teacher's EMA are still updated, as the reference's
    GradScaler step; the scale doubles after `dynamic_growth_steps` finite steps and halves
    on overflow.
    """
    trainable, non_trainable, optimizer_values, metrics_values = state
    scaler = model.optimizer if hasattr(model.optimizer, "dynamic_scale") else None
    steps = model.accumulation_steps
    base = _mapping(model.optimizer.variables, optimizer_values)

    # The teacher's targets for the whole update (the schedules read the optimizer's counter).
    with StatelessScope(state_mapping=_mapping(model.trainable_variables, trainable)
                        + _mapping(model.non_trainable_variables, non_trainable) + base) as scope:
        targets, teacher_logs = model.teacher_targets(data)
    non_trainable = _values(scope, model.non_trainable_variables, non_trainable)

    def loss_fn(trainable_values, non_trainable_values, micro, index):
        mapping = _mapping(model.trainable_variables, trainable_values)
        mapping += _mapping(model.non_trainable_variables, non_trainable_values) + base
        with StatelessScope(state_mapping=mapping) as scope:
            loss, logs = model.student_loss(micro, targets, index, training=True)
            loss = model.scale_loss(loss)
        new_non_trainable = _values(scope, model.non_trainable_variables, non_trainable_values)
        return loss, (logs, new_non_trainable)

    grads, micro_logs = None, []
    for index in range(steps):
        micro = model.micro_batch(data, index)
        (_, (logs, non_trainable)), micro_grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, non_trainable, micro, index
        )
        micro_logs.append(logs)
        grads = micro_grads if grads is None else [a + b for a, b in zip(grads, micro_grads)]
    if steps > 1:
        grads = [g / steps for g in grads]
    logs = model.merge_logs(micro_logs, teacher_logs)

    optimizer = model.optimizer
    if scaler is not None:
        if jax.default_backend() == "cpu" and not getattr(model, "_warned_float16_cpu", False):
            model._warned_float16_cpu = True
            warnings.warn(
                "mixed_float16 on JAX's CPU backend: XLA's CPU compiler cannot differentiate "
                "float16 attention (it fails with \"precision 'F16_F16_F32' is not supported by "
                "dot_general on CPU\"). mixed_float16 is meant for GPUs; on a CPU use float32 "
                "or mixed_bfloat16.",
                stacklevel=2,
            )
        optimizer_variables = list(model.optimizer.variables)
        scale_index = _index(optimizer_variables, scaler.dynamic_scale)
        counter_index = _index(optimizer_variables, scaler.step_counter)
        scale = optimizer_values[scale_index]
        grads = [g / scale.astype(g.dtype) for g in grads]
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in grads]))
        optimizer = scaler.inner_optimizer
    variables = model.trainable_variables + model.optimizer.variables
    values = list(trainable) + list(optimizer_values)
    with StatelessScope(state_mapping=_mapping(variables, values)
                        + _mapping(model.non_trainable_variables, non_trainable)) as scope:
        logs = model.apply_gradients(grads, logs, optimizer=optimizer)
    new_values = _values(scope, variables, values)
    n_t = len(trainable)
    if scaler is not None:
        # An overflow step leaves the student and the optimizer as they were (Keras'
        # LossScaleOptimizer skips it too); only the scale and its counter move.
        new_values = [jnp.where(finite, new, old) for new, old in zip(new_values, values)]
        counter = optimizer_values[counter_index]
        grow = jnp.logical_and(finite, counter == scaler.dynamic_growth_steps - 1)
        new_values[n_t + counter_index] = jnp.where(
            finite, jnp.where(grow, jnp.zeros_like(counter), counter + 1), jnp.zeros_like(counter)
        )
        new_values[n_t + scale_index] = jnp.where(
            finite, jnp.where(grow, scale * 2.0, scale), scale * 0.5
        )
    trainable, optimizer_values = new_values[:n_t], new_values[n_t:]
    # The teacher follows the student as it is now (unchanged after an overflow).
    with StatelessScope(state_mapping=_mapping(model.trainable_variables, trainable)
                        + _mapping(model.non_trainable_variables, non_trainable)) as scope:
        model.update_teacher(logs["momentum"])
    non_trainable = _values(scope, model.non_trainable_variables, non_trainable)
    return logs, (trainable, non_trainable, optimizer_values, list(metrics_values))


def _index(variables, target):
    for i, variable in enumerate(variables):
        if variable is target:
            return i
    raise ValueError(f"{target.path} is not among the optimizer's variables.")


def test_step(model, state, data):
    """The loss on a validation batch on JAX: `state` = (trainable, non_trainable, metrics)."""
    trainable, non_trainable = state[0], state[1]
    mapping = list(zip(model.trainable_variables, trainable))
    mapping += list(zip(model.non_trainable_variables, non_trainable))
    with StatelessScope(state_mapping=mapping):
        _, logs = model.compute_dinov2_loss(data, training=False, update_centers=False)
    return logs, state
