"""PyTorch kernels: the per-process replica seed and replica count."""

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
