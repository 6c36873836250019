"""The main job: a complete, resumable DINOv2 pretraining run in a run directory."""

import dataclasses
import math
import os
import sys
import time

import keras

from keras_dinov2 import distribute
from keras_dinov2.backbone import build_backbone
from keras_dinov2.data.image_headers import DEFAULT_MAX_IMAGE_PIXELS
from keras_dinov2.pretrainer import DINOv2Pretrainer
from keras_dinov2.run.callbacks import ProgressBar, StepLogger, TrainingMonitor
from keras_dinov2.run.checkpoint import CheckpointCallback, load_checkpoint
from keras_dinov2.run.directory import RunDirectory
from keras_dinov2.run.errors import ResumeError, RunInterrupted, TrainingDiverged
from keras_dinov2.run.plot import plot_metrics
from keras_dinov2.run.resume import data_position, describe_changes, resolve_config

# With LayerScale at 1e-5 a randomly initialized backbone gives nearly identical CLS tokens for
# every image, so float32 cosine similarities all round to 1 and its k-NN is at chance; the
# small digits evaluation is cheap in float64, which keeps the random-init baseline meaningful.
KNN_DTYPE = "float64"


def _random_init_knn(backbone, image_size, seed):
    """{k: top-1 %} on the held-out digits of the run's random-init baseline (seeded: the same network, and
    number, at the start, at the end and after a resume), with the protocol of the teacher's k-NN."""
    from keras_dinov2.evaluation import evaluate_digits, random_init_backbone

    return evaluate_digits(random_init_backbone(backbone, seed=seed), image_size=image_size,
                           dtype=KNN_DTYPE)


def _continue(run, resumed, config, checkpoint, initial_epoch, chief):
    """Says what a resume changes, cuts the logs back to `checkpoint` and records the resume in config.json."""
    optim = config.optim
    stored, changes = resumed
    if "batch_size" in changes:
        old_batch, new_batch = changes["batch_size"]
        print(f"warning: --batch-size {new_batch} changes the run's batch from {old_batch}: "
              f"the learning rate scales with sqrt(batch / 1024) (x "
              f"{math.sqrt(new_batch / old_batch):.2f}), an epoch stays "
              f"{optim.steps_per_epoch} steps, and the run is not the one a batch of "
              f"{new_batch} would have given from the start.", file=sys.stderr)
    if changes:
        print(f"Changed on resume: {describe_changes(changes)}.")
    if not chief:
        return
    removed = run.trim_logs(step=initial_epoch * optim.steps_per_epoch, epoch=initial_epoch)
    removed_files = run.remove_interrupted_files()
    if removed or removed_files:
        print("Removed what the interrupted run left past its checkpoint: "
              + ", ".join([f"{n} rows of {name}" for name, n in removed.items()]
                          + removed_files) + ".")
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "epoch": initial_epoch,
              "step": initial_epoch * optim.steps_per_epoch,
              "checkpoint": os.path.basename(checkpoint),
              "backend": keras.backend.backend(),
              "changes": {field: list(pair) for field, pair in changes.items()}}
    run.record_resume(stored, config.to_dict(), record)


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
    # tf.data: TensorFlow loads when a run starts, not when the package is imported.
    from keras_dinov2.data import get_source

    # First: JAX places variables on the mesh as they are created, and several hosts must
    # meet before anything runs; TF builds the model in the strategy's scope.
    dist = distribute.setup(getattr(args, "distribution", "auto"),
                            model_axis_size=getattr(args, "model_axis_size", None),
                            multi_host=getattr(args, "multi_host", False) or None)
    chief = dist.is_chief
    run = RunDirectory(args.out)
    run_dir = run.path
    run.create()
    config, model_name, data_spec, recipe, resumed = resolve_config(args, run)
    keras.utils.set_random_seed(config.seed)

    # Every replica reads its own shard: one pass is one shard's batches.
    max_image_pixels = getattr(args, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
    batches_per_pass = dist.batches_per_pass(data_spec, config.batch_size, config,
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
    checkpoint = run.latest_checkpoint() if args.resume else None
    metadata = {}
    if args.resume:
        if checkpoint is None:
            raise ResumeError(f"--resume given but {run_dir} holds no checkpoint; drop --resume to "
                              "start the run again.")
        with dist.scope():
            metadata = load_checkpoint(model, checkpoint)
        initial_epoch = int(metadata["epoch"])
        print(f"Resuming {run_dir} from {os.path.basename(checkpoint)} (epoch {initial_epoch}).")
    dist.prepare(model)  # torch: every rank starts from rank 0's state
    if not args.resume and chief:
        run.start({"ssl": config.to_dict(), "model": model_name, "data": data_spec,
                   "recipe": recipe, "backend": keras.backend.backend()})
    if initial_epoch > optim.epochs:
        raise ResumeError(
            f"--epochs {optim.epochs} is below the {initial_epoch} epochs that the run in "
            f"{run_dir} has trained; to extend it, pass more than {initial_epoch}.")
    if initial_epoch == optim.epochs:
        print(f"The run in {run_dir} already finished its {optim.epochs} epochs; to extend it, "
              f"resume with --epochs N (N > {optim.epochs}).")
        return run
    if args.resume:
        _continue(run, resumed, config, checkpoint, initial_epoch, chief)

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
    start_pass, skip = data_position(metadata, initial_epoch, micro_steps, old_batch,
                                     pass_images)
    dataset = dist.dataset(
        data_spec, config.batch_size, config, seed=config.seed, repeat=True,
        start_epoch=start_pass, skip_images=skip,
        micro_batches=accumulation, max_image_pixels=max_image_pixels,
    )

    monitor = TrainingMonitor(
        initial_step=consumed,
        resume_hint=f"keras-dinov2 pretrain --out {run_dir} --resume --lr {optim.base_lr / 2:g}")
    # Where this session starts in the data stream: a later resume continues from there.
    data_start = {"images": start_pass * (pass_images or 0) + skip, "epoch": initial_epoch,
                  "batch_size": config.batch_size}
    callbacks = [
        monitor,
        # Every process takes part (JAX gathers sharded variables); the chief writes.
        CheckpointCallback(run_dir, metadata={"model": model_name, "data_start": data_start}),
    ]
    if chief:
        callbacks.insert(0, StepLogger(run_dir, initial_step=consumed))
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
    callbacks.insert(0, ProgressBar())
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
        raise RunInterrupted(run_dir) from None
    finally:
        if chief and os.path.exists(run.metrics_path):
            plot_metrics(run.metrics_path, run.plot_path)
    if monitor.stopped_for_nan:
        raise TrainingDiverged(f"the loss became NaN or infinite and training stopped; the last good "
                               f"checkpoint in {run_dir} is kept.")
    minutes = (time.time() - start) / 60
    if hasattr(model, "jax_state_sync"):
        model.jax_state_sync()
    if not chief or (dist.backend == "jax" and dist.num_processes > 1):
        if chief:
            print(f"Trained in {minutes:.1f} min. The checkpoints in {run_dir} hold the run; "
                  "export the teacher from them on one host.")
        return run
    preset = run.teacher_preset_path
    model.teacher.save_to_preset(preset)
    print(f"Trained in {minutes:.1f} min. Teacher backbone saved to {preset} "
          "(DINOv2Backbone.from_preset).")
    if data_spec == "digits":
        _final_knn(run, model.teacher, config, random_init, minutes)
    return run
