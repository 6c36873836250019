"""Embedding a pool: every image through a frozen backbone's CLS token, into resumable shards on disk.

`embed_pool` reads the pool with the evaluation transform (`keras_dinov2.data.pool_dataset`: resize, center crop,
ImageNet normalization, unreadable files skipped and named), runs the `FeatureModel` of the evaluation package
(the final-norm CLS token, as the k-NN input) and writes the features shard by shard (`keras_dinov2.curation.store`
describes the folder). The folder records the backbone's identity (`backbone_identity`), so that a later step
can refuse embeddings of another backbone.

Parallelism: on JAX, a data-parallel `keras_dinov2.distribute.setup("data")` splits every batch over the devices
(one SPMD program; the batch size must be a multiple of the devices). On every backend, and across hosts,
`num_workers` processes (`worker_index` 0 .. num_workers - 1) embed disjoint shards into one folder (shard s goes
to worker s % num_workers); whichever finishes last writes files.csv and marks the folder complete.
"""

import hashlib
import json
import os
import time

import keras
import numpy as np

from keras_dinov2.curation.store import (
    FORMAT,
    META_FILE,
    PoolEmbeddings,
    finished_shards,
    ids_path,
    load_embeddings,
    read_meta,
    save_atomic,
    shard_path,
    write_files_table,
    write_json_atomic,
)
from keras_dinov2.data import get_source, pool_dataset
from keras_dinov2.data.image_headers import DEFAULT_MAX_IMAGE_PIXELS
from keras_dinov2.evaluation import feature_model
from keras_dinov2.evaluation.features import FeatureModel

DTYPES = ("float16", "float32")


