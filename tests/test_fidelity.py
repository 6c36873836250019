"""The training step's remaining differences from the reference (issue 17): stochastic depth,
learning-rate scaling by the global batch, gradient accumulation equal to the large batch, and the
loss switches."""

import dataclasses
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import to_numpy
from distributed_helpers import split_batch
from test_pretrainer import GLOBAL, LOCAL, N_LOCAL, PATCH, B, tiny_config, tiny_model

from keras_dinov2 import losses
from keras_dinov2.backbone import DINOv2Backbone
from keras_dinov2.config import LossConfig, SSLConfig
from keras_dinov2.distribute import stack_batches
from keras_dinov2.losses import dinov2 as combined_loss

# ------------------------------------------------------------------------------ stochastic depth


def _block_rates(backbone):
    return [block.drop_path_rate for block in backbone.transformer_blocks]


@pytest.mark.parametrize("recipe, rate", [("reference_default", 0.3), ("vitl14", 0.4),
                                          ("vitg14", 0.4)])
def test_dinov2_recipes_give_every_block_the_reference_drop_path_rate(recipe, rate):
    model = SSLConfig.recipe(recipe).model
    assert model.drop_path_uniform and model.drop_path_rate == rate
    backbone = DINOv2Backbone.from_preset("dinov2_vit_tiny4", load_weights=False,
                                          **model.stochastic_depth())
    assert _block_rates(backbone) == [rate] * 4


def test_digits_recipe_keeps_its_linear_ramp():
    model = SSLConfig.recipe("digits").model
    backbone = DINOv2Backbone.from_preset("dinov2_vit_tiny4", load_weights=False,
                                          **model.stochastic_depth())
    rates = _block_rates(backbone)
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(model.drop_path_rate)


def test_pretrain_flags_build_the_student_and_are_recorded(tmp_path, monkeypatch):
    from keras_dinov2 import pretrainer as pretrainer_module
    from keras_dinov2.cli import main

    built = {}
    original = pretrainer_module.DINOv2Pretrainer.__init__

    def capture(self, backbone, *args, **kwargs):
        built["rates"] = _block_rates(backbone)
        original(self, backbone, *args, **kwargs)
        built["model"] = self

    monkeypatch.setattr(pretrainer_module.DINOv2Pretrainer, "__init__", capture)
    run = str(tmp_path / "run")
    # Two micro-batches of 4 per update, through the real pipeline.
    assert main(["pretrain", "--out", run, "--epochs", "1", "--steps-per-epoch", "2",
                 "--batch-size", "4", "--accumulation", "2", "--drop-path", "0.2",
                 "--drop-path-uniform", "--knn-every", "0", "--verbose", "0"]) == 0
    assert built["rates"] == [0.2] * 4
    with open(os.path.join(run, "config.json")) as f:
        ssl = json.load(f)["ssl"]
    assert ssl["model"]["drop_path_rate"] == 0.2 and ssl["model"]["drop_path_uniform"] is True
    assert ssl["optim"]["gradient_accumulation_steps"] == 2
    # Two optimizer updates, each of 2 micro-batches of 4 images: the lr scaled by 8 images.
    model = built["model"]
    assert int(to_numpy(model.optimizer.iterations)) == 2
    peak = model.config.optim.base_lr * np.sqrt(8 / 1024)
    assert model.schedules.learning_rate.base_value == pytest.approx(peak, rel=1e-6)


# ------------------------------------------------------------------------------ lr scaling

LR_SCRIPT = r"""
import os, sys
sys.path.insert(0, {tests!r})
import keras, numpy as np
backend = keras.backend.backend()
if backend == "tensorflow":
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from keras_dinov2 import distribute
from test_pretrainer import tiny_config, tiny_model
dist = distribute.setup("data")
with dist.scope():
    model = tiny_model(tiny_config(gradient_accumulation_steps=3))
    active = distribute.active_replicas()
config = model.config
peak = model.schedules.learning_rate.base_value
# One accumulated update over the replicas, through the pipeline (stacked micro-batches).
data = dist.dataset("digits", config.batch_size, config, repeat=True, micro_batches=3)
history = model.fit(data, steps_per_epoch=1, epochs=1, verbose=0)
loss = history.history["loss"][0]
print("RESULT", dist.num_replicas, active, float(peak), loss)
"""


