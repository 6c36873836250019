"""Helpers shared by the benchmarks in tools/: machine description, memory, formatting."""

import contextlib
import importlib.metadata
import importlib.util
import os
import platform
import resource
import shutil
import subprocess
import sys

PACKAGES = ("keras", "keras-hub", "tensorflow", "jax", "jaxlib", "torch", "transformers", "numpy")


def installed(module):
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(packages=PACKAGES):
    """CPU, memory, GPUs, Python and package versions, and the threading environment."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    memory_gb = None
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    memory_gb = round(int(line.split()[1]) / 2**20, 1)
    gpus = []
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            gpus = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "memory_gb": memory_gb,
        "gpus": gpus,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: version(name) for name in packages},
        "env": {
            name: os.environ[name]
            for name in (
                "XLA_FLAGS",
                "OMP_NUM_THREADS",
                "TF_NUM_INTRAOP_THREADS",
                "TF_NUM_INTEROP_THREADS",
                "CUDA_VISIBLE_DEVICES",
                "JAX_PLATFORMS",
            )
            if name in os.environ
        },
    }


def load_average():
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def fmt(value, pattern, missing="-"):
    return missing if value is None else pattern.format(value)


def peak_rss_mb():
    # ru_maxrss is in kilobytes on Linux, in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


class Skip(Exception):
    pass