def weights_fingerprint(model):
    """A short hash of `model`'s weights: each variable's shape and up to 4,096 evenly spaced values, in order.

    Reading every value of a ViT-g (1.1B parameters) would take seconds; a sample of each variable tells
    retrained or other weights apart all the same. Paths are left out: a second build of the same network in one
    process gets other layer names.
    """
    digest = hashlib.sha256()
    for variable in model.weights:
        value = np.asarray(keras.ops.convert_to_numpy(variable)).ravel()
        sample = value[:: max(1, value.size // 4096)].astype(np.float32)
        digest.update(f"{tuple(variable.shape)}".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


def backbone_identity(model, name=None, image_size=None, resize_size=None, embed_dim=None):
    """What identifies embeddings: the backbone (config and weights hashes), the transform, the dimension.

    Args:
        model: the backbone (or its `FeatureModel`).
        name: str or None. How the user named it (preset, folder); recorded, not compared.
        image_size, resize_size: int. The evaluation transform's sizes.
        embed_dim: int. The feature dimension.

    Returns:
        dict with "name", "config_hash", "weights_hash", "image_size", "resize_size", "features", "embed_dim"
        and "fingerprint" (one hash of all but the name: equal fingerprints mean comparable embeddings).
    """
    backbone = model.backbone if isinstance(model, FeatureModel) else model
    try:
        # The layer name changes with every build in a process ("dinov2_backbone_1"): it says nothing of the network.
        config = {k: v for k, v in backbone.get_config().items() if k != "name"}
        config = json.dumps(config, sort_keys=True, default=str)
    except (NotImplementedError, TypeError):
        config = type(backbone).__name__
    identity = {
        "name": name or backbone.name,
        "config_hash": hashlib.sha256(config.encode()).hexdigest()[:16],
        "weights_hash": weights_fingerprint(backbone),
        "image_size": int(image_size),
        "resize_size": int(resize_size),
        "features": "cls",
        "embed_dim": int(embed_dim),
    }
    whole = json.dumps({k: v for k, v in identity.items() if k != "name"}, sort_keys=True)
    identity["fingerprint"] = hashlib.sha256(whole.encode()).hexdigest()[:16]
    return identity


def open_backbone(spec, random_weights=False, seed=0):
    """A backbone from a preset name, folder, run directory or URI (`keras_dinov2.interop.load_backbone`).

    An architecture without released weights (`dinov2_vit_tiny4`...), or any architecture with
    `random_weights`, is built with seeded random weights, so two processes get the same network.
    """
    from keras_dinov2.config.architectures import ARCHITECTURES
    from keras_dinov2.evaluation import random_init_backbone
    from keras_dinov2.interop import load_backbone

    if isinstance(spec, str) and spec in ARCHITECTURES and (random_weights or ARCHITECTURES[spec]["weights"] is None):
        return random_init_backbone(load_backbone(spec, load_weights=False), seed=seed)
    return load_backbone(spec)


def source_spec(source):
    """The pool as a string a later step can reopen with `get_source`, or None (arrays, file lists, sources)."""
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        return os.path.abspath(text) if os.path.exists(text) else text
    return None


class Bar:
    """Images done and images per second: tqdm when installed, else keras.utils.Progbar; silent unless verbose."""

    def __init__(self, total, initial, verbose):
        self.bar, self.kind = None, None
        self.done, self.start, self.counted = initial, time.perf_counter(), 0
        if not verbose:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar, self.kind = keras.utils.Progbar(total, unit_name="image"), "keras"
        else:
            self.bar, self.kind = tqdm(total=total, initial=initial, desc="embedding", unit="img"), "tqdm"

    def update(self, images):
        self.done += images
        self.counted += images
        if self.kind == "tqdm":
            self.bar.update(images)
        elif self.kind == "keras":
            rate = self.counted / max(time.perf_counter() - self.start, 1e-9)
            self.bar.update(self.done, values=[("images/s", rate)])

    def close(self):
        if self.kind == "tqdm":
            self.bar.close()


def check_embed_arguments(batch_size, shard_size, dtype, num_workers, worker_index):
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size), ("num_workers", num_workers)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, received {value!r}.")
    if dtype not in DTYPES:
        raise ValueError(f"`dtype` must be one of {DTYPES}, received {dtype!r}.")
    if isinstance(worker_index, bool) or not isinstance(worker_index, (int, np.integer)) \
            or not 0 <= worker_index < num_workers:
        raise ValueError(f"`worker_index` must be an integer in [0, {num_workers}), received {worker_index!r}.")


def check_resumable(folder, meta):
    """Refuses a folder holding another embedding (another pool, backbone, dtype or shard size)."""
    if not os.path.isfile(os.path.join(folder, META_FILE)):
        return
    old = read_meta(folder)
    for key in ("source_name", "num_images", "dtype", "shard_size"):
        if old.get(key) != meta[key]:
            raise ValueError(f"{folder!r} holds embeddings with {key}={old.get(key)!r}, not {meta[key]!r}: use "
                             "another output folder, or delete it to start over.")
    if old["backbone"]["fingerprint"] != meta["backbone"]["fingerprint"]:
        raise ValueError(f"{folder!r} holds embeddings of another backbone ({old['backbone']['name']}, fingerprint "
                         f"{old['backbone']['fingerprint']}; now {meta['backbone']['name']}, "
                         f"{meta['backbone']['fingerprint']}): use another output folder, or delete it.")


def predict(model, images, batch_size, distribution):
    """Features (B, dim) float32 of a batch, padded to `batch_size` (one compiled shape) and spread over devices."""
    count = len(images)
    if count < batch_size:
        images = np.concatenate([images, np.zeros((batch_size - count,) + images.shape[1:], images.dtype)])
    if distribution is not None and getattr(distribution, "distribution", None) is not None:
        layout = distribution.distribution.get_data_layout(images.shape)
        images = keras.distribution.distribute_tensor(images, layout)
    out = model.predict_on_batch(images)
    return np.asarray(keras.ops.convert_to_numpy(out), np.float32)[:count]


def embed_pool(source, backbone, out_dir, *, batch_size=64, shard_size=65536, dtype="float16", image_size=None,
               resize_size=None, backbone_name=None, distribution=None, num_workers=1, worker_index=0,
               max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS, verbose=True):
    """Embeds every image of a pool with a frozen backbone into resumable, memory-mappable shards.

    Args:
        source: a data spec or source as `keras_dinov2.data.get_source` takes: "digits[:SPLIT]", a folder,
            "tfds:NAME[:SPLIT]", a list of image files, a manifest, a NumPy array, an ImageSource. Its size must
            be known.
        backbone: a DINOv2Backbone (or any model `keras_dinov2.evaluation.feature_model` wraps), a `FeatureModel`,
            or a str that `open_backbone` loads (preset name, folder, run directory, hf:// URI).
        out_dir: str. The embedding folder (created; resumed when it holds an unfinished run of the same pool and
            backbone; another pool or backbone there is refused).
        batch_size: int, default 64. Images per forward pass (on JAX data parallel: over all devices).
        shard_size: int, default 65536. Pool positions per shard: the unit of resumption and of parallel workers.
        dtype: "float16" or "float32", default "float16". On-disk dtype (float16 halves the disk; cosine
            similarities change by about 1e-3).
        image_size: int or None, default None (the backbone's `image_size`). Side of the center crop.
        resize_size: int or None, default None (image_size * 256 / 224). Shorter side before the crop.
        backbone_name: str or None, default None. Name recorded in the identity (default: the spec or model name).
        distribution: a `keras_dinov2.distribute.DistributedSetup` or None, default None. JAX data parallel
            splits each batch over the devices; build (or load) the backbone after `distribute.setup`.
        num_workers: int, default 1. Processes embedding this pool into `out_dir` together.
        worker_index: int, default 0. This process's index: it embeds shards s with s % num_workers == index.
        max_image_pixels: int or None, default 89,478,485. Larger image files are skipped as unreadable.
        verbose: bool, default True. A progress bar with images per second.

    Returns:
        `PoolEmbeddings` (`load_embeddings(out_dir)`) once every shard is written, else None (other workers'
        shards are missing).

    Example:
    >>> pool = embed_pool("/data/pool", "dinov2_vit_small14", "emb/", batch_size=256)
    >>> pool.embeddings.shape, len(pool.unreadable)
    ((1000000, 384), 12)
    """
    check_embed_arguments(batch_size, shard_size, dtype, num_workers, worker_index)
    if isinstance(backbone, str):
        backbone_name, backbone = backbone_name or backbone, open_backbone(backbone)
    model = backbone if isinstance(backbone, FeatureModel) else feature_model(backbone)
    image_size = int(image_size or getattr(model.backbone, "image_size", 0) or 0)
    if image_size < 1:
        raise ValueError("`image_size` is needed for a backbone without an `image_size` attribute.")
    resize_size = int(resize_size or image_size * 256 // 224)
    replicas = getattr(distribution, "local_replicas", 1) if getattr(distribution, "distribution", None) else 1
    if batch_size % replicas:
        raise ValueError(f"`batch_size` must be a multiple of the {replicas} devices, received {batch_size}.")
    src = get_source(source, max_image_pixels=max_image_pixels)
    if src.num_examples is None:
        raise ValueError(f"{src.name} does not know its size; embed_pool needs a pool of known size.")
    if src.num_examples == 0:
        raise ValueError(f"{src.name} is empty: there is nothing to embed.")
    zeros = np.zeros((batch_size, image_size, image_size, 3), np.float32)
    embed_dim = predict(model, zeros, batch_size, distribution).shape[1]  # also compiles the forward
    num_shards = -(-src.num_examples // shard_size)
    meta = {
        "format": FORMAT, "version": 1, "source": source_spec(source), "source_name": src.name,
        "num_images": src.num_examples, "dtype": dtype, "shard_size": int(shard_size), "num_shards": num_shards,
        "backbone": backbone_identity(model, backbone_name, image_size, resize_size, embed_dim),
        "complete": False,
    }
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    check_resumable(out_dir, meta)
    for name in os.listdir(out_dir):  # what a kill left half-written
        if name.endswith(".tmp"):
            os.remove(os.path.join(out_dir, name))
    if worker_index == 0 or not os.path.isfile(os.path.join(out_dir, META_FILE)):
        write_json_atomic(os.path.join(out_dir, META_FILE), meta)
    mine = [s for s in range(num_shards) if s % num_workers == worker_index]
    todo = sorted(set(mine) - set(finished_shards(out_dir, num_shards)))
    done_images = sum(min(shard_size, src.num_examples - s * shard_size) for s in mine if s not in todo)
    total = sum(min(shard_size, src.num_examples - s * shard_size) for s in mine)
    bar = Bar(total, done_images, verbose)
    try:
        for shard in todo:
            start = shard * shard_size
            stop = min(start + shard_size, src.num_examples)
            features, positions = [], []
            batches = pool_dataset(src, image_size, batch_size, start=start, stop=stop, resize_size=resize_size,
                                   max_image_pixels=max_image_pixels)
            for images, where in batches.as_numpy_iterator():
                features.append(predict(model, images, batch_size, distribution).astype(dtype))
                positions.append(where.astype(np.int64))
                bar.update(len(where))
            bar.update(stop - start - sum(len(p) for p in positions))  # the unreadable ones count as done
            save_atomic(ids_path(out_dir, shard), np.concatenate(positions) if positions else np.zeros(0, np.int64))
            save_atomic(shard_path(out_dir, shard),
                        np.concatenate(features) if features else np.zeros((0, embed_dim), dtype))
    finally:
        bar.close()
    return finish(out_dir, meta, src)


def finish(out_dir, meta, src):
    """Writes files.csv and marks the folder complete once every shard exists; returns `load_embeddings` or None."""
    num_shards = meta["num_shards"]
    if len(finished_shards(out_dir, num_shards)) < num_shards:
        return None
    positions = np.concatenate([np.load(ids_path(out_dir, s)) for s in range(num_shards)]).astype(np.int64)
    unreadable = write_files_table(out_dir, meta["num_images"], positions, src.paths)
    meta = {**meta, "complete": True, "count": int(len(positions)), "unreadable": int(len(unreadable))}
    write_json_atomic(os.path.join(out_dir, META_FILE), meta)
    return load_embeddings(out_dir)


__all__ = ["DTYPES", "PoolEmbeddings", "backbone_identity", "embed_pool", "open_backbone", "weights_fingerprint"]
