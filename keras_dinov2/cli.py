"""The `keras-dinov2` command line: pretrain, evaluate, export, convert, visualize."""

import argparse
import os
import sys

DESCRIPTION = """\
DINOv2 self-supervised pretraining of Vision Transformers on Keras 3.

The Keras backend comes from KERAS_BACKEND (jax, tensorflow or torch), else from Keras' own
configuration (~/.keras/keras.json, TensorFlow by default). The README's quick start sets jax.
"""

NOT_YET = {
    "evaluate": "k-NN and linear-probe evaluation (issue: evaluation, pictures and examples)",
    "export": "preset, keras-hub and transformers export (issue: export and publish)",
    "visualize": "PCA and attention pictures (issue: evaluation, pictures and examples)",
}


def _parser():
    parser = argparse.ArgumentParser(
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
    pretrain.add_argument("--data", default="digits",
                          help="digits (bundled, no download), an image FOLDER, or "
                               "tfds:NAME[:SPLIT] (default: digits)")
    pretrain.add_argument("--model", default=None,
                          help="architecture preset (e.g. dinov2_vit_small14) or preset folder; "
                               "default dinov2_vit_tiny4 for digits, dinov2_vit_small14 otherwise")
    pretrain.add_argument("--recipe", default=None,
                          choices=["digits", "reference_default", "vitl14", "vitg14"],
                          help="named SSLConfig recipe (default: digits for --data digits, "
                               "reference_default otherwise)")
    pretrain.add_argument("--epochs", type=int, default=None, help="epochs (recipe default)")
    pretrain.add_argument("--steps-per-epoch", type=int, default=None,
                          help="optimizer steps per epoch (default: one pass over the data)")
    pretrain.add_argument("--batch-size", type=int, default=None,
                          help="source images per step (recipe default)")
    pretrain.add_argument("--accumulation", type=int, default=None,
                          help="micro-batches per optimizer update (gradient accumulation)")
    pretrain.add_argument("--lr", type=float, default=None, help="base learning rate")
    pretrain.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    pretrain.add_argument("--knn-every", type=int, default=1,
                          help="k-NN of the teacher on held-out digits every N epochs (digits "
                               "only; 0 disables; default 1)")
    pretrain.add_argument("--out", default="runs/latest", help="run directory (default runs/latest)")
    pretrain.add_argument("--resume", action="store_true",
                          help="continue the run in --out from its last checkpoint")
    pretrain.add_argument("--verbose", type=int, default=1, choices=[0, 1, 2],
                          help="Keras fit verbosity (default 1: progress bar)")

    evaluate = commands.add_parser("evaluate", help="k-NN and linear probe of a backbone")
    evaluate.add_argument("--preset", required=True, help="preset folder or hf:// URI")
    evaluate.add_argument("--data", default="digits", help="labelled data (default: digits)")

    export = commands.add_parser("export", help="export a run's teacher backbone")
    export.add_argument("--run", required=True, help="run directory")
    export.add_argument("--format", choices=["keras_dinov2", "keras_hub", "transformers"],
                        default="keras_dinov2")
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--push", default=None, help="hf://user/repo to upload to")

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

    visualize = commands.add_parser("visualize", help="PCA and attention maps as PNG")
    visualize.add_argument("--preset", required=True)
    visualize.add_argument("--image", required=True)
    visualize.add_argument("--out", required=True)
    return parser


def _convert(args):
    from keras_dinov2 import convert

    kind, path = args.source
    if kind == "torch-hub":
        if not os.path.isfile(path):
            raise SystemExit(f"error: --from torch-hub expects a .pth file; {path!r} is not one.")
        backbone = convert.load_torch_hub_checkpoint(path)
    elif kind == "transformers":
        if not os.path.isdir(path):
            raise SystemExit(f"error: --from transformers expects a folder; {path!r} is not one.")
        backbone = convert.load_transformers_checkpoint(path)
    else:
        raise SystemExit(f"error: --from KIND must be torch-hub or transformers, not {kind!r}.")
    backbone.save_to_preset(args.out)
    print(
        f"Wrote {args.out}: {backbone.num_layers} blocks, width {backbone.hidden_dim}, "
        f"patch {backbone.patch_size}, {backbone.num_register_tokens} registers, "
        f"{backbone.count_params():,} parameters, interpolation {backbone.interpolation!r}."
    )
    return 0


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
        return 2
    if args.command == "pretrain":
        from keras_dinov2.run import pretrain

        return pretrain(args)
    return _convert(args)


if __name__ == "__main__":
    sys.exit(main())
