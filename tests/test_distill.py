"""Distillation: head distillation (DistillationPretrainer) and feature distillation (FeatureDistiller).

The teacher stays bit-identical through `fit`, the students and their EMAs move, the students' losses match
independent NumPy formulas, several students do not interact, and bad inputs fail early with clear messages.
"""


import keras
import numpy as np
import pytest
from conftest import to_numpy
from test_pretrainer import GLOBAL, N_LOCAL, PATCH, B, dataset, make_batch, tiny_config

from keras_dinov2 import losses
from keras_dinov2.backbone import DINOv2Backbone
from keras_dinov2.config import HeadConfig
from keras_dinov2.data.batch import GLOBAL_CROPS, LOCAL_CROPS, MASK_INDICES, MASKS, MASKS_WEIGHT
from keras_dinov2.pretrainer import DINOv2Pretrainer, DistillationPretrainer, FeatureDistiller
from keras_dinov2.pretrainer.features import on_grid


def tiny_student(name, patch_size=PATCH, seed=None, image_size=GLOBAL):
    if seed is not None:
        keras.utils.set_random_seed(seed)
    return DINOv2Backbone(patch_size=patch_size, hidden_dim=8, num_layers=1, num_heads=2, image_size=image_size,
                          interpolation="transformers", layer_scale_init=0.1, name=name)


def teacher_and_heads(config):
    """A tiny pretrainer's teacher backbone and its (untied) heads, as a run's `load_teacher` returns them."""
    keras.utils.set_random_seed(0)
    backbone = DINOv2Backbone(patch_size=PATCH, hidden_dim=16, num_layers=1, num_heads=2, image_size=GLOBAL,
                              interpolation="transformers", layer_scale_init=0.1, name="teacher_student")
    model = DINOv2Pretrainer(backbone, config)
    return model.teacher, {"dino_head": model.teacher_dino_head, "ibot_head": model.teacher_ibot_head}


def global_only(batches):
    """A dataset of the batches without their local crops (a smaller program to compile for `fit`)."""
    return dataset([{k: v for k, v in b.items() if k != LOCAL_CROPS} for b in batches])


def tensors(batch):
    return {k: keras.ops.convert_to_tensor(v) for k, v in batch.items()}


def values(variables):
    return [to_numpy(v).copy() for v in variables]


# ---------------------------------------------------------------- NumPy references


def np_log_softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def np_koleo(x, eps=1e-8):
    """-mean_i log(||x_i - x_nn(i) + eps|| + eps) over L2-normalized rows, nn = largest dot product."""
    x = x.astype("float64")
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)
    dots = x @ x.T
    np.fill_diagonal(dots, -np.inf)
    nn = dots.argmax(axis=1)
    dist = np.linalg.norm(x - x[nn] + eps, axis=-1)
    return -np.mean(np.log(dist + eps))


def np_dinov2_loss(cls_global, logits_global, logits_local, patch_logits, teacher_global, teacher_patch,
                   masks_weight, loss_config):
    """DINO (local vs both teacher views, global vs the swapped view, / (2n + 2)), iBOT and KoLeo in NumPy."""
    temp = loss_config.student_temp
    b = logits_global.shape[0] // 2
    n = logits_local.shape[0] // b
    terms = 2 * n + 2
    t = teacher_global.astype("float64").reshape(2, b, -1)
    log_local = np_log_softmax(logits_local.astype("float64") / temp).reshape(n, b, -1)
    dino_local = sum(-np.mean(np.sum(t[v] * log_local[c], -1)) for c in range(n) for v in range(2)) / terms
    log_global = np_log_softmax(logits_global.astype("float64") / temp).reshape(2, b, -1)
    dino_global = (-np.mean(np.sum(t[1] * log_global[0], -1)) - np.mean(np.sum(t[0] * log_global[1], -1))) / terms
    log_patch = np_log_softmax(patch_logits.astype("float64") / temp)
    per_patch = np.sum(teacher_patch.astype("float64") * log_patch, -1)
    ibot = -np.sum(np.where(masks_weight > 0, masks_weight * per_patch, 0.0)) / (2 * b)
    koleo = np_koleo(cls_global[:b]) + np_koleo(cls_global[b:])
    return (loss_config.dino_weight * (dino_local + dino_global) + loss_config.ibot_weight * ibot
            + loss_config.koleo_weight * koleo)


