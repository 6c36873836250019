"""Distributed pretraining: N replicas with global batch G give the step of one device with batch G.

Each backend's distributed run needs its own process (virtual devices are fixed before the backend starts),
so the heavy checks run in one subprocess per backend, which prints a JSON report that the tests read:

- JAX: 4 virtual CPU devices (`--xla_force_host_platform_device_count=4`), keras.distribution DataParallel
  and ModelParallel (2 x 2 mesh, kernels sharded over the `model` axis).
- TensorFlow: 2 logical CPU devices, tf.distribute.MirroredStrategy.
- PyTorch: 2 processes with the gloo backend (torch.multiprocessing).

The JAX report runs when KERAS_BACKEND=jax, and so on: each CI job covers its own backend.

The batches are real: the first two batches of 8 images of `multicrop_dataset("digits", seed=0)` with the
digits recipe's crops and masks, split with `distributed_helpers.split_batch`. Their masked-patch counts
differ between replicas (some images have no masked patch at all), as in a run. Two recipes: the digits recipe
(Sinkhorn-Knopp, batch-norm heads, shared head) and the reference's defaults (centering, no batch norm,
shared head) with small heads; the in-process stacked-batch test adds the digits recipe with centering and
a separate iBOT head. Stochastic depth is off in these comparisons: on TensorFlow and torch every replica
draws its own pattern (as it must; the randomness test checks it), which no single-device draw reproduces.

The backbone is the tiny preset shrunk to one block of width 16 (the cost is compile time), with LayerScale
1 and a position table of std 0.02 whatever the recipe. At the recipes' own initializations the CLS tokens
of different images are nearly equal (nearest-neighbour distances ~1e-4 for the digits recipe, whose std-1
position table dominates every token, ~1e-7 with the reference's LayerScale 1e-5), so KoLeo's distances and
gradient are float32 rounding there: one device alone, fed the same batch with its images in reverse order,
moves KoLeo by 5e-3 to 8e-3 and some weights after two steps by 10% to 25% of their update. That is the
objective at initialization, on any number of devices; here the tokens are ~3e-2 apart.

Tolerance. The losses of both steps agree to LOSS_RTOL (1e-5) relative (the entropy diagnostics relative to
at least 1 nat: they reach ~1e-4 when the targets collapse). The optimizer is the reference AdamW with
epsilon raised to 1: its update is then ~lr * g, so the weights compare the gradients themselves. With
epsilon 1e-8, Adam divides float rounding noise in gradients that are mathematically zero (e.g. the
attention's key bias, or a head bias right before batch norm) by ~1e-8 and turns 1e-10 differences of
summation order into visible weight changes, on any two devices. After two steps every weight agrees to
STATE_RTOL / STATE_ATOL, and the worst difference of any tensor is below UPDATE_RTOL of that tensor's own
update: N replicas sum the same terms in another order (per-replica partial sums, then the all-reduce). The
measured differences (losses <= 1e-6 relative, weights <= 2e-7, updates <= 1e-3 relative on every backend)
are those of one device fed the batch in reverse order (2e-7, 2e-7, 5e-4 on torch), and the bounds leave at
least 5x that for float32 rounding. Before the fixes of the heads' batch norm (per-replica statistics) and
of the iBOT center (mean of the replicas' means) the digits recipe missed them by orders of magnitude (2e-2
to 4e-2 in the losses, 0.9 of an update) and the reference recipe (~1e-4 in the losses, ~4% of an update).
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from distributed_helpers import FakeCluster, split_batch

from keras_dinov2 import distribute, losses

HERE = os.path.dirname(os.path.abspath(__file__))
BACKEND = keras.backend.backend()
IMAGES = 8          # global batch: images per step over all replicas
RECIPES = ("digits", "reference")  # the distributed runs; "digits_centering" in process
STATE_ATOL, STATE_RTOL = 1e-6, 1e-5
# |weights_N - weights_1| / max |update_1|, per variable (see the module docstring).
UPDATE_RTOL = 2e-2
LOSS_RTOL = 1e-5
LOSS_KEYS = ("loss", "dino_local", "dino_global", "ibot", "koleo", "teacher_entropy",
             "teacher_marginal_entropy")


# ---------------------------------------------------------------------------------------------------- the setup


def _recipe(name):
    import dataclasses

    from keras_dinov2.config import HeadConfig, SSLConfig

    digits = SSLConfig.recipe("digits")
    config = SSLConfig.recipe("reference_default" if name == "reference" else "digits")
    heads, loss = config.heads, config.loss
    if name == "digits_centering":
        loss = dataclasses.replace(loss, centering="centering")
        heads = dataclasses.replace(heads, ibot_separate_head=True, ibot_num_prototypes=64,
                                    ibot_bottleneck_dim=32)
    elif name == "reference":
        heads = HeadConfig(num_prototypes=64, hidden_dim=32, bottleneck_dim=16)
    # The weights must move in both steps: no warmup from lr 0, no frozen last layer.
    optim = dataclasses.replace(config.optim, warmup_epochs=0, base_lr=0.5,
                                freeze_last_layer_epochs=0)
    model = dataclasses.replace(digits.model, drop_path_rate=0.0)
    return dataclasses.replace(config, batch_size=IMAGES, heads=heads, loss=loss, optim=optim,
                               data=digits.data, model=model)


def _build(name="digits"):
    from keras_dinov2.backbone import DINOv2Backbone
    from keras_dinov2.pretrainer import DINOv2Pretrainer

    config = _recipe(name)
    keras.utils.set_random_seed(0)
    # LayerScale 1 and position table std 0.02 whatever the recipe: see the module docstring.
    backbone = DINOv2Backbone.from_preset(
        "dinov2_vit_tiny4", load_weights=False, hidden_dim=16, num_layers=1, num_heads=2,
        image_size=config.data.crops.global_crops_size, drop_path_rate=0.0,
        layer_scale_init=1.0, position_embedding_init_std=0.02)
    model = DINOv2Pretrainer(backbone, config)
    # IMAGES is the global batch, whether one device or the replicas hold it (compile's default
    # would multiply config.batch_size by the replicas of the active distribution).
    model.compile(global_batch_size=IMAGES)
    model.optimizer.epsilon = 1.0  # see the module docstring
    return model


def _real_batches():
    """The first two batches of the digits pipeline (cached in the test folder for the torch ranks)."""
    folder = os.environ.get("DISTRIBUTE_TEST_DIR")
    path = folder and os.path.join(folder, "batches.npz")
    if path and os.path.exists(path):
        data = np.load(path)
        return [{k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(f"{i}/")}
                for i in range(2)]
    from keras_dinov2.config import SSLConfig
    from keras_dinov2.data import multicrop_dataset

    ds = multicrop_dataset("digits", batch_size=IMAGES, seed=0,
                           config=SSLConfig.recipe("digits"))
    batches = [{k: np.asarray(v) for k, v in b.items()} for b in ds.take(2).as_numpy_iterator()]
    if path:
        np.savez(path, **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()})
    return batches


def _global_batch(seed, equal_counts=True, images=IMAGES):
    """A synthetic global batch (for the split / stack checks); with equal_counts every replica (of 2 or
    4) gets the same masked count."""
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


def _mask_counts(batches, replicas):
    return [[int(p["n_masked_patches"]) for p in split_batch(b, replicas)]
            for b in batches]


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
    state_abs, update_rel, bad, worst, off = 0.0, 0.0, 0, None, {}
    names = names or [str(i) for i in range(len(state))]
    moved = max(float(np.abs(y - x0).max()) for y, x0 in zip(reference, initial) if y.size)
    for x, y, x0, name in zip(state, reference, initial, names):
        if not x.size or "seed_generator" in name:
            continue
        state_abs = max(state_abs, float(np.abs(x - y).max()))
        if not np.allclose(x, y, rtol=STATE_RTOL, atol=STATE_ATOL):
            bad += 1
            off[name] = [float(np.abs(x - y).max()), float(np.abs(y - x0).max())]
        # The update's scale, plus a few float32 ulps of the weights (a tiny EMA step of the
        # teacher can round either way), and at least 1e-3 of the step's largest update: a
        # gradient that is mathematically 0 (a bias right before batch norm) is rounding
        # noise, which must not be measured against itself.
        scale = (float(np.abs(y - x0).max()) + 1e-6 * float(np.abs(y).max())
                 + 1e-3 * moved)
        if scale > 0 and float(np.abs(x - y).max()) / scale > update_rel:
            update_rel, worst = float(np.abs(x - y).max()) / scale, name
    return {"state_max_abs": state_abs, "update_max_rel": update_rel, "tensors_off": bad,
            "worst_update": worst, "largest_update": moved, "off": off}


def _relative(a, b, key):
    # The entropies (nats, at most log K) go to ~0 when the targets collapse, where their
    # float32 rounding is all that is left: compared relative to at least 1 nat.
    return abs(a - b) / max(abs(b), 1.0 if key.endswith("entropy") else 1e-6)


def _loss_diffs(steps, reference):
    return max(_relative(a[k], b[k], k) for a, b in zip(steps, reference) for k in LOSS_KEYS)


def _single_device_runs(batches):
    """Per recipe: initial weights, the two steps' logs and final weights of one device."""
    runs = {}
    for name in RECIPES:
        model = _build(name)
        initial = _state(model)
        steps = _fit_steps(model, [_dataset([b]) for b in batches])
        runs[name] = {"initial": initial, "steps": steps, "state": _state(model),
                      "names": _names(model)}
    return runs


