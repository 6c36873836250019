"""PyTorch kernels: the per-process replica seed and replica count, the multi-tensor optimizer / clipping / EMA
updates, the transformer block's residual branches in one call each, the fused weight-norm kernel, and the small
eager steps of the embeddings and the objectives (`keras_dinov2.ops.eager`)."""

import itertools
import math
import operator
import weakref

import torch


def replica_seed(seed):
    """`keras_dinov2.ops.replica_seed` on PyTorch: offsets the seed by the process's rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return seed
    # Keras' torch backend seeds a generator with (seed[0] + seed[1]) mod 2**32, the second
    # element counting the draws: ranks start 2**32 / world apart, more draws than a run makes.
    offset = dist.get_rank() * (2**32 // dist.get_world_size()) % 2**32
    if seed.dtype == torch.int32 and offset >= 2**31:
        offset -= 2**32  # the same 32 bits in a signed seed
    return seed + torch.tensor([offset, 0], dtype=seed.dtype, device=seed.device)


def active_replicas():
    """The torch.distributed world size (1 when torch.distributed is not initialized)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return int(dist.get_world_size())


def host_int(x):
    """`keras_dinov2.ops.host_int` on PyTorch: int(x) for a one-element integer tensor on the CPU, else None."""
    if (isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.numel() == 1 and not x.is_floating_point()
            and x.dtype != torch.bool):
        return int(x)
    return None


# Keras' `Variable.value` re-checks the stateless and autocast scopes and the device at every read (~2 us; a tiny
# model's step made 700 reads). Where the kernels here run (outside a StatelessScope: `_eager_kernel`; in no autocast
# scope: the optimizer, the EMA, and TransformerBlock, which never autocasts) it is the variable's torch Parameter,
# one object for the variable's life (Keras assigns by copying into it). So the tensors of a list of variables are
# kept, keyed by the variables' ids and checked through weak references: a list with a dead or another variable, or
# a dead tensor, is read anew, and nothing here keeps a variable or a tensor alive.
_TENSORS = {}
_TENSORS_LIMIT = 4096


def _none():
    return None


def _ref(x):
    return _none if x is None else weakref.ref(x)


def variable_tensors(variables):
    """[v.value for v in variables] (None for None), from the cache above when the list was read before."""
    key = tuple(map(id, variables))
    entry = _TENSORS.get(key)
    if entry is not None:
        # The same variables (identity, C-level loops), and as many None tensors as None variables: none has died.
        tensors = [t() for t in entry[1]]
        if (all(map(operator.is_, [r() for r in entry[0]], variables))
                and sum(map(operator.is_, tensors, itertools.repeat(None))) == entry[2]):
            return tensors
    tensors = [None if v is None else v.value for v in variables]
    if len(_TENSORS) >= _TENSORS_LIMIT:
        _TENSORS.clear()
    _TENSORS[key] = ([_ref(v) for v in variables], [_ref(t) for t in tensors], sum(v is None for v in variables))
    return tensors


# Multi-tensor (foreach) updates. Keras' torch backend runs each per-variable update as a dozen eager ops, each
# through Keras' dispatch; torch's `_foreach_*` kernels take every tensor of a group in one call, as the reference's
# fused AdamW param groups and its EMA do. Scalars are Python floats (the reference's are too): reading the schedules
# costs one host sync per step.


def _floats(*values):
    return [float(v) for v in values]


@torch.no_grad()
def multi_tensor_adamw(variables, grads, momentums, velocities, lr, weight_decay, step, beta_1, beta_2,
                       epsilon):
    """`keras_dinov2.ops.multi_tensor_adamw` on PyTorch: torch.optim.AdamW's foreach update of one group."""
    lr, weight_decay, step = _floats(lr, weight_decay, step)
    params, exp_avgs, exp_avg_sqs = (variable_tensors(x) for x in (variables, momentums, velocities))
    grads = [g if g.dtype == p.dtype else g.to(p.dtype) for g, p in zip(grads, params)]
    bias_correction_1 = -math.expm1(step * math.log(beta_1)) if beta_1 else 1.0
    bias_correction_2 = -math.expm1(step * math.log(beta_2)) if beta_2 else 1.0
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta_1)
    torch._foreach_mul_(exp_avg_sqs, beta_2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta_2)
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denominators, math.sqrt(bias_correction_2))
    torch._foreach_add_(denominators, epsilon)
    if weight_decay:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_addcdiv_(params, exp_avgs, denominators, -lr / bias_correction_1)
    return True


