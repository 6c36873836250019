"""Throughput of the multi-crop tf.data pipeline: source images per second, decode included.

Writes `--images` JPEGs of about 500 x 375 (crops of scikit-learn's bundled sample photos) to a
temporary folder, then times `keras_dinov2.data.multicrop_dataset` with the ViT-14 recipe
(2 x 224 + 8 x 98 crops, block masks for patch 14) and, with `--digits`, the bundled digits
recipe. The pipeline runs alone (no model), so the figure is the input rate the CPU can feed.

With `--reference-src DIR` (a checkout of facebookresearch/dinov2) the same recipe also runs through
the reference's own DataAugmentationDINO (torchvision on PIL images) and collate_data_and_cast with
its MaskingGenerator, in a torch DataLoader with `--workers` processes, on the same JPEGs, in the same
run, and the ratio is printed. That needs torch and torchvision; the reference's code is imported
from DIR at run time, never copied.

Example:
    python tools/benchmark_data.py --batch-size 32 --batches 20
    python tools/benchmark_data.py --reference-src ~/src/dinov2 --repeats 3
"""

import glob
import importlib
import os
import statistics
import sys
import tempfile
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench import cli  # noqa: E402
from bench.images import photo_crops  # noqa: E402
from bench.machine import load_average, machine_info  # noqa: E402
from bench.reference import reference_collate  # noqa: E402
from bench.timing import time_calls, warm_up  # noqa: E402


def write_jpegs(folder, count, seed=0):
    """Saves `count` 500 x 375 JPEG crops of scikit-learn's sample images into `folder`."""
    from PIL import Image

    crops = photo_crops(count, 375, 500, seed)
    if crops is None:
        raise SystemExit("benchmark_data.py needs scikit-learn's sample images (pip install scikit-learn).")
    for i, crop in enumerate(crops):
        Image.fromarray(crop).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def time_batches(batches_iterable, batch_size, batches):
    """(source images/s over `batches` batches after 3 warm-up ones, seconds to the first batch)."""
    iterator = iter(batches_iterable)
    first, _ = warm_up(lambda: next(iterator), 1 + 3)
    seconds = time_calls(lambda: next(iterator), batches).seconds
    return batches * batch_size / seconds, first


def time_pipeline(source, config, batch_size, batches, jit_compile):
    from keras_dinov2.data import multicrop_dataset

    dataset = multicrop_dataset(source, batch_size=batch_size, config=config, repeat=True,
                                jit_compile=jit_compile)
    return time_batches(dataset, batch_size, batches)


def import_torchvision():
    """Imports torchvision; returns a note when its compiled operators could not be loaded.

    A torchvision wheel built for another torch build fails at import while it registers its compiled
    operators (nms, ...). The reference's augmentation uses only torchvision's Python transforms on PIL
    images, so the import is retried with that registration skipped, and the output says so.
    """
    try:
        import torchvision  # noqa: F401

        return ""
    except RuntimeError as error:
        import torch

        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        register_fake = torch.library.register_fake
        torch.library.register_fake = lambda *args, **kwargs: (lambda fn: fn)
        try:
            import torchvision  # noqa: F401, F811
        finally:
            torch.library.register_fake = register_fake
        return (f"torchvision's compiled operators do not load with this torch build ({error}); "
                "its Python transforms, all the recipe uses, were imported without them")


def import_reference_data(folder):
    """DataAugmentationDINO, collate_data_and_cast and MaskingGenerator from a dinov2 checkout.

    dinov2/data/__init__.py imports the dataset loaders and their dependencies; the three files the
    recipe needs are imported as a package of their own instead.
    """
    data = os.path.join(folder, "dinov2", "data")
    missing = [name for name in ("augmentations.py", "transforms.py", "collate.py", "masking.py")
               if not os.path.isfile(os.path.join(data, name))]
    if missing:
        raise SystemExit(f"--reference-src: {data} lacks {', '.join(missing)}; expected a checkout of "
                         "facebookresearch/dinov2.")
    package = types.ModuleType("_reference_data")
    package.__path__ = [data]
    sys.modules["_reference_data"] = package
    modules = {name: importlib.import_module(f"_reference_data.{name}")
               for name in ("augmentations", "collate", "masking")}
    return (modules["augmentations"].DataAugmentationDINO, modules["collate"].collate_data_and_cast,
            modules["masking"].MaskingGenerator)