def _recipe_report(steps, state, single):
    by_key = {k: [_relative(a[k], b[k], k) for a, b in zip(steps, single["steps"])]
              for k in LOSS_KEYS}
    return {"loss_max_rel": _loss_diffs(steps, single["steps"]), "steps": len(steps),
            "loss_rel_by_key": by_key,
            **_compare(state, single["state"], single["initial"], single["names"])}


class _Clock:
    """Records the CPU seconds of each phase of a worker in its report (`cpu_seconds`)."""

    def __init__(self, report):
        import time

        self.report = report.setdefault("cpu_seconds", {})
        self.last = time.process_time()

    def __call__(self, phase):
        import time

        now = time.process_time()
        self.report[phase] = round(now - self.last, 1)
        self.last = now


def _sinkhorn_case(replicas):
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(6 * replicas, 8)).astype("float32") * 0.2
    valid = np.ones(6 * replicas, bool)
    for r in range(replicas):  # unequal real rows per replica: the iBOT buffer's padding
        valid[r * 6 + 1 + r: (r + 1) * 6] = False
    return logits, valid


def _np_koleo(x, eps=1e-8):
    """KoLeo in NumPy (float64), as `losses.koleo`: -mean log(|x - nearest + eps| + eps)."""
    x = np.asarray(x, "float64")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)
    dots = x @ x.T
    np.fill_diagonal(dots, -2.0)
    return float(-np.mean(np.log(np.linalg.norm(x - x[dots.argmax(1)] + eps, axis=1) + eps)))


