"""tools/: the benchmark harness (tools/bench), each benchmark's command line, and the compute
ceiling's bounds (the FLOPs of the compiled program over measured rates).

What does not depend on the Keras backend runs once, in the torch job (`once`, see conftest.py).
"""

import json
import os
import sys
import textwrap

import keras
import numpy as np
import pytest

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
sys.path.insert(0, TOOLS)

import benchmark_data  # noqa: E402
import benchmark_dedup  # noqa: E402
import benchmark_distill  # noqa: E402
import benchmark_distributed  # noqa: E402
import benchmark_drop_path  # noqa: E402
import benchmark_embed  # noqa: E402
import benchmark_gpu  # noqa: E402
import benchmark_inference  # noqa: E402
import benchmark_packed_crops  # noqa: E402
import benchmark_train_step  # noqa: E402
import compare_dino_versions  # noqa: E402
import compute_ceiling  # noqa: E402
import distill_digits  # noqa: E402
import plot_knn_curves  # noqa: E402
import reference_step_v1  # noqa: E402
from bench import cli, images, report, timing, workers  # noqa: E402

BENCHMARKS = [benchmark_data, benchmark_dedup, benchmark_distill, benchmark_distributed, benchmark_drop_path,
              benchmark_embed, benchmark_gpu, benchmark_inference, benchmark_packed_crops, benchmark_train_step,
              compare_dino_versions, compute_ceiling, distill_digits, plot_knn_curves, reference_step_v1]


@pytest.mark.once
@pytest.mark.parametrize("module", BENCHMARKS, ids=lambda m: m.__name__)
def test_every_benchmark_prints_its_help(module, capsys):
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    assert "--" in capsys.readouterr().out


def test_packed_crops_give_the_two_passes_numbers(capsys):
    # Every backend: the packed prototype must compute the same blocks, or its timing says nothing.
    benchmark_packed_crops.main(["--preset", "dinov2_vit_tiny4", "--batch-size", "1", "--global-tokens", "5",
                                 "--local-tokens", "3", "--layers", "2", "--repeats", "1"])
    out = capsys.readouterr().out
    diffs = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if "largest output difference" in line]
    assert len(diffs) == (2 if keras.backend.backend() == "torch" else 1)
    assert max(diffs) < 1e-4, out


