"""The main job: a complete, resumable DINOv2 pretraining run in a run directory."""

import dataclasses
import json
import math
import os
import time

import keras

from keras_dinov2.image_headers import DEFAULT_MAX_IMAGE_PIXELS

# With LayerScale at 1e-5 a randomly initialized backbone gives nearly identical CLS tokens for
# every image, so float32 cosine similarities all round to 1 and its k-NN is at chance; the
# small digits evaluation is cheap in float64, which keeps the random-init baseline meaningful.
KNN_DTYPE = "float64"


def _resolve_config(args, run_dir):
    from keras_dinov2.config import SSLConfig

    saved = os.path.join(run_dir, "config.json")
    if args.resume and os.path.exists(saved):
        with open(saved) as f:
            stored = json.load(f)
        return SSLConfig.from_dict(stored["ssl"]), stored["model"], stored["data"]
    if args.resume:
        raise ValueError(f"--resume given but {saved} does not exist: nothing to resume; drop --resume "
                         "to start a new run there.")
    recipe = args.recipe or ("digits" if args.data == "digits" else "reference_default")
    config = SSLConfig.recipe(recipe)
    optim = {}
    if args.epochs is not None:
        optim["epochs"] = args.epochs
    if args.accumulation is not None:
        optim["gradient_accumulation_steps"] = args.accumulation
    if args.lr is not None:
        optim["base_lr"] = args.lr
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
        seed=args.seed,
    )
    model = args.model or ("dinov2_vit_tiny4" if args.data == "digits" else "dinov2_vit_small14")
    return config, model, args.data


def _build_backbone(model_name, config):
    from keras_dinov2.backbone import ARCHITECTURES, DINOv2Backbone

    overrides = config.optim.stochastic_depth()
    if model_name in ARCHITECTURES:
        patch = ARCHITECTURES[model_name]["config"]["patch_size"]
        overrides.update(config.optim.new_backbone_init())
        # Store the position table for the global crop size: no resampling at 224 / 32.
        overrides["image_size"] = config.data.crops.global_crops_size
        # A new run picks the antialiased rule of the registers release: our preset, keras-hub (any
        # backend) and transformers all resample its position table alike, so every export matches
        # at every input size. The released weights keep the rule they were trained with.
        overrides["interpolation"] = "registers"
        if config.data.masking.patch_size != patch:
            raise ValueError(
                f"the recipe's patch size {config.data.masking.patch_size} does not "
                f"match {model_name}'s {patch}; choose a matching --recipe or --model."
            )
        return DINOv2Backbone.from_preset(model_name, load_weights=False, **overrides)
    # A preset folder or URI: continue pretraining from its weights.
    return DINOv2Backbone.from_preset(model_name, **overrides)


def _random_init_knn(backbone, image_size, seed):
    """{k: top-1 %} on the held-out digits of the run's random-init baseline (seeded: the same network, and
    number, at the start, at the end and after a resume), with the protocol of the teacher's k-NN."""
    from keras_dinov2.evaluation import evaluate_digits, random_init_backbone

    return evaluate_digits(random_init_backbone(backbone, seed=seed), image_size=image_size,
                           dtype=KNN_DTYPE)


def pretrain(args):
    """Runs `keras-dinov2 pretrain` with parsed arguments; returns the exit status."""
    from keras_dinov2 import callbacks as cb
    from keras_dinov2 import distribute
    from keras_dinov2.pretrainer import DINOv2Pretrainer

    # First: JAX places variables on the mesh as they are created, and several hosts must
    # meet before anything runs; TF builds the model in the strategy's scope.
    dist = distribute.setup(getattr(args, "distribution", "auto"),
                            model_axis_size=getattr(args, "model_axis_size", None),
                            multi_host=getattr(args, "multi_host", False) or None)
    chief = dist.is_chief
    run_dir = args.out
    os.makedirs(run_dir, exist_ok=True)
    config, model_name, data_spec = _resolve_config(args, run_dir)
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

    # An export with heads (`keras-dinov2 export --heads`) continues with its heads and centers,
    # so the teacher's targets carry on where they were instead of restarting from random heads.
    heads_from = None
    if not args.resume and os.path.isdir(str(model_name)):
        from keras_dinov2.export.preset import exported_head_config

        exported = exported_head_config(model_name)
        if exported is not None:
            heads_from = model_name
            config = dataclasses.replace(
                config, heads=dataclasses.replace(config.heads, **exported))
    with dist.scope():
        backbone = _build_backbone(model_name, config)
        model = DINOv2Pretrainer(backbone, config, steps_per_epoch=optim.steps_per_epoch)
        if heads_from is not None:
            from keras_dinov2.export.preset import restore_heads

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
    if args.resume:
        if checkpoint is None:
            raise ValueError(f"--resume given but {run_dir} holds no checkpoint; drop --resume to "
                             "start the run again.")
        with dist.scope():
            initial_epoch = int(cb.load_checkpoint(model, checkpoint)["epoch"])
        print(f"Resuming {run_dir} from {os.path.basename(checkpoint)} (epoch {initial_epoch}).")
    dist.prepare(model)  # torch: every rank starts from rank 0's state
    if not args.resume and chief:
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump({"ssl": config.to_dict(), "model": model_name, "data": data_spec,
                       "backend": keras.backend.backend()}, f, indent=2)
        for name in ("metrics.csv", "epochs.csv"):
            if os.path.exists(os.path.join(run_dir, name)):
                os.remove(os.path.join(run_dir, name))
    if initial_epoch >= optim.epochs:
        print(f"The run in {run_dir} already finished its {optim.epochs} epochs.")
        return 0

    # The data stream is keyed by (seed, pass): skip to where the interrupted run stopped.
    # Each step takes one update's micro-batches, stacked (gradient accumulation).
    consumed = initial_epoch * optim.steps_per_epoch * accumulation
    dataset = dist.dataset(
        data_spec, config.batch_size, config.data, seed=config.seed, repeat=True,
        start_epoch=consumed // batches_per_pass, skip=consumed % batches_per_pass,
        micro_batches=accumulation, max_image_pixels=max_image_pixels,
    )

    monitor = cb.TrainingMonitor()
    callbacks = [
        monitor,
        # Every process takes part (JAX gathers sharded variables); the chief writes.
        cb.CheckpointCallback(run_dir, metadata={"model": model_name}),
    ]
    if chief:
        callbacks.insert(0, cb.StepLogger(run_dir,
                                          initial_step=initial_epoch * optim.steps_per_epoch))
    # The k-NN monitor runs outside the train step on one process: not across hosts.
    knn = data_spec == "digits" and args.knn_every > 0 and dist.num_processes == 1
    random_init = None  # {k: top-1 %} of the one random-init baseline of this run
    if knn:
        from keras_dinov2.data import eval_dataset
        from keras_dinov2.evaluation import KNNMonitor

        size = config.data.crops.global_crops_size
        random_init = _random_init_knn(model.teacher, size, config.seed)
        callbacks.insert(0, KNNMonitor(
            eval_dataset("digits", size, 256, split="train"),
            eval_dataset("digits", size, 256, split="test"),
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
