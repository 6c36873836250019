"""Helpers shared by the benchmarks in tools/: machine description, memory, formatting."""

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

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


def run_in_subprocess(script, spec, workdir, name, env, timeout, verbose):
    """Runs `script --worker SPEC` in a fresh process; returns (result dict, None) or (None, why).

    The worker writes its result JSON to `spec["result"]`; a result with a "skip" key, a
    timeout or a crash (with the end of its output) give a reason instead.
    """
    spec_path = os.path.join(workdir, f"spec_{name}.json")
    spec["result"] = os.path.join(workdir, f"result_{name}.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    command = [sys.executable, os.path.abspath(script), "--worker", spec_path]
    start = time.perf_counter()
    try:
        process = subprocess.run(
            command,
            env=env,
            timeout=timeout,
            text=True,
            stdout=None if verbose else subprocess.PIPE,
            stderr=None if verbose else subprocess.STDOUT,
        )
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    wall = time.perf_counter() - start
    if os.path.exists(spec["result"]):
        with open(spec["result"]) as f:
            result = json.load(f)
        if result.get("skip"):
            return None, result["skip"]
        result["subprocess_s"] = wall
        return result, None
    tail = (process.stdout or "").strip().splitlines()[-15:]
    return None, f"subprocess exited with {process.returncode}:\n    " + "\n    ".join(tail)


def worker_body(spec_path, measure):
    """A worker subprocess's body: read the JSON spec, run `measure(spec)`, write its result JSON.

    A `Skip` raised by `measure` is written as {"skip": reason}; the parent reports it.
    """
    with open(spec_path) as f:
        spec = json.load(f)
    try:
        result = measure(spec)
    except Skip as skip:
        result = {"skip": str(skip)}
    with open(spec["result"], "w") as f:
        json.dump(result, f)
    return 0
