"""Training-step parity with the official DINO v1 code (facebookresearch/dino): same weights, same batch, a few steps.

The v1 counterpart of tools/reference_step.py. It builds main_dino.py's student and teacher (utils.MultiCropWrapper
around vision_transformer.VisionTransformer and DINOHead), its DINOLoss, parameter groups, AdamW and schedules, from
a checkout given by path (never a dependency of keras_dinov2), and `keras_dinov2.DINOv2Pretrainer` with a DINO v1
recipe (`SSLConfig.recipe("dino")` at a tiny size) from the same initial weights. Both run the same steps on the same
multi-crop batch as main_dino.py's train_one_epoch does them: schedules written into the optimizer per step, the
teacher temperature read per epoch, gradients clipped per parameter tensor, the last layer's gradients dropped in
the first epoch, AdamW, the teacher's EMA. Per quantity it prints the worst relative difference of ours from the
reference over the steps, on each Keras backend.

Two configurations:

    v1          main_dino.py's defaults: prototype norms fixed at 1 (norm_last_layer), teacher temperature 0.04
    v1_boosted  its README's boosted ViT-S run: trained prototype norms, teacher temperature warmed to 0.07

Run from the repository root:

    python tools/reference_step_v1.py --reference-src /path/to/dino                    # both, 3 backends
    python tools/reference_step_v1.py --reference-src /path/to/dino \\
        --write-fixtures tests/fixtures/reference_step_v1                             # regenerate fixtures
    KERAS_BACKEND=jax python tools/reference_step_v1.py \\
        --replay tests/fixtures/reference_step_v1/v1.npz                              # no reference needed
"""

import contextlib
import functools
import importlib.util
import os
import sys
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import reference_step as shared  # noqa: E402

REPO_ROOT = shared.REPO_ROOT
BACKENDS = shared.BACKENDS

# Tiny settings named after main_dino.py's arguments where it has them. Epochs of 2 steps: three steps cross the
# lr warm-up (0, then the peak), the end of the dropped last layer (epoch 0) and the teacher temperature's table
# (epoch 0, then epoch 1).
COMMON = {
    "batch_size_per_gpu": 4,
    "patch_size": 4,
    "global_crops_size": 32,
    "local_crops_size": 16,
    "local_crops_number": 2,
    "embed_dim": 16,
    "depth": 2,
    "num_heads": 2,
    "mlp_ratio": 4,
    "head_hidden_dim": 32,
    "head_bottleneck_dim": 16,
    "head_nlayers": 3,
    "out_dim": 64,
    "norm_last_layer": True,
    "drop_path_rate": 0.0,
    "epoch_length": 2,
    "epochs": 3,
    "warmup_epochs": 1,
    "freeze_last_layer": 1,
    "lr": 0.0005,
    "min_lr": 1e-6,
    "weight_decay": 0.04,
    "weight_decay_end": 0.4,
    "momentum_teacher": 0.996,
    "teacher_temp": 0.04,
    "warmup_teacher_temp": 0.04,
    "warmup_teacher_temp_epochs": 0,
    "clip_grad": 3.0,
    "student_temp": 0.1,
    "center_momentum": 0.9,
}
CONFIGS = {
    "v1": dict(COMMON),
    "v1_boosted": {**COMMON, "norm_last_layer": False, "teacher_temp": 0.07, "warmup_teacher_temp_epochs": 2,
                   "clip_grad": 0.3},
}
DESCRIPTIONS = {
    "v1": "main_dino.py defaults: fixed prototype norms, teacher temperature 0.04",
    "v1_boosted": "trained prototype norms, teacher temperature 0.04 -> 0.07 per epoch, clip 0.3",
}
SCALARS = ("loss", "grad_norm_backbone", "grad_norm_dino_head", "lr", "wd", "momentum", "teacher_temp")
QUANTITIES = SCALARS + ("dino_center", "student parameters", "teacher parameters", "student updates")
# The names the tool gives the reference's two modules, so that neither shadows another `utils`.
MODULES = {"utils": "utils.py", "vision_transformer": "vision_transformer.py", "main_dino": "main_dino.py"}

