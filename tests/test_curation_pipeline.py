"""The curation pipeline end to end: embed a pool, select from it, write a manifest and a report, read it back.

Two kinds of checks:
- Planted truth (`once`): a pool of the bundled digits with exact copies, flipped / JPEG / recoloured / cropped
  near-copies of known digits, images of other domains (scikit-image photos, noise, shapes) and copies of the
  held-out digits. A randomly initialized ViT gives no meaningful similarity, so these thresholds are set on
  raw-pixel features (8 x 8 grey, mirror-symmetrized, centered: copies under flips, JPEG and colour changes stay
  above 0.999, while distinct digits stay below it) that go through the same `select_pool`.
- Mechanics (every backend): `embed_pool` with a tiny random backbone (shards, positions, identity, resume after
  a kill, unreadable files), the `keras-dinov2 curate` commands on a folder of PNGs, their one-line errors, and
  the manifest read by `get_source` and `multicrop_dataset`. JAX data parallel on 4 virtual CPU devices runs in
  a subprocess (`once`).
"""

import io
import json
import os
import subprocess
import sys
import textwrap

import faiss
import numpy as np
import pytest
import threadpoolctl
from PIL import Image

from keras_dinov2 import DINOv2Backbone, curation
from keras_dinov2.cli import main
from keras_dinov2.config.architectures import ARCHITECTURES
from keras_dinov2.data import get_source, multicrop_dataset, read_manifest
from keras_dinov2.data.arrays import digits_source

PNG = b"\x89PNG\r\n\x1a\n"


def read_json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    with threadpoolctl.threadpool_limits(limits=1):
        yield
    faiss.omp_set_num_threads(threads)


def digit_images(split):
    source = digits_source(split)
    return np.repeat(np.stack([np.asarray(source.read(i)["image"]) for i in range(source.num_examples)]), 3, -1)


def jpeg(image, quality=70):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def recolour(image):
    return np.clip(image.astype(np.float32) * np.array([1.0, 0.8, 0.6]) + 20, 0, 255).astype(np.uint8)


def crop(image):
    return np.asarray(Image.fromarray(image[1:32, 0:31]).resize((32, 32), Image.BICUBIC))


def other_domain(rng):
    """20 scikit-image pictures (not `cat`: it is `chelsea`, a true duplicate), 20 noise images and 20 shapes."""
    import skimage.data

    photos = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page", "text", "clock",
                 "horse", "brick", "grass", "gravel", "retina", "colorwheel", "logo", "shepp_logan_phantom",
                 "hubble_deep_field", "immunohistochemistry"):
        image = np.asarray(getattr(skimage.data, name)())
        image = np.repeat(image[..., None], 3, -1) if image.ndim == 2 else image[..., :3]
        image = (image * 255).astype(np.uint8) if image.dtype != np.uint8 else image
        photos.append(np.asarray(Image.fromarray(image).resize((32, 32), Image.BICUBIC)))
    noise = rng.integers(0, 256, size=(20, 32, 32, 3), dtype=np.uint8)
    shapes = np.zeros((20, 32, 32, 3), np.uint8)
    yy, xx = np.mgrid[:32, :32]
    for i in range(20):
        cy, cx, r = rng.integers(8, 24, size=2).tolist() + [int(rng.integers(4, 8))]
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2 if i % 2 else (abs(yy - cy) < r) & (abs(xx - cx) < r)
        shapes[i][mask] = rng.integers(64, 256, size=3)
    return np.concatenate([photos, noise, shapes])


