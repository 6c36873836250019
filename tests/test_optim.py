"""Parameter groups and DINOv2AdamW against a NumPy AdamW using the reference's multipliers; gradient clipping."""

import re

import keras
import numpy as np
import pytest
from conftest import to_numpy
from keras import ops

from keras_dinov2 import DINOHead, DINOv2Backbone
from keras_dinov2.optim import (
    DINOv2AdamW,
    clip_by_global_norm,
    clip_by_part,
    param_groups,
)
from keras_dinov2.schedules import CosineSchedule, FrozenStartSchedule

NUM_LAYERS = 3
DECAY = 0.9


@pytest.fixture(scope="module")
def model():
    backbone = DINOv2Backbone(
        patch_size=4,
        hidden_dim=8,
        num_layers=NUM_LAYERS,
        num_heads=2,
        image_size=8,
        num_register_tokens=1,
        mlp_ratio=1.0,  # few distinct shapes: JAX compiles every eager op once per shape
    )
    head = DINOHead(
        num_prototypes=8, hidden_dim=8, bottleneck_dim=8, num_layers=2, name="dino_head"
    )
    head.build((None, 8))
    groups = param_groups(backbone, heads=[head], layer_decay=DECAY, patch_embed_lr_mult=0.2)
    variables = backbone.trainable_variables + head.trainable_variables
    return backbone, head, groups, variables


def reference_multipliers(path):
    """The reference's rules (get_params_groups_with_decay), applied to this model's Keras paths."""
    if path.startswith("dino_head/"):
        lr = 1.0  # heads are grouped with no blocks: decay ** 0
    else:
        if path.startswith("embeddings/"):
            layer_id = 0
        elif match := re.match(r"block_(\d+)/", path):
            layer_id = int(match.group(1)) + 1
        else:
            layer_id = NUM_LAYERS + 1
        lr = DECAY ** (NUM_LAYERS + 1 - layer_id)
        if "patch_embedding" in path:
            lr *= 0.2
    wd = 0.0 if path.endswith("bias") or "norm" in path or "gamma" in path else 1.0
    return lr, wd, "last_layer" in path


def numpy_adamw_step(param, grad, m, v, t, lr, wd, beta_1=0.9, beta_2=0.999, eps=1e-8):
    """One step of torch.optim.AdamW (t counts from 1), in float64."""
    param = param * (1 - lr * wd)
    m = beta_1 * m + (1 - beta_1) * grad
    v = beta_2 * v + (1 - beta_2) * grad * grad
    denominator = np.sqrt(v) / np.sqrt(1 - beta_2**t) + eps
    return param - lr / (1 - beta_1**t) * m / denominator, m, v


def stepper(optimizer, variables):
    """`apply(grads)` for the test: JAX goes through a jitted `stateless_apply` (as JAX training does, and
    far faster than op-by-op eager dispatch), the other backends through `optimizer.apply`."""
    if keras.backend.backend() != "jax":
        return lambda grads: optimizer.apply(grads, variables)
    import jax

    optimizer.build(variables)
    step = jax.jit(optimizer.stateless_apply)

    def apply(grads):
        values, optimizer_values = step(
            [v.value for v in optimizer.variables], grads, [v.value for v in variables]
        )
        for variable, value in zip(
            [*variables, *optimizer.variables], [*values, *optimizer_values]
        ):
            variable.assign(value)

    return apply


def snapshot(variables):
    return [to_numpy(v).astype(np.float64) for v in variables]


def find(variables, path):
    return next(i for i, v in enumerate(variables) if v.path == path)


