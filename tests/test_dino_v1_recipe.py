"""The DINO v1 recipe as data: each field's effect against a NumPy formula, the recipes against main_dino.py."""

import dataclasses

import keras
import numpy as np
import pytest
from conftest import to_numpy
from keras import ops

from keras_dinov2 import DINOHead, DINOv2Backbone
from keras_dinov2.config import SSLConfig
from keras_dinov2.optim import DINOv2AdamW, clip_gradients, param_groups
from keras_dinov2.schedules import (
    CosineSchedule,
    EpochTableSchedule,
    FrozenStartSchedule,
    scaled_learning_rate,
    schedules_from_config,
)

# facebookresearch/dino main_dino.py (HEAD 7c446df), get_args_parser's defaults, and what they become here.
# warmup_teacher_temp_epochs is 0 in the code although its help text says 30.
MAIN_DINO_DEFAULTS = {
    "patch_size": 16, "out_dim": 65536, "norm_last_layer": True, "momentum_teacher": 0.996,
    "use_bn_in_head": False, "warmup_teacher_temp": 0.04, "teacher_temp": 0.04, "warmup_teacher_temp_epochs": 0,
    "weight_decay": 0.04, "weight_decay_end": 0.4, "clip_grad": 3.0, "batch_size_per_gpu": 64, "epochs": 100,
    "freeze_last_layer": 1, "lr": 0.0005, "warmup_epochs": 10, "min_lr": 1e-6, "drop_path_rate": 0.1,
    "global_crops_scale": (0.4, 1.0), "local_crops_number": 8, "local_crops_scale": (0.05, 0.4), "seed": 0,
}


def recipe_values(config):
    """The main_dino.py arguments as a recipe holds them."""
    o, c = config.optim, config.data.crops
    return {
        "patch_size": config.model.patch_size, "out_dim": config.heads.num_prototypes,
        "norm_last_layer": config.heads.norm_last_layer, "momentum_teacher": o.momentum_teacher,
        "use_bn_in_head": config.heads.use_bn, "warmup_teacher_temp": o.warmup_teacher_temp,
        "teacher_temp": o.teacher_temp, "warmup_teacher_temp_epochs": o.warmup_teacher_temp_epochs,
        "weight_decay": o.weight_decay, "weight_decay_end": o.weight_decay_end, "clip_grad": o.clip_grad,
        "batch_size_per_gpu": config.batch_size, "epochs": o.epochs, "freeze_last_layer": o.freeze_last_layer_epochs,
        "lr": o.base_lr, "warmup_epochs": o.warmup_epochs, "min_lr": o.min_lr,
        "drop_path_rate": config.model.drop_path_rate, "global_crops_scale": c.global_crops_scale,
        "local_crops_number": c.local_crops_number, "local_crops_scale": c.local_crops_scale, "seed": config.seed,
    }


def v1_cosine(base, final, epochs, niter, warmup_epochs=0):
    """main_dino.py's utils.cosine_scheduler, in NumPy (one value per step)."""
    warmup = np.linspace(0.0, base, warmup_epochs * niter)
    iters = np.arange(epochs * niter - warmup_epochs * niter)
    return np.concatenate([warmup, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))])


