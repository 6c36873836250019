"""What `pretrain` and `distill` share: a run directory's life around `model.fit`.

A command builds its model its own way (a pretrainer, a distiller); everything around it is the same for both and
lives here: the distribution set-up, the steps of an epoch, compiling for the global batch, restoring the newest
checkpoint on `--resume` and recording what the resume changes, the data stream continued at the right image, the
callbacks (per-step CSV, progress line, NaN and collapse monitor, checkpoints, k-NN monitors), and `fit` with its
plot, interruption and divergence handling.
"""

import dataclasses
import math
import os
import sys
import time

import keras

from keras_dinov2 import distribute
from keras_dinov2.data.image_headers import DEFAULT_MAX_IMAGE_PIXELS
from keras_dinov2.run.callbacks import ProgressBar, StepLogger, TrainingMonitor
from keras_dinov2.run.checkpoint import CheckpointCallback, load_checkpoint
from keras_dinov2.run.directory import RunDirectory
from keras_dinov2.run.errors import ResumeError, RunInterrupted, TrainingDiverged
from keras_dinov2.run.plot import plot_metrics
from keras_dinov2.run.resume import data_position, describe_changes

# With LayerScale at 1e-5 a randomly initialized backbone gives nearly identical CLS tokens for
# every image, so float32 cosine similarities all round to 1 and its k-NN is at chance; the
# small digits evaluation is cheap in float64, which keeps the random-init baseline meaningful.
KNN_DTYPE = "float64"


@dataclasses.dataclass
class Session:
    """One command's run: where it writes, on which devices, with which config and data.

    Attributes:
        command: str. "pretrain" or "distill" (named in the hints it prints).
        run: RunDirectory.
        dist: the `distribute.setup` engine.
        config: SSLConfig (final: recipe, flags, resume changes, the steps of an epoch).
        data_spec: str.
        resumed: None for a new run, else (the stored config.json dict, the changes of the resume).
        max_image_pixels: int or None.
        compile_options: dict. Passed to `model.compile` (`{"jit_compile": True}` for `--xla`).
    """

    command: str
    run: RunDirectory
    dist: object
    config: object
    data_spec: str
    resumed: object
    max_image_pixels: object = DEFAULT_MAX_IMAGE_PIXELS
    compile_options: dict = dataclasses.field(default_factory=dict)

    @property
    def chief(self):
        return self.dist.is_chief

    @property
    def resuming(self):
        return self.resumed is not None