def _np_koleo_terms(cls, replicas):
    """KoLeo of the two global crops' CLS rows (2B, D): over the global batch, and the mean over
    replicas of each replica's own (b consecutive images of each crop)."""
    crops = np.split(np.asarray(cls), 2)
    return {"global": sum(_np_koleo(c) for c in crops),
            "replica": sum(np.mean([_np_koleo(p) for p in np.split(c, replicas)]) for c in crops)}


def _student_cls(model, batch):
    out = model.student({"images": batch["global_crops"], "masks": batch["masks"]})
    return np.asarray(keras.ops.convert_to_numpy(out["cls_token"]))


def _single_device_references(batches, replicas):
    """KoLeo (NumPy, on one device's CLS tokens) and Sinkhorn-Knopp of one device, before any update."""
    logits, valid = _sinkhorn_case(replicas)
    return {
        "koleo": _np_koleo_terms(_student_cls(_build("digits"), batches[0]), replicas),
        "sinkhorn": np.asarray(keras.ops.convert_to_numpy(
            losses.sinkhorn_knopp(logits, 0.07, valid=valid))),
    }


def _koleo_report(single, runs, data_steps, data_replica=None):
    """The first step's KoLeo (default scope: gathered) of N replicas and of one device, the NumPy
    values, and the per-replica scope's value where the worker measured it."""
    report = {"data_global": data_steps[0]["koleo"],
              "single_global": runs["digits"]["steps"][0]["koleo"],
              "numpy_global": single["koleo"]["global"],
              "numpy_mean_of_replicas": single["koleo"]["replica"]}
    if data_replica is not None:
        report["data_replica"] = data_replica
    return report


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


# Stochastic depth per replica: every replica gets the same PER_REPLICA copies of one image, so its
# outputs differ only by which samples each block dropped.
PER_REPLICA = 4


def _drop_path_backbone(subset):
    from keras_dinov2.backbone import DINOv2Backbone

    keras.utils.set_random_seed(0)  # the same generator seeds in every process
    return DINOv2Backbone(patch_size=4, hidden_dim=16, num_layers=2, num_heads=2, image_size=8,
                          layer_scale_init=1.0, drop_path_rate=0.5, drop_path_uniform=True,
                          subset_drop_path=subset)