def test_param_groups_follow_the_reference_rules(model):
    backbone, head, groups, variables = model
    assert len(groups) == len(variables)
    for variable in variables:
        group = groups[variable]
        lr, wd, last = reference_multipliers(variable.path)
        assert group.lr_multiplier == pytest.approx(lr, rel=1e-12), variable.path
        assert (group.wd_multiplier, group.is_last_layer) == (wd, last), variable.path
    embeddings = backbone.embeddings
    for token in (embeddings.cls_token, embeddings.mask_token, embeddings.register_tokens):
        assert groups[token].layer_id == 0 and groups[token].wd_multiplier == 1.0
    assert groups[embeddings.position_embedding].lr_multiplier == pytest.approx(
        DECAY ** (NUM_LAYERS + 1)
    )
    assert groups[head.last_layer.weight_g].wd_multiplier == 1.0
    assert groups[backbone.transformer_blocks[1].ls1.gamma].wd_multiplier == 0.0
    assert groups[backbone.norm.gamma].lr_multiplier == 1.0
    assert groups.parts == ["backbone", "dino_head"]
    fused = groups.fused()
    assert sum(len(g["variables"]) for g in fused) == len(variables)
    assert {g["is_last_layer"] for g in fused} == {True, False}


def test_param_groups_use_identity_not_names(model):
    backbone, head, groups, _ = model
    # A teacher copy has the same paths but other variables: identity tells them apart.
    teacher_head = DINOHead(
        num_prototypes=8, hidden_dim=8, bottleneck_dim=8, num_layers=2, name="dino_head"
    )
    teacher_head.build((None, 8))
    both = param_groups(backbone, heads={"student": head, "teacher": teacher_head})
    assert both[head.mlp_layers[0].kernel].part == "student"
    assert both[teacher_head.mlp_layers[0].kernel].part == "teacher"
    assert both.get(keras.Variable(np.zeros(2, "float32"))) is None


def test_one_and_two_steps_match_numpy_adamw(model):
    _, _, groups, variables = model
    lr = CosineSchedule(1e-2, 1e-3, 10)
    wd = CosineSchedule(0.04, 0.4, 10)
    last_lr = FrozenStartSchedule(lr, 1)  # frozen at step 0 only
    optimizer = DINOv2AdamW(
        lr, weight_decay=wd, last_layer_learning_rate=last_lr, param_groups=groups
    )
    rng = np.random.default_rng(0)
    grads = [[rng.normal(size=v.shape) for v in variables] for _ in range(2)]

    params = snapshot(variables)
    ms = [np.zeros_like(p) for p in params]
    vs = [np.zeros_like(p) for p in params]
    apply = stepper(optimizer, variables)
    for step in range(2):
        apply([ops.convert_to_tensor(g, "float32") for g in grads[step]])
        for i, variable in enumerate(variables):
            lr_mult, wd_mult, is_last = reference_multipliers(variable.path)
            step_lr = (last_lr if is_last else lr).value_at(step) * lr_mult
            params[i], ms[i], vs[i] = numpy_adamw_step(
                params[i],
                grads[step][i],
                ms[i],
                vs[i],
                step + 1,
                step_lr,
                wd.value_at(step) * wd_mult,
            )
        for variable, expected in zip(variables, params):
            np.testing.assert_allclose(
                to_numpy(variable), expected, rtol=1e-5, atol=1e-7, err_msg=variable.path
            )
        if step == 0:
            weight_v = find(variables, "dino_head/last_layer/weight_v")
            assert np.array_equal(params[weight_v], snapshot(variables)[weight_v])  # frozen
    assert int(to_numpy(optimizer.iterations)) == 2


def test_multiplier_scales_the_update_not_the_gradient(model):
    _, _, groups, variables = model
    # Under Adam a scaled gradient would give the same step; the lr multipliers must show in the update.
    optimizer = DINOv2AdamW(1.0, weight_decay=0.0, param_groups=groups)
    before = snapshot(variables)
    stepper(optimizer, variables)([ops.ones(v.shape) for v in variables])
    after = snapshot(variables)

    def step_size(path):
        i = find(variables, path)
        return np.mean(np.abs(after[i] - before[i]))

    block_first = step_size("block_0/attn/qkv/kernel")
    block_last = step_size(f"block_{NUM_LAYERS - 1}/attn/qkv/kernel")
    head_kernel = step_size("dino_head/mlp_0/kernel")
    patch_kernel = step_size("embeddings/patch_embedding/projection/kernel")
    np.testing.assert_allclose(block_first / block_last, DECAY ** (NUM_LAYERS - 1), rtol=1e-5)
    np.testing.assert_allclose(
        patch_kernel / head_kernel, 0.2 * DECAY ** (NUM_LAYERS + 1), rtol=1e-5
    )
    np.testing.assert_allclose(head_kernel, 1.0, rtol=1e-5)  # first Adam step: lr * sign(grad)