def np_standardize(x, eps=1e-6):
    x = x.astype("float64")
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)


def np_regression(s, t, kind):
    s = s.astype("float64")
    if kind == "cosine":
        cos = np.sum(s * t, -1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))
        return np.mean(1.0 - cos)
    diff = np.abs(s - t)
    return np.mean(np.where(diff < 1.0, 0.5 * diff ** 2, diff - 0.5))


# ---------------------------------------------------------------- head distillation


def test_head_distillation_fit_keeps_teacher_and_moves_students_and_emas():
    config = tiny_config(warmup_epochs=0)
    teacher, heads = teacher_and_heads(config)
    students = [tiny_student(f"s{i}") for i in range(2)]
    model = DistillationPretrainer(teacher, heads, students, config)
    model.compile()
    frozen = teacher.weights + heads["dino_head"].weights + heads["ibot_head"].weights
    frozen_before = values(frozen)
    ema_before = [values(ema.weights) for ema in model.ema_students]
    student_before = [values(s.trainable_weights) for s in students]
    history = model.fit(global_only([make_batch(0), make_batch(1)]), epochs=1, verbose=0)
    assert int(to_numpy(model.optimizer.iterations)) == 2
    assert np.isfinite(history.history["loss"][-1])
    assert "student_0/loss" in history.history and "student_1/loss" in history.history

    for before, variable in zip(frozen_before, frozen):
        assert np.array_equal(before, to_numpy(variable)), variable.path
    for i in range(2):
        ema_moved = sum(not np.array_equal(a, to_numpy(v))
                        for a, v in zip(ema_before[i], model.ema_students[i].weights))
        student_moved = sum(not np.array_equal(a, to_numpy(v))
                            for a, v in zip(student_before[i], students[i].trainable_weights))
        assert ema_moved > len(ema_before[i]) // 2, (i, ema_moved)
        assert student_moved > len(student_before[i]) // 2, (i, student_moved)
    # The exported model is the first student's EMA.
    out = model(make_batch(2)[GLOBAL_CROPS])
    np.testing.assert_allclose(to_numpy(out["cls_token"]),
                               to_numpy(model.ema_students[0](make_batch(2)[GLOBAL_CROPS])["cls_token"]), rtol=1e-6)


def test_head_distillation_loss_matches_numpy_and_student_is_unmasked():
    config = tiny_config()
    teacher, heads = teacher_and_heads(config)
    student = tiny_student("s0", seed=1)
    model = DistillationPretrainer(teacher, heads, [student], config)
    model.compile()
    batch = make_batch(3)
    data = tensors(batch)
    targets, _ = model.teacher_targets(data, update_centers=False)
    total, logs = model.student_loss(data, targets, training=False)

    parts = model.student_parts[0]
    unmasked = student({"images": data[GLOBAL_CROPS]}, training=False)
    local = student({"images": data[LOCAL_CROPS]}, training=False)
    cls_global = to_numpy(unmasked["cls_token"])
    patches = to_numpy(unmasked["patch_tokens"])
    gathered = patches.reshape(-1, patches.shape[-1])[batch[MASK_INDICES]]

    def reference(cls, gathered_patches):
        return np_dinov2_loss(
            cls, to_numpy(parts.dino_head(keras.ops.convert_to_tensor(cls))),
            to_numpy(parts.dino_head(local["cls_token"])),
            to_numpy(parts.ibot_head(keras.ops.convert_to_tensor(gathered_patches))),
            to_numpy(targets["dino"]), to_numpy(targets["ibot"]), batch[MASKS_WEIGHT], config.loss)

    expected = reference(cls_global, gathered)
    np.testing.assert_allclose(float(to_numpy(total)), expected, rtol=1e-4)
    np.testing.assert_allclose(float(to_numpy(logs["loss"])), expected, rtol=1e-4)

    # The parity above discriminates masking: the masked student's loss is clearly different.
    masked = student({"images": data[GLOBAL_CROPS], "masks": data[MASKS]}, training=False)
    assert np.abs(to_numpy(masked["cls_token"]) - cls_global).max() > 1e-4
    masked_patches = to_numpy(masked["patch_tokens"])
    masked_loss = reference(to_numpy(masked["cls_token"]),
                            masked_patches.reshape(-1, masked_patches.shape[-1])[batch[MASK_INDICES]])
    assert abs(masked_loss - expected) > 1e-3 * abs(expected)


