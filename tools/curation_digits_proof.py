"""Does curation pay? Pretraining on a curated subset of a junk-heavy pool against pretraining on the raw pool,
the same number of steps at the same batch, judged by the teacher's k-NN (k=20) on the 450 held-out digits.

The pool (a folder of 32 x 32 RGB PNGs, the size `digits_source` serves, built once per --out, seeded by
--pool-seed) holds, in a shuffled order:

    digit      every image of the digits' training split (1,347; the library's stratified 75/25 split)
    copy       --copies exact or lightly altered copies (JPEG, 1-px shift, brightness, tint, noise, crop)
               of --copy-sources training digits
    noise      --other images of other domains, a third each: noise, synthetic shapes, and crops of
    shape      the pictures bundled with scikit-image
    photo
    leaked     exact copies of --leaked held-out (test split) digits: contamination

pool_truth.csv (next to the pool, not in it) says which file is what; seeds/ holds --seed-images training
digits (the same number of every class), the seed set of the retrieval (as DINOv2 retrieves from its pool
the neighbours of curated data sets). Then, each command as a user would type it, in its own process:

    keras-dinov2 curate embed  --data OUT/pool --model EMBED_MODEL --out OUT/embeddings
    keras-dinov2 curate select --embeddings OUT/embeddings --out OUT/curated --model EMBED_MODEL
                               --dedup-threshold D --eval-data digits:test --decontamination-threshold C
                               --seeds OUT/seeds --k K [--levels L --total N | --per-cluster N]
    for SEED in --seeds, for DATA in OUT/pool (raw) and OUT/curated (its manifest.csv):
        keras-dinov2 pretrain --recipe digits --model dinov2_vit_tiny4 --data DATA --epochs E
                              --steps-per-epoch S --batch-size B --seed SEED --knn-every 0 --out RUN
        keras-dinov2 evaluate --preset RUN --output RUN/eval.json        (k-NN on digits: 1,347 / 450)

It prints the images left after every curation step (report.json) and what the curated set holds per kind,
then one JSON line per run (data, seed, training images, distinct training digits among them, steps, the
teacher's k-NN k=20 and a random-init backbone's, minutes of the pretrain command), appended to --jsonl, and
a markdown table (mean and min-max over seeds per data). Runs already in --jsonl (same data, seed, epochs,
steps per epoch, batch, model and, for curated runs, embedder and selection flags) are not redone: the command
resumes a sweep. The k-NN monitor of `pretrain` runs
on `--data digits` only, hence --knn-every 0 and an `evaluate` afterwards; --model is given because `pretrain`
picks dinov2_vit_small14 for data other than digits. The pictures come from scikit-image (`pip install
scikit-image`, part of the test extras).

The default thresholds were read off a digits teacher (the digits recipe, 14 x 43 steps): exact, JPEG and
noisy copies sit above 0.99 to their source and brightened ones mostly above 0.97, but 1-px shifts, crops and
tints fall to 0.4-0.9, as low as distinct digits (median nearest other training digit: 0.90), so those copies
are only partly found (copies of one another still group); held-out copies sit at 1.0 while no training digit
comes within 0.99 of a held-out one. The curated set's composition per kind is printed, so what curation
missed is visible.

The embedder is a digits pretraining run (its teacher_preset/), made first with, for example:

    KERAS_BACKEND=jax keras-dinov2 pretrain --out runs/embedder --seed 100

(the digits recipe on the training split, about 5 minutes on 2 CPU cores). Then:

    KERAS_BACKEND=jax python tools/curation_digits_proof.py --embed-model runs/embedder \\
        --out runs/curation_proof --seeds 0 1 2
"""

import argparse
import csv
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

IMAGE_SIDE = 32  # what digits_source serves (8 x 8 upsampled); the digits recipe crops 24 / 12 px from it
COPY_KINDS = ("exact", "jpeg", "shift", "brightness", "tint", "noise", "crop")
OTHER_KINDS = ("noise", "shape", "photo")
# Pictures that scikit-image ships inside its wheel (no download).
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page", "text", "clock", "horse",
          "brick", "grass", "gravel", "retina", "colorwheel", "logo", "hubble_deep_field", "immunohistochemistry",
          "cell", "shepp_logan_phantom")