def test_weight_decay_mask_and_frozen_last_layer(model):
    backbone, head, groups, variables = model
    # Zero gradients leave only the decoupled weight decay: param * (1 - lr * lr_mult * wd * wd_mult).
    lr = 0.5
    optimizer = DINOv2AdamW(
        lr,
        weight_decay=0.1,
        last_layer_learning_rate=FrozenStartSchedule(CosineSchedule(lr, lr, 5), 1),
        param_groups=groups,
    )
    before = snapshot(variables)
    stepper(optimizer, variables)([ops.zeros(v.shape) for v in variables])
    after = snapshot(variables)
    for variable, b, a in zip(variables, before, after):
        lr_mult, wd_mult, is_last = reference_multipliers(variable.path)
        if wd_mult == 0.0 or is_last:
            assert np.array_equal(a, b), (
                variable.path
            )  # bias, norms, LayerScale; last layer while frozen
        else:
            np.testing.assert_allclose(
                a, b * (1 - lr * lr_mult * 0.1), rtol=1e-6, err_msg=variable.path
            )
    moved = find(variables, "embeddings/position_embedding")
    assert not np.array_equal(after[moved], before[moved])


def test_compiled_steps_read_the_step_in_graph(model):
    backend = keras.backend.backend()
    if backend == "torch":
        pytest.skip("torch runs eagerly; the eager path is covered above")
    _, _, groups, variables = model
    lr = CosineSchedule(1e-2, 1e-3, 10)
    last_lr = FrozenStartSchedule(lr, 1)
    optimizer = DINOv2AdamW(
        lr, weight_decay=0.05, last_layer_learning_rate=last_lr, param_groups=groups
    )
    optimizer.build(variables)
    grads = [ops.ones(v.shape) for v in variables]
    weight_v = find(variables, "dino_head/last_layer/weight_v")
    start = snapshot(variables)

    if backend == "jax":
        import jax

        apply = jax.jit(optimizer.stateless_apply)
        values = [v.value for v in variables]
        optimizer_values = [v.value for v in optimizer.variables]
        history = []
        for _ in range(2):
            values, optimizer_values = apply(optimizer_values, grads, values)
            history.append([np.asarray(x, np.float64) for x in values])
    else:
        import tensorflow as tf

        apply = tf.function(lambda: optimizer.apply(grads, variables), jit_compile=True)
        history = []
        for _ in range(2):
            apply()
            history.append(snapshot(variables))

    # Same trace, two steps: the last layer is frozen at step 0 and moves at step 1.
    assert np.array_equal(history[0][weight_v], start[weight_v])
    assert not np.array_equal(history[1][weight_v], start[weight_v])
    param, m, v = start[weight_v], 0.0, 0.0
    for step in range(2):
        param, m, v = numpy_adamw_step(param, 1.0, m, v, step + 1, last_lr.value_at(step), 0.05)
    np.testing.assert_allclose(history[1][weight_v], param, rtol=1e-5, atol=1e-7)
    kernel = find(variables, "block_0/attn/qkv/kernel")
    param, m, v = start[kernel], 0.0, 0.0
    for step in range(2):
        step_lr = lr.value_at(step) * DECAY**NUM_LAYERS
        param, m, v = numpy_adamw_step(param, 1.0, m, v, step + 1, step_lr, 0.05)
    np.testing.assert_allclose(history[1][kernel], param, rtol=1e-5, atol=1e-7)