@torch.no_grad()
def ema_update(teacher, student, momentum):
    """`keras_dinov2.ops.ema_update` on PyTorch: the reference's `_foreach_mul_` / `_foreach_add_` EMA."""
    (momentum,) = _floats(momentum)
    teacher = variable_tensors(teacher)
    torch._foreach_mul_(teacher, momentum)
    torch._foreach_add_(teacher, variable_tensors(student), alpha=1.0 - momentum)


def scaled_by_global_norm(grads, max_norm, in_place):
    """`keras_dinov2.ops.scaled_by_global_norm` on PyTorch: `clip_grad_norm_`'s foreach norms (and its in-place
    `_foreach_mul_` where allowed: no copy of every gradient, ~130 us of a small model's step)."""
    norms = torch._foreach_norm([g.float() for g in grads])
    norm = torch.linalg.vector_norm(torch.stack(norms))
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    if len({g.dtype for g in grads}) == 1:
        if in_place:
            torch._foreach_mul_(grads, scale.to(grads[0].dtype))
            return list(grads), norm
        return list(torch._foreach_mul(grads, scale.to(grads[0].dtype))), norm
    return [g * scale.to(g.dtype) for g in grads], norm


# The transformer block's two residual branches as plain torch calls. Through Keras each branch is five or
# six nested Layer calls and a dozen ops, each with Keras' dispatch (argument binding, autocast and name scopes,
# dtype checks): on a small model on a CPU that dispatch, not the arithmetic, is most of the step. The kernels are
# the ones Keras' torch backend runs (F.layer_norm, matmul + bias, scaled_dot_product_attention, erf GELU), in the
# dtypes of TransformerBlock's layers: LayerNorm in float32 on the residual stream (its float32 weights), its
# output cast to the compute dtype for the products and attention (weights cast likewise), LayerScale in float32.


def _as(value, dtype):
    return value if value is None or value.dtype == dtype else value.to(dtype)


def _float32_tensors(variables):
    """The variables' tensors (`variable_tensors`), or None unless every one is float32 (the kernels' contract)."""
    tensors = variable_tensors(variables)
    return None if any(t is not None and t.dtype != torch.float32 for t in tensors) else tensors


def _linear(x, kernel, bias):
    # F.linear (addmm: the bias added inside the GEMM, as the reference's nn.Linear) on the (in, out) Keras kernel.
    return torch.nn.functional.linear(x, _as(kernel, x.dtype).t(), _as(bias, x.dtype))


def _layer_norm(x, gamma, beta, epsilon, dtype):
    return torch.nn.functional.layer_norm(x.float(), x.shape[-1:], gamma, beta, epsilon).to(dtype)


def _layer_scale(out, gamma):
    return out if gamma is None else out.float() * gamma


