"""The main job: a complete, resumable DINOv2 pretraining run in a run directory."""

import dataclasses
import json
import math
import os
import sys
import time

import keras

from keras_dinov2.image_headers import DEFAULT_MAX_IMAGE_PIXELS

# With LayerScale at 1e-5 a randomly initialized backbone gives nearly identical CLS tokens for
# every image, so float32 cosine similarities all round to 1 and its k-NN is at chance; the
# small digits evaluation is cheap in float64, which keeps the random-init baseline meaningful.
KNN_DTYPE = "float64"

# What a resumed run may change: SSLConfig field -> flag. The rest of the config fixes the
# model, its heads, the data stream or the step's structure, which a checkpoint cannot change.
RESUME_CHANGEABLE = {
    "optim.base_lr": "--lr",
    "optim.weight_decay": "--weight-decay",
    "optim.weight_decay_end": "--weight-decay-end",
    "optim.epochs": "--epochs",
    "batch_size": "--batch-size",
}


class ResumeError(ValueError):
    """`pretrain --resume` was given flags that the run in its directory cannot take."""


def _data_default(args):
    return args.data if args.data is not None else "digits"


def _seed_default(args):
    return args.seed if args.seed is not None else 0


def _flag_values(args):
    """The values of the resume-changeable flags the user gave (None where not given)."""
    return {
        "optim.base_lr": args.lr,
        "optim.weight_decay": getattr(args, "weight_decay", None),
        "optim.weight_decay_end": getattr(args, "weight_decay_end", None),
        "optim.epochs": args.epochs,
        "batch_size": args.batch_size,
    }


def _get(config, field):
    for part in field.split("."):
        config = getattr(config, part)
    return config


def _replace(config, field, value):
    head, _, rest = field.partition(".")
    if not rest:
        return dataclasses.replace(config, **{head: value})
    return dataclasses.replace(config, **{head: _replace(getattr(config, head), rest, value)})


def _same_location(given, stored):
    # A folder may be named by another (relative, absolute) path on resume.
    if given == stored:
        return True
    return (os.path.exists(given) and os.path.exists(stored)
            and os.path.realpath(given) == os.path.realpath(stored))


def _stored_recipe(stored):
    from keras_dinov2.config import SSL_RECIPES, SSLConfig

    if stored.get("recipe"):
        return stored["recipe"]
    # Run directories written before the name was stored: the recipe whose heads, losses and
    # data match (the flags never change those).
    ssl = SSLConfig.from_dict(stored["ssl"])
    for name in SSL_RECIPES:
        recipe = SSLConfig.recipe(name)
        if (recipe.heads, recipe.loss, recipe.data) == (ssl.heads, ssl.loss, ssl.data):
            return name
    return None


def _resumed_config(args, stored, run_dir):
    """The stored config of the run in `run_dir` with the changes the flags ask for.

    Returns (config, changes), changes a dict field -> (old, new). Raises `ResumeError` naming
    every flag that differs from the run and cannot change on resume.
    """
    from keras_dinov2.config import SSLConfig

    config = SSLConfig.from_dict(stored["ssl"])
    fixed = [
        ("--data", args.data, stored["data"], _same_location),
        ("--model", args.model, stored["model"], _same_location),
        ("--recipe", args.recipe, _stored_recipe(stored), None),
        ("--steps-per-epoch", args.steps_per_epoch, config.optim.steps_per_epoch, None),
        ("--accumulation", args.accumulation, config.optim.gradient_accumulation_steps, None),
        ("--seed", args.seed, config.seed, None),
    ]
    differ = [f"{flag} {given} (the run has {'no recorded value' if have is None else have})"
              for flag, given, have, same in fixed
              if given is not None and not (same or (lambda a, b: a == b))(given, have)]
    if differ:
        allowed = ", ".join(RESUME_CHANGEABLE.values())
        raise ResumeError(
            f"--resume cannot change {'; '.join(differ)}: they fix the model, the data or the "
            f"recipe of the run in {run_dir}. Drop them to resume it (a resumed run may change "
            f"{allowed}), or start a new run with another --out."
        )
    changes = {}
    for field, value in _flag_values(args).items():
        if value is not None and value != _get(config, field):
            changes[field] = (_get(config, field), value)
            config = _replace(config, field, value)
    return config, changes