@pytest.mark.once
def test_benchmark_gpu_imports_the_library_where_tensorflow_is_missing(tmp_path):
    # The GPU machines carry no TensorFlow: the tool imports keras_dinov2 with an inert stand-in, removed afterwards,
    # and the training step's modules work without it.
    import subprocess

    (tmp_path / "tensorflow").mkdir()
    (tmp_path / "tensorflow" / "__init__.py").write_text("raise ImportError('no TensorFlow on this machine')\n")
    code = textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[1])
        import benchmark_gpu
        lib, stubbed = benchmark_gpu._import_library()
        assert stubbed and "tensorflow" not in sys.modules
        import keras_dinov2.trainers, keras_dinov2.pretrainer
        print("ok", lib.DINOv2Pretrainer.__name__)
    """)
    env = dict(os.environ, PYTHONPATH=str(tmp_path), KERAS_BACKEND="torch")
    done = subprocess.run([sys.executable, "-c", code, TOOLS], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ok DINOv2Pretrainer" in done.stdout


@pytest.mark.once
def test_benchmark_gpu_batch_round_trip_keeps_masks_exact(tmp_path):
    rng = np.random.default_rng(0)
    batch = {"global_crops": rng.normal(size=(4, 8, 8, 3)).astype(np.float32),
             "local_crops": rng.normal(size=(8, 4, 4, 3)).astype(np.float32),
             "masks": rng.random((4, 4)) < 0.5, "mask_indices": np.arange(5, dtype=np.int32),
             "masks_weight": np.full(5, 1 / 3, np.float32), "n_masked_patches": np.asarray(5, np.int32)}
    path = str(tmp_path / "b.npz")
    np.savez(path, model=np.asarray("tiny"), **{k: (v.astype(np.float16) if k in benchmark_gpu.FLOAT_KEYS else v)
                                                for k, v in batch.items()})
    model, loaded = benchmark_gpu.read_batch(path)
    assert model == "tiny" and set(loaded) == set(batch)
    np.testing.assert_array_equal(loaded["masks_weight"], batch["masks_weight"])  # float32 kept exact
    np.testing.assert_array_equal(loaded["masks"], batch["masks"])
    assert loaded["global_crops"].dtype == np.float32
    np.testing.assert_allclose(loaded["global_crops"], batch["global_crops"], atol=2e-3)


@pytest.mark.once
def test_benchmark_gpu_tiles_a_batch_with_its_masks():
    # --tile K: every view's images K times over, view-major order kept, and the iBOT buffer rebuilt so that each
    # index points at a masked patch of the tiled masks with weight 1 / (that image's masked patches).
    rng = np.random.default_rng(1)
    b, n = 2, 16
    masks = rng.random((2 * b, n)) < 0.4
    batch = {"global_crops": np.arange(2 * b, dtype=np.float32).reshape(2 * b, 1, 1, 1),
             "local_crops": np.arange(4 * b, dtype=np.float32).reshape(4 * b, 1, 1, 1), "masks": masks}
    out = benchmark_gpu.tile_batch(batch, 3)
    np.testing.assert_array_equal(out["global_crops"].ravel(), [0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3])
    np.testing.assert_array_equal(out["local_crops"].ravel()[:6], [0, 1, 0, 1, 0, 1])
    np.testing.assert_array_equal(out["masks"][: 3 * b], np.concatenate([masks[:b]] * 3))
    count = int(out["n_masked_patches"])
    assert count == 3 * masks.sum() and len(out["mask_indices"]) >= count
    flat = out["masks"].reshape(-1)
    assert flat[out["mask_indices"][:count]].all() and not out["masks_weight"][count:].any()
    rows = out["mask_indices"][:count] // n
    np.testing.assert_allclose(out["masks_weight"][:count], 1.0 / out["masks"].sum(axis=1)[rows])


@pytest.mark.once
def test_compare_dino_versions_judges_collapse_from_the_last_epoch(tmp_path):
    log_k = float(np.log(256))
    cases = {  # name: (teacher_entropy, teacher_marginal_entropy) of the last epoch
        "healthy": (3.0, 5.0),
        "uniform": (log_k - 0.001, log_k),
        "one_prototype": (0.1, 0.1),
    }
    for name, (entropy, marginal) in cases.items():
        os.makedirs(tmp_path / name)
        rows = ["step,epoch,teacher_entropy,teacher_kl_uniform,teacher_marginal_entropy"]
        rows.append(f"0,1,3.0,{log_k - 3.0},5.0")  # a healthy first epoch does not count
        rows += [f"{i},2,{entropy},{log_k - entropy},{marginal}" for i in (1, 2)]
        (tmp_path / name / "metrics.csv").write_text("\n".join(rows) + "\n")
    judged = {name: compare_dino_versions.collapsed(str(tmp_path / name))[:2] for name in cases}
    assert judged == {"healthy": (False, ""), "uniform": (True, "uniform"),
                      "one_prototype": (True, "one-prototype")}
    row = {"method": "DINO v1", "batch": 8, "knn20": 90.0, "linear": 91.0, "seconds_per_epoch": 10.0,
           "collapsed": True, "monitor_warned": True}
    table = compare_dino_versions.table([row, {**row, "knn20": 80.0, "collapsed": False, "monitor_warned": False}])
    assert "| DINO v1 | 8 | 2 | 85.0 (80.0-90.0) | 91.0 (91.0-91.0) | 10.0 | 1 of 2 | 1 of 2 |" in table


@pytest.mark.once
def test_knn_curves_are_drawn_from_epochs_csv(tmp_path, capsys):
    for name, values in (("a", [50.0, 70.0, 80.0]), ("b", [98.0, 98.0, 98.0])):
        os.makedirs(tmp_path / name)
        rows = ["epoch,step,knn_top1"] + [f"{i + 1},{i * 10},{v}" for i, v in enumerate(values)]
        (tmp_path / name / "epochs.csv").write_text("\n".join(rows) + "\n")
    out = str(tmp_path / "curves.png")
    plot_knn_curves.main(["--out", out, "--curve", f"student={tmp_path / 'a'}:knn_top1",
                          "--curve", f"teacher={tmp_path / 'b'}:knn_top1"])
    assert os.path.getsize(out) > 1000
    with pytest.raises(SystemExit, match="no 'knn_top1_ema_student' values"):
        plot_knn_curves.main(["--out", out, "--curve", f"x={tmp_path / 'a'}:knn_top1_ema_student"])
    with pytest.raises(SystemExit, match="LABEL=RUN_DIR:COLUMN"):
        plot_knn_curves.main(["--out", out, "--curve", "nolabel"])


@pytest.mark.once
def test_inference_flags_are_read_and_checked(capsys):
    args = benchmark_inference.parse_args(["--backends", "jax,torch", "--peers", "none"])
    assert (args.backends, args.peers, args.warmup, args.device) == (["jax", "torch"], [], 3, "auto")
    with pytest.raises(SystemExit):
        benchmark_inference.parse_args(["--backends", "jax,numpy"])
    assert "--backends: unknown 'numpy'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark_inference.parse_args(["--warmup", "-1"])
    assert "--warmup must be at least 0." in capsys.readouterr().err


@pytest.mark.once
def test_train_step_flags_are_read_and_checked(capsys):
    args = benchmark_train_step.parse_args(["--model", "tiny", "--backends", "jax"])
    assert (args.prototypes, args.backends, args.warmup) == (1024, ["jax"], 1)
    with pytest.raises(SystemExit):
        benchmark_train_step.parse_args(["--backends", "none"])
    assert "nothing to run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark_train_step.parse_args(["--steps", "0"])
    assert "--steps must be at least 1." in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark_train_step.parse_args(["--rounds", "0"])
    assert "--rounds must be at least 1." in capsys.readouterr().err


@pytest.mark.once
def test_train_step_rounds_alternate_and_each_round_is_its_own_baseline(capsys, tmp_path):
    # --rounds 2: reference, torch, reference, torch; each row's ratio against its round's reference, then medians.
    ref = tmp_path / "ref"
    (ref / "dinov2").mkdir(parents=True)
    args = benchmark_train_step.parse_args(["--backends", "torch", "--rounds", "2", "--drop-path", "0",
                                            "--reference-src", str(ref)])
    runs, _ = benchmark_train_step.plan(args)
    assert [(r["kind"], r["round"]) for r in runs] == [("reference", 0), ("ours", 0), ("reference", 1), ("ours", 1)]

    def row(kind, round_, seconds, rss):
        return {"kind": kind, "backend": "torch", "drop_path": 0.0, "round": round_, "median_s": seconds,
                "peak_rss_mb": rss}

    results = [row("reference", 0, 2.0, 100.0), row("ours", 0, 4.0, 150.0), row("reference", 1, 3.0, 100.0),
               row("ours", 1, 2.0, 120.0)]
    baselines, kind = benchmark_train_step._baselines(results)
    for r in results:  # as print_report sets them
        base = baselines[benchmark_train_step._key(r)]
        r["speedup_vs_baseline"] = base["median_s"] / r["median_s"]
        r["memory_vs_baseline"] = r["peak_rss_mb"] / base["peak_rss_mb"]
    assert [r["speedup_vs_baseline"] for r in results] == [1.0, 0.5, 1.0, 1.5]
    benchmark_train_step._print_rounds(results, kind)
    assert "speed 0.50x, 1.50x -> median 1.00x; memory median 1.35x" in capsys.readouterr().out


@pytest.mark.once
def test_train_step_interleave_is_one_torch_run_and_reports_block_ratios(capsys, tmp_path):
    ref = tmp_path / "ref"
    (ref / "dinov2").mkdir(parents=True)
    with pytest.raises(SystemExit):  # both run in one PyTorch process
        benchmark_train_step.parse_args(["--backends", "jax", "--interleave", "3", "--reference-src", str(ref)])
    assert "--interleave needs --backends torch and --reference-src" in capsys.readouterr().err
    args = benchmark_train_step.parse_args(["--backends", "torch", "--interleave", "3", "--drop-path", "0.1", "0.3",
                                            "--steps", "4", "--reference-src", str(ref)])
    runs, _ = benchmark_train_step.plan(args)
    assert runs == [{"kind": "interleaved", "backend": "torch", "drop_path": 0.1, "interleave": 3}]
    blocks = [{"reference_s": r, "ours_s": o} for r, o in ((0.030, 0.032), (0.045, 0.044), (0.031, 0.031))]
    benchmark_train_step._print_interleaved(args, {"blocks": blocks, "device": "cpu"})
    out = capsys.readouterr().out
    assert "3 blocks of 4 steps" in out and "30.0/32.0, 45.0/44.0, 31.0/31.0" in out
    assert "per block: 0.938, 1.023, 1.000" in out and "median 1.000x" in out


@pytest.mark.once
def test_timing_loops_count_their_calls():
    calls, synced = [], []
    first, seconds = timing.warm_up(lambda: calls.append(1) or len(calls), 3, synced.append)
    assert len(calls) == 3 and synced == [1, 2, 3] and 0 <= first <= seconds
    assert timing.warm_up(lambda: None, 0) == (None, pytest.approx(0, abs=1e-3))
    timed = timing.time_calls(lambda: len(calls), 4)
    assert len(timed.times) == len(timed.cpu_times) == 4 and timed.output == 3
    assert sum(timed.times) <= timed.seconds
    row = timing.summary([2.0, 1.0, 4.0], [1.0, 1.0, 3.0], items=8)
    assert (row["median_s"], row["min_s"], row["median_cpu_s"], row["images_per_s"]) == (2, 1, 1, 4)


def test_step_timer_times_every_step_of_fit():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    timer = timing.step_timer()
    x, y = np.ones((8, 3), "float32"), np.zeros((8, 1), "float32")
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[timer])
    assert len(timer.times) == len(timer.cpu_times) == len(timer.intervals()) == 4
    assert timer.intervals()[0] >= timer.times[0] and timer.last_loss >= 0
    timer.reset()
    assert timer.times == [] and timer.last_loss is None


@pytest.mark.once
def test_table_pads_every_column_to_its_widest_cell(capsys):
    report.print_table(["a", "bbb"], [["xxxx", "1"], ["y", "22"]], width=12)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["-" * 12, "a     bbb", "xxxx  1  ", "y     22 ", "-" * 12]
    assert report.fmt(None, "{:.1f}") == "-" and report.fmt(2, "{:.1f}x") == "2.0x"


@pytest.mark.once
def test_header_flags_a_busy_machine(capsys):
    info = {"cpu": "cpu", "cpu_count": 2, "cpus_usable": 2, "memory_gb": 4.0, "gpus": [],
            "python": "3", "versions": {"keras": "3"}, "env": {}, "load_before": 1.5,
            "load_after": 0.1}
    report.print_header(10, "title", info, ["extra line"], own_load_included=True)
    out = capsys.readouterr().out
    assert "title\nCPU: cpu (2 logical cores, 2 usable), 4.0 GB RAM\nPython 3, keras 3\nextra line\n" in out
    assert "(this run's own load included) on 2 cores  <-- busy machine" in out


@pytest.mark.once
def test_choose_reads_a_comma_separated_subset():
    parser = cli.parser("test")
    assert cli.choose(parser, "keras-hub, jax", ["jax", "keras_hub"], "--x") == ["keras_hub", "jax"]
    assert cli.choose(parser, "none", ["jax"], "--x", none=True) == []


@pytest.mark.once
def test_worker_environment_hides_gpus_for_the_cpu():
    env = workers.worker_env("torch", "cpu", EXTRA="1")
    assert env["KERAS_BACKEND"] == "torch" and env["EXTRA"] == "1"
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["JAX_PLATFORMS"] == "cpu"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == workers.REPO_ROOT


@pytest.mark.once
def test_a_worker_reports_its_result_or_why_it_skipped(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {TOOLS!r})
        from bench.workers import Skip, worker_body

        def measure(spec):
            if spec["skip"]:
                raise Skip("no reason")
            return {{"value": spec["value"] * 2}}

        sys.exit(worker_body(sys.argv[2], measure))
    """))
    env = dict(os.environ)
    ok = workers.run_in_subprocess(str(script), {"skip": False, "value": 21}, str(tmp_path), "a",
                                   env, 60, False)
    assert ok[0]["value"] == 42 and ok[1] is None
    assert json.loads((tmp_path / "spec_a.json").read_text())["value"] == 21
    assert workers.run_in_subprocess(str(script), {"skip": True, "value": 0}, str(tmp_path), "b",
                                     env, 60, False) == (None, "no reason")


