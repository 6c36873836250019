"""`keras-dinov2 distill`: a frozen teacher trains one or several small students, in a resumable run directory."""

import dataclasses
import os

import keras

from keras_dinov2.backbone import ARCHITECTURES, build_backbone
from keras_dinov2.config import SSLConfig
from keras_dinov2.run.callbacks import ConstantLogs
from keras_dinov2.run.directory import RunDirectory, is_run_directory
from keras_dinov2.run.errors import ResumeError
from keras_dinov2.run.resume import apply_flags, resumed_config, same_location
from keras_dinov2.run.session import (
    KNN_DTYPE,
    compile_model,
    describe_batch,
    exports_here,
    knn_enabled,
    knn_monitor,
    open_session,
    restore,
    train,
)

MODES = ("auto", "heads", "features")
DEFAULT_DIGITS_STUDENT = "dinov2_vit_micro4"


def student_names(args):
    """The students' architectures (or preset folders): --students a,b,c, else --student (commas allowed too),
    else the digits one."""
    given = getattr(args, "students", None) or getattr(args, "student", None)
    if given:
        names = [name.strip() for name in given.split(",")]
        if not all(names):
            raise ValueError(f"--students {given!r} has an empty name; give architectures separated by "
                             "commas, e.g. --students dinov2_vit_micro4,dinov2_vit_tiny4.")
        return names
    if (args.data or "digits") == "digits":
        return [DEFAULT_DIGITS_STUDENT]
    raise ValueError("--student ARCH (or --students a,b,c) is required: the architecture of the small backbone "
                     f"to train, e.g. dinov2_vit_small14; built in: {', '.join(sorted(ARCHITECTURES))}.")


def teacher_has_heads(spec):
    """Whether a teacher source brings DINO/iBOT heads: a pretraining run directory or an export with heads."""
    from keras_dinov2.interop import exported_head_config

    path = os.fspath(spec)
    if not os.path.isdir(path):
        return False
    return is_run_directory(path) or exported_head_config(path) is not None


def _teacher_recipe(spec):
    """(the teacher run's SSLConfig and recipe name) for a run directory, else (None, None)."""
    if not is_run_directory(spec):
        return None, None
    stored = RunDirectory(spec).read_config()
    return SSLConfig.from_dict(stored["ssl"]), stored.get("recipe")


def resolve_distill_config(args, run):
    """The config of the distillation run that `distill` starts or resumes in `run`.

    A new run takes the recipe (--recipe, else the teacher run's, else digits for the digits data, else
    reference_default) with the flags' values; its heads and loss settings (prototype counts, head tying,
    centering, teacher temperature) are the teacher's where it has heads; the students get no stochastic depth
    (the DINOv2 paper's distillation). A resumed run keeps its stored config; --teacher, --student(s), --mode,
    --feature-loss, --data, --recipe, --steps-per-epoch, --accumulation and --seed cannot change.

    Returns:
        (config, data spec, resumed, (teacher spec, student names, mode, feature loss, recipe)).

    Raises:
        ResumeError: as for `pretrain`, or resuming a run that `pretrain` wrote.
        ValueError: no --teacher, an unknown --mode for the teacher, or no students.
    """
    stored = run.read_config() if args.resume else None
    if stored is not None:
        if stored.get("command") != "distill":
            raise ResumeError(f"{run.path} holds a pretraining run; resume it with `keras-dinov2 pretrain --out "
                              f"{run.path} --resume`.")
        given_students = student_names(args) if (args.students or args.student) else None
        fixed = [("--data", args.data, stored["data"], same_location),
                 ("--teacher", args.teacher, stored["teacher"], same_location),
                 ("--students", given_students, stored["students"], None),
                 ("--mode", None if args.mode == "auto" else args.mode, stored["mode"], None),
                 ("--feature-loss", args.feature_loss, stored["feature_loss"], None),
                 ("--recipe", args.recipe, stored["recipe"], None)]
        config, changes = resumed_config(args, stored, run.path, fixed)
        extra = (stored["teacher"], stored["students"], stored["mode"], stored["feature_loss"], stored["recipe"])
        return config, stored["data"], (stored, changes), extra
    if args.resume:
        raise ResumeError(f"--resume given but {run.config_path} does not exist: nothing to resume; drop "
                          "--resume to start a new run there.")
    if not args.teacher:
        raise ValueError("--teacher is required: a pretraining run directory, a preset folder (exported with "
                         "--heads for head distillation), a transformers folder, a torch-hub .pth file or a "
                         "keras-hub preset.")
    data = args.data or "digits"
    has_heads = teacher_has_heads(args.teacher)
    mode = args.mode
    if mode == "auto":
        mode = "heads" if has_heads else "features"
    elif mode == "heads" and not has_heads:
        raise ValueError(f"--mode heads needs a teacher with DINO/iBOT heads (a pretraining run directory or an "
                         f"export made with --heads); {args.teacher!r} has none. Use --mode features (feature "
                         "distillation from the backbone alone).")
    teacher_config, teacher_recipe = _teacher_recipe(args.teacher)
    recipe = args.recipe or teacher_recipe or ("digits" if data == "digits" else "reference_default")
    config = apply_flags(SSLConfig.recipe(recipe), args)
    if teacher_config is not None:  # the targets are the teacher's: its heads, centering and temperatures
        config = dataclasses.replace(config, heads=teacher_config.heads, loss=teacher_config.loss)
    elif has_heads:
        from keras_dinov2.interop import exported_head_config

        config = dataclasses.replace(config, heads=dataclasses.replace(
            config.heads, **exported_head_config(args.teacher)))
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, drop_path_rate=0.0))
    names = student_names(args)
    return config, data, None, (args.teacher, names, mode, args.feature_loss or "cosine", recipe)