HELP_EPILOG = f"""
What is compared ("worst" is over the steps, and over the arrays for parameters):

  loss          DINOLoss's value (every teacher global crop against every other student crop, averaged)
  grad_norm_*   each part's global gradient norm before clipping (backbone, dino_head); v1 clips each
                tensor on its own (utils.clip_gradients), the norms are the logs' summary of the same gradients
  lr, wd, momentum, teacher_temp
                the schedules (utils.cosine_scheduler per step; DINOLoss's temperature table per epoch)
  dino_center   DINOLoss.center after the step
  student parameters, teacher parameters, student updates
                as in tools/reference_step.py (the attention key biases left out and bounded by the key
                bias drift); our backbone's mask token, which v1 has not, is not compared

Relative difference, tolerances (max({shared.RTOL:.0e}, {shared.FLOAT32_FACTOR:g} x the reference's own float32
error from its float64 run) and the fixture format are tools/reference_step.py's.

The reference runs on the CPU in one process: main_dino.py's objects and utils functions are used as
train_one_epoch uses them; a gloo process group of one process serves DINOLoss's all_reduce;
torchvision, which main_dino.py imports for its data loading only, gets an empty stand-in. main_dino.py's
DINOHead calls take the default hidden (2048) and bottleneck (256) sizes; here both heads are built at
the tiny sizes. Initial weights: the modules' own initialisation under torch.manual_seed, rounded to float16
values; the teacher loads the student's state dict, as main_dino.py does.

Requirements of the reference side: a checkout of facebookresearch/dino (main_dino.py, utils.py,
vision_transformer.py), torch and Pillow. Checked with dino 7c446df.
"""


# ------------------------------------------------------------------------- our side


def our_config(settings):
    """The SSLConfig (the "dino" recipe at the setting's sizes) and DINOv2Backbone arguments of a setting."""
    from keras_dinov2.config import SSLConfig

    s = settings
    config = SSLConfig.recipe("dino")
    config.batch_size = s["batch_size_per_gpu"]
    h = config.heads
    h.num_prototypes, h.hidden_dim, h.bottleneck_dim = s["out_dim"], s["head_hidden_dim"], s["head_bottleneck_dim"]
    h.num_layers, h.norm_last_layer = s["head_nlayers"], s["norm_last_layer"]
    config.loss.student_temp, config.loss.center_momentum = s["student_temp"], s["center_momentum"]
    o = config.optim
    o.epochs, o.steps_per_epoch, o.warmup_epochs = s["epochs"], s["epoch_length"], s["warmup_epochs"]
    o.base_lr, o.min_lr, o.weight_decay, o.weight_decay_end = s["lr"], s["min_lr"], s["weight_decay"], s[
        "weight_decay_end"]
    o.momentum_teacher, o.final_momentum_teacher = s["momentum_teacher"], 1.0
    o.teacher_temp, o.warmup_teacher_temp = s["teacher_temp"], s["warmup_teacher_temp"]
    o.warmup_teacher_temp_epochs = s["warmup_teacher_temp_epochs"]
    o.freeze_last_layer_epochs, o.clip_grad = s["freeze_last_layer"], s["clip_grad"]
    crops = config.data.crops
    crops.global_crops_size, crops.local_crops_size = s["global_crops_size"], s["local_crops_size"]
    crops.local_crops_number = s["local_crops_number"]
    config.model.patch_size, config.model.drop_path_rate = s["patch_size"], s["drop_path_rate"]
    backbone_args = {
        "patch_size": s["patch_size"],
        "hidden_dim": s["embed_dim"],
        "num_layers": s["depth"],
        "num_heads": s["num_heads"],
        "mlp_ratio": float(s["mlp_ratio"]),
        "num_register_tokens": 0,
        "image_size": s["global_crops_size"],
        "interpolation": "original",
        "layer_scale_init": None,
        "drop_path_rate": s["drop_path_rate"],
        "cls_token_init_std": 0.02,
    }
    return config, backbone_args