TRUTH_FILE = "pool_truth.csv"
POOL_SETTINGS_FILE = "pool_settings.json"


# The pool.

def digit_arrays(split):
    """(images uint8 (N, 32, 32, 3), labels int (N,)) of the library's digits split ("train" or "test")."""
    from keras_dinov2.data.arrays import digits_source

    source = digits_source(split)
    record = source.read(np.arange(source.num_examples))
    images = np.asarray(record["image"])
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images, np.asarray(source.labels)


def to_uint8(image):
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def resized(image, side=IMAGE_SIDE):
    from PIL import Image

    return np.asarray(Image.fromarray(image).convert("RGB").resize((side, side), Image.BICUBIC))


def altered_copy(image, kind, rng):
    """`image` (uint8 (32, 32, 3)) changed as a re-upload would change it, by `kind` (one of COPY_KINDS)."""
    from PIL import Image

    if kind == "exact":
        return image.copy()
    if kind == "jpeg":
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=int(rng.integers(70, 96)))
        return np.asarray(Image.open(buffer).convert("RGB"))
    if kind == "shift":  # one pixel down or up, left or right, the edge filled with black
        dy, dx = (int(v) for v in rng.choice([-1, 1], size=2))
        padded = np.pad(image, ((1, 1), (1, 1), (0, 0)))
        return padded[1 - dy:1 - dy + IMAGE_SIDE, 1 - dx:1 - dx + IMAGE_SIDE]
    if kind == "brightness":
        return to_uint8(image.astype(np.float32) * rng.uniform(0.8, 1.1) + rng.uniform(0, 25))
    if kind == "tint":
        return to_uint8(image.astype(np.float32) * rng.uniform(0.6, 1.0, size=3))
    if kind == "noise":
        return to_uint8(image.astype(np.float32) + rng.normal(0, 6, size=image.shape))
    if kind == "crop":
        top, left = rng.integers(0, 3, size=2)
        return resized(image[top:top + 30, left:left + 30])
    raise ValueError(f"unknown copy kind {kind!r}; expected one of {COPY_KINDS}.")