def _student_config(config, name):
    """`config` with the patch size of the architecture `name` (feature distillation allows other patch sizes;
    the masks the pipeline draws follow the teacher's and are not used)."""
    if name in ARCHITECTURES:
        patch = ARCHITECTURES[name]["config"]["patch_size"]
        crops = config.data.crops
        if crops.global_crops_size % patch or (crops.local_crops_number and crops.local_crops_size % patch):
            raise ValueError(
                f"Student {name} has {patch}-px patches, which do not divide the recipe's crops "
                f"({crops.global_crops_size} and {crops.local_crops_size} px): choose a student of the teacher's "
                "patch size, or a --recipe whose crops are multiples of it.")
        return dataclasses.replace(config, model=dataclasses.replace(config.model, patch_size=patch))
    return config


def preset_path(run, index, count):
    """The folder of student `index`'s final EMA backbone: student_preset/ (one student) or student_I_preset/."""
    return os.path.join(run.path, "student_preset" if count == 1 else f"student_{index}_preset")


def build_distiller(config, teacher_spec, names, mode, feature_loss="cosine", load_weights=True):
    """The model of a distillation run (not compiled): the teacher from `teacher_spec` (`load_teacher`), the
    students `names` built for `config`, in `mode` ("heads": `DistillationPretrainer`, else `FeatureDistiller`).
    `load_weights=False` skips the students' preset weights (a checkpoint will overwrite them)."""
    from keras_dinov2.pretrainer import DistillationPretrainer, FeatureDistiller
    from keras_dinov2.run.teacher import load_teacher

    teacher, heads, _ = load_teacher(teacher_spec)
    students = [build_backbone(name, _student_config(config, name), load_weights=load_weights) for name in names]
    steps = config.optim.steps_per_epoch
    if mode == "heads":
        return DistillationPretrainer(teacher, heads, students, config, steps_per_epoch=steps)
    return FeatureDistiller(teacher, students, config, loss=feature_loss, steps_per_epoch=steps)


def distiller_from_run(run_dir):
    """(the distillation model of `run_dir` restored from its newest checkpoint, its config.json dict, the
    checkpoint's metadata); its teacher source must still be there.

    Raises:
        ValueError: `run_dir` is no distillation run, has no checkpoint, or its teacher is gone.
    """
    from keras_dinov2.run.checkpoint import load_checkpoint

    run = RunDirectory(run_dir)
    stored = run.read_config()
    if stored is None or stored.get("command") != "distill":
        raise ValueError(f"{run_dir} is not a distillation run (its config.json does not say command: distill).")
    checkpoint = run.latest_checkpoint()
    if checkpoint is None:
        raise ValueError(f"{run_dir} holds no checkpoint-*.npz yet.")
    config = SSLConfig.from_dict(stored["ssl"])
    try:
        model = build_distiller(config, stored["teacher"], stored["students"], stored["mode"],
                                stored.get("feature_loss", "cosine"), load_weights=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"{run_dir}'s teacher {stored['teacher']!r} could not be loaded to rebuild the run "
                         f"({error}); its finished students are in student_preset/.") from error
    model.compile()
    return model, stored, load_checkpoint(model, checkpoint)