def _same_images():
    image = np.random.default_rng(5).normal(size=(1, 8, 8, 3)).astype("float32")
    return np.repeat(image, PER_REPLICA, axis=0)


def _drop_path_report(outputs):
    """outputs: {form: [per-replica (PER_REPLICA, D) outputs]} -> the smallest difference between
    two replicas' outputs and the largest within one replica (both > 0: each replica draws, and
    draws its own)."""
    report = {}
    for form, parts in outputs.items():
        parts = [np.asarray(p, "float64") for p in parts]
        across = min(float(np.abs(parts[r] - parts[s]).max())
                     for r in range(len(parts)) for s in range(r))
        within = max(float(np.abs(p - p[:1]).max()) for p in parts)
        report[form] = {"replicas": len(parts), "min_across_replicas": across,
                        "max_within_replica": within}
    return report


# ---------------------------------------------------------------------------------------------------- workers


def _jax_worker():
    import time

    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from keras_dinov2.run import load_checkpoint, save_checkpoint

    start = time.time()
    replicas = len(jax.devices())
    assert replicas == 4, jax.devices()
    batches = _real_batches()
    stacked = [distribute.stack_batches(split_batch(b, replicas)) for b in batches]
    report = {"devices": replicas, "mask_counts": _mask_counts(batches, replicas)}

    cpu = _Clock(report)
    single = _single_device_references(batches, replicas)
    cpu("references")
    runs = _single_device_runs(batches)
    cpu("single_device_runs")

    setup = distribute.setup("data")
    report["data_describe"] = setup.describe()
    for name in RECIPES:
        model = _build(name)
        _assign(model, runs[name]["initial"])
        if name == "digits":
            report["data_replicated"] = all(
                v.value.sharding.is_fully_replicated for v in model.trainable_variables)
        steps = _fit_steps(model, [_dataset([b]) for b in stacked])
        report[name] = _recipe_report(steps, _state(model), runs[name])
        if name == "digits":
            # The per-replica scope of a JAX program: see the in-process stacked-batch test.
            report["koleo"] = _koleo_report(single, runs, steps)
        cpu(f"data_{name}")

    # Stochastic depth: one program over the global batch of every replica's images.
    outputs = {}
    for form, subset in (("per_sample", False), ("subset", True)):
        backbone = _drop_path_backbone(subset)
        x = np.concatenate([_same_images()] * replicas)
        out = keras.ops.convert_to_numpy(backbone({"images": x}, training=True)["cls_token"])
        outputs[form] = np.split(np.asarray(out), replicas)
    report["drop_path"] = _drop_path_report(outputs)
    cpu("drop_path")

    # Sinkhorn-Knopp on rows sharded over the 4 devices, inside one jitted program.
    logits, valid = _sinkhorn_case(replicas)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
    rows = NamedSharding(mesh, PartitionSpec("batch"))
    probs = jax.jit(lambda x, v: losses.sinkhorn_knopp(x, 0.07, valid=v))(
        jax.device_put(logits, rows), jax.device_put(valid, rows))
    report.update(_sinkhorn_report(np.asarray(probs), single["sinkhorn"], logits, valid))

    setup = distribute.setup("model", model_axis_size=2)
    report["model_describe"] = setup.describe()
    model = _build("digits")
    _assign(model, runs["digits"]["initial"])
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
    save_checkpoint(model, checkpoint, {"epoch": 1})
    second = _fit_steps(model, [_dataset([stacked[1]])])
    report["model_loss_max_rel"] = _loss_diffs(first + second, runs["digits"]["steps"])
    straight = _state(model)
    report["model"] = _compare(straight, runs["digits"]["state"], runs["digits"]["initial"],
                               _names(model))
    # Resume: restore the checkpoint into the sharded model and take the second step again.
    _assign(model, runs["digits"]["initial"])
    load_checkpoint(model, checkpoint)
    report["resume_sharding_kept"] = all(
        "model" in tuple(v.value.sharding.spec) for v in model.trainable_variables
        if v.path in sharded)
    again = _fit_steps(model, [_dataset([stacked[1]])])
    report["resume_loss_max_rel"] = _loss_diffs(again, second)
    report["resume"] = _compare(_state(model), straight, runs["digits"]["initial"])
    cpu("model_parallel_and_resume")
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
    batches = _real_batches()
    splits = [split_batch(b, replicas) for b in batches]
    report = {"devices": replicas, "mask_counts": _mask_counts(batches, replicas)}

    cpu = _Clock(report)
    single = _single_device_references(batches, replicas)
    cpu("references")
    runs = _single_device_runs(batches)
    cpu("single_device_runs")

    setup = distribute.setup("data")
    report["data_describe"] = setup.describe()
    strategy = setup.strategy

    def per_replica(values):
        return strategy.experimental_distribute_values_from_function(
            lambda context: values[context.replica_id_in_sync_group])

    def data_fn(context):
        shards = [_dataset([split[j] for split in splits]) for j in range(replicas)]
        return tf.data.Dataset.choose_from_datasets(shards, tf.data.Dataset.range(replicas).repeat())

    for name in RECIPES:
        with setup.scope():
            model = _build(name)
        _assign(model, runs[name]["initial"])
        steps = _fit_steps(model, [strategy.distribute_datasets_from_function(data_fn)],
                           steps_per_epoch=2)
        report[name] = _recipe_report(steps, _state(model), runs[name])
        if name == "digits":
            # The per-replica scope is each replica's own rows (no collective): torch checks it.
            report["koleo"] = _koleo_report(single, runs, steps)
        cpu(f"data_{name}")

    # Stochastic depth: every replica gets the same images; the generators are mirrored.
    outputs = {}
    for form, subset in (("per_sample", False), ("subset", True)):
        with setup.scope():
            backbone = _drop_path_backbone(subset)
        forward = tf.function(lambda x, b=backbone: b({"images": x}, training=True)["cls_token"])
        out = strategy.run(forward, args=(per_replica([_same_images()] * replicas),))
        outputs[form] = [x.numpy() for x in strategy.experimental_local_results(out)]
    report["drop_path"] = _drop_path_report(outputs)
    cpu("drop_path")

    logits, valid = _sinkhorn_case(replicas)

    def sinkhorn_step(x, v):
        return losses.sinkhorn_knopp(x, 0.07, valid=v, reduction=distribute.replica_reduction())

    out = strategy.run(tf.function(sinkhorn_step), args=(
        per_replica(np.split(logits, replicas)), per_replica(np.split(valid, replicas))))
    probs = np.concatenate([x.numpy() for x in strategy.experimental_local_results(out)])
    report.update(_sinkhorn_report(probs, single["sinkhorn"], logits, valid))
    report["seconds"] = time.time() - start
    return report


