"""The PyTorch engine: `torch.distributed` (launched with `torchrun`; gloo on CPU, nccl on GPU), one process per
device.

The step binds a `CrossReplica` to `torch.distributed` (`replica_reduction`) and all-reduces the gradients (their
mean: every rank's loss is the mean over its own batch) before clipping; checkpoints are written by rank 0 only.
Every rank starts from rank 0's state (`TorchSetup.prepare`).
"""

import os

import keras
import numpy as np
import torch
import torch.distributed as dist

from keras_dinov2.distribute.setup import DistributedSetup
from keras_dinov2.losses import CrossReplica

# Gradients are all-reduced in buckets of at most this many elements.
BUCKET_ELEMENTS = 1 << 25


class TorchSetup(DistributedSetup):
    """`DistributedSetup` of the torch engine: one process per replica, every rank from rank 0's state."""

    def engine_name(self):
        """`torch.distributed (<its backend>)`."""
        return f"torch.distributed ({_backend_name()})"

    def prepare(self, model):
        """Every rank starts from rank 0's state; returns `model` (see `DistributedSetup.prepare`)."""
        if self.num_processes > 1:
            broadcast_variables(model)
        return model


def _backend_name():
    return dist.get_backend() if dist.is_available() and dist.is_initialized() else "none"


def setup(mode):
    """`keras_dinov2.distribute.setup` on torch: joins the process group and returns a `TorchSetup`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    initialized = dist.is_available() and dist.is_initialized()
    if initialized:
        world = dist.get_world_size()
    if mode == "none" or (mode == "auto" and world < 2):
        return TorchSetup("none", "torch", devices=_device_text())
    if not initialized:
        if world < 2 and "MASTER_ADDR" not in os.environ:
            raise ValueError(
                "mode='data' on the torch backend needs several processes: launch with "
                "`torchrun --nproc_per_node=N ...` (or call torch.distributed.init_process_group)."
            )
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    elif torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    world, rank = dist.get_world_size(), dist.get_rank()
    return TorchSetup("data", "torch", world, 1, world, rank, devices=_device_text(world))


def _device_text(world=1):
    if torch.cuda.is_available():
        return f"{world} x {torch.cuda.get_device_name()}"
    return f"{world} x CPU process"


def _distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# ---------------------------------------------------------------------------------------------------- the step


def _sum(x):
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y


def _max(x):
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.MAX)
    return y


class AllGather(torch.autograd.Function):
    """Concatenates every rank's rows; the gradient of a rank's rows sums over ranks."""

    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rows, ctx.rank = x.shape[0], dist.get_rank()
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def replica_reduction():
    """The `CrossReplica` bound to torch.distributed when several processes take part, else None."""
    if not _distributed():
        return None
    return CrossReplica(sum_fn=_sum, max_fn=_max, all_gather_fn=AllGather.apply,
                        num_replicas=dist.get_world_size())


def all_reduce_gradients(grads):
    """The mean over ranks of each gradient (None stays None), all-reduced in buckets of at most
    `BUCKET_ELEMENTS` elements of one dtype."""
    out = list(grads)
    present = [i for i, g in enumerate(grads) if g is not None]
    if not present or not _distributed():
        return out
    n = dist.get_world_size()
    buckets, current, size = [], [], 0
    for i in present:
        g = grads[i]
        if current and (size + g.numel() > BUCKET_ELEMENTS or g.dtype != grads[current[0]].dtype):
            buckets.append(current)
            current, size = [], 0
        current.append(i)
        size += g.numel()
    buckets.append(current)
    for bucket in buckets:
        flat = torch.cat([grads[i].reshape(-1) for i in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= n
        offset = 0
        for i in bucket:
            numel = grads[i].numel()
            out[i] = flat[offset:offset + numel].view_as(grads[i])
            offset += numel
    return out


def average_logs(logs):
    """The mean over ranks of each logged scalar, in one all-reduce (rank 0 writes the logs)."""
    if not _distributed() or not logs:
        return logs
    names = list(logs)
    values = [keras.ops.convert_to_tensor(logs[k], "float32").reshape(()) for k in names]
    stacked = torch.stack(values).detach()
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    stacked /= dist.get_world_size()
    return {k: stacked[i] for i, k in enumerate(names)}


def broadcast_variables(model, source=0):
    """Copies rank `source`'s value of every variable of `model` (and its optimizer) to all ranks."""
    if not _distributed():
        return
    variables = list(model.variables)
    if getattr(model, "optimizer", None) is not None:
        variables += list(model.optimizer.variables)
    with torch.no_grad():
        for variable in variables:
            dist.broadcast(variable.value.data, src=source)


# ---------------------------------------------------------------------------------------------------- files


def is_chief():
    """Whether this is rank 0 (or a process outside any process group)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def to_numpy(value):
    """A value as a NumPy array on this host."""
    return np.asarray(keras.ops.convert_to_numpy(value))
