"""Image sources for pretraining and evaluation: an image folder, a TFDS dataset, in-memory arrays, bundled digits.

A source is an `ImageSource`: a finite collection of images, with integer labels when the data has them. Random
access sources (folders, arrays, digits) are read by index, so every epoch can be an exact permutation; TFDS
datasets are streams, shuffled with a buffer. Every source yields float32 RGB images in [0, 1], (H, W, 3).

`get_source(spec)` turns what a user types (`--data digits|FOLDER|tfds:NAME[:SPLIT]|MANIFEST`) into a source.
"""

from __future__ import annotations

import os
import re

import numpy as np

from keras_dinov2.data.arrays import array_source, digits_source
from keras_dinov2.data.folder import file_list_source, files_source, image_folder_source
from keras_dinov2.data.image_headers import DEFAULT_MAX_IMAGE_PIXELS
from keras_dinov2.data.image_source import ImageSource
from keras_dinov2.data.manifest import index_subset, manifest_path, read_manifest
from keras_dinov2.data.tfds import tfds_source

__all__ = ["get_source", "manifest_source", "parse_tfds_spec"]


_VERSION = re.compile(r"^(\d+|\*)(\.(\d+|\*)){0,2}$")


def parse_tfds_spec(spec):
    """("NAME", "SPLIT" or None) of a "tfds:NAME[:SPLIT]" spec; a version ("mnist:3.0.1") stays in the name.

    Example:
        >>> parse_tfds_spec("tfds:mnist:3.0.1:train[:10%]")
        ('mnist:3.0.1', 'train[:10%]')
    """
    rest = spec[len("tfds:") :]
    name, _, split = rest.partition(":")
    # A version ("mnist:3.0.1") also uses a colon: keep it in the name.
    if split:
        version, _, after = split.partition(":")
        if _VERSION.match(version):
            name, split = f"{name}:{version}", after
    if not re.fullmatch(r"[A-Za-z0-9_]+(/[A-Za-z0-9_.\-]+)?(:[0-9.*]+)?", name):
        raise ValueError(
            f"data spec {spec!r}: expected 'tfds:NAME[:SPLIT]' with a dataset name; received name {name!r}."
        )
    return name, split or None


def get_source(
    spec, split: str | None = None, *, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, **kwargs
) -> ImageSource:
    """Turn a data spec into an `ImageSource`: "digits", a folder path, "tfds:NAME[:SPLIT]", arrays or a source.

    Accepted specs:
    - "digits" or "digits:train" / "digits:test" / "digits:all": the bundled digits (`digits_source`).
    - "tfds:NAME[:SPLIT]": a TFDS dataset (`tfds_source`), split "train" unless given.
    - a curation manifest: a file named `manifest.csv` or `*.manifest.csv`, or a folder holding `manifest.csv`
      (`manifest_source`: its kept images only).
    - any other string or path-like: an image folder (`image_folder_source`).
    - a NumPy array, or a tuple (images, labels): `array_source`.
    - a list of image file paths: `file_list_source`.
    - an `ImageSource`: returned as is.

    Args:
        spec: str, path-like, NumPy array, (images, labels) tuple or ImageSource.
        split: str or None, default None. Overrides the split of "digits" / "tfds:" specs; for a folder, a
            subfolder name ("train", "val").
        max_image_pixels: int or None, default 89,478,485 (PIL's limit). Folders and TFDS datasets skip (and
            name) encoded images whose header declares more pixels, before decoding them; None for no limit.
            Digits and arrays are not encoded: it does not apply to them.
        **kwargs: passed to the source builder (e.g. `image_key`, `data_dir`, `download` for TFDS).

    Example:
        >>> get_source("digits").num_examples
        1347
    """
    if split is not None and not isinstance(spec, (str, os.PathLike)):
        raise ValueError(
            f"split applies to 'digits', 'tfds:' and folder specs; received split={split!r} with a "
            f"{type(spec).__name__} (use split_source for arrays and sources)."
        )
    if isinstance(spec, ImageSource):
        return spec
    if isinstance(spec, np.ndarray):
        return array_source(spec, **kwargs)
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], np.ndarray):
        return array_source(spec[0], spec[1], **kwargs)
    if isinstance(spec, list) and spec and all(isinstance(p, (str, os.PathLike)) for p in spec):
        return file_list_source(spec, max_image_pixels=max_image_pixels)
    if not isinstance(spec, (str, os.PathLike)):
        raise ValueError(
            "data must be 'digits', a folder path, 'tfds:NAME[:SPLIT]', a manifest, a list of image files, a NumPy "
            "array or an ImageSource; "
            f"received {type(spec).__name__}."
        )
    text = os.fspath(spec)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"data spec must be a non-empty string; received {spec!r}.")
    manifest = manifest_path(text)
    if manifest is not None:
        if split is not None:
            raise ValueError(f"split does not apply to the manifest {manifest!r}; received split={split!r}.")
        return manifest_source(manifest, max_image_pixels=max_image_pixels, **kwargs)
    if text == "digits" or text.startswith("digits:"):
        spec_split = text.partition(":")[2] or None
        return digits_source(split or spec_split or "train", **kwargs)
    if text.startswith("tfds:"):
        name, spec_split = parse_tfds_spec(text)
        return tfds_source(
            name, split or spec_split or "train", max_image_pixels=max_image_pixels, **kwargs
        )
    if (
        ":" in text.split(os.sep)[0]
        and not os.path.exists(text)
        and not re.match(r"^[A-Za-z]:[\\/]", text)
    ):
        raise ValueError(
            f"data spec {text!r} is not understood: expected 'digits', a folder path or 'tfds:NAME[:SPLIT]'."
        )
    return image_folder_source(text, split=split, max_image_pixels=max_image_pixels, **kwargs)


def manifest_source(path, *, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, **kwargs) -> ImageSource:
    """The images a curation manifest kept (`keras_dinov2.data.manifest`), as a source.

    Rows with a `path` are read as image files; otherwise every kept row must name the same pool `source`, which
    is opened with `get_source` and read at the rows' indices (random access), or filtered by position (a stream).

    Args:
        path: str. A manifest file, or a folder holding `manifest.csv`.
        max_image_pixels: int or None, default 89,478,485. As `get_source`.
        **kwargs: passed to the pool's source builder (e.g. `data_dir` for TFDS).

    Example:
        >>> manifest_source("runs/curated").num_examples  # doctest: +SKIP
        1204
    """
    file = manifest_path(path) or os.fspath(path)
    rows = read_manifest(file)
    name = f"manifest {file}"
    if not len(rows["index"]):
        raise ValueError(f"manifest {file!r} keeps no image (every row has kept = 0).")
    with_path = [bool(p) for p in rows["path"]]
    if all(with_path):
        return files_source(f"{name} ({len(with_path)} kept images)", rows["path"], max_image_pixels=max_image_pixels)
    if any(with_path):
        raise ValueError(f"manifest {file!r} mixes rows with and without a path; expected one kind.")
    pools = sorted(set(rows["source"]))
    if len(pools) != 1 or not pools[0]:
        raise ValueError(f"manifest {file!r}: rows without a path must name one pool source, received {pools}.")
    indices = np.unique(rows["index"])
    pool = get_source(pools[0], max_image_pixels=max_image_pixels, **kwargs)
    return index_subset(pool, indices, f"{name} ({len(indices)} kept images of {pool.name})")
