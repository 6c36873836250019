"""The argument parser of `keras-dinov2`: the subcommands, their flags and the flags' types."""

import argparse
import math

from keras_dinov2.cli.errors import USAGE_ERROR
from keras_dinov2.config.recipes import SSL_RECIPES

DESCRIPTION = """\
DINOv2 self-supervised pretraining of Vision Transformers on Keras 3.

The Keras backend comes from KERAS_BACKEND (jax, tensorflow or torch), else from Keras' own
configuration (~/.keras/keras.json, TensorFlow by default). The README's quick start sets jax.
TensorFlow's start-up log lines are hidden; set TF_CPP_MIN_LOG_LEVEL=0 to see them.
"""


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


def _positive_floats(text):
    values = [_positive_float(part) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, received {text!r}")
    return tuple(values)


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


def _add_run_flags(parser, command):
    """The flags `pretrain` and `distill` share: data, recipe, schedule, run directory, resume, devices."""
    parser.add_argument("--data", default=None,
                        help="digits (bundled, no download), an image FOLDER, or "
                             "tfds:NAME[:SPLIT] (default: digits)")
    parser.add_argument("--recipe", default=None,
                        choices=list(SSL_RECIPES),
                        help="named SSLConfig recipe; dino* are DINO v1's (default: digits for --data digits, "
                             "reference_default otherwise)")
    parser.add_argument("--epochs", type=_integer(1), default=None, help="epochs (recipe default)")
    parser.add_argument("--steps-per-epoch", type=_integer(1), default=None,
                        help="optimizer steps per epoch (default: one pass over the data)")
    parser.add_argument("--batch-size", type=_integer(1), default=None,
                        help="source images per step and replica (recipe default)")
    parser.add_argument("--accumulation", type=_integer(1), default=None,
                        help="micro-batches per optimizer update (gradient accumulation)")
    parser.add_argument("--lr", type=_positive_float, default=None,
                        help="base learning rate, for a global batch of 1024 (of 256 for the dino "
                             "recipes) (recipe default)")
    parser.add_argument("--weight-decay", type=_non_negative_float, default=None,
                        help="weight decay at the start of its cosine schedule (recipe default)")
    parser.add_argument("--weight-decay-end", type=_non_negative_float, default=None,
                        help="weight decay at the end of its cosine schedule (recipe default)")
    parser.add_argument("--seed", type=_integer(0), default=None, help="random seed (default 0)")
    parser.add_argument("--max-image-pixels", type=_max_image_pixels, default=89_478_485,
                        help=MAX_IMAGE_PIXELS_HELP)
    parser.add_argument("--knn-every", type=_integer(0), default=2,
                        help=("k-NN of the teacher" if command == "pretrain" else
                              "k-NN of every student and of its EMA (the teacher's once)")
                        + " on held-out digits every N epochs (digits only; 0 disables; default 2)")
    parser.add_argument("--out", default="runs/latest", help="run directory (default runs/latest)")
    # Defaults of None: a resumed run tells a flag given from one left out (see `--resume`).
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last checkpoint, with its "
                             "config; --lr, --weight-decay, --weight-decay-end, --epochs (to "
                             "extend a run) and --batch-size may change it (recorded in "
                             "config.json), other differing flags are refused")
    parser.add_argument("--distribution", default="auto",
                        choices=["auto", "none", "data", "model"],
                        help="several devices: data parallel over all of them (jax, tensorflow; "
                             "torch under torchrun), or 'model' (jax) to also shard the large "
                             "kernels over a model axis; auto: data when several devices or "
                             "torchrun processes are visible (default auto)")
    parser.add_argument("--model-axis-size", type=_integer(1), default=None,
                        help="devices per model-axis group for --distribution model "
                             "(default: the devices of one host)")
    parser.add_argument("--multi-host", action="store_true",
                        help="jax: join the other hosts first (keras.distribution.initialize; "
                             "TPU pods, or KERAS_DISTRIBUTION_* variables)")
    parser.add_argument("--xla", action="store_true",
                        help="tensorflow: compile the training step with XLA on a CPU-only machine too, which "
                             "Keras leaves to GPUs (ViT-S/14 on 2 CPU cores: steps 1.46x faster and less memory "
                             "between them; the first step takes ~15-20 s longer to compile, so short runs of "
                             "small models, like the digits default, finish later); jax always compiles with "
                             "XLA; not for torch")
    parser.add_argument("--verbose", type=int, default=1, choices=[0, 1, 2],
                        help="Keras fit verbosity (default 1: progress bar)")



