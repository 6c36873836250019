"""The bodies of the `keras-dinov2` subcommands; each takes the parsed arguments and returns the exit status."""

import json
import os
import sys
import warnings

from keras_dinov2.cli.errors import UPLOAD_FAILED, is_user_error, one_line
from keras_dinov2.run import RunDirectory, distill, plot_metrics, pretrain


def run_convert(args):
    """`keras-dinov2 convert`: official weights to a preset folder."""
    from keras_dinov2 import interop

    kind, path = args.source
    if kind == "torch-hub":
        if not os.path.isfile(path):
            raise ValueError(f"--from torch-hub expects a .pth file; {path!r} is not one.")
        load = interop.load_torch_hub_checkpoint
    elif kind == "transformers":
        if not os.path.isdir(path):
            raise ValueError(f"--from transformers expects a folder; {path!r} is not one.")
        load = interop.load_transformers_checkpoint
    else:
        raise ValueError(f"--from KIND must be torch-hub or transformers, not {kind!r}.")
    try:
        backbone = load(path)
    except Exception as error:
        # Name the input when the reader's message does not (a JSON or zip error says where, not what).
        if not is_user_error(error) or os.path.basename(os.path.normpath(path)) in str(error):
            raise
        raise ValueError(f"{path!r} could not be converted ({kind}): {one_line(error)}") from error
    backbone.save_to_preset(args.out)
    print(
        f"Wrote {args.out}: {backbone.num_layers} blocks, width {backbone.hidden_dim}, "
        f"patch {backbone.patch_size}, {backbone.num_register_tokens} registers, "
        f"{backbone.count_params():,} parameters, interpolation {backbone.interpolation!r}."
    )
    return 0


def check_preset_spec(flag, spec):
    """Refuses, in one line that names `flag`, a preset spec that is no architecture name, folder or URI."""
    from keras_dinov2.interop import UnknownSourceError, check_source

    try:
        check_source(spec)
    except UnknownSourceError as error:
        raise ValueError(f"{flag} {error}") from None


def load_backbone(spec, flag="--preset"):
    """A backbone from a run directory (its teacher_preset/), a preset folder, an hf:// URI or a preset name.

    `keras_dinov2.interop.load_backbone` reads it; an unknown spec is reported with `flag`.
    """
    from keras_dinov2 import interop

    check_preset_spec(flag, spec)
    return interop.load_backbone(spec)


def run_evaluate(args):
    """`keras-dinov2 evaluate`: k-NN and linear probe of a backbone's frozen features."""
    from keras_dinov2.evaluation import evaluate_backbone

    backbone = load_backbone(args.preset)
    result = evaluate_backbone(
        backbone, data=args.data, image_size=args.image_size, features=args.features,
        n_last_blocks=args.n_last_blocks, avgpool=args.avgpool, linear=args.linear,
        linear_epochs=args.linear_epochs, linear_learning_rates=args.linear_lrs,
        compare_random_init=not args.no_random_init,
        batch_size=args.batch_size, train_split=args.train_split, test_split=args.test_split,
        max_image_pixels=args.max_image_pixels,
    )
    random_init = result.get("random_init", {})
    print(f"{args.preset} on {result['data']} ({result['num_train']} references, {result['num_test']} "
          f"queries, {result['image_size']} px):")
    for k, accuracy in sorted(result["knn"].items()):
        extra = f"   random init {random_init['knn'][k]:5.1f}%" if random_init else ""
        print(f"  k-NN k={k:<4d} {accuracy:5.1f}%{extra}")
    if "linear" in result:
        extra = f"   random init {random_init['linear']['accuracy']:5.1f}%" if random_init else ""
        print(f"  linear     {result['linear']['accuracy']:5.1f}% (lr {result['linear']['learning_rate']:g}){extra}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
        print(f"Wrote {args.output}.")
    return 0


def run_export(args):
    """`keras-dinov2 export`: a run's teacher or a preset, written, verified and optionally uploaded."""
    from keras_dinov2.export import ExportWarning, UploadError, export, load_run

    if args.preset is not None:
        check_preset_spec("--preset", args.preset)
    try:
        source = load_run(args.run, student=args.student_index) if args.run else args.preset
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExportWarning)  # export prints them itself
            export(source, args.out, format=args.format, heads=args.heads,
                   tolerance=args.tolerance, license=args.license, push=args.push,
                   private=args.private, revision=args.revision,
                   commit_message=args.commit_message, overwrite=args.overwrite)
    except UploadError as error:
        # The export is on disk; only the upload failed (its message is already free of credentials).
        print(f"error: {error}", file=sys.stderr)
        return UPLOAD_FAILED
    return 0


def _parse_size(text):
    if text is None:
        return None
    try:
        sides = [int(part) for part in text.lower().split("x")]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or min(sides) < 1:
        raise ValueError(f"--size must be N or HxW in pixels, received {text!r}.")
    return sides[0] if len(sides) == 1 else tuple(sides)


def run_visualize(args):
    """`keras-dinov2 visualize`: PCA and attention maps of a backbone (and a run's training plot) as PNG."""
    from keras_dinov2.backbone import ARCHITECTURES, DINOv2Backbone
    from keras_dinov2.visualize import save_figure

    spec = args.preset or args.run
    if spec is None:
        raise ValueError("visualize needs --preset (or --run RUN_DIR).")
    run = args.run
    if run is None and os.path.isdir(RunDirectory(spec).teacher_preset_path):
        run = spec
    if run is not None and not os.path.isfile(RunDirectory(run).metrics_path):
        if args.run is not None:
            raise ValueError(f"--run {run!r} has no metrics.csv to plot.")
        run = None
    size = _parse_size(args.size)
    try:
        if spec in ARCHITECTURES and args.random_weights:
            backbone = DINOv2Backbone.from_preset(spec, load_weights=False)
        else:
            backbone = load_backbone(spec, "--preset" if args.preset else "--run")
    except ValueError as error:
        hint = " Pass --random-weights for random weights." if spec in ARCHITECTURES else ""
        raise ValueError(f"{error}{hint}") from None
    picture = save_figure(backbone, args.image, args.out, size=size,
                          background_threshold=args.background_threshold,
                          upsample=args.upsample, max_image_pixels=args.max_image_pixels)
    side = size or backbone.image_size
    side = f"{side[0]} x {side[1]}" if isinstance(side, tuple) else side
    print(f"Wrote {args.out} ({picture.shape[1]} x {picture.shape[0]} px): {len(args.image)} "
          f"image(s) at {side} px, PCA and {backbone.num_heads} attention heads + their mean.")
    if run is not None:
        directory = RunDirectory(run)
        plot_metrics(directory.metrics_path, directory.plot_path)
        print(f"Wrote {directory.plot_path} (training curves of {run}).")
    return 0


def run_pretrain(args):
    """`keras-dinov2 pretrain`: a resumable pretraining run (its errors propagate to `main`)."""
    if args.model is not None and not args.resume:
        check_preset_spec("--model", args.model)
    pretrain(args)
    return 0


def run_distill(args):
    """`keras-dinov2 distill`: a resumable distillation run (its errors propagate to `main`)."""
    if not args.resume:
        if args.teacher is not None:
            check_preset_spec("--teacher", args.teacher)
        flag, given = ("--students", args.students) if args.students else ("--student", args.student)
        for name in filter(None, (given or "").split(",")):
            check_preset_spec(flag, name.strip())
    distill(args)
    return 0


# Subcommand name -> its body.
COMMANDS = {"evaluate": run_evaluate, "export": run_export, "visualize": run_visualize,
            "pretrain": run_pretrain, "distill": run_distill, "convert": run_convert}