def attention_branch(x, norm, qkv, proj, num_heads, scale, layer_scale, compute_dtype):
    """`keras_dinov2.ops.attention_branch` on PyTorch (None unless its variables are float32)."""
    tensors = _float32_tensors([norm[0], norm[1], *qkv, *proj, layer_scale])
    if tensors is None:
        return None
    gamma, beta, qkv_kernel, qkv_bias, proj_kernel, proj_bias, ls = tensors
    batch, tokens, width = x.shape
    h = _linear(_layer_norm(x, gamma, beta, norm[2], getattr(torch, compute_dtype)), qkv_kernel, qkv_bias)
    # Unbound on the (q, k, v) axis, then each transposed: the backward pass stacks the three gradients straight into
    # qkv's layout (unbinding a permuted view would stack them permuted, then copy).
    q, k, v = (t.transpose(1, 2) for t in h.reshape(batch, tokens, 3, num_heads, width // num_heads).unbind(2))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    out = _linear(out.transpose(1, 2).reshape(batch, tokens, width), proj_kernel, proj_bias)
    return _layer_scale(out, ls)


def mlp_branch(x, norm, fc1, fc2, layer_scale, compute_dtype):
    """`keras_dinov2.ops.mlp_branch` on PyTorch (None unless its variables are float32)."""
    tensors = _float32_tensors([norm[0], norm[1], *fc1, *fc2, layer_scale])
    if tensors is None:
        return None
    gamma, beta, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias, ls = tensors
    h = _layer_norm(x, gamma, beta, norm[2], getattr(torch, compute_dtype))
    return _layer_scale(_linear(torch.nn.functional.gelu(_linear(h, fc1_kernel, fc1_bias)), fc2_kernel, fc2_bias), ls)


def weight_normalized_kernel(v, g, floor):
    """`keras_dinov2.ops.weight_normalized_kernel` on PyTorch: torch's fused weight-norm kernel (the one the
    reference's `weight_norm` runs; forward and backward each one pass), with one check of its norms against the
    floor: a column below it (all zero) takes the formula with the floor instead."""
    kernel, norms = torch._weight_norm_interface(v, g.reshape(1, -1), 1)
    if bool(torch.all(norms > math.sqrt(floor))):
        return kernel
    return v * (g / torch.sqrt(torch.clamp_min(torch.sum(torch.square(v), 0), floor)))


def layer_norm(x, gamma, beta, epsilon):
    """`keras_dinov2.ops.layer_norm` on PyTorch (None unless its variables are float32)."""
    tensors = _float32_tensors([gamma, beta])
    return None if tensors is None else torch.nn.functional.layer_norm(x, x.shape[-1:], *tensors, epsilon)


def projection_head(x, layers, prototypes, epsilon, floor):
    """`keras_dinov2.ops.projection_head` on PyTorch (None unless its variables are float32)."""
    tensors = _float32_tensors([w for layer in layers for w in layer] + list(prototypes))
    if tensors is None:
        return None
    for i in range(len(layers)):
        if i:
            x = torch.nn.functional.gelu(x)
        x = torch.nn.functional.linear(x, tensors[2 * i].t(), tensors[2 * i + 1])
    x = torch.nn.functional.normalize(x, dim=-1, eps=epsilon)  # x / max(|x|, eps), as the reference
    return torch.matmul(x, weight_normalized_kernel(tensors[-2], tensors[-1], floor))


def patch_embedding(images, kernel, bias, patch_size, compute_dtype):
    """`keras_dinov2.ops.patch_embedding` on PyTorch (None unless its variables are float32)."""
    tensors = _float32_tensors([kernel, bias])
    if tensors is None:
        return None
    batch, height, width, channels = images.shape
    rows, cols = height // patch_size, width // patch_size
    patches = images.to(getattr(torch, compute_dtype)).reshape(batch, rows, patch_size, cols, patch_size, channels)
    patches = patches.permute(0, 1, 3, 2, 4, 5).reshape(batch, rows * cols, patch_size * patch_size * channels)
    weight = _as(tensors[0], patches.dtype).reshape(-1, kernel.shape[-1]).t()
    return torch.nn.functional.linear(patches, weight, _as(tensors[1], patches.dtype))


# The objectives' small eager steps (the position grid's resampling, KoLeo, centering): each is a dozen Keras ops of
# 5-15 us of dispatch around kernels of a few microseconds; on PyTorch they run as the torch calls the reference makes.
_MATRICES = {}


def _constant(matrix, device):
    """A kept NumPy matrix (read-only, cached by its caller) as a float32 tensor on `device`, converted once."""
    if isinstance(matrix, torch.Tensor):
        return matrix
    key = (id(matrix), device)
    entry = _MATRICES.get(key)
    if entry is None or entry[0] is not matrix:
        if len(_MATRICES) >= 256:
            _MATRICES.clear()
        entry = _MATRICES[key] = (matrix, torch.tensor(matrix, dtype=torch.float32, device=device))
    return entry[1]


def resample_axes(rows, grid, cols):
    """`keras_dinov2.ops.eager.resample_axes` on PyTorch: two matrix products (a three-operand einsum: ~6x the
    time)."""
    rows, cols = _constant(rows, grid.device), _constant(cols, grid.device)
    size, width, dim = grid.shape
    resampled = torch.matmul(rows, grid.reshape(size, width * dim)).reshape(-1, width, dim)
    return torch.matmul(cols, resampled)


def koleo(x, eps):
    """`keras_dinov2.ops.eager.koleo` on PyTorch: the reference's search (no gradient through it) and its pairwise
    distance."""
    x = x / torch.sqrt(torch.clamp_min(torch.sum(torch.square(x), -1, keepdim=True), eps * eps))
    with torch.no_grad():
        dots = torch.matmul(x, x.t())
        dots.fill_diagonal_(-2.0)
        nearest = torch.argmax(dots, -1)
    distance = torch.nn.functional.pairwise_distance(x, x.index_select(0, nearest), p=2.0, eps=eps)
    return -torch.mean(torch.log(distance + eps))


@torch.no_grad()
def softmax_center(logits, center, temperature):
    """`keras_dinov2.ops.eager.softmax_center` on PyTorch."""
    return torch.softmax((logits - center.reshape(-1)) / temperature, -1)


@torch.no_grad()
def update_center(center, logits, momentum, valid, reduction):
    """`keras_dinov2.ops.eager.update_center` on PyTorch (the collectives through `reduction`)."""
    return _updated_center(center, logits, momentum, valid, reduction)


@torch.no_grad()
def center_targets(logits, center, temperature, momentum, valid, reduction):
    """`keras_dinov2.ops.eager.center_targets` on PyTorch: the targets with the center as it is, then the update
    copied into the center's tensor (what Keras' `assign` does, without its conversions and checks)."""
    probs = softmax_center(logits, center, temperature)
    center.copy_(_updated_center(center, logits, momentum, valid, reduction))
    return probs


def _updated_center(center, logits, momentum, valid, reduction):
    logits = logits.reshape(-1, logits.shape[-1])
    if valid is None:
        batch_mean = reduction.mean(torch.sum(logits, 0) / logits.shape[0])
    else:
        count = torch.sum(valid.float()).reshape(1)
        total = reduction.sum(torch.cat([torch.sum(torch.where(valid[:, None], logits, 0.0), 0), count]))
        batch_mean = total[:-1] / torch.clamp_min(total[-1], 1.0)
    return momentum * center + (1.0 - momentum) * batch_mean.reshape(center.shape)


def assemble_tokens(patches, masks, mask_token, cls_token, positions, registers):
    """`keras_dinov2.ops.eager.assemble_tokens` on PyTorch (None unless its variables are float32)."""
    tensors = _float32_tensors([mask_token, cls_token, registers])
    if tensors is None:
        return None
    mask_token, cls_token, registers = tensors
    if masks is not None:
        patches = torch.where(masks.unsqueeze(-1), _as(mask_token, patches.dtype), patches)
    batch = patches.shape[0]
    x = torch.cat([cls_token.expand(batch, -1, -1), patches.float()], 1) + positions
    if registers is None:
        return x
    return torch.cat([x[:, :1], registers.expand(batch, -1, -1), x[:, 1:]], 1)


def take_rows(x, indices):
    """`keras_dinov2.ops.eager.take_rows` on PyTorch: one `index_select`."""
    return x.reshape(-1, x.shape[-1]).index_select(0, indices)


def soft_cross_entropy(logits, targets, temperature):
    """`keras_dinov2.ops.eager.soft_cross_entropy` on PyTorch."""
    return -torch.sum(targets.detach() * torch.log_softmax(logits / temperature, -1), -1)


@torch.no_grad()
def collapse_entropies(probs, reduction):
    """`keras_dinov2.ops.eager.collapse_entropies` on PyTorch (the marginal's mean over replicas through
    `reduction`)."""
    mean_entropy = torch.mean(-torch.sum(probs * torch.log(torch.clamp_min(probs, 1e-12)), -1))
    marginal = torch.mean(probs, 0)
    if reduction is not None:
        marginal = reduction.mean(marginal)
    return mean_entropy, -torch.sum(marginal * torch.log(torch.clamp_min(marginal, 1e-12)))


def split_rows(x, sizes):
    """`keras_dinov2.ops.eager.split_rows` on PyTorch: one `split` (one backward node that concatenates the parts'
    gradients, where slices would each scatter into a zero tensor of the whole)."""
    return list(x.split(sizes))