def _threshold(text):
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a cosine similarity in (0, 1], received {text!r}")
    return value


def _levels(text):
    try:
        levels = [int(part) for part in text.split(",")]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"expected cluster counts like 100,10 (bottom level first), received {text!r}")
    return tuple(levels)


def _add_curate(commands):
    curate = commands.add_parser(
        "curate", help="curate an image pool: embed it, then deduplicate, decontaminate, retrieve, cluster",
        description="Curate a pool of images as DINOv2 built LVD-142M, in two steps. `curate embed` runs every "
                    "image through a frozen backbone (CLS token) into resumable shards; `curate select` "
                    "deduplicates, removes images close to evaluation data, keeps the neighbours of seed "
                    "images and samples evenly over hierarchical k-means clusters, writing manifest.csv (which "
                    "`pretrain --data OUT` reads), report.json and two PNGs. Example: keras-dinov2 curate "
                    "embed --data photos/ --model dinov2_vit_small14 --out emb && keras-dinov2 curate select "
                    "--embeddings emb --dedup-threshold 0.95 --levels 1000,100 --total 50000 --out curated",
    )
    steps = curate.add_subparsers(dest="curate_command", metavar="STEP", required=True)
    embed = steps.add_parser(
        "embed", help="embed a pool into resumable shards (shard_00000.npy ...)",
        description="Embed every image of --data with --model (resize, center crop, CLS token) into --out: "
                    "shard_XXXXX.npy (+ .ids.npy), files.csv and embeddings.json (the backbone's identity). "
                    "Rerunning the same command after a kill redoes only the missing shards. Unreadable files "
                    "are skipped and listed in files.csv.",
    )
    embed.add_argument("--data", required=True,
                       help="the pool: an image FOLDER, a .txt file listing image files, tfds:NAME[:SPLIT], "
                            "digits[:SPLIT] or a manifest")
    embed.add_argument("--model", required=True,
                       help="backbone: preset name, preset folder, run directory or hf:// URI")
    embed.add_argument("--random-weights", action="store_true",
                       help="a built-in architecture with seeded random weights (to try the command offline)")
    embed.add_argument("--out", required=True, help="embedding folder to write (or to resume)")
    embed.add_argument("--batch-size", type=_integer(1), default=64, help="images per forward pass (default 64)")
    embed.add_argument("--shard-size", type=_integer(1), default=65536,
                       help="images per shard, the unit of resumption (default 65536)")
    embed.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                       help="dtype on disk (default float16)")
    embed.add_argument("--image-size", type=_integer(1), default=None,
                       help="crop side in pixels (default: the backbone's image_size)")
    embed.add_argument("--distribution", choices=["auto", "none", "data"], default="auto",
                       help="jax: split every batch over all devices (data); auto: data when several devices "
                            "are visible. Other backends: one device per process, see --num-workers")
    embed.add_argument("--num-workers", type=_integer(1), default=1,
                       help="processes embedding this pool into --out together (default 1)")
    embed.add_argument("--worker-index", type=_integer(0), default=0,
                       help="this process's index in [0, --num-workers): it takes shards s with "
                            "s %% num_workers == index (default 0)")
    embed.add_argument("--max-image-pixels", type=_max_image_pixels, default=89_478_485, help=MAX_IMAGE_PIXELS_HELP)
    embed.add_argument("--verbose", type=int, choices=[0, 1], default=1, help="progress bar (default 1)")
    select = steps.add_parser(
        "select", help="deduplicate, decontaminate, retrieve and sample; write manifest.csv and a report",
        description="Run the curation steps on the embeddings of `curate embed`, each on what the earlier ones "
                    "kept: --dedup-threshold, --eval-data, --seeds with --k, --levels with --per-cluster or "
                    "--total. Writes --out/manifest.csv (every pool image: kept 0/1, reason, cluster per "
                    "level), report.json (images left after each step), cluster_sizes.png and "
                    "cluster_members.png. --eval-data and --seeds take an embedding folder, or data that is "
                    "then embedded with the pool's backbone (reloaded from its recorded name and checked "
                    "against its fingerprint).",
    )
    select.add_argument("--embeddings", required=True, help="embedding folder of the pool (curate embed --out)")
    select.add_argument("--out", required=True, help="folder for manifest.csv and the report")
    select.add_argument("--dedup-threshold", type=_threshold, default=None,
                        help="cosine similarity of near-copies; one image per group is kept (default: no "
                             "deduplication; about 0.9-0.95 for DINOv2 embeddings)")
    select.add_argument("--eval-data", default=None,
                        help="evaluation images to stay away from: an embedding folder or a data spec")
    select.add_argument("--decontamination-threshold", type=_threshold, default=0.95,
                        help="pool images this similar to an evaluation image go, with their near-copies "
                             "(default 0.95)")
    select.add_argument("--seeds", default=None,
                        help="seed images (an embedding folder or a data spec): keep the --k nearest pool "
                             "images of each")
    select.add_argument("--k", type=_integer(1), default=4, help="neighbours per seed image (default 4)")
    select.add_argument("--retrieval-clusters", type=_integer(1), default=None, metavar="N",
                        help="cluster-based retrieval instead of --k: k-means of the pool into N clusters, "
                             "every member of a cluster holding at least --min-seeds seeds kept")
    select.add_argument("--min-seeds", type=_integer(1), default=1,
                        help="seeds a cluster needs with --retrieval-clusters (default 1; the paper: 4)")
    select.add_argument("--levels", type=_levels, default=None,
                        help="hierarchical k-means clusters per level, bottom first, e.g. 100,10")
    budget = select.add_mutually_exclusive_group()
    budget.add_argument("--per-cluster", type=_integer(1), default=None,
                        help="with --levels: images kept per top-level cluster")
    budget.add_argument("--total", type=_integer(1), default=None,
                        help="with --levels: images kept in all, balanced over the clusters")
    select.add_argument("--index", default="flat",
                        help="faiss index of the searches: flat (exact), ivf, or a factory string such as "
                             "IVF4096,PQ32 (default flat)")
    select.add_argument("--model", default=None,
                        help="backbone to embed --eval-data / --seeds specs with (default: the pool's "
                             "recorded one); it must match the pool's fingerprint")
    select.add_argument("--random-weights", action="store_true",
                        help="the pool was embedded with --random-weights")
    select.add_argument("--batch-size", type=_integer(1), default=64,
                        help="images per forward pass when embedding --eval-data / --seeds (default 64)")
    select.add_argument("--seed", type=_integer(0), default=0, help="seed of k-means and sampling (default 0)")
    select.add_argument("--verbose", type=int, choices=[0, 1], default=1, help="progress bars (default 1)")