def distill(args):
    """Runs `keras-dinov2 distill` with parsed arguments; returns the run's `RunDirectory`.

    The teacher (`keras_dinov2.run.load_teacher`) is frozen; with heads (a pretraining run directory, an export
    with --heads) the students learn its DINO/iBOT targets (`DistillationPretrainer`), without them its CLS and
    patch tokens (`FeatureDistiller`). The run directory is `pretrain`'s: config.json ("command": "distill", the
    teacher, students and mode), metrics.csv, epochs.csv with the k-NN of the teacher, of every student and of
    its EMA (digits), metrics.png, checkpoints (the whole state, the frozen teacher included) and at the end the
    EMA students as presets (student_preset/, or student_I_preset/ for several) and knn.json. `--resume`
    continues from the newest checkpoint as `pretrain --resume` does, with the same changeable flags.

    Raises:
        ValueError: bad flags, or a teacher that does not fit the mode (prototype counts, patch sizes, crop
            sizes): before anything trains.
        ResumeError, TrainingDiverged, RunInterrupted: as `pretrain`.
    """
    session, (teacher_spec, names, mode, feature_loss, recipe) = open_session(
        "distill", args, resolve_distill_config)
    config, dist, run = session.config, session.dist, session.run
    optim = config.optim
    with dist.scope():
        model = build_distiller(config, teacher_spec, names, mode, feature_loss, load_weights=not session.resuming)
        compile_model(session, model)
    teacher, students = model.teacher, model.students
    start = restore(session, model, {"teacher": teacher_spec, "students": names, "mode": mode,
                                     "feature_loss": feature_loss, "data": session.data_spec, "recipe": recipe})
    if start is None:
        return run
    suffix = [("" if len(students) == 1 else f"_{i}") for i in range(len(students))]
    callbacks, teacher_knn = [], None
    if knn_enabled(session, args):
        from keras_dinov2.evaluation import evaluate_digits

        teacher_knn = evaluate_digits(teacher, image_size=config.data.crops.global_crops_size, dtype=KNN_DTYPE)
        print(f"k-NN top-1 (k=20) of the teacher: {teacher_knn[20]:.2f}%")
        callbacks.append(ConstantLogs({"knn_top1_teacher": teacher_knn[20]}, every_n_epochs=args.knn_every))
        for i in range(len(students)):
            callbacks.append(knn_monitor(session, lambda i=i: model.students[i], args.knn_every,
                                         name=f"knn_top1_student{suffix[i]}"))
            callbacks.append(knn_monitor(session, lambda i=i: model.ema_students[i], args.knn_every,
                                         name=f"knn_top1_ema_student{suffix[i]}"))
    sizes = ", ".join(f"{name} ({s.count_params():,})" for name, s in zip(names, students))
    headline = (f"Distilling {teacher_spec} ({teacher.count_params():,} parameters, {mode} mode) into {sizes} on "
                f"{session.data_spec} with the {keras.backend.backend()} backend: {describe_batch(session)}, "
                f"run directory {run.path}." + (f" Distribution: {dist.describe()}." if dist.mode != "none" else ""))
    progress = None
    if mode == "features":
        progress = (("loss", "loss"), ("cls", "cls"), ("patch", "patch"), ("lr", "lr"))
    minutes = train(session, model, start, headline,
                    resume_hint=f"keras-dinov2 distill --out {run.path} --resume --lr {optim.base_lr / 2:g}",
                    checkpoint_metadata={"teacher": teacher_spec, "students": names}, extra_callbacks=callbacks,
                    progress_keys=progress, verbose=args.verbose)
    if not exports_here(session):
        if session.chief:
            print(f"Trained in {minutes:.1f} min. The checkpoints in {run.path} hold the run.")
        return run
    results = {"minutes": round(minutes, 2), "students": []}
    if teacher_knn is not None:
        from keras_dinov2.evaluation import evaluate_digits

        results["teacher"] = teacher_knn
        print("k-NN top-1 on the held-out digits (450 images):")
    for i, (name, ema) in enumerate(zip(names, model.ema_students)):
        path = preset_path(run, i, len(students))
        ema.save_to_preset(path)
        entry = {"student": name, "preset": os.path.basename(path), "params": ema.count_params()}
        line = f"Student {i} ({name}): EMA backbone saved to {path} (DINOv2Backbone.from_preset)."
        if teacher_knn is not None:
            entry["ema_student"] = evaluate_digits(ema, image_size=config.data.crops.global_crops_size,
                                                   dtype=KNN_DTYPE)
            line += "  k-NN " + "  ".join(f"k={k}: {entry['ema_student'][k]:.1f}%"
                                           for k in sorted(entry["ema_student"]))
        results["students"].append(entry)
        print(line)
    if teacher_knn is not None:
        print("  teacher: " + "  ".join(f"k={k}: {teacher_knn[k]:.1f}%" for k in sorted(teacher_knn)))
        run.write_results(results)
    print(f"Trained in {minutes:.1f} min.")
    return run