def _torch_gather(x):
    import torch

    x = torch.as_tensor(keras.ops.convert_to_numpy(x)).contiguous()
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, x)
    return [p.numpy() for p in parts]


def _torch_rank(rank, world, port, folder):
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from keras_dinov2.run import load_checkpoint, save_checkpoint

    setup = distribute.setup("auto")
    assert setup.mode == "data" and setup.num_replicas == world, setup
    batches = _real_batches()
    mine = [split_batch(b, world)[rank] for b in batches]
    report = {"describe": setup.describe(), "recipes": {}}

    for name in RECIPES:
        model = setup.prepare(_build(name))
        if name == "digits":
            model.config.loss.koleo_scope = "replica"
            # This rank's batch; the logs are averaged over ranks.
            report["koleo_replica"] = float(model.test_step(mine[0])["koleo"])
            model.config.loss.koleo_scope = "global"
        first = _fit_steps(model, [_dataset([mine[0]])])
        if name == "digits":
            checkpoint = os.path.join(folder, "checkpoint-00001.npz")
            save_checkpoint(model, checkpoint, {"epoch": 1})
            # Rank 0 writes; the others skip the file (here: a folder only rank 1 would create).
            save_checkpoint(model, os.path.join(folder, f"rank{rank}", "c.npz"))
        second = _fit_steps(model, [_dataset([mine[1]])])
        straight = _state(model)
        report["recipes"][name] = {"steps": first + second,
                                   "state": [x.tolist() for x in straight]}
        if name == "digits":
            torch.distributed.barrier()
            load_checkpoint(model, checkpoint)
            again = _fit_steps(model, [_dataset([mine[1]])])
            report["resume_loss_max_rel"] = _loss_diffs(again, second)
            report["resume"] = _compare(_state(model), straight, straight)

    outputs = {}
    for form, subset in (("per_sample", False), ("subset", True)):
        backbone = setup.prepare(_drop_path_backbone(subset))
        outputs[form] = _torch_gather(backbone({"images": _same_images()},
                                               training=True)["cls_token"])
    report["drop_path"] = _drop_path_report(outputs)

    logits, valid = _sinkhorn_case(world)
    probs = losses.sinkhorn_knopp(np.split(logits, world)[rank], 0.07,
                                  valid=np.split(valid, world)[rank],
                                  reduction=distribute.replica_reduction())
    report["sinkhorn"] = np.concatenate(_torch_gather(probs)).tolist()
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
    batches = _real_batches()
    report = {}
    cpu = _Clock(report)
    single = _single_device_references(batches, world)
    runs = _single_device_runs(batches)
    cpu("references_and_single_device_runs")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_torch_rank, args=(world, port, folder), nprocs=world, join=True)
    with open(os.path.join(folder, "rank0.json")) as f:
        ranks = json.load(f)
    logits, valid = _sinkhorn_case(world)
    cpu("ranks")
    report.update({
        "devices": world,
        "mask_counts": _mask_counts(batches, world),
        "data_describe": ranks["describe"],
        "koleo": _koleo_report(single, runs, ranks["recipes"]["digits"]["steps"],
                               ranks["koleo_replica"]),
        "resume_loss_max_rel": ranks["resume_loss_max_rel"],
        "resume": ranks["resume"],
        "rank0_wrote": ranks["rank0_file_exists"],
        "rank1_wrote": ranks["rank1_file_exists"],
        "drop_path": ranks["drop_path"],
    })
    for name in RECIPES:
        state = [np.asarray(x, "float64") for x in ranks["recipes"][name]["state"]]
        report[name] = _recipe_report(ranks["recipes"][name]["steps"], state, runs[name])
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
def test_real_batches_give_replicas_unequal_masked_counts(backend, report):
    # What the comparisons below rest on: a pipeline batch, not equal synthetic counts.
    for counts in report["mask_counts"]:
        assert len(set(counts)) > 1, report["mask_counts"]