@pytest.mark.once
def test_photo_crops_are_the_same_for_the_same_seed():
    pytest.importorskip("sklearn")
    a, b = images.photo_crops(3, 20, 30), images.photo_crops(3, 20, 30)
    assert [c.shape for c in a] == [(20, 30, 3)] * 3 and a[0].dtype == np.uint8
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    stacked, what = images.source_images(2, size=16)
    assert stacked.shape == (2, 16, 16, 3) and "photographs" in what


@pytest.mark.once
def test_weighted_rate_is_total_flops_over_total_time():
    rates = {(2, 3, 4): {"xla": 10.0, "torch": None}, (4, 5, 6): {"xla": 40.0, "torch": 1.0}}
    flops = [2 * 2 * 3 * 4, 2 * 4 * 5 * 6]  # 48 and 240
    seconds = flops[0] / 10e9 + flops[1] / 40e9
    assert compute_ceiling.weighted_rate(rates, "xla") == pytest.approx(sum(flops) / seconds / 1e9)
    assert compute_ceiling.weighted_rate(rates, "torch") is None


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the tool compiles with JAX")
def test_inference_bound_counts_the_models_matrix_products(capsys):
    batch, size, patch, dim, depth, hidden = 2, 32, 4, 96, 4, 384
    results = compute_ceiling.main(["--model", "tiny", "--batch-size", str(batch), "--image-size",
                                    str(size), "--inference-only", "--repeats", "2"])
    # The products of the tiny ViT, counted by hand: patch embedding, then per block qkv,
    # the attention's two products, the projection and the MLP.
    tokens = 1 + (size // patch) ** 2
    per_block = 2 * tokens * (dim * 3 * dim + dim * dim + 2 * dim * hidden)
    per_block += 2 * 2 * tokens * tokens * dim
    products = batch * (2 * (tokens - 1) * patch * patch * 3 * dim + depth * per_block)
    flops = results["inference"]["flops"]
    # XLA also counts the elementwise work (LayerNorm, GELU, softmax): a little more.
    assert products <= flops <= 1.25 * products
    bound = results["inference"]["bounds"]["XLA"]
    assert bound["s_per_batch"] == pytest.approx(flops / (bound["gflops"] * 1e9))
    assert "images/s" in capsys.readouterr().out


@pytest.mark.once
def test_peak_rss_reset_leaves_out_the_memory_held_before_it():
    from bench import machine

    block = np.ones(256 * 2**20 // 8)  # 256 MB, touched
    before = machine.peak_rss_mb()
    del block  # a block this large is unmapped at once
    if not machine.reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs on this system")
    assert machine.peak_rss_mb() < before - 128
