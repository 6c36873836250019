"""Resuming a run: the stored config with the changes the flags ask for, and where the data stream continues."""

import dataclasses
import os

from keras_dinov2.config import SSL_RECIPES, SSLConfig
from keras_dinov2.run.errors import ResumeError

# What a resumed run may change: SSLConfig field -> flag. The rest of the config fixes the
# model, its heads, the data stream or the step's structure, which a checkpoint cannot change.
RESUME_CHANGEABLE = {
    "optim.base_lr": "--lr",
    "optim.weight_decay": "--weight-decay",
    "optim.weight_decay_end": "--weight-decay-end",
    "optim.epochs": "--epochs",
    "batch_size": "--batch-size",
}


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


def same_location(given, stored):
    # A folder may be named by another (relative, absolute) path on resume.
    if given == stored:
        return True
    return (os.path.exists(given) and os.path.exists(stored)
            and os.path.realpath(given) == os.path.realpath(stored))


def _stored_recipe(stored):
    if stored.get("recipe"):
        return stored["recipe"]
    # Run directories written before the name was stored: the recipe whose heads, losses and
    # data match (the flags never change those).
    ssl = SSLConfig.from_dict(stored["ssl"])
    for name in SSL_RECIPES:
        recipe = SSLConfig.recipe(name)
        if ((recipe.heads, recipe.loss, recipe.data, recipe.model.patch_size)
                == (ssl.heads, ssl.loss, ssl.data, ssl.model.patch_size)):
            return name
    return None


def resumed_config(args, stored, run_dir, fixed=None):
    """The stored config of the run in `run_dir` with the changes the flags ask for.

    Args:
        args: argparse.Namespace of `keras-dinov2 pretrain` or `distill` (None where a flag was not given).
        stored: dict. The run's config.json.
        run_dir: str. The run directory (named in the error).
        fixed: list of (flag, given value, the run's value, comparison or None for ==) that a resume cannot
            change, besides --steps-per-epoch, --accumulation and --seed; default pretrain's (--data, --model,
            --recipe).

    Returns:
        (SSLConfig, changes), changes a dict field -> (old, new) over `RESUME_CHANGEABLE`'s fields.

    Raises:
        ResumeError: naming every flag that differs from the run and cannot change on resume.

    Example:
    >>> config, changes = resumed_config(args, json.load(open("runs/x/config.json")), "runs/x")
    """
    config = SSLConfig.from_dict(stored["ssl"])
    if fixed is None:
        fixed = [("--data", args.data, stored["data"], same_location),
                 ("--model", args.model, stored["model"], same_location),
                 ("--recipe", args.recipe, _stored_recipe(stored), None)]
    fixed = list(fixed) + [
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


def describe_changes(changes):
    """The changes of `resumed_config` as the flags that made them: "--lr 0.004 -> 0.0001, ..."."""
    return ", ".join(f"{RESUME_CHANGEABLE[field]} {old} -> {new}"
                     for field, (old, new) in changes.items())


def data_position(metadata, epoch, micro_steps, batch_size, pass_images):
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

    Example:
    >>> data_position({}, epoch=5, micro_steps=21, batch_size=64, pass_images=1347)
    (4, 1332)
    """
    start = metadata.get("data_start", {"images": 0, "epoch": 0, "batch_size": batch_size})
    images = start["images"] + (epoch - start["epoch"]) * micro_steps * start["batch_size"]
    return (0, images) if pass_images is None else divmod(images, pass_images)


def resolve_config(args, run):
    """The config of the run that `pretrain` starts or resumes in `run` (a `RunDirectory`).

    A new run takes the named recipe (digits for the digits data, else reference_default) with
    the flags' values; a resumed one its stored config with the changes `resumed_config` allows.

    Returns:
        (config, model name, data spec, recipe name, resumed): `resumed` is None for a new run,
        else (the stored config.json dict, the changes of `resumed_config`).

    Raises:
        ResumeError: --resume without a config.json in the run directory, or with flags the run
            cannot take.
    """
    stored = run.read_config() if args.resume else None
    if stored is not None:
        config, changes = resumed_config(args, stored, run.path)
        return config, stored["model"], stored["data"], _stored_recipe(stored), (stored, changes)
    if args.resume:
        raise ResumeError(f"--resume given but {run.config_path} does not exist: nothing to resume; drop "
                          "--resume to start a new run there.")
    data = _data_default(args)
    recipe = args.recipe or ("digits" if data == "digits" else "reference_default")
    config = apply_flags(SSLConfig.recipe(recipe), args)
    # The digits recipes (patch 4, 24 px crops) train the tiny ViT on any data; DINO v1's other recipes (patch
    # 16) its ViT-S/16.
    default = "dino_vit_small16" if recipe.startswith("dino") else "dinov2_vit_small14"
    small_crops = data == "digits" or config.model.patch_size == 4
    model = args.model or ("dinov2_vit_tiny4" if small_crops else default)
    return config, model, data, recipe, None


def apply_flags(config, args):
    """`config` with the values of the flags of a new run (epochs, accumulation, lr, weight decay, steps per
    epoch, drop path, batch size, seed) where they are given; the seed defaults to 0."""
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
    settings = {}
    if getattr(args, "drop_path_rate", None) is not None:
        settings["drop_path_rate"] = args.drop_path_rate
    if getattr(args, "drop_path_uniform", None) is not None:
        settings["drop_path_uniform"] = args.drop_path_uniform
    config = dataclasses.replace(
        config,
        optim=dataclasses.replace(config.optim, **optim),
        model=dataclasses.replace(config.model, **settings),
        batch_size=config.batch_size if args.batch_size is None else args.batch_size,
        seed=_seed_default(args),
    )
    return config