def test_recipes_hold_main_dino_defaults_and_the_readme_runs():
    dino = SSLConfig.recipe("dino")
    assert recipe_values(dino) == MAIN_DINO_DEFAULTS
    assert SSLConfig.recipe("dino_vits16_100ep") == dino
    boosted = SSLConfig.recipe("dino_vits16_300ep")
    expected = {**MAIN_DINO_DEFAULTS, "epochs": 300, "teacher_temp": 0.07, "warmup_teacher_temp_epochs": 30,
                "norm_last_layer": False}
    assert recipe_values(boosted) == expected
    digits = SSLConfig.recipe("dino_digits")
    for config in (dino, boosted, digits):
        o = config.optim
        # v1's mechanics: DINO with centering only; the head of 3 layers; no layer-wise decay; v1's rules.
        assert (config.loss.ibot_weight, config.loss.koleo_weight, config.loss.centering) == (0, 0, "centering")
        assert (config.loss.student_temp, config.loss.center_momentum) == (0.1, 0.9)
        assert config.heads.num_layers == 3
        assert config.heads.use_bn == (config is digits)  # main_dino.py's --use_bn_in_head, for the digits
        assert (o.layer_decay, o.patch_embed_lr_mult, o.adamw_beta1, o.adamw_beta2) == (1.0, 1.0, 0.9, 0.999)
        assert (o.lr_scaling, o.clip_mode, o.freeze_last_layer_mode, o.teacher_temp_per_epoch) == (
            "linear_wrt_256", "per_parameter", "drop_grad", True)
        assert (config.model.drop_path_uniform, config.model.layer_scale_init) == (False, None)
        # Blur really applied with 1.0 / 0.1 / 0.5, solarization 0.2, no masking.
        aug = config.data.augmentation
        assert aug.resolved_blur_probabilities() == (1.0, 0.1, 0.5) and aug.solarize_probability == 0.2
        assert config.data.masking.mask_sample_probability == 0.0
    assert (dino.heads.hidden_dim, dino.heads.bottleneck_dim, dino.data.crops.local_crops_size) == (2048, 256, 96)
    # The DINOv2 defaults are untouched.
    o = SSLConfig().optim
    assert (o.lr_scaling, o.clip_mode, o.freeze_last_layer_mode, o.teacher_temp_per_epoch) == (
        "sqrt_wrt_1024", "per_part", "zero_lr", False)
    assert not SSLConfig().heads.norm_last_layer


def test_linear_lr_scaling_and_v1_schedules_match_the_cosine_scheduler():
    assert scaled_learning_rate(0.0005, 512, "linear_wrt_256") == pytest.approx(0.001)
    assert scaled_learning_rate(0.004, 256) == pytest.approx(0.002)  # DINOv2's sqrt rule, unchanged
    optim = dataclasses.replace(SSLConfig.recipe("dino").optim, epochs=6, warmup_epochs=2)
    niter, batch = 3, 128
    s = schedules_from_config(optim, optim.epochs * niter, niter, batch)
    steps = np.arange(optim.epochs * niter)
    lr = v1_cosine(0.0005 * batch / 256, 1e-6, optim.epochs, niter, warmup_epochs=2)
    np.testing.assert_allclose(s.learning_rate.value_at(steps), lr, rtol=1e-12)
    np.testing.assert_allclose(s.weight_decay.value_at(steps), v1_cosine(0.04, 0.4, 6, niter), rtol=1e-12)
    np.testing.assert_allclose(s.teacher_momentum.value_at(steps), v1_cosine(0.996, 1.0, 6, niter), rtol=1e-12)
    # No zero lr for the last layer: v1 drops its gradients in the optimizer instead.
    np.testing.assert_allclose(s.last_layer_learning_rate.value_at(steps), lr, rtol=1e-12)
    np.testing.assert_allclose(to_numpy(s.learning_rate(ops.convert_to_tensor(7))), lr[7], rtol=1e-5)


