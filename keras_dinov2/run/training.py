"""The main job: a complete, resumable DINOv2 pretraining run in a run directory."""

import dataclasses
import os

import keras

from keras_dinov2.backbone import build_backbone
from keras_dinov2.pretrainer import DINOv2Pretrainer
from keras_dinov2.run.resume import resolve_config
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


def _random_init_knn(backbone, image_size, seed):
    """{k: top-1 %} on the held-out digits of the run's random-init baseline (seeded: the same network, and
    number, at the start, at the end and after a resume), with the protocol of the teacher's k-NN."""
    from keras_dinov2.evaluation import evaluate_digits, random_init_backbone

    return evaluate_digits(random_init_backbone(backbone, seed=seed), image_size=image_size,
                           dtype=KNN_DTYPE)


def _final_knn(run, teacher, config, random_init, minutes):
    """Prints the trained teacher's k-NN on the held-out digits beside the random-init baseline's; writes
    knn.json."""
    from keras_dinov2.evaluation import evaluate_digits

    size = config.data.crops.global_crops_size
    trained = evaluate_digits(teacher, image_size=size, dtype=KNN_DTYPE)
    random_init = random_init or _random_init_knn(teacher, size, config.seed)
    print("k-NN top-1 on the held-out digits (450 images):")
    for k in sorted(trained):
        print(f"  k={k:<4d} teacher {trained[k]:5.1f}%   random init {random_init[k]:5.1f}%")
    run.write_knn(trained, random_init, minutes)


def pretrain(args):
    """Runs `keras-dinov2 pretrain` with parsed arguments; returns the run's `RunDirectory`.

    Resuming (`--resume`) continues the run in `--out` from its newest checkpoint, with its
    stored config. These flags may change it, and the change is applied from the resumed step
    on and recorded in config.json (the config is updated; its "resumes" list gets the time,
    the step and every changed field as [old, new]):

    - `--lr`, `--weight-decay`, `--weight-decay-end`: the schedules' new end points. The step
      clock continues, so the values jump to where the new schedule is at that step (after a
      NaN, a lower `--lr` takes effect at once, warmup or not).
    - `--epochs`: to extend (or shorten) the run, e.g. a finished one. The schedules are
      functions of the step and the total length, so every cosine (learning rate, weight
      decay, teacher momentum) is stretched over the new length: at the resumed step they
      jump back to where the longer schedule is, e.g. a finished 1-epoch run extended to 2
      resumes at the midpoint of the learning-rate cosine, about half the peak, instead of at
      its minimum, and decays again to `min_lr` by the new end (a warm restart). Warmups and
      the frozen last layer are counted in epochs and, already past, do not repeat.
    - `--batch-size`, with a warning: the learning rate scales with sqrt(batch / 1024), an
      epoch keeps its number of steps (so it sees a different number of images), and the data
      stream continues at the same image.

    Any other flag that differs from the run (data, model, recipe, steps per epoch,
    accumulation, seed) raises `ResumeError` listing them. The rows of metrics.csv and
    epochs.csv past the checkpoint (from a killed partial epoch) are removed, and so are
    temporary files of an interrupted save. A run that has already trained its epochs
    returns at once (after saying so).

    Raises:
        ResumeError: --resume with nothing to resume, with flags the run cannot take, or with
            fewer --epochs than it has trained (the CLI prints it, exit status 2).
        ValueError: bad data or flags (the CLI prints it, exit status 2).
        TrainingDiverged: the loss became NaN or infinite; the last good checkpoint is kept (the
            CLI exits with status 1).
        RunInterrupted: Ctrl-C during training (the CLI prints how to resume, exit status 130).
    """
    def resolve(args, run):
        config, model_name, data_spec, recipe, resumed = resolve_config(args, run)
        return config, data_spec, resumed, (model_name, recipe)

    session, (model_name, recipe) = open_session("pretrain", args, resolve)
    config, dist = session.config, session.dist
    optim = config.optim

    # An export with heads (`keras-dinov2 export --heads`) continues with its heads and centers,
    # so the teacher's targets carry on where they were instead of restarting from random heads.
    heads_from = None
    if not args.resume and os.path.isdir(str(model_name)):
        from keras_dinov2.interop import exported_head_config

        exported = exported_head_config(model_name)
        if exported is not None:
            heads_from = model_name
            config = session.config = dataclasses.replace(
                config, heads=dataclasses.replace(config.heads, **exported))
    with dist.scope():
        backbone = build_backbone(model_name, config)
        model = DINOv2Pretrainer(backbone, config, steps_per_epoch=optim.steps_per_epoch)
        if heads_from is not None:
            from keras_dinov2.interop import restore_heads

            restore_heads(model, heads_from)
            print(f"Continuing from the heads and centers exported in {heads_from}.")
        compile_model(session, model)
    start = restore(session, model, {"model": model_name, "data": session.data_spec, "recipe": recipe})
    run = session.run
    if start is None:
        return run

    # The k-NN monitor runs outside the train step on one process: not across hosts.
    callbacks, random_init = [], None  # {k: top-1 %} of the one random-init baseline of this run
    if knn_enabled(session, args):
        random_init = _random_init_knn(model.teacher, config.data.crops.global_crops_size, config.seed)
        callbacks.append(knn_monitor(session, lambda: model.teacher, args.knn_every,
                                     random_init=random_init[20]))
    headline = (f"Pretraining {model_name} ({backbone.count_params():,} parameters) on {session.data_spec} with "
                f"the {keras.backend.backend()} backend: {describe_batch(session)}, run directory {run.path}."
                + (f" Distribution: {dist.describe()}." if dist.mode != "none" else ""))
    minutes = train(session, model, start, headline,
                    resume_hint=f"keras-dinov2 pretrain --out {run.path} --resume --lr {optim.base_lr / 2:g}",
                    checkpoint_metadata={"model": model_name}, extra_callbacks=callbacks,
                    verbose=args.verbose)
    if not exports_here(session):
        if session.chief:
            print(f"Trained in {minutes:.1f} min. The checkpoints in {run.path} hold the run; "
                  "export the teacher from them on one host.")
        return run
    preset = run.teacher_preset_path
    model.teacher.save_to_preset(preset)
    print(f"Trained in {minutes:.1f} min. Teacher backbone saved to {preset} "
          "(DINOv2Backbone.from_preset).")
    if session.data_spec == "digits":
        _final_knn(run, model.teacher, config, random_init, minutes)
    return run