def _layouts(model, network):
    """{part: [(reference name, variable, layout)]}: v1's MultiCropWrapper names (backbone, dino_head)."""
    from keras_dinov2.interop import torch_hub_layout

    backbone = model.student if network == "student" else model.teacher
    layout = [pair for pair in torch_hub_layout(backbone) if pair[0] != "mask_token"]
    return {"backbone": layout, "dino_head": shared._head_layout(getattr(model, f"{network}_dino_head"))}


def build_ours(record, modify=None):
    """A compiled DINOv2Pretrainer with the v1 recipe, holding the record's initial weights (teacher = student).

    `modify(config)`, if given, changes the SSLConfig first (the replay test's negative controls).
    """
    import keras_dinov2 as kd

    config, backbone_args = our_config(record["meta"]["settings"])
    if modify is not None:
        modify(config)
    model = kd.DINOv2Pretrainer(kd.DINOv2Backbone(**backbone_args), config)
    for network in ("student", "teacher"):
        for part, layout in _layouts(model, network).items():
            for name, variable, how in layout:
                key = f"init/{part}/{name}"
                if key not in record:
                    raise KeyError(f"the record has no {key}")
                shared._write(variable, record[key], how)
    model.compile()
    return model


def batch_of(record):
    """The record's crops in keras_dinov2's batch contract, with no masked patch (v1 has no iBOT)."""
    from keras_dinov2.config import MaskingConfig
    from keras_dinov2.data import mask_buffer_size

    s = record["meta"]["settings"]
    global_crops = np.asarray(record["batch/global_crops"], np.float32)
    n_patches = (s["global_crops_size"] // s["patch_size"]) ** 2
    buffer = mask_buffer_size(len(global_crops), n_patches, MaskingConfig(mask_sample_probability=0.0))
    return {
        "global_crops": global_crops,
        "local_crops": np.asarray(record["batch/local_crops"], np.float32),
        "masks": np.zeros((len(global_crops), n_patches), bool),
        "mask_indices": np.zeros((buffer,), np.int32),
        "masks_weight": np.zeros((buffer,), np.float32),
        "n_masked_patches": np.int32(0),
    }


def run_ours(record, steps=None, modify=None):
    """Replays the record's steps with keras_dinov2 on the active backend; returns a record of ours."""
    import keras

    steps = record["meta"]["steps"] if steps is None else steps
    model = build_ours(record, modify)
    batch = batch_of(record)
    out = {"meta": {**record["meta"], "backend": keras.backend.backend()}}
    out.update({k: v for k, v in record.items() if k.startswith("init/")})
    for step in range(steps):
        logs = model.train_on_batch(batch, return_dict=True)
        for quantity in SCALARS:
            if quantity in logs:
                out[f"step{step}/{quantity}"] = np.float32(logs[quantity])
        out[f"step{step}/dino_center"] = np.asarray(keras.ops.convert_to_numpy(model.dino_center)).reshape(-1)
        for network in ("student", "teacher"):
            for part, layout in _layouts(model, network).items():
                for name, variable, how in layout:
                    out[f"step{step}/{network}/{part}/{name}"] = shared._read(variable, how)
    return out


def differences(reference, ours):
    """{key: relative difference}: tools/reference_step.py's comparison (its scalar list holds every v1 quantity)."""
    return shared.differences(reference, ours)


# ------------------------------------------------------------------------- the reference side


@functools.cache
def import_reference(folder):
    """main_dino.py, utils.py and vision_transformer.py of a facebookresearch/dino checkout, as modules."""
    folder = os.path.abspath(os.path.expanduser(folder))
    problem = check_reference_src(folder)
    if problem:
        raise ValueError(f"--reference-src: {problem}")
    torchvision = types.ModuleType("torchvision")
    for name in ("datasets", "transforms", "models"):
        setattr(torchvision, name, types.ModuleType(f"torchvision.{name}"))
    stand_ins = {"torchvision": torchvision, **{f"torchvision.{n}": getattr(torchvision, n)
                                                 for n in ("datasets", "transforms", "models")}}
    saved = {name: sys.modules.get(name) for name in [*MODULES, *stand_ins]}
    sys.modules.update(stand_ins)
    loaded = {}
    try:
        for name, file in MODULES.items():  # utils first: the other two import it by that name
            spec = importlib.util.spec_from_file_location(name, os.path.join(folder, file))
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            loaded[name] = module
    except ImportError as error:
        raise ImportError(f"could not import the reference from {folder}: {error}. It needs torch and "
                          "Pillow.") from error
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return types.SimpleNamespace(folder=folder, **loaded)


def _make_crops(settings, seed):
    """Random crops (multiples of 1/32 in [-2, 2], float16 values), view-major as keras_dinov2's batch."""
    s = settings
    b, n_local = s["batch_size_per_gpu"], s["local_crops_number"]
    g, loc = s["global_crops_size"], s["local_crops_size"]
    rng = np.random.RandomState(seed)
    global_crops = (rng.randint(-64, 65, size=(2 * b, g, g, 3)) / 32.0).astype(np.float32)
    local_crops = (rng.randint(-64, 65, size=(n_local * b, loc, loc, 3)) / 32.0).astype(np.float32)
    return global_crops, local_crops


def run_reference(folder, name, steps=3, seed=0, dtype="float32"):
    """Runs `steps` steps of main_dino.py's training in configuration `name`; returns its record.

    `dtype="float64"` runs the same steps in double precision: a yardstick for float32 rounding.
    """
    import torch
    from torch import nn

    if dtype not in ("float32", "float64"):
        raise ValueError(f"`dtype` must be 'float32' or 'float64'; received {dtype!r}.")
    ref = import_reference(folder)
    s = CONFIGS[name]
    record = {}
    torch.manual_seed(seed)

    def network(norm_last_layer):
        backbone = ref.vision_transformer.VisionTransformer(
            img_size=[s["global_crops_size"]], patch_size=s["patch_size"], embed_dim=s["embed_dim"],
            depth=s["depth"], num_heads=s["num_heads"], mlp_ratio=s["mlp_ratio"], qkv_bias=True,
            norm_layer=functools.partial(nn.LayerNorm, eps=1e-6), drop_path_rate=s["drop_path_rate"])
        head = ref.vision_transformer.DINOHead(
            s["embed_dim"], s["out_dim"], use_bn=False, norm_last_layer=norm_last_layer,
            nlayers=s["head_nlayers"], hidden_dim=s["head_hidden_dim"], bottleneck_dim=s["head_bottleneck_dim"])
        return ref.utils.MultiCropWrapper(backbone, head)

    with _quiet_weight_norm_warning():
        student = network(s["norm_last_layer"])
        teacher = network(True)  # main_dino.py builds the teacher's head with its default; the state dict follows
    with torch.no_grad():
        for p in student.parameters():
            p.copy_(p.half().float())
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    for pname, p in student.named_parameters():
        record[f"init/{_key(pname)}"] = p.detach().numpy().copy()
    dino_loss = ref.main_dino.DINOLoss(
        s["out_dim"], s["local_crops_number"] + 2, s["warmup_teacher_temp"], s["teacher_temp"],
        s["warmup_teacher_temp_epochs"], s["epochs"], student_temp=s["student_temp"],
        center_momentum=s["center_momentum"])
    if dtype == "float64":
        student.double(), teacher.double(), dino_loss.double()
    optimizer = torch.optim.AdamW(ref.utils.get_params_groups(student))
    niter, epochs = s["epoch_length"], s["epochs"]
    lr_schedule = ref.utils.cosine_scheduler(s["lr"] * s["batch_size_per_gpu"] / 256.0, s["min_lr"], epochs,
                                             niter, warmup_epochs=s["warmup_epochs"])
    wd_schedule = ref.utils.cosine_scheduler(s["weight_decay"], s["weight_decay_end"], epochs, niter)
    momentum_schedule = ref.utils.cosine_scheduler(s["momentum_teacher"], 1, epochs, niter)
    global_crops, local_crops = _make_crops(s, seed)
    record["batch/global_crops"], record["batch/local_crops"] = global_crops, local_crops
    b = s["batch_size_per_gpu"]
    torch_dtype = torch.float64 if dtype == "float64" else torch.float32
    nchw = [torch.from_numpy(c.transpose(0, 3, 1, 2).copy()).to(torch_dtype)
            for c in (global_crops, local_crops)]
    images = [nchw[0][:b], nchw[0][b:]] + [nchw[1][j * b:(j + 1) * b] for j in range(s["local_crops_number"])]
    parts = {"backbone": student.backbone, "dino_head": student.head}
    with shared._single_process_group():
        for it in range(steps):
            epoch = it // niter
            for i, group in enumerate(optimizer.param_groups):  # train_one_epoch's schedule writes
                group["lr"] = lr_schedule[it]
                if i == 0:
                    group["weight_decay"] = wd_schedule[it]
            teacher_output = teacher(images[:2])
            student_output = student(images)
            loss = dino_loss(student_output, teacher_output, epoch)
            optimizer.zero_grad()
            loss.backward()
            norms = {part: float(torch.sqrt(sum(torch.sum(p.grad.double() ** 2) for p in module.parameters()
                                                    if p.grad is not None)))
                     for part, module in parts.items()}
            tensor_norms = ref.utils.clip_gradients(student, s["clip_grad"])
            ref.utils.cancel_gradients_last_layer(epoch, student, s["freeze_last_layer"])
            optimizer.step()
            with torch.no_grad():
                m = momentum_schedule[it]
                for param_q, param_k in zip(student.parameters(), teacher.parameters()):
                    param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
            values = {"loss": float(loss.detach()), "lr": lr_schedule[it], "wd": wd_schedule[it], "momentum": m,
                      "teacher_temp": dino_loss.teacher_temp_schedule[epoch]}
            values.update({f"grad_norm_{part}": norm for part, norm in norms.items()})
            # Not compared: how many tensors the step clipped (the fixtures' proof that clipping acted).
            values["clipped_tensors"] = sum(norm > s["clip_grad"] for norm in tensor_norms)
            for quantity, value in values.items():
                record[f"step{it}/{quantity}"] = np.float64(value)
            record[f"step{it}/dino_center"] = dino_loss.center.detach().numpy().reshape(-1).copy()
            for net_name, net in (("student", student), ("teacher", teacher)):
                for pname, p in net.named_parameters():
                    record[f"step{it}/{net_name}/{_key(pname)}"] = p.detach().numpy().copy()
    record["meta"] = {
        "format": shared.FORMAT_VERSION,
        "config": name,
        "description": DESCRIPTIONS[name],
        "settings": s,
        "steps": steps,
        "seed": seed,
        "dtype": dtype,
        "parameter_steps": list(range(steps)),
        "reference_commit": shared._reference_commit(folder),
        "torch": torch.__version__,
        "generator": "tools/reference_step_v1.py",
    }
    return record


def _key(torch_name):
    """MultiCropWrapper's parameter names as record keys: "backbone/blocks.0..." and "dino_head/mlp.0..."."""
    module, _, rest = torch_name.partition(".")
    return f"{'dino_head' if module == 'head' else module}/{rest}"


@contextlib.contextmanager
def _quiet_weight_norm_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*weight_norm.*")
        yield


# ------------------------------------------------------------------------- command line (tools/reference_step.py's)

DESCRIPTION = "Compare training steps of keras_dinov2's DINO v1 recipe with the official DINO v1 code."
REFERENCE_NAME = "facebookresearch/dino"
REFERENCE_MARKER = "main_dino.py"
SEED_HELP = "weights and crops. Default: 0."


def check_reference_src(folder):
    """None when `folder` holds main_dino.py, utils.py and vision_transformer.py, else what is missing."""
    missing = [f for f in MODULES.values() if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        return f"{folder} holds no {', '.join(missing)} (expected a checkout of {REFERENCE_NAME})."
    return None


def replay(path):
    """Replays a stored record on the active backend: (its record, ours, {key: difference})."""
    reference = shared.load_record(path)
    ours = run_ours(reference)
    return reference, ours, differences(reference, ours)


def main(argv=None):
    return shared.main(argv, tool=sys.modules[__name__])


if __name__ == "__main__":
    sys.exit(main())
