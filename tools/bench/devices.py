"""Per-backend device checks, synchronization and peak device memory, inside a worker.

`device` is the benchmarks' --device flag: "auto" (a GPU where the framework sees one, else the
CPU), "cpu" (the parent hid the GPUs) or "gpu" (a run whose framework sees none is skipped).
"""

import contextlib

from bench.workers import Skip

AUTOCAST = {"mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}


def tf_gpu(device):
    """TensorFlow's first GPU's name, or None; every GPU gets memory growth (a meaningful peak)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        with contextlib.suppress(RuntimeError):
            tf.config.experimental.set_memory_growth(gpu, True)
    if device == "gpu" and not gpus:
        raise Skip("TensorFlow sees no GPU.")
    if gpus:
        return tf.config.experimental.get_device_details(gpus[0]).get("device_name", "gpu")
    return None


def jax_gpu(device):
    """JAX's first GPU's kind, or None."""
    import jax

    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    if device == "gpu" and not gpus:
        raise Skip("JAX sees no GPU (jax.devices('gpu') is empty).")
    return getattr(gpus[0], "device_kind", "gpu") if gpus else None


def torch_gpu(device, threads=None):
    """PyTorch's CUDA device's name, or None; `threads` sets torch.set_num_threads first."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    if device == "gpu":
        raise Skip("PyTorch sees no GPU (torch.cuda.is_available() is False).")
    return None


def backend_gpu(backend, device, torch_threads=None):
    """The GPU the Keras backend `backend` will use, or None; call it before importing Keras."""
    if backend == "tensorflow":
        return tf_gpu(device)
    if backend == "jax":
        return jax_gpu(device)
    return torch_gpu(device, torch_threads)


def import_keras(backend):
    """Imports Keras, checking that it started with `backend` (the parent sets KERAS_BACKEND)."""
    import keras

    if keras.backend.backend() != backend:
        raise Skip(f"Keras started with backend {keras.backend.backend()!r}, not {backend!r}.")
    return keras


def device_sync(backend, gpu):
    """A function `sync(output=None)` that waits for the device's queued work (a no-op on a CPU)."""

    def nothing(output=None):
        return output

    if not gpu:
        return nothing
    if backend == "jax":
        import jax

        # A jitted step is one executable: its outputs are ready only when all of it has run.
        # The barrier adds any effects still in flight.
        wait = jax.effects_barrier
    elif backend == "tensorflow":
        import tensorflow as tf

        wait = tf.test.experimental.sync_devices
    else:
        import torch

        wait = torch.cuda.synchronize

    def sync(output=None):
        wait()
        return output

    return sync


def gpu_peak_mb(backend, gpu):
    """The peak device memory of the framework so far in MB, or None without a GPU."""
    if not gpu:
        return None
    if backend == "jax":
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        return peak / 2**20 if peak else None
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


def torch_autocast(dtype_policy):
    """The torch dtype torch.autocast runs a Keras mixed policy in, or None for float32."""
    import torch

    name = AUTOCAST.get(dtype_policy)
    return getattr(torch, name) if name else None
