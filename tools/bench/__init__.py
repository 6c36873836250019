"""The benchmark harness shared by the tools in tools/.

Each benchmark (benchmark_inference.py, benchmark_train_step.py, benchmark_data.py,
benchmark_distributed.py, benchmark_drop_path.py, compute_ceiling.py) keeps only what it
measures; the rest lives here, one module per concern:

  bench.cli       the flags the benchmarks share (--dtype, --backends, --device, --warmup,
                  --json, --timeout, --keep, --verbose) and their checks
  bench.machine   the machine: CPU, memory, GPUs, package versions, load, resident memory
  bench.timing    timing loops (warm-up, timed calls with wall and CPU seconds, medians) and
                  a Keras callback that times each training step
  bench.workers   peers side by side, each in a fresh subprocess: the worker's environment,
                  its spec and result files, the loop over the runs, the work folder
  bench.devices   per-backend device checks, synchronization and peak device memory
  bench.report    result tables, the machine header, JSON output
  bench.images    the source images the benchmarks share (crops of scikit-learn's photos)
  bench.reference loading pieces of a facebookresearch/dinov2 checkout at run time

Measured figures live in docs/performance.md, not here.
"""