def open_session(command, args, resolve):
    """Sets up the devices, creates the run directory and resolves the run's config.

    Args:
        command: str. The command's name.
        args: the parsed arguments (`out`, `resume`, `steps_per_epoch`, `recipe`, distribution flags).
        resolve: callable(args, run) -> (SSLConfig, data spec, resumed, extra): the command's own config of a new
            or resumed run (`extra` is returned as is).

    Returns:
        (Session, extra). An unset `--steps-per-epoch` of a new run becomes one pass over the data.

    Raises:
        ValueError: the data gives no full batch per pass.
    """
    options = compile_options(args)
    # First: JAX places variables on the mesh as they are created, and several hosts must
    # meet before anything runs; TF builds the model in the strategy's scope.
    dist = distribute.setup(getattr(args, "distribution", "auto"),
                            model_axis_size=getattr(args, "model_axis_size", None),
                            multi_host=getattr(args, "multi_host", False) or None)
    run = RunDirectory(args.out)
    run.create()
    config, data_spec, resumed, extra = resolve(args, run)
    keras.utils.set_random_seed(config.seed)
    max_image_pixels = getattr(args, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
    # Every replica reads its own shard: one pass is one shard's batches.
    batches_per_pass = dist.batches_per_pass(data_spec, config.batch_size, config,
                                             seed=config.seed, max_image_pixels=max_image_pixels)
    if batches_per_pass <= 0:
        raise ValueError(
            f"{data_spec!r} gives no full batch of {config.batch_size} images per pass "
            "(or its size is unknown); lower --batch-size or pass --steps-per-epoch."
        )
    if args.steps_per_epoch is None and not args.resume and getattr(args, "recipe", None) is None:
        updates = max(batches_per_pass // config.optim.gradient_accumulation_steps, 1)
        config = dataclasses.replace(
            config, optim=dataclasses.replace(config.optim, steps_per_epoch=updates))
    return Session(command, run, dist, config, data_spec, resumed, max_image_pixels, options), extra


def compile_options(args):
    """The `model.compile` options of the flags: `--xla` asks for `jit_compile=True`.

    Raises:
        ValueError: `--xla` on the torch backend (Keras would take it for torch.compile, which is not XLA).
    """
    if not getattr(args, "xla", False):
        return {}
    if keras.backend.backend() == "torch":
        raise ValueError("--xla compiles the step with XLA on the tensorflow backend (jax always does); the torch "
                         "backend has no XLA step: leave --xla out or set KERAS_BACKEND=tensorflow.")
    return {"jit_compile": True}


def compile_model(session, model):
    """Compiles `model` (inside the distribution scope) with the learning rate of the global batch."""
    dist, config = session.dist, session.config
    if dist.num_replicas > 1:
        # The learning rate scales with the global batch (all replicas).
        model.compile(global_batch_size=dist.global_batch_size(config.batch_size)
                      * config.optim.gradient_accumulation_steps, **session.compile_options)
    else:
        model.compile(**session.compile_options)


def restore(session, model, record):
    """Loads the newest checkpoint on resume, or writes config.json for a new run; returns where training starts.

    Args:
        record: dict. config.json of a new run besides "ssl" and "backend" (model, data, recipe...).

    Returns:
        (initial epoch, checkpoint metadata), or None when the run has already trained its epochs.

    Raises:
        ResumeError: resume without a checkpoint, or with fewer --epochs than trained.
    """
    run, dist, config = session.run, session.dist, session.config
    optim = config.optim
    initial_epoch, metadata, checkpoint = 0, {}, None
    if session.resuming:
        checkpoint = run.latest_checkpoint()
        if checkpoint is None:
            raise ResumeError(f"--resume given but {run.path} holds no checkpoint; drop --resume to "
                              "start the run again.")
        with dist.scope():
            metadata = load_checkpoint(model, checkpoint)
        initial_epoch = int(metadata["epoch"])
        print(f"Resuming {run.path} from {os.path.basename(checkpoint)} (epoch {initial_epoch}).")
    dist.prepare(model)  # torch: every rank starts from rank 0's state
    if not session.resuming and session.chief:
        run.start({"command": session.command, "ssl": config.to_dict(), **record,
                   "backend": keras.backend.backend()})
    if initial_epoch > optim.epochs:
        raise ResumeError(
            f"--epochs {optim.epochs} is below the {initial_epoch} epochs that the run in "
            f"{run.path} has trained; to extend it, pass more than {initial_epoch}.")
    if initial_epoch == optim.epochs:
        print(f"The run in {run.path} already finished its {optim.epochs} epochs; to extend it, "
              f"resume with --epochs N (N > {optim.epochs}).")
        return None
    if session.resuming:
        _continue(session, checkpoint, initial_epoch)
    return initial_epoch, metadata


def _continue(session, checkpoint, initial_epoch):
    """Says what a resume changes, cuts the logs back to `checkpoint` and records the resume in config.json."""
    run, config = session.run, session.config
    optim = config.optim
    stored, changes = session.resumed
    if "batch_size" in changes:
        old_batch, new_batch = changes["batch_size"]
        print(f"warning: --batch-size {new_batch} changes the run's batch from {old_batch}: "
              f"the learning rate scales with sqrt(batch / 1024) (x "
              f"{math.sqrt(new_batch / old_batch):.2f}), an epoch stays "
              f"{optim.steps_per_epoch} steps, and the run is not the one a batch of "
              f"{new_batch} would have given from the start.", file=sys.stderr)
    if changes:
        print(f"Changed on resume: {describe_changes(changes)}.")
    if not session.chief:
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


def knn_enabled(session, args):
    """Whether the digits k-NN monitor runs: digits data, --knn-every > 0, one process."""
    return session.data_spec == "digits" and args.knn_every > 0 and session.dist.num_processes == 1


def knn_monitor(session, backbone_fn, every, name="knn_top1", random_init=None):
    """A `KNNMonitor` on the held-out digits that logs `name` every `every` epochs."""
    from keras_dinov2.data import eval_dataset
    from keras_dinov2.evaluation import KNNMonitor

    size = session.config.data.crops.global_crops_size
    return KNNMonitor(
        # Cached: the monitor reads the same resized images every time it evaluates.
        eval_dataset("digits", size, 256, split="train").cache(),
        eval_dataset("digits", size, 256, split="test").cache(),
        backbone_fn=backbone_fn, every_n_epochs=every, k=20, name=name,
        random_init_accuracy=random_init, dtype=KNN_DTYPE)


def train(session, model, start, headline, resume_hint, checkpoint_metadata, extra_callbacks=(),
          progress_keys=None, verbose=1):
    """Runs `model.fit` from `start` (what `restore` returned) to the config's last epoch; returns the minutes.

    The data stream continues where the checkpoint's session left it; metrics.csv, epochs.csv, the checkpoints
    and, at the end (also after an interruption), metrics.png are written.

    Args:
        headline: str. Printed (by the chief) before training.
        resume_hint: str. The command that resumes after a NaN (printed by the monitor).
        checkpoint_metadata: dict stored in every checkpoint.
        extra_callbacks: callbacks placed before the logger (k-NN monitors).
        progress_keys: the progress line's (log key, label) pairs (default: the pretraining losses).

    Raises:
        RunInterrupted: Ctrl-C.
        TrainingDiverged: the loss became NaN or infinite.
    """
    from keras_dinov2.data import get_source

    run, dist, config = session.run, session.dist, session.config
    optim = config.optim
    initial_epoch, metadata = start
    accumulation = optim.gradient_accumulation_steps
    micro_steps = optim.steps_per_epoch * accumulation  # batches read per epoch
    # The data stream is keyed by (seed, pass): skip to where the interrupted run stopped.
    # Each step takes one update's micro-batches, stacked (gradient accumulation); the position
    # in the stream is counted in images, as batches run across passes.
    consumed = initial_epoch * optim.steps_per_epoch  # metrics.csv's step of the first update
    # A checkpoint without a recorded start had one batch size throughout: the stored one.
    old_batch = config.batch_size
    if session.resuming and "batch_size" in session.resumed[1]:
        old_batch = session.resumed[1]["batch_size"][0]
    num_examples = get_source(session.data_spec).num_examples
    pass_images = None if num_examples is None else num_examples // dist.num_replicas
    start_pass, skip = data_position(metadata, initial_epoch, micro_steps, old_batch, pass_images)
    dataset = dist.dataset(
        session.data_spec, config.batch_size, config, seed=config.seed, repeat=True,
        start_epoch=start_pass, skip_images=skip,
        micro_batches=accumulation, max_image_pixels=session.max_image_pixels,
    )
    monitor = TrainingMonitor(initial_step=consumed, resume_hint=resume_hint)
    # Where this session starts in the data stream: a later resume continues from there.
    data_start = {"images": start_pass * (pass_images or 0) + skip, "epoch": initial_epoch,
                  "batch_size": config.batch_size}
    callbacks = list(extra_callbacks) + [
        monitor,
        # Every process takes part (JAX gathers sharded variables); the chief writes.
        CheckpointCallback(run.path, metadata={**checkpoint_metadata, "data_start": data_start}),
    ]
    if session.chief:
        callbacks.insert(len(extra_callbacks), StepLogger(run.path, initial_step=consumed))
        print(headline)
    # First: it ends its line before other callbacks print at the end of an epoch.
    callbacks.insert(0, ProgressBar(keys=progress_keys))
    begin = time.time()
    try:
        # shuffle=False: the dataset shuffles itself (fit would only warn that it ignores shuffle=True).
        model.fit(dataset, epochs=optim.epochs, initial_epoch=initial_epoch, shuffle=False,
                  steps_per_epoch=optim.steps_per_epoch, callbacks=callbacks, verbose=verbose)
    except KeyboardInterrupt:
        raise RunInterrupted(run.path) from None
    finally:
        if session.chief and os.path.exists(run.metrics_path):
            plot_metrics(run.metrics_path, run.plot_path)
    if monitor.stopped_for_nan:
        raise TrainingDiverged(f"the loss became NaN or infinite and training stopped; the last good "
                               f"checkpoint in {run.path} is kept.")
    if hasattr(model, "jax_state_sync"):
        model.jax_state_sync()
    return (time.time() - begin) / 60


def describe_batch(session):
    """"E epochs x S steps, batch B[ per replica x R replicas][ x K accumulated]" for a headline."""
    dist, config = session.dist, session.config
    optim = config.optim
    return (f"{optim.epochs} epochs x {optim.steps_per_epoch} steps, batch {config.batch_size}"
            + (f" per replica x {dist.num_replicas} replicas" if dist.num_replicas > 1 else "")
            + (f" x {optim.gradient_accumulation_steps} accumulated"
               if optim.gradient_accumulation_steps > 1 else ""))


def exports_here(session):
    """Whether this process writes the final export (one process of the run; JAX multi-host exports offline)."""
    return session.chief and not (session.dist.backend == "jax" and session.dist.num_processes > 1)