def noise_image(rng):
    """Uniform noise, or smooth noise (a random 4 x 4 to 16 x 16 grid upsampled)."""
    if rng.random() < 0.5:
        return rng.integers(0, 256, size=(IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
    side = int(rng.integers(4, 17))
    return resized(rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8))


def shape_image(rng):
    """One to four filled rectangles, ellipses or thick lines in random colours on a random plain background."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE), tuple(int(v) for v in rng.integers(0, 256, size=3)))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, 5))):
        x0, y0 = (int(v) for v in rng.integers(0, IMAGE_SIDE - 6, size=2))
        x1, y1 = x0 + int(rng.integers(5, IMAGE_SIDE - x0 + 1)), y0 + int(rng.integers(5, IMAGE_SIDE - y0 + 1))
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(2, 5)))
    return np.asarray(canvas)


def load_photos():
    """The scikit-image pictures of PHOTOS as uint8 RGB arrays."""
    import skimage.data

    photos = []
    for name in PHOTOS:
        image = np.asarray(getattr(skimage.data, name)())
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        image = image[..., :3]
        if image.dtype != np.uint8:
            image = image.astype(np.float64)
            image = to_uint8(255 * (image - image.min()) / max(image.max() - image.min(), 1e-12))
        photos.append(image)
    return photos


def photo_crop(photos, rng):
    """A random square crop (16 px to half the shorter side) of a random picture, resized to 32 x 32."""
    photo = photos[int(rng.integers(len(photos)))]
    height, width = photo.shape[:2]
    side = int(rng.integers(16, max(17, min(height, width) // 2)))
    top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    return resized(photo[top:top + side, left:left + side])


def plan_pool(train, test, *, copy_sources, copies, other, leaked, seed):
    """The pool's images and truth rows, shuffled: (images (N, 32, 32, 3) uint8, rows of (kind, detail, source)).

    `train` and `test` are the digits' training and held-out images. `detail` is the copy kind or other domain,
    `source` the training index a copy copies or the held-out index a leaked image copies (-1 otherwise).
    """
    rng = np.random.default_rng(seed)
    images = list(train)
    rows = [("digit", "", i) for i in range(len(train))]
    if copies:
        if not 1 <= copy_sources <= len(train):
            raise ValueError(f"--copy-sources must be in [1, {len(train)}], received {copy_sources}.")
        sources = rng.choice(len(train), size=copy_sources, replace=False)
        for j in range(copies):
            source = int(sources[j % copy_sources])  # every source about as often
            kind = COPY_KINDS[int(rng.integers(len(COPY_KINDS)))]
            images.append(altered_copy(train[source], kind, rng))
            rows.append(("copy", kind, source))
    photos = load_photos() if other else []
    for j in range(other):
        kind = OTHER_KINDS[j % len(OTHER_KINDS)]
        images.append({"noise": noise_image, "shape": shape_image}[kind](rng) if kind != "photo"
                      else photo_crop(photos, rng))
        rows.append((kind, "", -1))
    if leaked > len(test):
        raise ValueError(f"--leaked must be at most the {len(test)} held-out digits, received {leaked}.")
    for source in rng.choice(len(test), size=leaked, replace=False):
        images.append(test[source].copy())
        rows.append(("leaked", "", int(source)))
    order = rng.permutation(len(images))
    return np.stack(images)[order], [rows[i] for i in order]


def seed_indices(labels, count, seed):
    """`count` training indices spread over the classes, round robin (class sizes permitting), sorted."""
    rng = np.random.default_rng(seed + 1)
    per_class = [list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)]
    chosen = []
    while len(chosen) < count and any(per_class):
        for members in per_class:
            if members and len(chosen) < count:
                chosen.append(members.pop())
    return np.sort(np.asarray(chosen, np.int64))


def write_png(path, image):
    from PIL import Image

    Image.fromarray(image).save(path)


def build_pool(out, *, copy_sources=50, copies=2000, other=3000, leaked=100, seed_images=100, seed=0):
    """Writes OUT/pool/ (PNGs), OUT/pool_truth.csv, OUT/seeds/ and OUT/pool_settings.json; returns the settings.

    Reuses a pool built with the same settings; refuses one built with other settings (another --out, please).
    """
    settings = {"copy_sources": copy_sources, "copies": copies, "other": other, "leaked": leaked,
                "seed_images": seed_images, "seed": seed, "side": IMAGE_SIDE}
    settings_path = os.path.join(out, POOL_SETTINGS_FILE)
    if os.path.isfile(settings_path):
        with open(settings_path) as f:
            old = json.load(f)
        if old != settings:
            raise SystemExit(f"{out} holds a pool built with {old}, not {settings}: pass another --out (its runs "
                             "would mix pools).")
        return settings
    train, train_labels = digit_arrays("train")
    test, _ = digit_arrays("test")
    images, rows = plan_pool(train, test, copy_sources=copy_sources, copies=copies, other=other, leaked=leaked,
                             seed=seed)
    pool, seeds = os.path.join(out, "pool"), os.path.join(out, "seeds")
    for folder in (pool, seeds):
        if os.path.isdir(folder):
            shutil.rmtree(folder)  # what an interrupted build left
        os.makedirs(folder)
    width = len(str(len(images)))
    with open(os.path.join(out, TRUTH_FILE), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "kind", "detail", "source"])
        for i, (image, (kind, detail, source)) in enumerate(zip(images, rows)):
            name = f"img_{i:0{width}d}.png"
            write_png(os.path.join(pool, name), image)
            writer.writerow([name, kind, detail, source])
    for i in seed_indices(train_labels, seed_images, seed):
        write_png(os.path.join(seeds, f"seed_train{i:04d}.png"), train[i])
    with open(settings_path, "w") as f:
        json.dump(settings, f, indent=2)
    return settings


def read_truth(out):
    """{file name: (kind, source)} of OUT/pool_truth.csv."""
    with open(os.path.join(out, TRUTH_FILE), newline="") as f:
        return {row["file"]: (row["kind"], int(row["source"])) for row in csv.DictReader(f)}


KINDS = ("digit", "copy") + OTHER_KINDS + ("leaked",)


def composition(planted):
    """{kind: count} over KINDS, then "distinct_digits": the training digits present (as themselves or a copy).

    `planted` is a list of (kind, source) of the images of a training set.
    """
    counts = {kind: sum(k == kind for k, _ in planted) for kind in KINDS}
    counts["distinct_digits"] = len({source for kind, source in planted if kind in ("digit", "copy")})
    return counts


# The commands.

def run(cmd, log_path, env):
    """Runs `cmd`, its output into `log_path`; the seconds it took, or SystemExit naming the log."""
    start = time.time()
    with open(log_path, "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-2000:]
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}); see {log_path}:\n{tail}")
    return time.time() - start


CLI = [sys.executable, "-m", "keras_dinov2.cli"]


def check_embedder(spec):
    """A SystemExit that says how to make one when `spec` names a folder that does not exist."""
    if "://" in spec or os.path.isdir(spec):
        return
    from keras_dinov2.config.architectures import ARCHITECTURES

    if spec in ARCHITECTURES:
        return
    raise SystemExit(f"--embed-model {spec!r} does not exist. Make a digits embedder first, e.g.\n"
                     f"    KERAS_BACKEND=jax keras-dinov2 pretrain --out {spec} --seed 100\n"
                     "(a digits pretraining run; its teacher_preset/ embeds the pool), or pass another run "
                     "directory or preset folder.")


def check_spread(folder, model, pairs=2000, limit=0.99):
    """A SystemExit when the embedder gives about one CLS direction to every image (no threshold can then work).

    A barely trained digits backbone does: its position embeddings (std 1.0) put a common part into every CLS
    token, so random pool images sit at cosine 0.9999 and deduplication joins the whole pool into one group.
    """
    from keras_dinov2 import curation

    embeddings = curation.load_embeddings(folder).embeddings
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(len(embeddings), size=min(len(embeddings), 2 * pairs), replace=False))
    x = np.asarray(embeddings[rows], np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    x = x[rng.permutation(len(x))]
    half = len(x) // 2
    median = float(np.median(np.sum(x[:half] * x[half:2 * half], axis=1)))
    if median > limit:
        raise SystemExit(f"--embed-model {model}: random pool images are at median cosine {median:.4f} (above "
                         f"{limit}); its CLS tokens barely differ, so no threshold tells copies from other images. "
                         "Train the embedder longer (the digits recipe: keras-dinov2 pretrain --out DIR).")
    print(f"embeddings: median cosine of random pool pairs {median:.3f}", flush=True)


def curate(args, env):
    """curate embed + curate select; returns report.json with "composition" (raw and curated) added."""
    out = args.out
    pool, embeddings, curated = (os.path.join(out, name) for name in ("pool", "embeddings", "curated"))
    run(CLI + ["curate", "embed", "--data", pool, "--model", args.embed_model, "--out", embeddings,
               "--verbose", "0"], os.path.join(out, "curate_embed.log"), env)
    check_spread(embeddings, args.embed_model)
    select = ["curate", "select", "--embeddings", embeddings, "--out", curated, "--model", args.embed_model,
              "--verbose", "0",
              "--dedup-threshold", str(args.dedup_threshold), "--seed", str(args.pool_seed)]
    if args.decontaminate:
        select += ["--eval-data", "digits:test", "--decontamination-threshold", str(args.decontamination_threshold)]
    if args.k:
        select += ["--seeds", os.path.join(out, "seeds"), "--k", str(args.k)]
    if args.levels:
        select += ["--levels", args.levels, "--total" if args.total else "--per-cluster",
                   str(args.total or args.per_cluster)]
    run(CLI + select, os.path.join(out, "curate_select.log"), env)
    with open(os.path.join(curated, "report.json")) as f:
        report = json.load(f)
    from keras_dinov2.data import read_manifest

    truth = read_truth(out)
    kept = read_manifest(curated)["path"]
    report["composition"] = {"raw": composition(list(truth.values())),
                             "curated": composition([truth[os.path.basename(p)] for p in kept])}
    return report


def print_curation(report):
    print("curation: " + ", ".join(f"{step} {count}" for step, count in report["counts"].items()))
    for data, counts in report["composition"].items():
        total = sum(counts[kind] for kind in KINDS)
        print(f"  {data:8s} {total:5d} images: " + ", ".join(f"{kind} {counts[kind]}" for kind in KINDS)
              + f"; {counts['distinct_digits']} distinct training digits")


def selection_settings(args):
    """What a curated run depends on besides the pool (fixed per --out): the embedder and the selection flags."""
    return {"embed_model": args.embed_model, "dedup_threshold": args.dedup_threshold,
            "decontamination_threshold": args.decontamination_threshold if args.decontaminate else None,
            "k": args.k, "levels": args.levels, "total": args.total, "per_cluster": args.per_cluster}


def run_key(row):
    """Runs with equal keys are the same run: --jsonl rows with the key of a planned run are not redone."""
    selection = json.dumps(row.get("selection"), sort_keys=True) if row["data"] == "curated" else ""
    return row["data"], row["seed"], row["epochs"], row["steps_per_epoch"], row["batch"], row["model"], selection


def one_run(data, seed, counts, args, env):
    """pretrain + evaluate on `data` ("raw" or "curated"), whose `composition` is `counts`; the JSON row."""
    spec = os.path.join(args.out, "pool" if data == "raw" else "curated")
    name = f"{data}_s{seed}"
    run_dir = os.path.join(args.out, "runs", name)
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)  # an interrupted run of this sweep, not in --jsonl
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    seconds = run(CLI + ["pretrain", "--recipe", "digits", "--model", args.model, "--data", spec,
                         "--epochs", str(args.epochs), "--steps-per-epoch", str(args.steps_per_epoch),
                         "--batch-size", str(args.batch_size), "--seed", str(seed), "--knn-every", "0",
                         "--verbose", "2", "--out", run_dir],
                  os.path.join(args.out, "runs", f"{name}.log"), env)
    eval_json = os.path.join(run_dir, "eval.json")
    run(CLI + ["evaluate", "--preset", run_dir, "--output", eval_json],
        os.path.join(args.out, "runs", f"{name}.eval.log"), env)
    with open(eval_json) as f:
        evaluation = json.load(f)
    return {"data": data, "seed": seed, "images": sum(counts[kind] for kind in KINDS),
            "distinct_digits": counts["distinct_digits"], "epochs": args.epochs,
            "steps_per_epoch": args.steps_per_epoch, "steps": args.epochs * args.steps_per_epoch,
            "batch": args.batch_size, "model": args.model, "backend": env.get("KERAS_BACKEND", "jax"),
            "knn20": round(float(evaluation["knn"]["20"]), 2),
            "random_init_knn20": round(float(evaluation["random_init"]["knn"]["20"]), 2),
            "minutes": round(seconds / 60, 2), "selection": selection_settings(args)}


def table(rows):
    """Markdown: per data, the seeds, training images, steps, teacher k-NN mean (min-max) and minutes."""
    lines = ["| data | seeds | training images | steps | teacher k-NN (k=20) | random init | minutes / run |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for data in ("raw", "curated"):
        group = [r for r in rows if r["data"] == data]
        if not group:
            continue

        def cell(key, group=group):
            values = [r[key] for r in group]
            return f"{statistics.mean(values):.1f} ({min(values):.1f}-{max(values):.1f})"

        images = sorted({r["images"] for r in group})
        steps = sorted({r["steps"] for r in group})
        lines.append(f"| {data} | {len(group)} | {', '.join(map(str, images))} | {', '.join(map(str, steps))} | "
                     f"{cell('knn20')} | {cell('random_init_knn20')} | "
                     f"{statistics.mean(r['minutes'] for r in group):.1f} |")
    return "\n".join(lines)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/curation_proof",
                        help="folder of the pool, embeddings, curated manifest, runs and logs "
                             "(default runs/curation_proof)")
    parser.add_argument("--embed-model", default="runs/embedder",
                        help="backbone of `curate embed`: a digits pretraining run directory or preset folder "
                             "(default runs/embedder; see above for the command that makes it)")
    pool = parser.add_argument_group("pool (built once per --out)")
    pool.add_argument("--copy-sources", type=int, default=50, help="training digits that are copied (default 50)")
    pool.add_argument("--copies", type=int, default=2000,
                      help="copies of them, exact or altered, spread evenly (default 2000: 40 per source)")
    pool.add_argument("--other", type=int, default=3000,
                      help="other-domain images, a third each noise, shapes, photo crops (default 3000)")
    pool.add_argument("--leaked", type=int, default=100,
                      help="exact copies of distinct held-out digits, the contamination (default 100)")
    pool.add_argument("--seed-images", type=int, default=100,
                      help="training digits in seeds/, as evenly over the classes as possible (default 100)")
    pool.add_argument("--pool-seed", type=int, default=0, help="seed of the pool and of `curate select` (default 0)")
    select = parser.add_argument_group("curate select")
    select.add_argument("--dedup-threshold", type=float, default=0.97,
                        help="cosine similarity of near-copies (default 0.97: with a digits embedder, 1.3%% of "
                             "the distinct training digits have another one this close)")
    select.add_argument("--decontamination-threshold", type=float, default=0.99,
                        help="pool images this close to a held-out digit go, with their near-copies (default "
                             "0.99: exact copies sit at 1.0, no distinct training digit reaches 0.99)")
    select.add_argument("--no-decontamination", dest="decontaminate", action="store_false",
                        help="skip --eval-data digits:test")
    select.add_argument("--k", type=int, default=64,
                        help="pool images retrieved per seed image (default 64; 0: no retrieval)")
    select.add_argument("--levels", default=None,
                        help="also hierarchical k-means of what is left, e.g. 40,8, sampled with --total or "
                             "--per-cluster (default: none)")
    select.add_argument("--total", type=int, default=None, help="with --levels: images kept")
    select.add_argument("--per-cluster", type=int, default=None, help="with --levels: images per top cluster")
    train = parser.add_argument_group("pretraining (the same for raw and curated)")
    train.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default 0 1 2)")
    train.add_argument("--epochs", type=int, default=14, help="epochs (default 14, the digits recipe's)")
    train.add_argument("--steps-per-epoch", type=int, default=42,
                       help="steps per epoch (default 42, the digits recipe's), whatever the data's size")
    train.add_argument("--batch-size", type=int, default=32, help="batch (default 32, the digits recipe's)")
    train.add_argument("--model", default="dinov2_vit_tiny4", help="architecture (default dinov2_vit_tiny4)")
    train.add_argument("--data", nargs="+", default=["raw", "curated"], choices=["raw", "curated"],
                       help="which training sets (default both)")
    parser.add_argument("--jsonl", default=None, help="results file (default OUT/results.jsonl); appended")
    parser.add_argument("--table-only", action="store_true", help="print the table of --jsonl and stop")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("copy_sources", "copies", "other", "leaked", "seed_images", "k"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} must be >= 0")
    if min(args.epochs, args.steps_per_epoch, args.batch_size) < 1:
        parser.error("--epochs, --steps-per-epoch and --batch-size must be >= 1")
    if args.levels and (args.total is None) == (args.per_cluster is None):
        parser.error("--levels needs one of --total and --per-cluster")
    if args.k and not args.seed_images:
        parser.error("retrieval (--k) needs --seed-images >= 1; pass --k 0 to skip it")
    if not args.table_only:
        check_embedder(args.embed_model)
    os.makedirs(args.out, exist_ok=True)
    jsonl = args.jsonl or os.path.join(args.out, "results.jsonl")
    rows = []
    if os.path.exists(jsonl):
        with open(jsonl) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    if not args.table_only:
        env = dict(os.environ)
        env.setdefault("KERAS_BACKEND", "jax")
        settings = build_pool(args.out, copy_sources=args.copy_sources, copies=args.copies, other=args.other,
                              leaked=args.leaked, seed_images=args.seed_images, seed=args.pool_seed)
        print(f"pool: {os.path.join(args.out, 'pool')} ({json.dumps(settings)})", flush=True)
        report = curate(args, env)
        print_curation(report)
        done = {run_key(r) for r in rows}
        for seed in args.seeds:
            for data in args.data:
                planned = {"data": data, "seed": seed, "epochs": args.epochs, "steps_per_epoch": args.steps_per_epoch,
                           "batch": args.batch_size, "model": args.model, "selection": selection_settings(args)}
                if run_key(planned) in done:
                    continue
                row = one_run(data, seed, report["composition"][data], args, env)
                print(json.dumps(row), flush=True)
                rows.append(row)
                with open(jsonl, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