def pixel_features(images):
    grey = np.stack([np.asarray(Image.fromarray(x).convert("L").resize((8, 8), Image.BOX), np.float32)
                     for x in images])
    grey = (grey + grey[:, :, ::-1]).reshape(len(grey), -1)  # a mirror image gets the same features
    grey -= grey.mean(axis=1, keepdims=True)  # brightness and contrast changes keep the direction
    return grey / np.linalg.norm(grey, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def planted():
    """The pool (images, features) and what was planted where."""
    rng = np.random.default_rng(0)
    train, test = digit_images("train"), digit_images("test")
    sources = rng.choice(len(train), size=75, replace=False)
    copies = {"exact": train[sources[:15]], "flip": train[sources[15:30], :, ::-1], "jpeg": [jpeg(x) for x in
              train[sources[30:45]]], "colour": [recolour(x) for x in train[sources[45:60]]],
              "crop": [crop(x) for x in train[sources[60:75]]]}
    leaked = rng.choice(len(test), size=30, replace=False)
    parts = [train] + [np.asarray(v) for v in copies.values()] + [other_domain(rng), np.stack([jpeg(x, 90) for x in
                                                                                               test[leaked]])]
    images = np.concatenate(parts)
    start = len(train)
    planted_copies = np.arange(start, start + 60)  # exact, flip, jpeg, colour
    crops = np.arange(start + 60, start + 75)
    other = np.arange(start + 75, start + 135)
    leaks = np.arange(start + 135, start + 165)
    return dict(images=images, features=pixel_features(images), sources=sources, copies=planted_copies, crops=crops,
                other=other, leaks=leaks, leaked=leaked, test_features=pixel_features(test))


@pytest.mark.once
def test_planted_copies_and_leaks_are_dropped_with_their_reasons(planted, tmp_path):
    features = planted["features"]
    selection = curation.select_pool(features, dedup_threshold=0.999, eval_embeddings=planted["test_features"],
                                     decontamination_threshold=0.999, verbose=False)
    dropped = np.flatnonzero(~selection.kept)
    # Every exact, flipped, JPEG and recoloured copy is found, and points at the digit it copies.
    copies = planted["copies"]
    assert not selection.kept[copies].any()
    assert [selection.reason[i] for i in copies] == [f"duplicate_of:{s}" for s in planted["sources"][:60]]
    # Every copy of a held-out digit is found, and names the held-out digit it copies.
    leaks = planted["leaks"]
    assert [selection.reason[i] for i in leaks] == [f"contaminated:{t}" for t in planted["leaked"]]
    # Few false alarms: distinct digits that happen to be as close (natural near-duplicates of 8 x 8 digits).
    false = np.setdiff1d(dropped, np.concatenate([copies, leaks]))
    assert len(false) <= 0.01 * len(features), len(false)
    lost = [(int(i), selection.reason[i]) for i in planted["other"] if not selection.kept[i]]
    assert not lost, lost
    counts = selection.counts
    assert counts["pool"] == counts["readable"] == len(features)
    assert counts["after_dedup"] == len(features) - sum(r.startswith("duplicate_of") for r in selection.reason)
    assert counts["after_decontamination"] == selection.kept.sum()
    # Cropped copies move too much in pixel space to pass 0.999, but each one's nearest digit is its source.
    crops, train = planted["crops"], slice(0, planted["crops"][0] - 60)
    nearest = np.argmax(features[crops] @ features[train].T, axis=1)
    assert np.mean(nearest == planted["sources"][60:]) >= 0.8


@pytest.mark.once
def test_balanced_sampling_lifts_the_rare_domain(planted):
    features = planted["features"]
    selection = curation.select_pool(features, dedup_threshold=0.999, levels=(40, 8), per_cluster=30, seed=0)
    kept = selection.kept_positions
    other = planted["other"]
    share_pool = len(other) / len(features)
    share_kept = np.isin(kept, other).mean()
    assert share_kept >= 2 * share_pool, (share_kept, share_pool)
    assert selection.counts["after_sampling"] == len(kept)
    assert all(len(c) == len(features) for c in selection.clusters) and len(selection.clusters) == 2
    assert (selection.clusters[0][kept] >= 0).all()
    assert {r for i, r in enumerate(selection.reason) if not selection.kept[i]} <= {"not_sampled"} | {
        r for r in selection.reason if r.startswith("duplicate_of")}


@pytest.mark.once
def test_select_refuses_mismatched_embeddings_and_budgets(planted):
    features = planted["features"]
    with pytest.raises(ValueError, match="dimension 10 but the pool's have 64"):
        curation.select_pool(features, eval_embeddings=np.ones((3, 10), np.float32))
    with pytest.raises(ValueError, match="give `levels` too"):
        curation.select_pool(features, total=10)
    with pytest.raises(ValueError, match="more than the"):
        curation.select_pool(features[:20], levels=(2,), total=50)


def tiny_backbone(seed=0, **overrides):
    """dinov2_vit_tiny4 with 2 blocks and LayerScale 1 (at 1e-5 the random blocks barely touch the CLS token)."""
    import keras

    keras.utils.set_random_seed(seed)
    config = {**ARCHITECTURES["dinov2_vit_tiny4"]["config"], "num_layers": 2, "layer_scale_init": 1.0, **overrides}
    return DINOv2Backbone(**config)


def write_folder(folder, images, corrupt=1):
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(os.path.join(folder, f"img_{i:03d}.png"))
    for i in range(corrupt):
        with open(os.path.join(folder, f"zz_broken_{i}.png"), "wb") as f:
            f.write(b"not an image")


def test_embed_pool_writes_shards_and_resumes_only_what_is_missing(tmp_path, monkeypatch):
    images = digit_images("test")[:40]
    folder = str(tmp_path / "pool")
    write_folder(folder, images)  # 40 images, then one unreadable file at position 40
    backbone = tiny_backbone()
    out = str(tmp_path / "emb")
    pool = curation.embed_pool(folder, backbone, out, batch_size=8, shard_size=16, verbose=False)
    assert pool.embeddings.shape == (40, 96) and pool.embeddings.dtype == np.float16
    np.testing.assert_array_equal(pool.positions, np.arange(40))
    np.testing.assert_array_equal(pool.unreadable, [40])
    assert pool.paths[40].endswith("zz_broken_0.png")
    meta = read_json(os.path.join(out, "embeddings.json"))
    assert meta["complete"] and meta["count"] == 40 and meta["unreadable"] == 1 and meta["num_shards"] == 3
    assert meta["backbone"]["embed_dim"] == 96 and len(meta["backbone"]["fingerprint"]) == 16
    # The rows are the evaluation transform's CLS features (float16 on disk).
    from keras_dinov2.data import pool_dataset
    from keras_dinov2.evaluation import feature_model

    batch, _ = next(iter(pool_dataset(folder, 32, 8)))
    expected = np.asarray(feature_model(backbone).predict_on_batch(batch.numpy()))
    np.testing.assert_allclose(np.asarray(pool.embeddings[:8], np.float32), expected, rtol=2e-2, atol=2e-2)

    # A kill: the last shard is gone, and the second one failed while being written.
    stamps = {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in os.listdir(out)}
    first = np.load(os.path.join(out, "shard_00000.npy"))
    last = np.load(os.path.join(out, "shard_00002.npy"))
    os.remove(os.path.join(out, "shard_00002.npy"))
    os.remove(os.path.join(out, "shard_00001.npy"))
    from keras_dinov2.curation import embed as embed_module

    calls = []

    def failing_save(path, array):
        calls.append(path)
        if len(calls) == 2:  # shard 1's features, after its ids
            raise KeyboardInterrupt
        return real_save(path, array)

    real_save = embed_module.save_atomic
    monkeypatch.setattr(embed_module, "save_atomic", failing_save)
    with pytest.raises(KeyboardInterrupt):
        curation.embed_pool(folder, backbone, out, batch_size=8, shard_size=16, verbose=False)
    monkeypatch.setattr(embed_module, "save_atomic", real_save)
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    with pytest.raises(ValueError, match="unfinished: 1 of 3 shards"):
        curation.load_embeddings(out)
    resumed = curation.embed_pool(folder, backbone, out, batch_size=8, shard_size=16, verbose=False)
    assert os.stat(os.path.join(out, "shard_00000.npy")).st_mtime_ns == stamps["shard_00000.npy"]
    np.testing.assert_array_equal(np.load(os.path.join(out, "shard_00000.npy")), first)
    np.testing.assert_array_equal(np.load(os.path.join(out, "shard_00002.npy")), last)
    np.testing.assert_array_equal(np.asarray(resumed.embeddings), np.asarray(pool.embeddings))
    # Two worker processes share the shards of one folder; the last to finish completes it.
    shared = str(tmp_path / "shared")
    assert curation.embed_pool(folder, backbone, shared, batch_size=8, shard_size=16, verbose=False,
                               num_workers=2, worker_index=1) is None
    assert sorted(n for n in os.listdir(shared) if n.endswith(".npy")) == ["shard_00001.ids.npy", "shard_00001.npy"]
    both = curation.embed_pool(folder, backbone, shared, batch_size=8, shard_size=16, verbose=False,
                               num_workers=2, worker_index=0)
    np.testing.assert_array_equal(np.asarray(both.embeddings), np.asarray(pool.embeddings))
    # Another backbone in the same folder is refused.
    with pytest.raises(ValueError, match="another backbone"):
        curation.embed_pool(folder, tiny_backbone(seed=1), out, batch_size=8, shard_size=16, verbose=False)


def cli(argv, capsys):
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def test_curate_commands_end_to_end_and_the_manifest_feeds_pretraining(tmp_path, capsys):
    digits = digit_images("test")
    images = np.concatenate([digits[:14], digits[[2, 5]], digits[[7]][:, :, ::-1] * 0])  # 2 exact copies, a blank
    folder = str(tmp_path / "pool")
    write_folder(folder, images)
    preset = str(tmp_path / "tiny")
    tiny_backbone().save_to_preset(preset)
    emb, out = str(tmp_path / "emb"), str(tmp_path / "curated")
    status, text = cli(["curate", "embed", "--data", folder, "--model", preset, "--out", emb, "--batch-size", "8",
                        "--shard-size", "8", "--verbose", "0"], capsys)
    assert status == 0, text
    assert "17 embeddings of dimension 96" in text and "1 unreadable" in text
    status, text = cli(["curate", "select", "--embeddings", emb, "--out", out, "--dedup-threshold", "1.0",
                        "--levels", "4,2", "--per-cluster", "5", "--verbose", "0"], capsys)
    assert status == 0, text
    rows = read_manifest(out, kept_only=False)
    reasons = dict(zip(rows["index"].tolist(), rows["reason"]))
    assert reasons[14] == "duplicate_of:2" and reasons[15] == "duplicate_of:5" and reasons[17] == "unreadable"
    kept = int(rows["kept"].sum())
    assert 2 <= kept <= 10 and set(rows["reason"]) <= {"kept", "duplicate_of:2", "duplicate_of:5", "unreadable",
                                                       "not_sampled"}
    report = read_json(os.path.join(out, "report.json"))
    assert report["counts"]["pool"] == 18 and report["counts"]["readable"] == 17
    assert report["counts"]["after_dedup"] == 15 and report["counts"]["after_sampling"] == kept
    for name in ("cluster_sizes.png", "cluster_members.png"):
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == PNG and os.path.getsize(os.path.join(out, name)) > 1000
    # The manifest is a data spec: a folder holding manifest.csv, or the file itself.
    assert get_source(out).num_examples == kept == get_source(os.path.join(out, "manifest.csv")).num_examples
    config_batch = min(kept, 2)
    from keras_dinov2.config import DataConfig

    batch = next(iter(multicrop_dataset(out, batch_size=config_batch, config=DataConfig.recipe("digits"),
                                        patch_size=4)))
    assert batch["global_crops"].shape[0] == 2 * config_batch

    # One-line errors naming what is wrong.
    other = str(tmp_path / "other_emb")
    status, _ = cli(["curate", "embed", "--data", "digits:test", "--model", "dinov2_vit_micro4", "--out", other,
                     "--verbose", "0", "--batch-size", "50", "--shard-size", "500"], capsys)
    assert status == 0
    status, text = cli(["curate", "select", "--embeddings", emb, "--out", out, "--eval-data", other], capsys)
    assert status == 2 and "dimension 48 but the pool's have 96" in text and len(text.strip().splitlines()) == 1
    changed = str(tmp_path / "changed")
    tiny_backbone(seed=1).save_to_preset(changed)
    status, text = cli(["curate", "select", "--embeddings", emb, "--out", out, "--eval-data", folder, "--model",
                        changed, "--verbose", "0"], capsys)
    assert status == 2 and "the backbone changed" in text and "weights_hash" in text
    os.makedirs(tmp_path / "empty")
    status, text = cli(["curate", "embed", "--data", str(tmp_path / "empty"), "--model", preset, "--out",
                        str(tmp_path / "e")], capsys)
    assert status == 2 and "holds no images" in text
    for argv in (["curate", "select", "--embeddings", emb, "--out", out, "--levels", "ten"],
                 ["curate", "embed", "--data", folder, "--model", preset, "--out", emb, "--dtype", "float64"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
    assert "expected cluster counts" in capsys.readouterr().err


@pytest.mark.once
def test_manifest_of_source_indices_and_bad_manifests(tmp_path):
    from keras_dinov2.data import write_manifest

    path = str(tmp_path / "digits.manifest.csv")
    write_manifest(path, np.arange(6), [1, 0, 1, 1, 0, 1], ["kept", "duplicate_of:0", "kept", "kept",
                                                            "not_sampled", "kept"], source="digits:test")
    source = get_source(path)
    assert source.num_examples == 4
    np.testing.assert_array_equal(source.labels, digits_source("test").labels[[0, 2, 3, 5]])
    bad = tmp_path / "bad.manifest.csv"
    bad.write_text("index,kept\n0,1\n")
    with pytest.raises(ValueError, match="lacks the column"):
        get_source(str(bad))
    none = str(tmp_path / "none.manifest.csv")
    write_manifest(none, np.arange(2), [0, 0], ["not_sampled", "not_sampled"], source="digits")
    with pytest.raises(ValueError, match="keeps no image"):
        get_source(none)


JAX_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jax, keras
    from keras_dinov2 import DINOv2Backbone, curation, distribute
    from keras_dinov2.config.architectures import ARCHITECTURES
    config = {**ARCHITECTURES["dinov2_vit_tiny4"]["config"], "num_layers": 2, "layer_scale_init": 1.0}
    keras.utils.set_random_seed(0)
    single = curation.embed_pool("digits:test", DINOv2Backbone(**config), sys.argv[1] + "/one", batch_size=16,
                                 shard_size=64, dtype="float32", verbose=False)
    dist = distribute.setup("data")
    keras.utils.set_random_seed(0)
    backbone = DINOv2Backbone(**config)
    seen = []
    original = keras.Model.predict_on_batch
    def spy(self, x):
        seen.append(len(x.sharding.device_set))
        return original(self, x)
    keras.Model.predict_on_batch = spy
    parallel = curation.embed_pool("digits:test", backbone, sys.argv[1] + "/four", batch_size=16, shard_size=64,
                                   dtype="float32", distribution=dist, verbose=False)
    print(json.dumps({"devices": len(jax.devices()), "replicas": dist.num_replicas, "sharded_over": min(seen),
                      "same_identity": single.identity["fingerprint"] == parallel.identity["fingerprint"],
                      "max_diff": float(np.abs(np.asarray(single.embeddings) - np.asarray(parallel.embeddings)).max()),
                      "rows": len(parallel.positions)}))
""")


@pytest.mark.once
def test_jax_data_parallel_embedding_matches_one_device(tmp_path):
    env = {**os.environ, "KERAS_BACKEND": "jax", "OMP_NUM_THREADS": "1",
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"}
    done = subprocess.run([sys.executable, "-c", JAX_SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["devices"] == 4 and report["replicas"] == 4 and report["sharded_over"] == 4
    assert report["same_identity"] and report["rows"] == 450
    assert report["max_diff"] < 1e-4, report


PROOF_TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                          "curation_digits_proof.py")


def load_proof_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("curation_digits_proof", PROOF_TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.once
def test_curation_proof_tool_plants_what_its_truth_file_says(tmp_path, capsys):
    import collections
    import csv

    tool = load_proof_tool()
    with pytest.raises(SystemExit) as exit_:
        tool.main(["--help"])
    assert exit_.value.code == 0 and "--embed-model" in capsys.readouterr().out
    out = str(tmp_path / "proof")
    sizes = dict(copy_sources=3, copies=12, other=9, leaked=5, seed_images=10, seed=0)
    tool.build_pool(out, **sizes)
    with open(os.path.join(out, "pool_truth.csv"), newline="") as f:
        truth = list(csv.DictReader(f))
    assert sorted(os.listdir(os.path.join(out, "pool"))) == sorted(row["file"] for row in truth)
    assert collections.Counter(row["kind"] for row in truth) == {"digit": 1347, "copy": 12, "noise": 3, "shape": 3,
                                                                 "photo": 3, "leaked": 5}
    train, test = digit_images("train"), digit_images("test")

    def image(row, folder="pool"):
        picture = np.asarray(Image.open(os.path.join(out, folder, row["file"])))
        assert picture.shape == (32, 32, 3) and picture.dtype == np.uint8  # what the digits pipeline serves
        return picture

    by_kind = collections.defaultdict(list)
    for row in truth:
        by_kind[row["kind"]].append(row)
    # The training split whole, each digit once; no held-out digit except the planted ones.
    assert sorted(int(row["source"]) for row in by_kind["digit"]) == list(range(len(train)))
    for row in by_kind["digit"][::50]:
        np.testing.assert_array_equal(image(row), train[int(row["source"])])
    # The contamination: exact copies of distinct held-out digits.
    leaked = [int(row["source"]) for row in by_kind["leaked"]]
    assert len(set(leaked)) == 5
    for row in by_kind["leaked"]:
        np.testing.assert_array_equal(image(row), test[int(row["source"])])
    # The copies: three sources, four copies each; the exact ones equal their source.
    assert sorted(collections.Counter(row["source"] for row in by_kind["copy"]).values()) == [4, 4, 4]
    for row in by_kind["copy"]:
        copy = image(row)
        if row["detail"] == "exact":
            np.testing.assert_array_equal(copy, train[int(row["source"])])
    for row in by_kind["noise"] + by_kind["shape"] + by_kind["photo"]:
        image(row)
    # The order is shuffled: the planted images are not all at the end.
    assert min(i for i, row in enumerate(truth) if row["kind"] != "digit") < len(truth) - 21
    # The seeds: one training digit of each class.
    seeds = sorted(os.listdir(os.path.join(out, "seeds")))
    labels = digits_source("train").labels
    assert len(seeds) == 10 and sorted(labels[int(name[len("seed_train"):-4])] for name in seeds) == list(range(10))
    # Built once per folder: the same sizes reuse it, other sizes are refused.
    stamp = os.stat(os.path.join(out, "pool_truth.csv")).st_mtime_ns
    tool.build_pool(out, **sizes)
    assert os.stat(os.path.join(out, "pool_truth.csv")).st_mtime_ns == stamp
    with pytest.raises(SystemExit, match="pass another --out"):
        tool.build_pool(out, **{**sizes, "copies": 13})