class _JpegFolder:
    """A map-style torch dataset: (the reference's augmentation of image i, label 0), as its ImageNet class."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        from PIL import Image

        with open(self.paths[index], "rb") as f:
            image = Image.open(f).convert("RGB")
        return self.transform(image), 0


def time_reference(folder, reference, batch_size, batches, workers):
    """Source images/s of the reference's augmentation + collate in a torch DataLoader (same recipe)."""
    import torch

    augmentation, collate, masking_generator = reference
    transform = augmentation((0.32, 1.0), (0.05, 0.32), 8, global_crops_size=224, local_crops_size=98)
    collate_fn = reference_collate(collate, masking_generator, 224 // 14, (0.1, 0.5), 0.5)
    dataset = _JpegFolder(sorted(glob.glob(os.path.join(folder, "*.jpg"))), transform)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10**9,
                                             generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                         num_workers=workers, collate_fn=collate_fn, drop_last=True,
                                         persistent_workers=workers > 0)
    return time_batches(loader, batch_size, batches)


def main(argv=None):
    parser = cli.parser(__doc__)
    parser.add_argument("--images", type=int, default=256, help="JPEGs to write (default 256)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    parser.add_argument("--batches", type=int, default=20, help="timed batches (default 20)")
    parser.add_argument("--no-xla", action="store_true",
                        help="also time the pipeline without the XLA-compiled color stage")
    parser.add_argument("--digits", action="store_true", help="also time the digits recipe")
    parser.add_argument("--reference-src", metavar="DIR",
                        help="a checkout of facebookresearch/dinov2: also time its augmentation and "
                             "collate in a torch DataLoader, in the same run")
    parser.add_argument("--workers", type=int, default=2,
                        help="DataLoader worker processes for --reference-src (default 2)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="time each pipeline this many times, alternating, and report the "
                             "median (default 1)")
    args = parser.parse_args(argv)
    for name in ("images", "batch_size", "batches", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1; received {getattr(args, name)}.")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0; received {args.workers}.")
    reference, note = None, ""
    if args.reference_src:
        folder = os.path.abspath(os.path.expanduser(args.reference_src))
        try:
            note = import_torchvision()
        except ImportError as error:
            raise SystemExit(f"--reference-src needs torch and torchvision: {error}") from error
        reference = import_reference_data(folder)

    from keras_dinov2.config import DataConfig, SSLConfig

    info = machine_info()
    print(f"CPU: {info['cpu']} ({info['cpu_count']} cores), tensorflow "
          f"{info['versions'].get('tensorflow')}; load average before {load_average():.2f}")
    runs = {}  # name -> [(rate, first batch seconds)]
    with tempfile.TemporaryDirectory() as folder:
        write_jpegs(folder, args.images)
        for _ in range(args.repeats):
            for jit in [True] + ([False] if args.no_xla else []):
                name = f"keras-dinov2, ViT-14 recipe, 2x224 + 8x98, JPEG 500x375, XLA {'on' if jit else 'off'}"
                runs.setdefault(name, []).append(
                    time_pipeline(folder, DataConfig(), args.batch_size, args.batches, jit))
            if reference:
                name = (f"reference DataAugmentationDINO + collate, 2x224 + 8x98, DataLoader "
                        f"{args.workers} workers")
                runs.setdefault(name, []).append(
                    time_reference(folder, reference, args.batch_size, args.batches, args.workers))
    if args.digits:
        runs["keras-dinov2, digits recipe, 2x32 + 8x16"] = [
            time_pipeline("digits", SSLConfig.recipe("digits"), 64, args.batches, True)]
    rates = {name: statistics.median(rate for rate, _ in values) for name, values in runs.items()}
    peer = next((rate for name, rate in rates.items() if name.startswith("reference")), None)
    for name, values in runs.items():
        spread = (f" (runs {', '.join(f'{rate:.1f}' for rate, _ in values)})"
                  if len(values) > 1 else "")
        same_recipe = "ViT-14 recipe" in name or name.startswith("reference")
        ratio = f", {rates[name] / peer:.2f}x the reference" if peer and same_recipe else ""
        print(f"{name}: {rates[name]:.1f} images/s{ratio}{spread}; first batch {values[0][1]:.1f} s")
    if note:
        print(f"Note: {note}")
    print(f"load average after {load_average():.2f}; batch {args.batch_size}, "
          f"{args.batches} timed batches after 3 warm-up batches")


if __name__ == "__main__":
    main()
