"""The machine a benchmark runs on: CPU, memory, GPUs, package versions, load and memory use."""

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
THREAD_VARIABLES = (
    "XLA_FLAGS",
    "OMP_NUM_THREADS",
    "TF_NUM_INTRAOP_THREADS",
    "TF_NUM_INTEROP_THREADS",
    "CUDA_VISIBLE_DEVICES",
    "JAX_PLATFORMS",
)


def installed(module):
    """Whether `module` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def version(dist):
    """The installed version of the distribution `dist`, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name():
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return cpu


def _memory_gb():
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return round(int(line.split()[1]) / 2**20, 1)
    return None


def _gpus():
    if not shutil.which("nvidia-smi"):
        return []
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return []


def machine_info(packages=PACKAGES):
    """CPU, memory, GPUs, Python and package versions, and the threading environment."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "memory_gb": _memory_gb(),
        "gpus": _gpus(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: version(name) for name in packages},
        "env": {name: os.environ[name] for name in THREAD_VARIABLES if name in os.environ},
    }


def load_average():
    """The 1-minute load average, or None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def peak_rss_mb():
    """The peak resident memory of this process so far (ru_maxrss), in MB."""
    # ru_maxrss is in kilobytes on Linux, in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def reset_peak_rss():
    """Resets this process's peak resident memory (Linux: `/proc/self/clear_refs`, which ru_maxrss follows too).

    After it `peak_rss_mb` is the peak since the reset: a benchmark separates what its steps hold from what
    compiling them held. False where the system has no such reset (the peak then stays the process's).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss_mb():
    """Resident memory now (VmRSS), or None where /proc is missing."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**10
    return None


def installed_backends(backends, skipped):
    """The Keras backends among `backends` whose packages are installed.

    A message for each of the others is appended to `skipped`.
    """
    out = []
    for backend in backends:
        if not installed("keras"):
            skipped.append(f"{backend}: keras is not installed.")
        elif not installed(backend):
            skipped.append(f"{backend}: the {backend} package is not installed.")
        else:
            out.append(backend)
    return out