@DISTRIBUTED
@pytest.mark.parametrize("recipe", RECIPES)
def test_n_replicas_match_one_device_with_the_global_batch(backend, recipe, report):
    result = report[recipe]
    assert result["steps"] == 2, result
    assert result["loss_max_rel"] < LOSS_RTOL, result
    assert result["tensors_off"] == 0, result
    assert result["state_max_abs"] < STATE_ATOL, result
    assert result["update_max_rel"] < UPDATE_RTOL, result
    assert result["largest_update"] > 1e-3, result  # the steps moved the weights


@DISTRIBUTED
def test_every_replica_draws_its_own_stochastic_depth(backend, report):
    for form, result in report["drop_path"].items():
        assert result["replicas"] == (4 if backend == "jax" else 2), result
        assert result["max_within_replica"] > 1e-3, (form, result)  # samples are dropped
        # Two replicas with the same outputs dropped the same samples in every block.
        assert result["min_across_replicas"] > 1e-3, (form, result)


@DISTRIBUTED
def test_koleo_gathers_by_default_and_keeps_the_per_replica_option(backend, report):
    koleo = report["koleo"]
    # One device and N replicas (gathered rows, the default) give the global batch's KoLeo.
    np.testing.assert_allclose(koleo["single_global"], koleo["numpy_global"], rtol=1e-5)
    np.testing.assert_allclose(koleo["data_global"], koleo["numpy_global"], rtol=1e-5)
    if "data_replica" in koleo:  # torch; jax's is in the stacked-batch test
        np.testing.assert_allclose(koleo["data_replica"], koleo["numpy_mean_of_replicas"],
                                   rtol=1e-5)
    # Fewer candidate neighbours per replica: the two differ.
    assert abs(koleo["numpy_global"] - koleo["numpy_mean_of_replicas"]) > 1e-3, koleo


@DISTRIBUTED
def test_sinkhorn_marginals_are_over_the_global_batch(backend, report):
    assert report["sinkhorn_max_abs"] < 1e-6, report
    assert report["sinkhorn_without_collectives_max_abs"] > 1e-3, report
    assert report["sinkhorn_row_sums_max_err"] < 1e-5 and report["sinkhorn_padding_max"] == 0
    low, high = report["sinkhorn_prototype_mass_range"]
    assert 0.5 < low <= high < 1.5, report  # close to balanced after 3 iterations


