"""Peers side by side: each run in a fresh subprocess, and the loop over the runs.

A benchmark's parent process writes one JSON spec per run and starts `script --worker SPEC`
in a fresh process (KERAS_BACKEND must be set before Keras is imported, and the peak resident
memory of one run must not mix with another's); the worker measures and writes its result JSON.
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from bench.machine import load_average, machine_info

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Skip(Exception):
    """Raised in a worker: the run cannot happen here (a missing package, no GPU, ...)."""


def worker_env(backend, device="auto", **overrides):
    """The environment of a worker on Keras backend `backend`.

    The repository root leads PYTHONPATH (so that the worker imports this checkout's
    keras_dinov2), TensorFlow's C++ logs are quieted unless set, `overrides` are set as given,
    and device "cpu" hides every GPU (CUDA_VISIBLE_DEVICES='', JAX_PLATFORMS=cpu).
    """
    env = dict(os.environ)
    env["KERAS_BACKEND"] = backend
    env["PYTHONPATH"] = os.pathsep.join(
        [REPO_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(overrides)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["JAX_PLATFORMS"] = "cpu"
    return env


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


def run_all(runs, label, run_one, describe):
    """Runs every spec in `runs` in turn, printing its progress; returns (results, skipped).

    `label(spec)` names a run, `run_one(spec, name)` returns (result, None) or (None, reason)
    (as `run_in_subprocess`), `describe(result)` is the line printed under a run that worked.
    """
    results, skipped = [], []
    for index, spec in enumerate(runs):
        name = label(spec)
        print(f"[{index + 1}/{len(runs)}] {name} ...", flush=True)
        result, reason = run_one(spec, str(index))
        if result is None:
            print(f"    skipped: {reason}", flush=True)
            skipped.append(f"{name}: {reason}")
            continue
        print(f"    {describe(result)}", flush=True)
        results.append(result)
    return results, skipped


@contextlib.contextmanager
def work_folder(keep, prefix):
    """The folder of the specs and results: `keep` (kept), or a temporary one deleted at the end."""
    workdir = keep or tempfile.mkdtemp(prefix=prefix)
    os.makedirs(workdir, exist_ok=True)
    try:
        yield workdir
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def run_benchmark(argv, parse_args, measure, parent):
    """The entry point of a benchmark with workers.

    `parse_args(argv)` reads the flags; with --worker SPEC this process is a worker and runs
    `measure(spec)`; else it is the parent: `parent(args, info)` runs with the machine's
    description, the load average before the run in `info["load_before"]`.
    """
    args = parse_args(argv)
    if args.worker:
        return worker_body(args.worker, measure)
    info = machine_info()
    info["load_before"] = load_average()
    return parent(args, info)