@pytest.mark.parametrize("warmup_epochs", [0, 1, 3])
def test_teacher_temperature_is_a_table_per_epoch(warmup_epochs):
    epochs, niter = 5, 4
    optim = dataclasses.replace(SSLConfig.recipe("dino_vits16_300ep").optim, epochs=epochs, warmup_epochs=1,
                                warmup_teacher_temp_epochs=warmup_epochs)
    s = schedules_from_config(optim, epochs * niter, niter, 64)
    assert isinstance(s.teacher_temperature, EpochTableSchedule)
    # main_dino.py: linspace(warmup_teacher_temp, teacher_temp, W) then teacher_temp, indexed by the epoch.
    table = np.concatenate([np.linspace(0.04, 0.07, warmup_epochs), np.full(epochs - warmup_epochs, 0.07)])
    steps = np.arange(epochs * niter)
    values = s.teacher_temperature.value_at(steps)
    np.testing.assert_allclose(values, table[steps // niter], rtol=1e-12)
    assert all(len(set(values[e * niter:(e + 1) * niter])) == 1 for e in range(epochs))  # constant in an epoch
    in_graph = to_numpy(s.teacher_temperature(ops.convert_to_tensor(steps)))
    np.testing.assert_allclose(in_graph, table[steps // niter], rtol=1e-6)


def small_model(norm_last_layer=True):
    keras.utils.set_random_seed(0)
    backbone = DINOv2Backbone(patch_size=4, hidden_dim=8, num_layers=2, num_heads=2, image_size=8,
                              mlp_ratio=1.0, layer_scale_init=None)
    head = DINOHead(num_prototypes=8, hidden_dim=8, bottleneck_dim=8, num_layers=3,
                    norm_last_layer=norm_last_layer, name="dino_head")
    head.build((None, 8))
    groups = param_groups(backbone, heads=[head], layer_decay=1.0, patch_embed_lr_mult=1.0)
    variables = backbone.trainable_variables + head.trainable_variables
    return backbone, head, groups, variables


def test_per_parameter_clipping_caps_each_tensor():
    _, _, groups, variables = small_model()
    rng = np.random.default_rng(0)
    grads = [rng.normal(scale=rng.choice([0.01, 1.0, 10.0]), size=v.shape).astype("float32") for v in variables]
    clipped, norms = clip_gradients([ops.convert_to_tensor(g) for g in grads], variables, groups, 3.0,
                                    "per_parameter")
    for g, c in zip(grads, clipped):
        # main_dino.py's utils.clip_gradients: coef = clip / (||g|| + 1e-6), applied when < 1.
        coef = 3.0 / (np.linalg.norm(g) + 1e-6)
        np.testing.assert_allclose(to_numpy(c), g * min(coef, 1.0), rtol=1e-5)
        assert np.linalg.norm(to_numpy(c)) <= 3.0 + 1e-4
    assert sum(np.linalg.norm(g) > 3.0 for g in grads) >= 2  # some were clipped, some not
    backbone_norm = np.sqrt(sum(np.sum(g**2) for g, v in zip(grads, variables) if groups[v].part == "backbone"))
    np.testing.assert_allclose(to_numpy(norms["backbone"]), backbone_norm, rtol=1e-5)


def test_no_layer_decay_and_weight_decay_only_on_the_decayed_group():
    backbone, head, groups, variables = small_model()
    assert all(groups[v].lr_multiplier == 1.0 for v in variables)
    # main_dino.py's utils.get_params_groups: no decay for biases and 1-D tensors (cls_token, pos_embed decayed).
    for v in variables:
        if "mask_token" in v.path:  # v1 has none
            continue
        assert groups[v].wd_multiplier == (0.0 if v.path.endswith("bias") or len(v.shape) == 1 else 1.0), v.path
    total = 4
    wd = CosineSchedule(0.04, 0.4, total)
    optimizer = DINOv2AdamW(learning_rate=0.5, weight_decay=wd, param_groups=groups, frozen_last_layer_steps=0)
    before = [to_numpy(v).astype(np.float64) for v in variables]
    zeros = [ops.zeros(v.shape) for v in variables]
    for _ in range(total):
        optimizer.apply(zeros, variables)  # zero gradients: only the decay moves a variable
    shrink = np.prod([1 - 0.5 * w for w in v1_cosine(0.04, 0.4, 1, total)])
    for v, b in zip(variables, before):
        expected = b * shrink if groups[v].wd_multiplier else b
        np.testing.assert_allclose(to_numpy(v), expected, rtol=1e-5, atol=1e-7)


def momentum_of(optimizer, variable):
    """AdamW's first moment of `variable`, found by the name Keras gives it."""
    name = variable.path.replace("/", "_") + "_momentum"
    (found,) = [v for v in optimizer.variables if v.path.split("/", 1)[-1] == name]
    return to_numpy(found)


def numpy_adamw_step(param, grad, m, v, t, lr, wd, beta_1=0.9, beta_2=0.999, eps=1e-8):
    """One step of torch.optim.AdamW (t: the parameter's own step count, from 1), in float64."""
    param = param * (1 - lr * wd)
    m = beta_1 * m + (1 - beta_1) * grad
    v = beta_2 * v + (1 - beta_2) * grad * grad
    return param - lr / (1 - beta_1**t) * m / (np.sqrt(v) / np.sqrt(1 - beta_2**t) + eps), m, v


def test_dropped_last_layer_gradient_keeps_no_adamw_state_unlike_a_zero_lr():
    _, head, groups, variables = small_model(norm_last_layer=False)
    last = [i for i, v in enumerate(variables) if groups[v].is_last_layer]
    assert len(last) == 2  # weight_v and the trained weight_g
    frozen, lr, wd = 2, 0.01, 0.04
    dropped = DINOv2AdamW(learning_rate=lr, weight_decay=wd, param_groups=groups, frozen_last_layer_steps=frozen)
    zero_lr = DINOv2AdamW(learning_rate=lr, weight_decay=wd, param_groups=groups,
                          last_layer_learning_rate=FrozenStartSchedule(CosineSchedule(lr, lr, 10), frozen))
    rng = np.random.default_rng(1)
    grads = [[rng.normal(size=v.shape).astype("float32") for v in variables] for _ in range(frozen + 1)]
    start = [to_numpy(v).astype(np.float64) for v in variables]
    runs = {}
    for name, optimizer in (("dropped", dropped), ("zero_lr", zero_lr)):
        for v, value in zip(variables, start):
            v.assign(value)
        for step in range(frozen):
            optimizer.apply([ops.convert_to_tensor(g) for g in grads[step]], variables)
        moments = [momentum_of(optimizer, variables[i]) for i in last]
        frozen_values = [to_numpy(variables[i]) for i in last]
        optimizer.apply([ops.convert_to_tensor(g) for g in grads[frozen]], variables)
        runs[name] = (moments, frozen_values, [to_numpy(v).astype(np.float64) for v in variables])
    for i, values in zip(last, runs["dropped"][1]):
        np.testing.assert_array_equal(values, start[i])  # no move, no weight decay while dropped
    assert all(np.all(m == 0) for m in runs["dropped"][0])  # AdamW keeps no state for the frozen layer
    assert all(np.abs(m).max() > 0 for m in runs["zero_lr"][0])  # a zero lr still feeds the moments
    for i in last:
        # After the freeze the dropped layer takes AdamW's first step (its own t = 1, zero moments).
        expected, _, _ = numpy_adamw_step(start[i], grads[frozen][i].astype(np.float64), 0.0, 0.0, 1, lr, wd)
        np.testing.assert_allclose(runs["dropped"][2][i], expected, rtol=1e-5, atol=1e-7)
        assert np.abs(runs["zero_lr"][2][i] - expected).max() > 1e-6
    for i in set(range(len(variables))) - set(last):  # every other variable steps alike
        np.testing.assert_allclose(runs["dropped"][2][i], runs["zero_lr"][2][i], rtol=1e-6, atol=1e-8)
    config = dropped.get_config()
    assert config["frozen_last_layer_steps"] == frozen


def test_v1_head_fixes_the_prototype_norms_at_one():
    _, head, groups, variables = small_model(norm_last_layer=True)
    g = head.last_layer.weight_g
    assert not g.trainable and all(v is not g for v in [*variables, *head.trainable_weights])
    kernel = to_numpy(head.last_layer.effective_kernel())
    np.testing.assert_allclose(np.linalg.norm(kernel, axis=0), 1.0, rtol=1e-5)
    # Each logit is a cosine: the L2-normalized bottleneck against a unit prototype.
    x = np.random.default_rng(2).normal(size=(5, 8)).astype("float32")
    logits = to_numpy(head(ops.convert_to_tensor(x)))
    assert np.abs(logits).max() <= 1.0 + 1e-5
    assert DINOHead.from_config(head.get_config()).norm_last_layer
    _, trained, _, _ = small_model(norm_last_layer=False)
    assert trained.last_layer.weight_g.trainable


def test_fit_dino_digits_recipe_drops_the_last_layer_gradient_in_its_first_epoch():
    from keras_dinov2.backbone import build_backbone
    from keras_dinov2.data import multicrop_dataset
    from keras_dinov2.pretrainer import DINOv2Pretrainer

    config = SSLConfig.recipe("dino_digits")
    config.batch_size = 4
    config.heads = dataclasses.replace(config.heads, num_prototypes=32, hidden_dim=16, bottleneck_dim=8)
    config.optim = dataclasses.replace(config.optim, epochs=3, steps_per_epoch=1, warmup_epochs=0)
    config.data.crops.local_crops_number = 2
    keras.utils.set_random_seed(0)
    backbone = build_backbone("dinov2_vit_tiny4", config)
    assert backbone.get_config()["layer_scale_init"] is None  # v1's ViT: no LayerScale
    model = DINOv2Pretrainer(backbone, config)
    model.compile()
    data = multicrop_dataset("digits", batch_size=4, config=config, shuffle=False).take(2)
    head = model.student_dino_head
    weight_v = head.last_layer.weight_v
    before = to_numpy(weight_v)
    model.fit(data.take(1), epochs=1, verbose=0)
    np.testing.assert_array_equal(to_numpy(weight_v), before)  # epoch 0: gradient dropped
    assert np.all(momentum_of(model.optimizer, weight_v) == 0)
    history = model.fit(data.skip(1), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert np.abs(to_numpy(weight_v) - before).max() > 0  # epoch 1: it trains
    np.testing.assert_array_equal(to_numpy(head.last_layer.weight_g), 1.0)  # norm_last_layer
    assert not model.do_ibot and not model.do_koleo


def test_pretrain_command_trains_the_v1_recipe(tmp_path, capsys):
    import csv
    import json
    import os

    from keras_dinov2.cli import main

    run = str(tmp_path / "run")
    assert main(["pretrain", "--recipe", "dino_digits", "--out", run, "--epochs", "2", "--steps-per-epoch", "2",
                 "--batch-size", "4", "--knn-every", "0", "--verbose", "0"]) == 0
    with open(os.path.join(run, "config.json")) as f:
        optim = json.load(f)["ssl"]["optim"]
    assert (optim["lr_scaling"], optim["clip_mode"], optim["freeze_last_layer_mode"]) == (
        "linear_wrt_256", "per_parameter", "drop_grad")
    with open(os.path.join(run, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(np.isfinite(float(r["loss"])) for r in rows)
    assert all(float(r["ibot"]) == 0 and float(r["koleo"]) == 0 for r in rows)  # DINO with centering only
    # The linear rule: the peak lr (end of the 1-epoch warm-up) is base_lr x 4 / 256.
    np.testing.assert_allclose(float(rows[2]["lr"]), 0.005 * 4 / 256, rtol=1e-5)
    backbone = DINOv2Backbone.from_preset(os.path.join(run, "teacher_preset"))
    assert backbone.get_config()["layer_scale_init"] is None


@pytest.mark.once
@pytest.mark.parametrize("recipe, data, model", [
    ("digits", "/data/pool", "dinov2_vit_tiny4"), ("dino_digits", "/data/pool", "dinov2_vit_tiny4"),
    ("dino", "/data/pool", "dino_vit_small16"), (None, "/data/pool", "dinov2_vit_small14"),
    ("dino", "digits", "dinov2_vit_tiny4")])
def test_pretrain_default_model_fits_the_recipe(tmp_path, recipe, data, model):
    # A digits recipe (patch 4, 24 px crops) on a folder or a manifest trains the tiny ViT, not ViT-S/14.
    from keras_dinov2.cli.parser import build_parser
    from keras_dinov2.run.directory import RunDirectory
    from keras_dinov2.run.resume import resolve_config

    flags = ["pretrain", "--data", data, "--out", str(tmp_path)] + (["--recipe", recipe] if recipe else [])
    args = build_parser().parse_args(flags)
    assert resolve_config(args, RunDirectory(str(tmp_path)))[1] == model
