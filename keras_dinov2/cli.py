"""The `keras-dinov2` command line: pretrain, evaluate, export, convert, visualize."""

import argparse
import math
import os
import sys

DESCRIPTION = """\
DINOv2 self-supervised pretraining of Vision Transformers on Keras 3.

The Keras backend comes from KERAS_BACKEND (jax, tensorflow or torch), else from Keras' own
configuration (~/.keras/keras.json, TensorFlow by default). The README's quick start sets jax.
TensorFlow's start-up log lines are hidden; set TF_CPP_MIN_LOG_LEVEL=0 to see them.
"""

NOT_YET = {}

# Exit statuses: 2 for anything the user can fix in the command (a flag, a path, the data), 3 when an
# export was written but its upload failed, 130 on Ctrl-C.
USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse with a short error: the problem and where to read more, not the whole usage text."""

    def error(self, message):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\nRun `{self.prog} --help` for the options.\n")


def _integer(minimum):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, received {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, received {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, received {text!r}")
    return value


def _non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, received {text!r}")
    return value


def _max_image_pixels(text):
    if text.lower() == "none":
        return None
    return _integer(1)(text)


MAX_IMAGE_PIXELS_HELP = (
    "largest width x height of an image file that is decoded; larger files are skipped and named "
    "(decompression bombs: a 1.6 MB PNG can declare 23000 x 23000 pixels); 'none' for no limit "
    "(default 89478485, PIL's limit)"
)


def _parser():
    parser = _Parser(
        prog="keras-dinov2", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    pretrain = commands.add_parser(
        "pretrain", help="pretrain a backbone with the DINOv2 recipe",
        description="Pretrain a ViT with DINOv2 (self-distillation, iBOT, KoLeo) through "
                    "model.fit, writing a run directory: config.json, metrics.csv (every step), "
                    "epochs.csv, metrics.png, checkpoints (full state, atomic) and the final "
                    "teacher backbone as a preset (teacher_preset/). With no arguments it trains "
                    "the tiny preset on the bundled digits in a few minutes on a CPU and "
                    "prints the teacher's k-NN accuracy next to a randomly initialized "
                    "backbone's.",
    )
    # Defaults of None: a resumed run tells a flag given from one left out (see `--resume`).
    pretrain.add_argument("--data", default=None,
                          help="digits (bundled, no download), an image FOLDER, or "
                               "tfds:NAME[:SPLIT] (default: digits)")
    pretrain.add_argument("--model", default=None,
                          help="architecture preset (e.g. dinov2_vit_small14) or preset folder; "
                               "a folder exported with `export --heads` also restores its heads "
                               "and centers (their sizes replace the recipe's) to continue "
                               "pretraining; default dinov2_vit_tiny4 for digits, "
                               "dinov2_vit_small14 otherwise")
    pretrain.add_argument("--recipe", default=None,
                          choices=["digits", "reference_default", "vitl14", "vitg14"],
                          help="named SSLConfig recipe (default: digits for --data digits, "
                               "reference_default otherwise)")
    pretrain.add_argument("--epochs", type=_integer(1), default=None, help="epochs (recipe default)")
    pretrain.add_argument("--steps-per-epoch", type=_integer(1), default=None,
                          help="optimizer steps per epoch (default: one pass over the data)")
    pretrain.add_argument("--batch-size", type=_integer(1), default=None,
                          help="source images per step and replica (recipe default)")
    pretrain.add_argument("--accumulation", type=_integer(1), default=None,
                          help="micro-batches per optimizer update (gradient accumulation)")
    pretrain.add_argument("--lr", type=_positive_float, default=None,
                          help="base learning rate, for a global batch of 1024 (recipe default)")
    pretrain.add_argument("--weight-decay", type=_non_negative_float, default=None,
                          help="weight decay at the start of its cosine schedule (recipe default)")
    pretrain.add_argument("--weight-decay-end", type=_non_negative_float, default=None,
                          help="weight decay at the end of its cosine schedule (recipe default)")
    pretrain.add_argument("--drop-path", type=float, default=None, dest="drop_path_rate",
                          help="student stochastic-depth rate (recipe default: 0.3, 0.4 for "
                               "vitl14 / vitg14, 0.1 for digits)")
    pretrain.add_argument("--drop-path-uniform", action=argparse.BooleanOptionalAction,
                          default=None,
                          help="the same drop-path rate in every block, as the reference's "
                               "DINOv2 configs (default for the DINOv2 recipes); "
                               "--no-drop-path-uniform ramps it linearly from 0 in the first "
                               "block (the digits recipe's rule)")
    pretrain.add_argument("--seed", type=_integer(0), default=None, help="random seed (default 0)")
    pretrain.add_argument("--max-image-pixels", type=_max_image_pixels, default=89_478_485,
                          help=MAX_IMAGE_PIXELS_HELP)
    pretrain.add_argument("--knn-every", type=_integer(0), default=2,
                          help="k-NN of the teacher on held-out digits every N epochs (digits "
                               "only; 0 disables; default 2)")
    pretrain.add_argument("--out", default="runs/latest", help="run directory (default runs/latest)")
    pretrain.add_argument("--resume", action="store_true",
                          help="continue the run in --out from its last checkpoint, with its "
                               "config; --lr, --weight-decay, --weight-decay-end, --epochs (to "
                               "extend a run) and --batch-size may change it (recorded in "
                               "config.json), other differing flags are refused")
    pretrain.add_argument("--distribution", default="auto",
                          choices=["auto", "none", "data", "model"],
                          help="several devices: data parallel over all of them (jax, tensorflow; "
                               "torch under torchrun), or 'model' (jax) to also shard the large "
                               "kernels over a model axis; auto: data when several devices or "
                               "torchrun processes are visible (default auto)")
    pretrain.add_argument("--model-axis-size", type=_integer(1), default=None,
                          help="devices per model-axis group for --distribution model "
                               "(default: the devices of one host)")
    pretrain.add_argument("--multi-host", action="store_true",
                          help="jax: join the other hosts first (keras.distribution.initialize; "
                               "TPU pods, or KERAS_DISTRIBUTION_* variables)")
    pretrain.add_argument("--verbose", type=int, default=1, choices=[0, 1, 2],
                          help="Keras fit verbosity (default 1: progress bar)")

    evaluate = commands.add_parser(
        "evaluate", help="k-NN and linear probe of a backbone's frozen features",
        description="Evaluate a backbone's frozen features with the reference protocol: k-NN "
                    "(L2-normalized CLS tokens, cosine similarity, 200 neighbours weighted by "
                    "exp(sim / 0.07), top-1 for k = 10, 20, 100, 200) and optionally a linear probe "
                    "with a small learning-rate sweep, next to a randomly initialized backbone of "
                    "the same architecture.",
    )
    evaluate.add_argument("--preset", required=True,
                          help="a run directory (its teacher_preset/), a preset folder, an hf:// "
                               "URI or a built-in preset name")
    evaluate.add_argument("--data", default="digits",
                          help="labelled data: digits (bundled), tfds:NAME, or a folder of class "
                               "subfolders (train/ and val/ or test/ inside, else a stratified "
                               "25%% hold-out); default digits")
    evaluate.add_argument("--train-split", default=None, help="reference split (TFDS split or subfolder)")
    evaluate.add_argument("--test-split", default=None, help="query split (TFDS split or subfolder)")
    evaluate.add_argument("--image-size", type=_integer(1), default=None,
                          help="evaluation crop side (default: the backbone's image_size)")
    evaluate.add_argument("--features", choices=["cls", "patch_mean"], default="cls",
                          help="k-NN features (default cls, the reference's)")
    evaluate.add_argument("--n-last-blocks", type=_integer(1), default=1,
                          help="concatenate the features of the last N blocks (default 1)")
    evaluate.add_argument("--avgpool", action="store_true",
                          help="append the mean patch token to the k-NN features")
    evaluate.add_argument("--linear", action="store_true", help="also train a linear probe")
    evaluate.add_argument("--linear-epochs", type=_integer(1), default=100,
                          help="linear probe epochs (default 100)")
    evaluate.add_argument("--no-random-init", action="store_true",
                          help="skip the randomly initialized comparison backbone")
    evaluate.add_argument("--batch-size", type=_integer(1), default=256, help="images per batch (default 256)")
    evaluate.add_argument("--max-image-pixels", type=_max_image_pixels, default=89_478_485,
                          help=MAX_IMAGE_PIXELS_HELP)
    evaluate.add_argument("--output", default=None, help="also write the results as JSON to this file")

    export = commands.add_parser(
        "export", help="export a run's teacher backbone and publish it",
        description="Export the EMA teacher of a run's newest checkpoint (the network the "
                    "reference releases), or a preset, as our preset (DINOv2Backbone.from_preset), "
                    "a stock keras-hub DINOV2Backbone preset, or a transformers folder "
                    "(AutoModel.from_pretrained). The export is loaded back and compared with "
                    "the source at the stored and an interpolated size (max differences "
                    "printed; it fails above --tolerance), gets a model card (README.md), and "
                    "is uploaded with --push. The Hugging Face token comes from HF_TOKEN or "
                    "`hf auth login`.",
    )
    export_source = export.add_mutually_exclusive_group(required=True)
    export_source.add_argument("--run", help="run directory (its newest checkpoint's teacher)")
    export_source.add_argument("--preset", help="preset folder, hf:// URI or architecture name")
    export.add_argument("--format", choices=["keras_dinov2", "keras_hub", "transformers"],
                        default="keras_dinov2", help="output format (default keras_dinov2)")
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--heads", action="store_true",
                        help="keras_dinov2 format from a run: also save the teacher's DINO / "
                             "iBOT heads and centers, to continue pretraining")
    export.add_argument("--push", default=None, help="hf://user/repo to upload to")
    export.add_argument("--private", action="store_true", help="create the Hub repo as private")
    export.add_argument("--revision", default=None, help="branch to push to (default main)")
    export.add_argument("--commit-message", default=None, help="commit message of the upload")
    export.add_argument("--license", default="apache-2.0",
                        help="license in the model card metadata (default apache-2.0)")
    export.add_argument("--tolerance", type=_positive_float, default=1e-4,
                        help="largest allowed feature difference (default 1e-4)")
    export.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")

    convert = commands.add_parser(
        "convert", help="convert official weights to a keras-dinov2 preset folder",
        description="Convert an official torch-hub .pth state dict or a Hugging Face "
                    "Dinov2Model / Dinov2WithRegistersModel folder into a preset folder that "
                    "DINOv2Backbone.from_preset (and keras_hub.models.Backbone.from_preset, "
                    "after `import keras_dinov2`) loads. Needs no torch.",
    )
    convert.add_argument("--from", dest="source", nargs=2, required=True,
                         metavar=("KIND", "PATH"),
                         help="torch-hub FILE.pth, or transformers FOLDER")
    convert.add_argument("--out", required=True, help="preset folder to write")

    visualize = commands.add_parser(
        "visualize", help="PCA of patch features and CLS attention maps as a PNG",
        description="Draw what a backbone sees into one PNG, one row per image: the input, the "
                    "first three PCA components of its final-norm patch tokens as RGB (one PCA "
                    "shared by all images, so colours correspond), and the CLS token's "
                    "last-block attention over the patches for every head and their mean. "
                    "Images are resized to --size (any multiple of the patch size; the position "
                    "embeddings are interpolated). With a run directory (--run, or --preset "
                    "RUN_DIR) it also redraws the run's training plot, metrics.csv -> "
                    "metrics.png. Example: keras-dinov2 visualize --preset runs/latest "
                    "--image skimage:chelsea --image photo.jpg --size 64 --out pictures.png",
    )
    visualize.add_argument("--preset", default=None,
                           help="a run directory (its teacher_preset/), a preset folder, an hf:// "
                                "URI or a built-in preset name (default: the --run directory)")
    visualize.add_argument("--image", action="append", required=True, metavar="IMAGE",
                           help="an image file (PNG, JPEG...) or skimage:NAME for a picture "
                                "bundled with scikit-image (astronaut, coffee, chelsea, rocket, "
                                "coins...); repeat for several images")
    visualize.add_argument("--out", required=True, help="PNG file to write")
    visualize.add_argument("--size", default=None,
                           help="input size N or HxW in pixels, multiples of the patch size "
                                "(default: the backbone's image_size)")
    visualize.add_argument("--run", default=None,
                           help="run directory whose metrics.csv is redrawn into metrics.png")
    visualize.add_argument("--background-threshold", type=float, default=None,
                           help="separate the background on the first PCA component first (the "
                                "DINOv2 paper's procedure; about 0.5 for trained backbones) and "
                                "draw it black")
    visualize.add_argument("--upsample", choices=["nearest", "bilinear"], default="nearest",
                           help="how PCA colours fill each patch (default nearest)")
    visualize.add_argument("--max-image-pixels", type=_max_image_pixels, default=89_478_485,
                           help=MAX_IMAGE_PIXELS_HELP)
    visualize.add_argument("--random-weights", action="store_true",
                           help="with a built-in preset name: random weights instead of the "
                                "official download (to try the command offline)")
    return parser


def _convert(args):
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
        if not _is_user_error(error) or os.path.basename(os.path.normpath(path)) in str(error):
            raise
        raise ValueError(f"{path!r} could not be converted ({kind}): {_one_line(error)}") from error
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


def _evaluate(args):
    import json

    from keras_dinov2.evaluation import evaluate_backbone

    backbone = load_backbone(args.preset)
    result = evaluate_backbone(
        backbone, data=args.data, image_size=args.image_size, features=args.features,
        n_last_blocks=args.n_last_blocks, avgpool=args.avgpool, linear=args.linear,
        linear_epochs=args.linear_epochs, compare_random_init=not args.no_random_init,
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


def _export(args):
    import warnings

    from keras_dinov2.export import ExportWarning, UploadError, export, load_run

    if args.preset is not None:
        check_preset_spec("--preset", args.preset)
    try:
        source = load_run(args.run) if args.run else args.preset
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExportWarning)  # export prints them itself
            export(source, args.out, format=args.format, heads=args.heads,
                   tolerance=args.tolerance, license=args.license, push=args.push,
                   private=args.private, revision=args.revision,
                   commit_message=args.commit_message, overwrite=args.overwrite)
    except UploadError as error:
        # The export is on disk; only the upload failed (its message is already free of credentials).
        print(f"error: {error}", file=sys.stderr)
        return 3
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


def _visualize(args):
    from keras_dinov2.backbone import ARCHITECTURES, DINOv2Backbone
    from keras_dinov2.visualize import save_figure

    spec = args.preset or args.run
    if spec is None:
        raise ValueError("visualize needs --preset (or --run RUN_DIR).")
    run = args.run
    if run is None and os.path.isdir(os.path.join(spec, "teacher_preset")):
        run = spec
    if run is not None and not os.path.isfile(os.path.join(run, "metrics.csv")):
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
        from keras_dinov2.callbacks import plot_metrics

        png = os.path.join(run, "metrics.png")
        plot_metrics(os.path.join(run, "metrics.csv"), png)
        print(f"Wrote {png} (training curves of {run}).")
    return 0


def _pretrain(args):
    from keras_dinov2.run import pretrain

    if args.model is not None and not args.resume:
        check_preset_spec("--model", args.model)
    return pretrain(args)


def _is_user_error(error):
    """Errors that describe a bad input (a flag, a path, a file, the data), as the library raises them on
    purpose; anything else is a bug and keeps its traceback."""
    return isinstance(error, (ValueError, OSError)) or type(error).__module__.startswith("keras_dinov2")


def _one_line(error, limit=600):
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and not isinstance(error, ConnectionError) and error.filename:
        text = f"{error.strerror or text}: {error.filename!r}"
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command in NOT_YET:
        print(
            f"keras-dinov2 {args.command} is not available yet: {NOT_YET[args.command]} has "
            "not landed. Nothing was run. `keras-dinov2 pretrain` and `keras-dinov2 convert` "
            "work today.",
            file=sys.stderr,
        )
        return USAGE_ERROR
    command = {"evaluate": _evaluate, "export": _export, "visualize": _visualize,
               "pretrain": _pretrain, "convert": _convert}[args.command]
    try:
        return command(args)
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        return 130
    except Exception as error:
        if not _is_user_error(error):
            raise
        message = _one_line(error)
        if args.command == "export":
            from keras_dinov2.export.hub import redact_secrets

            message = redact_secrets(message, secrets=[os.environ.get("HF_TOKEN", "")])
        print(f"keras-dinov2 {args.command}: error: {message}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