def test_matches_torch_adamw_param_groups(model):
    if keras.backend.backend() != "torch":
        pytest.skip("compares with torch.optim.AdamW under the torch backend")
    import torch

    _, _, groups, variables = model
    lr, wd = (
        CosineSchedule(1e-2, 1e-3, 10, warmup_steps=1, start_warmup_value=1e-3),
        CosineSchedule(0.04, 0.4, 10),
    )
    last_lr = FrozenStartSchedule(lr, 1)
    optimizer = DINOv2AdamW(
        lr, weight_decay=wd, last_layer_learning_rate=last_lr, param_groups=groups
    )
    params = [torch.nn.Parameter(torch.tensor(to_numpy(v))) for v in variables]
    reference = torch.optim.AdamW([{"params": [p]} for p in params], betas=(0.9, 0.999))
    rng = np.random.default_rng(1)
    for step in range(3):
        grads = [rng.normal(size=v.shape).astype("float32") for v in variables]
        # As the reference's apply_optim_scheduler, before each step.
        for group, variable in zip(reference.param_groups, variables):
            g = groups[variable]
            group["lr"] = (last_lr if g.is_last_layer else lr).value_at(step) * g.lr_multiplier
            group["weight_decay"] = wd.value_at(step) * g.wd_multiplier
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g)
        reference.step()
        optimizer.apply([ops.convert_to_tensor(g) for g in grads], variables)
    for variable, p in zip(variables, params):
        np.testing.assert_allclose(to_numpy(variable), p.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_config_round_trip_keeps_groups(model):
    _, _, groups, variables = model
    lr = CosineSchedule(1e-2, 1e-3, 10)
    optimizer = DINOv2AdamW(
        lr,
        weight_decay=CosineSchedule(0.04, 0.4, 10),
        last_layer_learning_rate=FrozenStartSchedule(lr, 2),
        param_groups=groups,
    )
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(optimizer))
    assert isinstance(restored, DINOv2AdamW)
    assert restored.base_weight_decay.get_config() == optimizer.base_weight_decay.get_config()
    assert restored.last_layer_learning_rate.frozen_steps == 2
    optimizer.build(variables)
    restored.build(variables)  # groups restored by path
    assert restored._multipliers == optimizer._multipliers


def test_plain_adamw_and_exclusions():
    variable = keras.Variable(np.full((3,), 2.0, "float32"), name="w")
    optimizer = DINOv2AdamW(0.1, weight_decay=0.5)
    optimizer.apply([ops.zeros((3,))], [variable])
    np.testing.assert_allclose(to_numpy(variable), 2.0 * (1 - 0.1 * 0.5), rtol=1e-6)
    excluded = keras.Variable(np.full((3,), 2.0, "float32"), name="w2")
    optimizer = DINOv2AdamW(0.1, weight_decay=0.5)
    optimizer.exclude_from_weight_decay(var_list=[excluded])
    optimizer.apply([ops.zeros((3,))], [excluded])
    np.testing.assert_array_equal(to_numpy(excluded), 2.0)


def test_bad_input_raises(model):
    backbone, head, groups, variables = model
    stranger = keras.Variable(np.zeros(2, "float32"), name="stranger")
    with pytest.raises(ValueError, match="not.*'stranger'"):
        DINOv2AdamW(param_groups=groups).build([*variables, stranger])
    with pytest.raises(ValueError, match="`layer_decay`.*-0.5"):
        param_groups(backbone, layer_decay=-0.5)
    with pytest.raises(ValueError, match="`backbone`.*Dense"):
        param_groups(keras.layers.Dense(2))
    with pytest.raises(ValueError, match="`heads`.*unbuilt"):
        param_groups(backbone, heads=[DINOHead(5, 6, 4, name="unbuilt")])
    with pytest.raises(ValueError, match="`weight_decay`.*'x'"):
        DINOv2AdamW(weight_decay="x")
    with pytest.raises(ValueError, match="`beta_2`.*1.5"):
        DINOv2AdamW(beta_2=1.5)
    with pytest.raises(ValueError, match="`max_norm`.*0"):
        clip_by_global_norm([ops.ones(2)], 0)