def build_parser():
    """The `keras-dinov2` parser: one subparser per command (`args.command` is None when none is given)."""
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
    pretrain.add_argument("--model", default=None,
                          help="architecture preset (e.g. dinov2_vit_small14) or preset folder; "
                               "a folder exported with `export --heads` also restores its heads "
                               "and centers (their sizes replace the recipe's) to continue "
                               "pretraining; default dinov2_vit_tiny4 for digits or the digits "
                               "recipes, dino_vit_small16 for the other dino recipes, "
                               "dinov2_vit_small14 otherwise")
    _add_run_flags(pretrain, "pretrain")
    pretrain.add_argument("--drop-path", type=float, default=None, dest="drop_path_rate",
                          help="student stochastic-depth rate (recipe default: 0.3, 0.4 for "
                               "vitl14 / vitg14, 0.1 for digits)")
    pretrain.add_argument("--drop-path-uniform", action=argparse.BooleanOptionalAction,
                          default=None,
                          help="the same drop-path rate in every block, as the reference's "
                               "DINOv2 configs (default for the DINOv2 recipes); "
                               "--no-drop-path-uniform ramps it linearly from 0 in the first "
                               "block (the digits recipe's rule)")

    distill = commands.add_parser(
        "distill", help="distil a large frozen teacher into small students",
        description="Train one or several small students from a frozen teacher through model.fit, "
                    "writing a run directory as pretrain does (config.json, metrics.csv, epochs.csv, "
                    "metrics.png, checkpoints, --resume) and, at the end, each student's EMA backbone "
                    "as a preset (student_preset/, or student_I_preset/ for several). A teacher with "
                    "heads (a pretraining run directory, an export made with --heads) is distilled with "
                    "DINOv2's recipe: its DINO/iBOT targets, the students unmasked and without "
                    "stochastic depth, with new heads of the teacher's prototype counts. A teacher "
                    "without heads (a preset, a transformers folder, a torch-hub .pth file, a keras-hub "
                    "preset) is distilled by feature regression: each student, through a small "
                    "projector, learns the teacher's standardized CLS and patch tokens (other patch "
                    "sizes are matched by interpolation). Several students share one teacher forward per "
                    "batch. On digits the k-NN of the teacher, of each student and of its EMA is logged "
                    "every --knn-every epochs. Example: keras-dinov2 distill --teacher runs/teacher "
                    "--student dinov2_vit_micro4 --out runs/student",
    )
    distill.add_argument("--teacher", default=None,
                         help="pretraining run directory (its newest checkpoint's EMA teacher and heads), "
                              "preset folder (with heads if exported with --heads), transformers folder, "
                              "torch-hub .pth file, keras-hub preset or hf:// URI (required for a new run)")
    distill.add_argument("--student", default=None,
                         help="student architecture (e.g. dinov2_vit_small14) or preset folder to start "
                              "from (default dinov2_vit_micro4 for digits)")
    distill.add_argument("--students", default=None, metavar="A,B,C",
                         help="several students in one run, comma-separated (the same as --student A,B,C)")
    distill.add_argument("--mode", default="auto", choices=["auto", "heads", "features"],
                         help="heads: DINOv2's distillation through the teacher's heads; features: "
                              "regression of the teacher's tokens (any teacher); auto: heads when the "
                              "teacher has them (default auto)")
    distill.add_argument("--feature-loss", default=None, choices=["cosine", "smooth_l1"],
                         help="loss of --mode features (default cosine)")
    _add_run_flags(distill, "distill")

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
    evaluate.add_argument("--linear-lrs", type=_positive_floats, default=None, metavar="LR,LR,...",
                          help="linear probe learning rates for batch 256, one classifier each, the best "
                               "reported (default 0.001,0.003,0.01,0.03,0.1); widen it when the best is "
                               "at an end of the grid")
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
    export_source.add_argument("--run", help="run directory (its newest checkpoint's teacher; of a distill run, "
                                             "its EMA student)")
    export_source.add_argument("--preset", help="preset folder, hf:// URI or architecture name")
    export.add_argument("--format", choices=["keras_dinov2", "keras_hub", "transformers"],
                        default="keras_dinov2", help="output format (default keras_dinov2)")
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--student-index", type=_integer(0), default=0,
                        help="--run of a distill run with several students: which one (from 0; default 0)")
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
    _add_curate(commands)
    return parser