def _describe_changes(changes):
    return ", ".join(f"{RESUME_CHANGEABLE[field]} {old} -> {new}"
                     for field, (old, new) in changes.items())


def _data_position(metadata, epoch, micro_steps, batch_size, pass_images):
    """(pass, images to skip in it) where the run that wrote a checkpoint left the data stream.

    Batches run across passes, so the position is counted in images (of one shard). A
    checkpoint records how many images its session had read when it began, and with which
    batch size; the session then read `micro_steps` batches per epoch. A new batch size
    continues at the same image.

    Args:
        metadata: dict. The checkpoint's metadata ("data_start" where recorded).
        epoch: int. The checkpoint's epoch.
        micro_steps: int. Batches per epoch (steps per epoch x accumulation).
        batch_size: int. Images per batch of the checkpoint's session when it recorded none.
        pass_images: int or None. Images in one pass over (one shard of) the data; None when
            unknown (a streamed source): the position is then (0, every image read so far).
    """
    start = metadata.get("data_start", {"images": 0, "epoch": 0, "batch_size": batch_size})
    images = start["images"] + (epoch - start["epoch"]) * micro_steps * start["batch_size"]
    return (0, images) if pass_images is None else divmod(images, pass_images)


def _write_json(path, value):
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(value, f, indent=2)
    os.replace(temporary, path)


def _resolve_config(args, run_dir):
    from keras_dinov2.config import SSLConfig

    saved = os.path.join(run_dir, "config.json")
    if args.resume and os.path.exists(saved):
        with open(saved) as f:
            stored = json.load(f)
        config, changes = _resumed_config(args, stored, run_dir)
        return config, stored["model"], stored["data"], _stored_recipe(stored), (stored, changes)
    if args.resume:
        raise ValueError(f"--resume given but {saved} does not exist: nothing to resume; drop --resume "
                         "to start a new run there.")
    data = _data_default(args)
    recipe = args.recipe or ("digits" if data == "digits" else "reference_default")
    config = SSLConfig.recipe(recipe)
    optim = {}
    if args.epochs is not None:
        optim["epochs"] = args.epochs
    if args.accumulation is not None:
        optim["gradient_accumulation_steps"] = args.accumulation
    if args.lr is not None:
        optim["base_lr"] = args.lr
    for name in ("weight_decay", "weight_decay_end"):
        if getattr(args, name, None) is not None:
            optim[name] = getattr(args, name)
    if args.steps_per_epoch is not None:
        optim["steps_per_epoch"] = args.steps_per_epoch
    if getattr(args, "drop_path_rate", None) is not None:
        optim["drop_path_rate"] = args.drop_path_rate
    if getattr(args, "drop_path_uniform", None) is not None:
        optim["drop_path_uniform"] = args.drop_path_uniform
    config = dataclasses.replace(
        config,
        optim=dataclasses.replace(config.optim, **optim),
        batch_size=config.batch_size if args.batch_size is None else args.batch_size,
        seed=_seed_default(args),
    )
    model = args.model or ("dinov2_vit_tiny4" if data == "digits" else "dinov2_vit_small14")
    return config, model, data, recipe, None


def _random_init_knn(backbone, image_size, seed):
    """{k: top-1 %} on the held-out digits of the run's random-init baseline (seeded: the same network, and
    number, at the start, at the end and after a resume), with the protocol of the teacher's k-NN."""
    from keras_dinov2.evaluation import evaluate_digits, random_init_backbone

    return evaluate_digits(random_init_backbone(backbone, seed=seed), image_size=image_size,
                           dtype=KNN_DTYPE)