def numpy_clip(grads, max_norm):
    """torch.nn.utils.clip_grad_norm_: total 2-norm, scale by min(max_norm / (norm + 1e-6), 1)."""
    norm = np.sqrt(sum(np.sum(np.square(g.astype(np.float64))) for g in grads if g is not None))
    scale = min(max_norm / (norm + 1e-6), 1.0)
    return [None if g is None else g * scale for g in grads], norm


@pytest.mark.parametrize("factor", [10.0, 0.01])
def test_clip_by_global_norm_matches_torch_formula(factor):
    rng = np.random.default_rng(2)
    grads = [
        rng.normal(size=(3, 4)).astype("float32") * factor,
        None,
        rng.normal(size=(5,)).astype("float32"),
    ]
    clipped, norm = clip_by_global_norm(
        [None if g is None else ops.convert_to_tensor(g) for g in grads], 3.0
    )
    expected, expected_norm = numpy_clip(grads, 3.0)
    np.testing.assert_allclose(to_numpy(norm), expected_norm, rtol=1e-6)
    assert clipped[1] is None
    for got, want in zip(clipped, expected):
        if want is not None:
            np.testing.assert_allclose(to_numpy(got), want, rtol=1e-6)
    if keras.backend.backend() == "torch":
        import torch

        params = [torch.nn.Parameter(torch.zeros(g.shape)) for g in grads if g is not None]
        for p, g in zip(params, [g for g in grads if g is not None]):
            p.grad = torch.tensor(g)
        torch_norm = torch.nn.utils.clip_grad_norm_(params, 3.0)
        np.testing.assert_allclose(to_numpy(norm), torch_norm.numpy(), rtol=1e-6)
        np.testing.assert_allclose(to_numpy(clipped[0]), params[0].grad.numpy(), rtol=1e-6)


def test_clip_by_global_norm_edge_cases():
    clipped, norm = clip_by_global_norm([ops.zeros((3,)), None], 3.0)
    assert float(to_numpy(norm)) == 0.0
    np.testing.assert_array_equal(to_numpy(clipped[0]), 0.0)  # no NaN from 0 / 0
    clipped, norm = clip_by_global_norm([None], 3.0)
    assert clipped == [None] and float(to_numpy(norm)) == 0.0
    half = ops.full((4,), 100.0, dtype="bfloat16")
    clipped, norm = clip_by_global_norm([half], 1.0)
    assert norm.dtype == "float32" or str(norm.dtype).endswith("float32")
    assert "bfloat16" in str(clipped[0].dtype)
    np.testing.assert_allclose(to_numpy(ops.cast(clipped[0], "float32")), 0.5, rtol=1e-2)


def test_clip_by_part_clips_each_part_separately(model):
    _, _, groups, variables = model
    grads = []
    for variable in variables:
        value = 10.0 if groups[variable].part == "backbone" else 1e-3
        grads.append(ops.full(variable.shape, value))
    clip = lambda grads: clip_by_part(grads, variables, groups, 3.0)  # noqa: E731
    if keras.backend.backend() == "jax":
        import jax

        clip = jax.jit(clip)  # as inside a train step; eager JAX would compile op by op
    clipped, norms = clip(grads)
    assert set(norms) == {"backbone", "dino_head"}
    backbone_grads = [g for g, v in zip(clipped, variables) if groups[v].part == "backbone"]
    head_indices = [i for i, v in enumerate(variables) if groups[v].part == "dino_head"]
    backbone_norm = np.sqrt(sum(np.sum(np.square(to_numpy(g))) for g in backbone_grads))
    np.testing.assert_allclose(backbone_norm, 3.0, rtol=1e-5)
    for i in head_indices:  # small head gradients are untouched by the backbone's clipping
        np.testing.assert_allclose(to_numpy(clipped[i]), to_numpy(grads[i]), rtol=1e-6)
    assert float(to_numpy(norms["dino_head"])) < 3.0 < float(to_numpy(norms["backbone"]))