@pytest.mark.skipif(keras.backend.backend() == "torch",
                    reason="torch replicas are torchrun processes (tests/test_distribute.py)")
def test_compile_scales_the_lr_by_the_global_batch_of_every_replica():
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    out = subprocess.run([sys.executable, "-c", LR_SCRIPT.format(tests=tests)], env=env,
                         capture_output=True, text=True, timeout=900)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT")]
    assert line, out.stderr[-3000:]
    replicas, active, peak, loss = line[0].split()[1:]
    assert np.isfinite(float(loss))
    replicas = int(replicas)
    assert replicas == {"jax": 4, "tensorflow": 2}[keras.backend.backend()]
    assert int(active) == replicas
    config = tiny_config()
    # The reference: base_lr * sqrt(batch per GPU * world size / 1024), here x 3 micro-batches.
    expected = config.optim.base_lr * np.sqrt(B * 3 * replicas / 1024)
    assert float(peak) == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------------------ accumulation


def large_batch(seed=0, images=8):
    """A batch of `images` source images with masks on half of the global crops (NumPy)."""
    rng = np.random.default_rng(seed)
    n = (GLOBAL // PATCH) ** 2
    masks = np.zeros((2 * images, n), bool)
    for i in rng.permutation(2 * images)[:images]:
        masks[i, rng.choice(n, size=int(rng.integers(2, 8)), replace=False)] = True
    flat = np.flatnonzero(masks.reshape(-1))
    buffer = 8 * images
    indices = np.zeros(buffer, "int32")
    weights = np.zeros(buffer, "float32")
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


def _one_element(batch):
    return tf.data.Dataset.from_tensors(batch)


def _state(model):
    return {v.path: to_numpy(v) for v in model.weights + model.optimizer.variables
            if "seed_generator" not in v.path}


# The Sinkhorn-Knopp case differs only in the teacher's targets, which are computed once per
# update on every backend alike: it runs in one job (see conftest), the centering case in all.
@pytest.mark.parametrize("centering, separate", [
    ("centering", False), pytest.param("sinkhorn_knopp", True, marks=pytest.mark.once)])
def test_four_micro_batches_of_two_take_the_step_of_one_batch_of_eight(centering, separate):
    def config(batch_size, steps):
        base = tiny_config(warmup_epochs=0, freeze_last_layer_epochs=0,
                           gradient_accumulation_steps=steps)
        # KoLeo's neighbours are searched within a micro-batch: the one term that differs.
        loss = LossConfig(centering=centering, koleo_weight=0.0)
        heads = dataclasses.replace(base.heads, ibot_separate_head=separate)
        return dataclasses.replace(base, batch_size=batch_size, loss=loss, heads=heads)

    large = tiny_model(config(8, 1))
    accumulated = tiny_model(config(2, 4), seed=1)
    for source, target in zip(large.weights, accumulated.weights):
        assert source.path == target.path
        target.assign(to_numpy(source))
    logs_large, logs_accumulated = [], []
    for step in range(2):
        batch = large_batch(seed=step)
        stacked = stack_batches(split_batch(batch, 4))
        assert stacked["n_masked_patches"].shape == (4,)
        logs_large.append(large.fit(_one_element(batch), verbose=0).history)
        logs_accumulated.append(accumulated.fit(_one_element(stacked), verbose=0).history)
    for a, b in zip(logs_large, logs_accumulated):
        for key in ("loss", "dino_local", "dino_global", "ibot", "teacher_entropy",
                    "grad_norm_backbone", "lr"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=key)
    expected, got = _state(large), _state(accumulated)
    assert int(to_numpy(accumulated.optimizer.iterations)) == 2
    # Relative L2 difference per array: AdamW divides each element's update by that element's
    # own gradient size, so an element whose gradient is tiny carries the summation order's
    # float32 rounding into its update; the array as a whole agrees to 1e-5.
    # The attention's key bias (middle third of qkv's bias) is left out: its exact gradient is 0
    # (it shifts every logit of a query's softmax alike), so AdamW moves it by rounding noise of
    # lr size in any implementation (tools/reference_step.py also leaves it out of its comparison
    # and reports its drift apart).
    for path, value in expected.items():
        other = got[path]
        if path.endswith("attn/qkv/bias"):
            third = value.shape[-1] // 3
            keep = np.r_[0:third, 2 * third:3 * third]
            value, other = value[..., keep], other[..., keep]
        norm = max(float(np.linalg.norm(value)), 1e-6)
        assert np.linalg.norm(other - value) <= 1e-5 * norm, path


def test_accumulation_needs_stacked_micro_batches():
    model = tiny_model(tiny_config(gradient_accumulation_steps=2))
    with pytest.raises(ValueError, match="micro_batches=2"):
        model.compute_dinov2_loss(large_batch(images=B), training=False)


def test_pipeline_groups_micro_batches_for_the_step():
    from keras_dinov2.data import group_micro_batches, multicrop_dataset

    config = tiny_config()
    plain = multicrop_dataset("digits", 2, config, seed=3)
    grouped = group_micro_batches(multicrop_dataset("digits", 2, config, seed=3), 3)
    first = [{k: to_numpy(v) for k, v in b.items()} for b in plain.take(3)]
    stacked = next(iter(grouped))
    expected = stack_batches(first)
    assert set(stacked) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(to_numpy(stacked[key]), value, err_msg=key)


# ------------------------------------------------------------------------------ loss switches


def _counting(monkeypatch, names):
    calls = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(losses, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        # The package's name and the one the combined loss calls (`keras_dinov2.losses.dinov2`).
        monkeypatch.setattr(losses, name, counted)
        monkeypatch.setattr(combined_loss, name, counted)
    return calls


@pytest.mark.parametrize("weights, computed", [
    ((1.0, 1.0, 0.0), {"koleo": False, "dino_cross_entropy": True, "ibot_cross_entropy": True}),
    ((0.0, 1.0, 0.1), {"koleo": False, "dino_cross_entropy": False, "ibot_cross_entropy": True}),
    ((1.0, 0.0, 0.1), {"koleo": True, "dino_cross_entropy": True, "ibot_cross_entropy": False}),
])
def test_a_term_with_weight_zero_is_not_computed(weights, computed, monkeypatch):
    dino, ibot, koleo = weights
    base = tiny_config(warmup_epochs=0)
    config = dataclasses.replace(base, loss=LossConfig(dino_weight=dino, ibot_weight=ibot,
                                                       koleo_weight=koleo))
    model = tiny_model(config)  # tiny_config's heads are untied
    calls = _counting(monkeypatch, list(computed))
    loss, logs = model.compute_dinov2_loss(large_batch(images=B), training=False)
    for name, expected in computed.items():
        assert (calls[name] > 0) == expected, (name, calls)
    assert np.isfinite(float(to_numpy(loss)))
    names = {v.path.split("/")[0] for v in model.weights}
    # No iBOT head of its own without iBOT; the DINO head stays out of training without DINO.
    assert ("student_ibot_head" in names) == (ibot > 0)
    trained = {v.path.split("/")[0] for v in model.trainable_variables}
    assert ("student_dino_head" in trained) == (dino > 0)
    if not koleo or not dino:
        assert float(to_numpy(logs["koleo"])) == 0.0
    if not ibot:
        assert float(to_numpy(logs["ibot"])) == 0.0
    # One step trains with the switched-off parts absent from the optimizer.
    model.fit(_one_element(large_batch(images=B)), verbose=0)


def test_both_objectives_off_is_refused():
    config = dataclasses.replace(tiny_config(), loss=LossConfig(dino_weight=0.0,
                                                                ibot_weight=0.0))
    with pytest.raises(ValueError, match="dino_weight"):
        tiny_model(config)