def test_students_are_independent():
    config = tiny_config()
    teacher, heads = teacher_and_heads(config)
    s0, s1 = tiny_student("s0", seed=1), tiny_student("s1", seed=2)
    pair = DistillationPretrainer(teacher, heads, [s0, s1], config)
    pair.compile()
    single = DistillationPretrainer(teacher, heads, [s0], config)
    single.compile()
    single.student_parts[0].dino_head.set_weights(pair.student_parts[0].dino_head.get_weights())
    single.student_parts[0].ibot_head.set_weights(pair.student_parts[0].ibot_head.get_weights())
    data = tensors(make_batch(4))
    pair_targets, _ = pair.teacher_targets(data, update_centers=False)
    single_targets, _ = single.teacher_targets(data, update_centers=False)
    _, pair_logs = pair.student_loss(data, pair_targets, training=False)
    _, single_logs = single.student_loss(data, single_targets, training=False)
    np.testing.assert_allclose(float(to_numpy(pair_logs["student_0/loss"])), float(to_numpy(single_logs["loss"])),
                               rtol=1e-5)
    np.testing.assert_allclose(
        float(to_numpy(pair_logs["loss"])),
        float(to_numpy(pair_logs["student_0/loss"])) + float(to_numpy(pair_logs["student_1/loss"])), rtol=1e-5)


# ---------------------------------------------------------------- feature distillation


@pytest.mark.parametrize("kind", ["cosine", "smooth_l1"])
def test_feature_distillation_loss_matches_numpy(kind):
    rng = np.random.default_rng(0)
    s_cls, t_cls = rng.normal(size=(2, 3, 8)).astype("float32")
    s_patch = rng.normal(size=(3, 5, 8)).astype("float32")
    t_patch = (3.0 * rng.normal(size=(3, 5, 8)) + 2.0).astype("float32")
    out = losses.feature_distillation_loss(s_cls, t_cls, s_patch, t_patch, kind=kind, cls_weight=0.5,
                                           patch_weight=2.0)
    cls = np_regression(s_cls, np_standardize(t_cls), kind)
    patch = np_regression(s_patch, np_standardize(t_patch), kind)
    np.testing.assert_allclose(float(to_numpy(out["cls"])), cls, rtol=1e-5)
    np.testing.assert_allclose(float(to_numpy(out["patch"])), patch, rtol=1e-5)
    np.testing.assert_allclose(float(to_numpy(out["total"])), 0.5 * cls + 2.0 * patch, rtol=1e-5)