@pytest.mark.parametrize("backend", [pytest.param("jax", marks=_only("jax"))])
def test_jax_model_parallel_shards_large_kernels_and_matches_one_device(backend, report):
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
    parts = split_batch(batch, 4)
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
        split_batch(batch, 3)


def test_a_stacked_batch_gives_the_loss_and_centers_of_the_global_batch():
    """The layout a JAX program receives (replicas stacked) is read as the global batch, on any
    backend: a real batch (unequal masked counts), batch-norm heads, both centers."""
    batch = _real_batches()[0]
    stacked = distribute.stack_batches(split_batch(batch, 2))
    model = _build("digits_centering")
    initial = _state(model)
    _, logs = model.compute_dinov2_loss(batch, training=False)
    centers = [keras.ops.convert_to_numpy(c) for c in (model.dino_center, model.ibot_center)]
    _assign(model, initial)
    _, stacked_logs = model.compute_dinov2_loss(stacked, training=False)
    for key in LOSS_KEYS:
        np.testing.assert_allclose(float(stacked_logs[key]), float(logs[key]), rtol=1e-5,
                                   err_msg=key)
    for c, variable in zip(centers, (model.dino_center, model.ibot_center)):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(variable), c, rtol=1e-5, atol=1e-7)
    # KoLeo: gathered over the global batch by default; "replica" keeps each replica's rows.
    expected = _np_koleo_terms(_student_cls(model, batch), 2)
    np.testing.assert_allclose(float(stacked_logs["koleo"]), expected["global"], rtol=1e-5)
    model.config.loss.koleo_scope = "replica"
    _, logs = model.compute_dinov2_loss(stacked, training=False, update_centers=False)
    np.testing.assert_allclose(float(logs["koleo"]), expected["replica"], rtol=1e-5)


def test_batch_norm_statistics_cover_every_replica():
    """Two replicas (threads with NumPy collectives) normalize their rows with the global batch's
    statistics, padding rows left out, as one device does with all the rows."""
    from keras_dinov2.layers.dino_head import DINOHead

    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 6)).astype("float32") * 3 + 1
    weights = np.ones(10, "float32")
    weights[[3, 4, 9]] = 0  # padding rows: 3 real rows on replica 0, 4 on replica 1
    head = DINOHead(num_prototypes=5, hidden_dim=8, bottleneck_dim=4, use_bn=True)
    head.build((None, 6))
    whole = np.asarray(keras.ops.convert_to_numpy(head(x, row_weights=weights)))
    parts = FakeCluster(2).run(lambda r, rows, w: head(rows, row_weights=w, reduction=r),
                                [(x[:5], weights[:5]), (x[5:], weights[5:])])
    real = weights > 0
    np.testing.assert_allclose(np.concatenate(parts)[real], whole[real], rtol=1e-5, atol=1e-6)
    # Each replica on its own statistics (what the heads did before) is visibly off.
    alone = np.concatenate([np.asarray(keras.ops.convert_to_numpy(head(x[i:i + 5],
                                                                      row_weights=weights[i:i + 5])))
                            for i in (0, 5)])
    assert np.abs(alone[real] - whole[real]).max() > 1e-2


def test_every_shard_samples_its_own_masks():
    """Replicas reading the same identical images still mask different patches."""
    from keras_dinov2.config import SSLConfig
    from keras_dinov2.data import multicrop_dataset

    images = np.full((16, 32, 32, 3), 128, "uint8")
    config = SSLConfig.recipe("digits")
    masks = [next(iter(multicrop_dataset(images, 4, config, num_shards=2, shard_index=r,
                                         jit_compile=False)))["masks"].numpy()
             for r in range(2)]
    assert masks[0].any() and masks[1].any()
    assert not np.array_equal(masks[0], masks[1])


def test_replica_seed_generator_is_a_plain_generator_on_one_device():
    from keras_dinov2.layers.block import DropPath

    layer = DropPath(0.5, seed=3)
    plain = keras.random.SeedGenerator(3)
    x = np.ones((64, 1), "float32")
    dropped = np.asarray(keras.ops.convert_to_numpy(layer(x, training=True)))
    draw = np.asarray(keras.ops.convert_to_numpy(keras.random.uniform((64, 1), seed=plain)))
    np.testing.assert_array_equal(dropped > 0, draw < 0.5)
    # Checkpoints keep the plain generator's variable path.
    assert layer.seed_generator.state.path.startswith("seed_generator_")


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