def pretrain(args):
    """Runs `keras-dinov2 pretrain` with parsed arguments; returns the exit status.

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
    temporary files of an interrupted save.

    Raises:
        ResumeError: --resume with flags the run cannot take (the CLI prints it, exit status 2).
    """
    from keras_dinov2 import callbacks as cb
    from keras_dinov2 import distribute
    from keras_dinov2.backbone import build_backbone
    from keras_dinov2.data import get_source
    from keras_dinov2.pretrainer import DINOv2Pretrainer

    # First: JAX places variables on the mesh as they are created, and several hosts must
    # meet before anything runs; TF builds the model in the strategy's scope.
    dist = distribute.setup(getattr(args, "distribution", "auto"),
                            model_axis_size=getattr(args, "model_axis_size", None),
                            multi_host=getattr(args, "multi_host", False) or None)
    chief = dist.is_chief
    run_dir = args.out
    os.makedirs(run_dir, exist_ok=True)
    config, model_name, data_spec, recipe, resumed = _resolve_config(args, run_dir)
    keras.utils.set_random_seed(config.seed)

    # Every replica reads its own shard: one pass is one shard's batches.
    max_image_pixels = getattr(args, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
    batches_per_pass = dist.batches_per_pass(data_spec, config.batch_size, config.data,
                                             seed=config.seed, max_image_pixels=max_image_pixels)
    if batches_per_pass <= 0:
        raise ValueError(
            f"{data_spec!r} gives no full batch of {config.batch_size} images per pass "
            "(or its size is unknown); lower --batch-size or pass --steps-per-epoch."
        )
    if args.steps_per_epoch is None and not args.resume and args.recipe is None:
        updates = max(batches_per_pass // config.optim.gradient_accumulation_steps, 1)
        config = dataclasses.replace(
            config, optim=dataclasses.replace(config.optim, steps_per_epoch=updates))
    optim = config.optim
    accumulation = optim.gradient_accumulation_steps
    micro_steps = optim.steps_per_epoch * accumulation  # batches read per epoch

    # An export with heads (`keras-dinov2 export --heads`) continues with its heads and centers,
    # so the teacher's targets carry on where they were instead of restarting from random heads.
    heads_from = None
    if not args.resume and os.path.isdir(str(model_name)):
        from keras_dinov2.interop import exported_head_config

        exported = exported_head_config(model_name)
        if exported is not None:
            heads_from = model_name
            config = dataclasses.replace(
                config, heads=dataclasses.replace(config.heads, **exported))
    with dist.scope():
        backbone = build_backbone(model_name, config)
        model = DINOv2Pretrainer(backbone, config, steps_per_epoch=optim.steps_per_epoch)
        if heads_from is not None:
            from keras_dinov2.interop import restore_heads

            restore_heads(model, heads_from)
            print(f"Continuing from the heads and centers exported in {heads_from}.")
        if dist.num_replicas > 1:
            # The learning rate scales with the global batch (all replicas).
            model.compile(global_batch_size=dist.global_batch_size(config.batch_size)
                          * accumulation)
        else:
            model.compile()

    initial_epoch = 0
    checkpoint = cb.latest_checkpoint(run_dir) if args.resume else None
    metadata = {}
    if args.resume:
        if checkpoint is None:
            raise ValueError(f"--resume given but {run_dir} holds no checkpoint; drop --resume to "
                             "start the run again.")
        with dist.scope():
            metadata = cb.load_checkpoint(model, checkpoint)
        initial_epoch = int(metadata["epoch"])
        print(f"Resuming {run_dir} from {os.path.basename(checkpoint)} (epoch {initial_epoch}).")
    dist.prepare(model)  # torch: every rank starts from rank 0's state
    if not args.resume and chief:
        _write_json(os.path.join(run_dir, "config.json"),
                    {"ssl": config.to_dict(), "model": model_name, "data": data_spec,
                     "recipe": recipe, "backend": keras.backend.backend()})
        for name in ("metrics.csv", "epochs.csv"):
            if os.path.exists(os.path.join(run_dir, name)):
                os.remove(os.path.join(run_dir, name))
    if initial_epoch > optim.epochs:
        raise ResumeError(
            f"--epochs {optim.epochs} is below the {initial_epoch} epochs that the run in "
            f"{run_dir} has trained; to extend it, pass more than {initial_epoch}.")
    if initial_epoch == optim.epochs:
        print(f"The run in {run_dir} already finished its {optim.epochs} epochs; to extend it, "
              f"resume with --epochs N (N > {optim.epochs}).")
        return 0
    if args.resume:
        stored, changes = resumed
        if "batch_size" in changes:
            old_batch, new_batch = changes["batch_size"]
            print(f"warning: --batch-size {new_batch} changes the run's batch from {old_batch}: "
                  f"the learning rate scales with sqrt(batch / 1024) (x "
                  f"{math.sqrt(new_batch / old_batch):.2f}), an epoch stays "
                  f"{optim.steps_per_epoch} steps, and the run is not the one a batch of "
                  f"{new_batch} would have given from the start.", file=sys.stderr)
        if changes:
            print(f"Changed on resume: {_describe_changes(changes)}.")
        if chief:
            removed = cb.trim_run_logs(run_dir, step=initial_epoch * optim.steps_per_epoch,
                                       epoch=initial_epoch)
            removed_files = cb.remove_interrupted_files(run_dir)
            if removed or removed_files:
                print("Removed what the interrupted run left past its checkpoint: "
                      + ", ".join([f"{n} rows of {name}" for name, n in removed.items()]
                                  + removed_files) + ".")
            record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "epoch": initial_epoch,
                      "step": initial_epoch * optim.steps_per_epoch,
                      "checkpoint": os.path.basename(checkpoint),
                      "backend": keras.backend.backend(),
                      "changes": {field: list(pair) for field, pair in changes.items()}}
            _write_json(os.path.join(run_dir, "config.json"),
                        {**stored, "ssl": config.to_dict(),
                         "resumes": stored.get("resumes", []) + [record]})

    # The data stream is keyed by (seed, pass): skip to where the interrupted run stopped.
    # Each step takes one update's micro-batches, stacked (gradient accumulation); the position
    # in the stream is counted in images, as batches run across passes.
    consumed = initial_epoch * optim.steps_per_epoch  # metrics.csv's step of the first update
    # A checkpoint without a recorded start had one batch size throughout: the stored one.
    old_batch = config.batch_size
    if resumed is not None and "batch_size" in resumed[1]:
        old_batch = resumed[1]["batch_size"][0]
    num_examples = get_source(data_spec).num_examples
    pass_images = None if num_examples is None else num_examples // dist.num_replicas
    start_pass, skip = _data_position(metadata, initial_epoch, micro_steps, old_batch,
                                      pass_images)
    dataset = dist.dataset(
        data_spec, config.batch_size, config.data, seed=config.seed, repeat=True,
        start_epoch=start_pass, skip_images=skip,
        micro_batches=accumulation, max_image_pixels=max_image_pixels,
    )

    monitor = cb.TrainingMonitor(
        initial_step=consumed,
        resume_hint=f"keras-dinov2 pretrain --out {run_dir} --resume --lr {optim.base_lr / 2:g}")
    # Where this session starts in the data stream: a later resume continues from there.
    data_start = {"images": start_pass * (pass_images or 0) + skip, "epoch": initial_epoch,
                  "batch_size": config.batch_size}
    callbacks = [
        monitor,
        # Every process takes part (JAX gathers sharded variables); the chief writes.
        cb.CheckpointCallback(run_dir, metadata={"model": model_name, "data_start": data_start}),
    ]
    if chief:
        callbacks.insert(0, cb.StepLogger(run_dir, initial_step=consumed))
    # The k-NN monitor runs outside the train step on one process: not across hosts.
    knn = data_spec == "digits" and args.knn_every > 0 and dist.num_processes == 1
    random_init = None  # {k: top-1 %} of the one random-init baseline of this run
    if knn:
        from keras_dinov2.data import eval_dataset
        from keras_dinov2.evaluation import KNNMonitor

        size = config.data.crops.global_crops_size
        random_init = _random_init_knn(model.teacher, size, config.seed)
        callbacks.insert(0, KNNMonitor(
            # Cached: the monitor reads the same resized images every time it evaluates.
            eval_dataset("digits", size, 256, split="train").cache(),
            eval_dataset("digits", size, 256, split="test").cache(),
            backbone_fn=lambda: model.teacher, every_n_epochs=args.knn_every, k=20,
            random_init_accuracy=random_init[20], dtype=KNN_DTYPE))
    # First: it ends its line before other callbacks print at the end of an epoch.
    callbacks.insert(0, cb.ProgressBar())
    if chief:
        print(
            f"Pretraining {model_name} ({backbone.count_params():,} parameters) on {data_spec} with "
            f"the {keras.backend.backend()} backend: {optim.epochs} epochs x "
            f"{optim.steps_per_epoch} steps, batch {config.batch_size}"
            + (f" per replica x {dist.num_replicas} replicas" if dist.num_replicas > 1 else "")
            + (f" x {accumulation} accumulated" if accumulation > 1 else "")
            + f", run directory {run_dir}."
            + (f" Distribution: {dist.describe()}." if dist.mode != "none" else "")
        )
    start = time.time()
    try:
        # shuffle=False: the dataset shuffles itself (fit would only warn that it ignores shuffle=True).
        model.fit(dataset, epochs=optim.epochs, initial_epoch=initial_epoch, shuffle=False,
                  steps_per_epoch=optim.steps_per_epoch, callbacks=callbacks,
                  verbose=args.verbose)
    except KeyboardInterrupt:
        print(f"\nInterrupted. Resume with: keras-dinov2 pretrain --out {run_dir} --resume")
        return 130
    finally:
        metrics = os.path.join(run_dir, "metrics.csv")
        if chief and os.path.exists(metrics):
            cb.plot_metrics(metrics, os.path.join(run_dir, "metrics.png"))
    if monitor.stopped_for_nan:
        return 1
    minutes = (time.time() - start) / 60
    if hasattr(model, "jax_state_sync"):
        model.jax_state_sync()
    if not chief or (dist.backend == "jax" and dist.num_processes > 1):
        if chief:
            print(f"Trained in {minutes:.1f} min. The checkpoints in {run_dir} hold the run; "
                  "export the teacher from them on one host.")
        return 0
    preset = os.path.join(run_dir, "teacher_preset")
    model.teacher.save_to_preset(preset)
    print(f"Trained in {minutes:.1f} min. Teacher backbone saved to {preset} "
          "(DINOv2Backbone.from_preset).")
    if data_spec == "digits":
        from keras_dinov2.evaluation import evaluate_digits

        size = config.data.crops.global_crops_size
        trained = evaluate_digits(model.teacher, image_size=size, dtype=KNN_DTYPE)
        random_init = random_init or _random_init_knn(model.teacher, size, config.seed)
        print("k-NN top-1 on the held-out digits (450 images):")
        for k in sorted(trained):
            print(f"  k={k:<4d} teacher {trained[k]:5.1f}%   random init {random_init[k]:5.1f}%")
        with open(os.path.join(run_dir, "knn.json"), "w") as f:
            json.dump({"teacher": trained, "random_init": random_init,
                       "minutes": round(minutes, 2)}, f, indent=2)
    return 0 if all(math.isfinite(v) for v in [minutes]) else 1