def test_on_grid_identity_and_bilinear_downsampling():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 16, 3)).astype("float32")
    assert on_grid(x, (4, 4), (4, 4)) is x
    out = to_numpy(on_grid(keras.ops.convert_to_tensor(x), (4, 4), (2, 2)))
    assert out.shape == (2, 4, 3)
    # Half-pixel bilinear 4 -> 2 samples between pixels 0/1 and 2/3: the mean of each 2x2 block.
    expected = x.reshape(2, 2, 2, 2, 2, 3).mean(axis=(2, 4)).reshape(2, 4, 3)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_feature_distiller_trains_student_of_other_patch_size():
    config = tiny_config(warmup_epochs=0)
    teacher, _ = teacher_and_heads(config)
    student = tiny_student("s0", patch_size=2, seed=1)
    model = FeatureDistiller(teacher, [student], config, loss="smooth_l1")
    model.compile()
    teacher_before = values(teacher.weights)
    student_before = values(student.trainable_weights)
    history = model.fit(global_only([make_batch(0), make_batch(1)]), epochs=1, verbose=0)
    assert all(np.isfinite(history.history["loss"]))
    for before, variable in zip(teacher_before, teacher.weights):
        assert np.array_equal(before, to_numpy(variable)), variable.path
    assert any(not np.array_equal(a, to_numpy(v)) for a, v in zip(student_before, student.trainable_weights))
    # The loss is the crop-weighted mean of global and local feature losses on the teacher's grid.
    data = tensors(make_batch(2))
    targets, _ = model.teacher_targets(data)
    assert targets["global"][2] == (GLOBAL // PATCH,) * 2
    total, logs = model.student_loss(data, targets, training=False)
    expected = []
    for key, name in ((GLOBAL_CROPS, "global"), (LOCAL_CROPS, "local")):
        out = student({"images": data[key]}, training=False)
        side = data[key].shape[1]
        patches = to_numpy(on_grid(model.patch_projectors[0](out["patch_tokens"]), (side // 2,) * 2,
                                   (side // PATCH,) * 2))
        assert patches.shape[1] == (side // PATCH) ** 2
        t_cls, t_patch, _ = targets[name]
        expected.append(np_regression(to_numpy(model.cls_projectors[0](out["cls_token"])),
                                      np_standardize(to_numpy(t_cls)), "smooth_l1")
                        + np_regression(patches, np_standardize(to_numpy(t_patch)), "smooth_l1"))
    weights = np.array([2 * B, N_LOCAL * B], "float64")
    np.testing.assert_allclose(float(to_numpy(total)), np.dot(weights, expected) / weights.sum(), rtol=1e-4)


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_raise():
    config = tiny_config()
    teacher, heads = teacher_and_heads(config)
    student = tiny_student("s0")
    with pytest.raises(ValueError, match="FeatureDistiller"):
        DistillationPretrainer(teacher, None, [student], config)
    wrong = tiny_config()
    wrong.heads = HeadConfig(num_prototypes=64, hidden_dim=24, bottleneck_dim=8, ibot_separate_head=True,
                             ibot_num_prototypes=16, ibot_bottleneck_dim=8)
    with pytest.raises(ValueError, match="prototypes"):
        DistillationPretrainer(teacher, heads, [student], wrong)
    with pytest.raises(ValueError, match="patch size"):
        DistillationPretrainer(teacher, heads, [tiny_student("s2", patch_size=2)], config)
    with pytest.raises(ValueError, match="do not divide into student 0's 3-px"):
        FeatureDistiller(teacher, [tiny_student("s3", patch_size=3, image_size=18)], config)
    odd = tiny_config()
    odd.data.crops.local_crops_size = 6
    with pytest.raises(ValueError, match="Crops of 6 px do not divide into the teacher's"):
        FeatureDistiller(teacher, [student], odd)
    with pytest.raises(ValueError, match="same backbone twice"):
        DistillationPretrainer(teacher, heads, [student, student], config)
    with pytest.raises(ValueError, match="same backbone twice"):
        FeatureDistiller(teacher, [student, student], config)


@pytest.mark.once
def test_load_teacher_reads_a_run_directory_with_its_heads(tmp_path):
    """A pretraining run directory gives its newest checkpoint's EMA teacher and teacher heads, not fresh ones."""
    import json

    from keras_dinov2.backbone import build_backbone
    from keras_dinov2.run import RunDirectory, load_teacher, save_checkpoint

    config = tiny_config()
    keras.utils.set_random_seed(3)
    model = DINOv2Pretrainer(build_backbone("dinov2_vit_tiny4", config), config)
    model.compile()
    model.optimizer.build(model.trainable_variables)  # as after training: the checkpoint holds its moments
    rng = np.random.default_rng(0)
    for variable in model.teacher.weights + model.teacher_dino_head.weights + model.teacher_ibot_head.weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    run = RunDirectory(str(tmp_path / "run"))
    run.create()
    with open(run.config_path, "w") as f:
        json.dump({"ssl": config.to_dict(), "model": "dinov2_vit_tiny4", "data": "digits"}, f)
    save_checkpoint(model, run.checkpoint_path(1), {"epoch": 1})
    teacher, heads, loaded_config = load_teacher(run.path)
    assert loaded_config.heads == config.heads
    pairs = [(teacher, model.teacher), (heads["dino_head"], model.teacher_dino_head),
             (heads["ibot_head"], model.teacher_ibot_head)]
    assert heads["ibot_head"] is not heads["dino_head"]
    for loaded, saved in pairs:
        for a, b in zip(loaded.weights, saved.weights):
            np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    # A run directory without a checkpoint (a run that stopped before its first epoch ended).
    empty = RunDirectory(str(tmp_path / "empty"))
    empty.create()
    with open(empty.config_path, "w") as f:
        json.dump({"ssl": config.to_dict(), "model": "dinov2_vit_tiny4"}, f)
    with pytest.raises(ValueError, match="not a pretraining run"):
        load_teacher(empty.path)
