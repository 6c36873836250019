"""Distributed pretraining: N replicas with global batch G give the step of one device with batch G.

Each backend's distributed run needs its own process (virtual devices are fixed before the backend starts),
so the heavy checks run in one subprocess per backend, which prints a JSON report that the tests read:

- JAX: 4 virtual CPU devices (`--xla_force_host_platform_device_count=4`), keras.distribution DataParallel
  and ModelParallel (2 x 2 mesh, kernels sharded over the `model` axis).
- TensorFlow: 2 logical CPU devices, tf.distribute.MirroredStrategy.
- PyTorch: 2 processes with the gloo backend (torch.multiprocessing).

The JAX report runs when KERAS_BACKEND=jax, and so on: each CI job covers its own backend.

Tolerance. The optimizer is the reference AdamW with epsilon raised to 1: its update is then ~lr * g, so the
weights compare the gradients themselves. With epsilon 1e-8, Adam divides float rounding noise in gradients
that are mathematically zero (e.g. the attention's key bias, whose gradient cancels exactly) by ~1e-8 and
turns 1e-10 differences of summation order into visible weight changes (~1e-5), on any two devices.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_dinov2 import distribute, losses

HERE = os.path.dirname(os.path.abspath(__file__))
BACKEND = keras.backend.backend()
IMAGES = 8          # global batch: images per step over all replicas
STATE_ATOL, STATE_RTOL = 1e-6, 1e-5
# |weights_N - weights_1| / max |update_1|, per variable: float32 summation order in gradients
# that sum many cancelling terms (the patch embedding's) moves the worst tensor by ~1e-2 of its step.
UPDATE_RTOL = 2e-2
LOSS_RTOL = 1e-5


# ---------------------------------------------------------------------------------------------------- the setup


def _config(**loss):
    import dataclasses

    from test_pretrainer import tiny_config

    from keras_dinov2.config import HeadConfig, LossConfig

    config = tiny_config(warmup_epochs=0, base_lr=0.5)
    return dataclasses.replace(
        config, batch_size=IMAGES,
        heads=HeadConfig(num_prototypes=32, hidden_dim=24, bottleneck_dim=8),
        loss=LossConfig(**loss),
    )


def _build(config=None):
    from test_pretrainer import GLOBAL, PATCH

    from keras_dinov2.backbone import DINOv2Backbone
    from keras_dinov2.pretrainer import DINOv2Pretrainer

    keras.utils.set_random_seed(0)
    backbone = DINOv2Backbone(patch_size=PATCH, hidden_dim=16, num_layers=1, num_heads=2,
                              image_size=GLOBAL, interpolation="transformers",
                              layer_scale_init=0.1)
    model = DINOv2Pretrainer(backbone, config or _config())
    model.compile()
    model.optimizer.epsilon = 1.0  # see the module docstring
    return model


def _global_batch(seed, equal_counts=True, images=IMAGES):
    """A global multi-crop batch; with equal_counts every replica (of 2 or 4) gets the same masked count."""
    from test_pretrainer import GLOBAL, LOCAL, N_LOCAL, PATCH

    rng = np.random.default_rng(seed)
    n = (GLOBAL // PATCH) ** 2
    masks = np.zeros((2 * images, n), bool)
    for i in range(0, 2 * images, 2):
        count = 3 if equal_counts else 1 + i
        masks[i, rng.choice(n, size=count, replace=False)] = True
    flat = np.flatnonzero(masks.reshape(-1))
    buffer = flat.size + 5
    indices, weights = np.zeros(buffer, "int32"), np.zeros(buffer, "float32")
    indices[: flat.size] = flat
    weights[: flat.size] = 1.0 / masks.sum(1)[flat // n]
    return {
        "global_crops": rng.normal(size=(2 * images, GLOBAL, GLOBAL, 3)).astype("float32"),
        "local_crops": rng.normal(size=(N_LOCAL * images, LOCAL, LOCAL, 3)).astype("float32"),
        "masks": masks,
        "mask_indices": indices,
        "masks_weight": weights,
        "n_masked_patches": np.int32(flat.size),
    }


def _dataset(batches):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices(
        {k: np.stack([b[k] for b in batches]) for k in batches[0]})


class _Logs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.steps = []

    def on_train_batch_end(self, batch, logs=None):
        self.steps.append({k: float(v) for k, v in logs.items()})


def _fit_steps(model, datasets, **kwargs):
    logs = _Logs()
    for data in datasets:
        model.fit(data, epochs=1, verbose=0, callbacks=[logs], **kwargs)
    return logs.steps


def _state(model):
    if hasattr(model, "jax_state_sync"):
        model.jax_state_sync()
    return [np.asarray(keras.ops.convert_to_numpy(v.value), "float64") for v in model.variables]


def _names(model):
    return [f"{i}:{v.path}" for i, v in enumerate(model.variables)]


def _assign(model, values):
    for variable, value in zip(model.variables, values):
        variable.assign(value.astype(variable.dtype))


def _compare(state, reference, initial, names=None):
    """Max absolute state difference and max relative update difference (see UPDATE_RTOL)."""
    state_abs, update_rel, bad, worst = 0.0, 0.0, 0, None
    names = names or [str(i) for i in range(len(state))]
    for x, y, x0, name in zip(state, reference, initial, names):
        if not x.size:
            continue
        state_abs = max(state_abs, float(np.abs(x - y).max()))
        bad += int(not np.allclose(x, y, rtol=STATE_RTOL, atol=STATE_ATOL))
        # The update's scale, plus a few float32 ulps of the weights (a tiny EMA step of the
        # teacher can round either way).
        scale = float(np.abs(y - x0).max()) + 1e-6 * float(np.abs(y).max())
        if scale > 0 and float(np.abs(x - y).max()) / scale > update_rel:
            update_rel, worst = float(np.abs(x - y).max()) / scale, name
    moved = max(float(np.abs(y - x0).max()) for y, x0 in zip(reference, initial) if y.size)
    return {"state_max_abs": state_abs, "update_max_rel": update_rel, "tensors_off": bad,
            "worst_update": worst, "largest_update": moved}


def _loss_diffs(steps, reference):
    keys = ("loss", "dino_local", "dino_global", "ibot", "koleo", "teacher_marginal_entropy")
    return max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-6)
               for a, b in zip(steps, reference) for k in keys)


def _sinkhorn_case(replicas):
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(6 * replicas, 8)).astype("float32") * 0.2
    valid = np.ones(6 * replicas, bool)
    for r in range(replicas):  # unequal real rows per replica: the iBOT buffer's padding
        valid[r * 6 + 1 + r: (r + 1) * 6] = False
    return logits, valid


def _single_device_references(model, batches, replicas):
    """Losses of one device on the global batch and KoLeo per replica, before any update."""
    global_logs = model.compute_dinov2_loss(batches[0], training=False, update_centers=False)[1]
    per_replica = [model.compute_dinov2_loss(part, training=False, update_centers=False)[1]
                   for part in distribute.split_batch(batches[0], replicas)]
    logits, valid = _sinkhorn_case(replicas)
    return {
        "koleo_global": float(global_logs["koleo"]),
        "koleo_replica": float(np.mean([float(p["koleo"]) for p in per_replica])),
        "sinkhorn": np.asarray(keras.ops.convert_to_numpy(
            losses.sinkhorn_knopp(logits, 0.07, valid=valid))),
    }


def _sinkhorn_report(probs, reference, logits, valid):
    k = logits.shape[1]
    mass = probs.sum(0) * k / valid.sum()  # 1 for every prototype when balanced over the global batch
    local = np.concatenate([  # what replicas without the collectives would compute
        np.asarray(keras.ops.convert_to_numpy(losses.sinkhorn_knopp(x, 0.07, valid=v)))
        for x, v in zip(np.split(logits, len(logits) // 6), np.split(valid, len(valid) // 6))])
    return {
        "sinkhorn_max_abs": float(np.abs(probs - reference).max()),
        "sinkhorn_without_collectives_max_abs": float(np.abs(local - reference).max()),
        "sinkhorn_row_sums_max_err": float(np.abs(probs[valid].sum(1) - 1).max()),
        "sinkhorn_padding_max": float(np.abs(probs[~valid]).max()),
        "sinkhorn_prototype_mass_range": [float(mass.min()), float(mass.max())],
    }


# ---------------------------------------------------------------------------------------------------- workers


def _jax_worker():
    import time

    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from keras_dinov2 import callbacks

    start = time.time()
    replicas = len(jax.devices())
    assert replicas == 4, jax.devices()
    batches = [_global_batch(0), _global_batch(1)]
    stacked = [distribute.stack_batches(distribute.split_batch(b, replicas)) for b in batches]
    report = {"devices": replicas}

    reference = _build()
    initial = _state(reference)
    single = _single_device_references(reference, batches, replicas)
    ref_steps = _fit_steps(reference, [_dataset([b]) for b in batches])
    ref_state = _state(reference)

    setup = distribute.setup("data")
    report["data_describe"] = setup.describe()
    model = _build()
    _assign(model, initial)
    report["data_replicated"] = all(
        v.value.sharding.is_fully_replicated for v in model.trainable_variables)
    # KoLeo before training: gathered (the default) and the reference's per replica.
    koleo = {}
    for scope in ("global", "replica"):
        model.config.loss.koleo_scope = scope
        koleo[scope] = float(model.compute_dinov2_loss(stacked[0], training=False,
                                                       update_centers=False)[1]["koleo"])
    model.config.loss.koleo_scope = "global"
    report["koleo"] = {"data_global": koleo["global"], "data_replica": koleo["replica"],
                       "single_global": single["koleo_global"],
                       "single_mean_of_replicas": single["koleo_replica"]}
    steps = _fit_steps(model, [_dataset([b]) for b in stacked])
    report["data_loss_max_rel"] = _loss_diffs(steps, ref_steps)
    report["data"] = _compare(_state(model), ref_state, initial, _names(model))

    # Sinkhorn-Knopp on rows sharded over the 4 devices, inside one jitted program.
    logits, valid = _sinkhorn_case(replicas)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
    rows = NamedSharding(mesh, PartitionSpec("batch"))
    probs = jax.jit(lambda x, v: losses.sinkhorn_knopp(x, 0.07, valid=v))(
        jax.device_put(logits, rows), jax.device_put(valid, rows))
    report.update(_sinkhorn_report(np.asarray(probs), single["sinkhorn"], logits, valid))

    setup = distribute.setup("model", model_axis_size=2)
    report["model_describe"] = setup.describe()
    model = _build()
    _assign(model, initial)
    sharded = {}
    for v in model.trainable_variables + model.non_trainable_variables:
        spec = tuple(v.value.sharding.spec)
        if "model" in spec:
            shard = v.value.addressable_shards[0].data.shape
            sharded[v.path] = {"spec": [str(a) for a in spec], "shape": list(v.shape),
                               "shard": list(shard)}
    report["model_sharded"] = sharded
    first = _fit_steps(model, [_dataset([stacked[0]])])
    checkpoint = os.path.join(os.environ["DISTRIBUTE_TEST_DIR"], "checkpoint-00001.npz")
    callbacks.save_checkpoint(model, checkpoint, {"epoch": 1})
    second = _fit_steps(model, [_dataset([stacked[1]])])
    report["model_loss_max_rel"] = _loss_diffs(first + second, ref_steps)
    report["model_vs_data_loss_max_rel"] = _loss_diffs(first + second, steps)
    straight = _state(model)
    report["model"] = _compare(straight, ref_state, initial, _names(model))
    # Resume: restore the checkpoint into the sharded model and take the second step again.
    _assign(model, initial)
    callbacks.load_checkpoint(model, checkpoint)
    report["resume_sharding_kept"] = all(
        "model" in tuple(v.value.sharding.spec) for v in model.trainable_variables
        if v.path in sharded)
    again = _fit_steps(model, [_dataset([stacked[1]])])
    report["resume_loss_max_rel"] = _loss_diffs(again, second)
    report["resume"] = _compare(_state(model), straight, initial)
    report["seconds"] = time.time() - start
    return report


def _tf_worker():
    import time

    import tensorflow as tf

    start = time.time()
    replicas = 2
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    batches = [_global_batch(0), _global_batch(1)]
    splits = [distribute.split_batch(b, replicas) for b in batches]
    report = {"devices": replicas}

    reference = _build()
    initial = _state(reference)
    single = _single_device_references(reference, batches, replicas)
    ref_steps = _fit_steps(reference, [_dataset([b]) for b in batches])
    ref_state = _state(reference)

    setup = distribute.setup("data")
    report["data_describe"] = setup.describe()
    strategy = setup.strategy
    with setup.scope():
        model = _build()
    _assign(model, initial)

    def per_replica(values):
        return strategy.experimental_distribute_values_from_function(
            lambda context: values[context.replica_id_in_sync_group])

    def koleo_step(data):
        reduction = distribute.replica_reduction()
        return model.compute_dinov2_loss(data, training=False, update_centers=False,
                                         reduction=reduction)[1]["koleo"]

    koleo = {}
    for scope in ("global", "replica"):
        model.config.loss.koleo_scope = scope
        data = per_replica([{k: tf.constant(v) for k, v in part.items()} for part in splits[0]])
        out = strategy.experimental_local_results(strategy.run(tf.function(koleo_step),
                                                               args=(data,)))
        koleo[scope] = float(np.mean([float(x) for x in out]))
    model.config.loss.koleo_scope = "global"
    report["koleo"] = {"data_global": koleo["global"], "data_replica": koleo["replica"],
                       "single_global": single["koleo_global"],
                       "single_mean_of_replicas": single["koleo_replica"]}

    def data_fn(context):
        shards = [_dataset([split[j] for split in splits]) for j in range(replicas)]
        return tf.data.Dataset.choose_from_datasets(shards, tf.data.Dataset.range(replicas).repeat())

    steps = _fit_steps(model, [strategy.distribute_datasets_from_function(data_fn)],
                       steps_per_epoch=2)
    report["data_loss_max_rel"] = _loss_diffs(steps, ref_steps)
    report["data"] = _compare(_state(model), ref_state, initial, _names(model))

    logits, valid = _sinkhorn_case(replicas)

    def sinkhorn_step(x, v):
        return losses.sinkhorn_knopp(x, 0.07, valid=v, reduction=distribute.replica_reduction())

    out = strategy.run(tf.function(sinkhorn_step), args=(
        per_replica(np.split(logits, replicas)), per_replica(np.split(valid, replicas))))
    probs = np.concatenate([x.numpy() for x in strategy.experimental_local_results(out)])
    report.update(_sinkhorn_report(probs, single["sinkhorn"], logits, valid))
    report["seconds"] = time.time() - start
    return report


def _torch_rank(rank, world, port, folder):
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from keras_dinov2 import callbacks

    setup = distribute.setup("auto")
    assert setup.mode == "data" and setup.num_replicas == world, setup
    model = setup.prepare(_build())
    batches = [_global_batch(0), _global_batch(1)]
    mine = [distribute.split_batch(b, world)[rank] for b in batches]
    report = {"describe": setup.describe()}

    koleo = {}
    for scope in ("global", "replica"):
        model.config.loss.koleo_scope = scope
        logs = model.test_step(mine[0])  # this rank's batch; logs averaged over ranks
        koleo[scope] = float(logs["koleo"])
    model.config.loss.koleo_scope = "global"
    report["koleo"] = koleo

    first = _fit_steps(model, [_dataset([mine[0]])])
    checkpoint = os.path.join(folder, "checkpoint-00001.npz")
    callbacks.save_checkpoint(model, checkpoint, {"epoch": 1})
    # Rank 0 writes; the others skip the file (here: a folder only rank 1 would create).
    callbacks.save_checkpoint(model, os.path.join(folder, f"rank{rank}", "c.npz"))
    second = _fit_steps(model, [_dataset([mine[1]])])
    straight = _state(model)
    report["steps"] = first + second
    report["state"] = [x.tolist() for x in straight]
    torch.distributed.barrier()
    callbacks.load_checkpoint(model, checkpoint)
    again = _fit_steps(model, [_dataset([mine[1]])])
    report["resume_loss_max_rel"] = _loss_diffs(again, second)
    report["resume"] = _compare(_state(model), straight, straight)

    logits, valid = _sinkhorn_case(world)
    probs = losses.sinkhorn_knopp(np.split(logits, world)[rank], 0.07,
                                  valid=np.split(valid, world)[rank],
                                  reduction=distribute.replica_reduction())
    parts = [torch.empty_like(probs) for _ in range(world)]
    torch.distributed.all_gather(parts, probs.contiguous())
    report["sinkhorn"] = torch.cat(parts).cpu().numpy().tolist()
    report["rank1_file_exists"] = os.path.exists(os.path.join(folder, "rank1", "c.npz"))
    report["rank0_file_exists"] = os.path.exists(os.path.join(folder, "rank0", "c.npz"))
    torch.distributed.barrier()
    if rank == 0:
        with open(os.path.join(folder, "rank0.json"), "w") as f:
            json.dump(report, f)
    torch.distributed.destroy_process_group()


def _torch_worker():
    import socket
    import time

    import torch.multiprocessing as mp

    start = time.time()
    world = 2
    folder = os.environ["DISTRIBUTE_TEST_DIR"]
    batches = [_global_batch(0), _global_batch(1)]
    reference = _build()
    initial = _state(reference)
    single = _single_device_references(reference, batches, world)
    ref_steps = _fit_steps(reference, [_dataset([b]) for b in batches])
    ref_state = _state(reference)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_torch_rank, args=(world, port, folder), nprocs=world, join=True)
    with open(os.path.join(folder, "rank0.json")) as f:
        ranks = json.load(f)
    state = [np.asarray(x, "float64") for x in ranks["state"]]
    logits, valid = _sinkhorn_case(world)
    report = {
        "devices": world,
        "data_describe": ranks["describe"],
        "data_loss_max_rel": _loss_diffs(ranks["steps"], ref_steps),
        "data": _compare(state, ref_state, initial, _names(reference)),
        "koleo": {"data_global": ranks["koleo"]["global"],
                  "data_replica": ranks["koleo"]["replica"],
                  "single_global": single["koleo_global"],
                  "single_mean_of_replicas": single["koleo_replica"]},
        "resume_loss_max_rel": ranks["resume_loss_max_rel"],
        "resume": ranks["resume"],
        "rank0_wrote": ranks["rank0_file_exists"],
        "rank1_wrote": ranks["rank1_file_exists"],
    }
    report.update(_sinkhorn_report(np.asarray(ranks["sinkhorn"]), single["sinkhorn"], logits,
                                   valid))
    report["seconds"] = time.time() - start
    return report


WORKERS = {"jax": _jax_worker, "tensorflow": _tf_worker, "torch": _torch_worker}


# ---------------------------------------------------------------------------------------------------- runner


def _run_worker(backend, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp(f"distribute_{backend}"))
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3",
           "DISTRIBUTE_TEST_DIR": folder}
    if backend == "jax":
        # Optimization level 0: the tiny step compiles 3x faster; every run shares the flags.
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
                            " --xla_backend_optimization_level=0")
        env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, os.path.abspath(__file__), backend], env=env, cwd=HERE,
                         capture_output=True, text=True, timeout=600)
    lines = [x for x in out.stdout.splitlines() if x.startswith("REPORT ")]
    assert out.returncode == 0 and lines, (out.stdout[-3000:], out.stderr[-6000:])
    report = json.loads(lines[-1][len("REPORT "):])
    print(json.dumps(report, indent=1))
    return report


def _only(backend):
    return pytest.mark.skipif(
        BACKEND != backend,
        reason=f"distributed {backend} run: covered by the KERAS_BACKEND={backend} job")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return _run_worker(BACKEND, tmp_path_factory)


DISTRIBUTED = pytest.mark.parametrize("backend", [
    pytest.param(b, marks=_only(b)) for b in ("jax", "tensorflow", "torch")])


@DISTRIBUTED
def test_n_replicas_match_one_device_with_the_global_batch(backend, report):
    assert report["data_loss_max_rel"] < LOSS_RTOL, report
    assert report["data"]["tensors_off"] == 0, report["data"]
    assert report["data"]["state_max_abs"] < STATE_ATOL, report["data"]
    assert report["data"]["update_max_rel"] < UPDATE_RTOL, report["data"]
    assert report["data"]["largest_update"] > 1e-3, report["data"]  # the step moved the weights


@DISTRIBUTED
def test_koleo_gathers_by_default_and_keeps_the_per_replica_option(backend, report):
    koleo = report["koleo"]
    np.testing.assert_allclose(koleo["data_global"], koleo["single_global"], rtol=1e-5)
    np.testing.assert_allclose(koleo["data_replica"], koleo["single_mean_of_replicas"], rtol=1e-5)
    # Fewer candidate neighbours per replica: the two differ.
    assert abs(koleo["data_global"] - koleo["data_replica"]) > 1e-3, koleo


@DISTRIBUTED
def test_sinkhorn_marginals_are_over_the_global_batch(backend, report):
    assert report["sinkhorn_max_abs"] < 1e-6, report
    assert report["sinkhorn_without_collectives_max_abs"] > 1e-3, report
    assert report["sinkhorn_row_sums_max_err"] < 1e-5 and report["sinkhorn_padding_max"] == 0
    low, high = report["sinkhorn_prototype_mass_range"]
    assert 0.5 < low <= high < 1.5, report  # close to balanced after 3 iterations


@pytest.mark.parametrize("backend", [pytest.param("jax", marks=_only("jax"))])
def test_jax_model_parallel_shards_large_kernels_and_matches_data_parallel(backend, report):
    sharded = report["model_sharded"]
    for name in ("block_0/attn/qkv/kernel", "block_0/attn/proj/kernel", "block_0/mlp/fc1/kernel",
                 "block_0/mlp/fc2/kernel", "student_dino_head/mlp_0/kernel",
                 "student_dino_head/last_layer/weight_v",
                 "embeddings/patch_embedding/projection/kernel"):
        assert name in sharded, sorted(sharded)
        entry = sharded[name]
        axis = entry["spec"].index("model")
        assert entry["shard"][axis] * 2 == entry["shape"][axis], entry
    assert report["data_replicated"]
    assert report["model_vs_data_loss_max_rel"] < LOSS_RTOL, report
    assert report["model_loss_max_rel"] < LOSS_RTOL, report
    assert report["model"]["tensors_off"] == 0, report["model"]
    assert report["model"]["update_max_rel"] < UPDATE_RTOL, report["model"]


@pytest.mark.parametrize("backend", [pytest.param("jax", marks=_only("jax")),
                                     pytest.param("torch", marks=_only("torch"))])
def test_distributed_run_resumes_from_its_checkpoint(backend, report):
    assert report["resume_loss_max_rel"] < LOSS_RTOL, report
    assert report["resume"]["tensors_off"] == 0, report["resume"]
    if backend == "jax":
        assert report["resume_sharding_kept"]
    else:
        assert report["rank0_wrote"] and not report["rank1_wrote"], report


# ---------------------------------------------------------------------------------------------------- in process


def test_split_and_stack_keep_every_image_and_masked_patch():
    batch = _global_batch(3, equal_counts=False)
    parts = distribute.split_batch(batch, 4)
    n = batch["masks"].shape[1]
    assert [int(p["n_masked_patches"]) for p in parts] == [
        int(p["masks"].sum()) for p in parts]
    assert sum(int(p["n_masked_patches"]) for p in parts) == int(batch["n_masked_patches"])
    for r, part in enumerate(parts):
        real = part["masks_weight"] > 0
        # Every real entry points at a masked patch of this replica's own crops.
        assert part["masks"].reshape(-1)[part["mask_indices"][real]].all()
        counts = part["masks"].sum(1)[part["mask_indices"][real] // n]
        np.testing.assert_allclose(part["masks_weight"][real], 1.0 / counts)
        np.testing.assert_array_equal(part["global_crops"][:2], batch["global_crops"][2 * r:2 * r + 2])
    stacked = distribute.stack_batches(parts)
    assert stacked["n_masked_patches"].shape == (4,)
    assert stacked["global_crops"].shape == batch["global_crops"].shape
    assert distribute.replica_count(stacked) == 4 and distribute.replica_count(batch) == 1
    with pytest.raises(ValueError, match="num_replicas"):
        distribute.split_batch(batch, 3)


@pytest.mark.skipif(BACKEND == "jax", reason="the jax distributed run trains on stacked batches")
def test_a_stacked_batch_gives_the_loss_of_the_global_batch():
    """The layout a JAX program receives (replicas stacked) is read as the global batch, on any backend."""
    batch = _global_batch(4)
    stacked = distribute.stack_batches(distribute.split_batch(batch, 2))
    model = _build()
    initial = _state(model)
    _, logs = model.compute_dinov2_loss(batch, training=False)
    centers = [keras.ops.convert_to_numpy(c) for c in (model.dino_center, model.ibot_center)]
    _assign(model, initial)
    _, stacked_logs = model.compute_dinov2_loss(stacked, training=False)
    for key in ("loss", "dino_local", "dino_global", "ibot", "koleo", "teacher_entropy",
                "teacher_marginal_entropy"):
        np.testing.assert_allclose(float(stacked_logs[key]), float(logs[key]), rtol=1e-5,
                                   err_msg=key)
    for c, variable in zip(centers, (model.dino_center, model.ibot_center)):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(variable), c, rtol=1e-5, atol=1e-7)


def test_grouped_koleo_is_the_mean_of_each_groups_koleo():
    x = np.random.default_rng(0).normal(size=(12, 5)).astype("float32")
    grouped = float(losses.koleo(x, groups=3))
    separate = np.mean([float(losses.koleo(part)) for part in np.split(x, 3)])
    np.testing.assert_allclose(grouped, separate, rtol=1e-5)
    assert abs(grouped - float(losses.koleo(x))) > 1e-3
    with pytest.raises(ValueError, match="groups"):
        losses.koleo(x, groups=5)


def test_setup_on_one_device_and_bad_arguments():
    setup = distribute.setup("none")
    assert setup.mode == "none" and setup.num_replicas == 1 and setup.is_chief
    assert setup.global_batch_size(32) == 32
    with pytest.raises(ValueError, match="mode"):
        distribute.setup("pipeline")
    if BACKEND != "jax":
        with pytest.raises(ValueError, match="JAX"):
            distribute.setup("model")
    if BACKEND == "jax":
        keras.distribution.set_distribution(None)


def test_koleo_scope_is_validated():
    from keras_dinov2.config import LossConfig

    assert LossConfig().koleo_scope == "global"
    with pytest.raises(ValueError, match="koleo_scope"):
        LossConfig(koleo_scope="local")


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    result = WORKERS[sys.argv[1]]()
    print("REPORT " + json.dumps(result))
