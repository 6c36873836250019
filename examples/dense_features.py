"""Dense features: a linear segmentation probe on frozen patch tokens, and patch matching under a flip.

Everything uses pictures bundled with scikit-image (no download):

1. Segmentation probe on `skimage.data.coins()` (a 303 x 384 gray photo of 24 coins on a dark background). The
   labels are a classical segmentation of that photo, computed here: a watershed of its Sobel gradient from
   markers (darker than 30: background, brighter than 150: coin), holes filled, specks under 100 pixels removed.
   A patch is "coin" when at least half of its pixels are.
   The photo is cut into a left and a right half; the backbone sees each half separately; a linear classifier
   (a Keras Dense layer on standardized (N, D) patch tokens) learns coin / background from the left half's patches
   and is scored on the right half's: per-patch accuracy and the intersection-over-union of the coin class. The
   same probe on the raw pixels of each patch is printed next to it for scale.
2. Matching on `skimage.data.astronaut()`: every patch of the horizontally flipped picture looks for its nearest
   neighbour (cosine similarity of patch tokens) in the original; a match is correct when it lands on the mirrored
   position, give or take one patch. A pretrained backbone matches by content; a random one mostly by colour.

A PNG shows the held-out half, its labels, the probe's prediction and its errors.

Usage:
    python examples/dense_features.py --preset runs/latest          # a pretrained backbone
    python examples/dense_features.py                               # random tiny backbone (a warning)
    python examples/dense_features.py --quick                       # smaller grids, fewer steps (for tests)
"""

import argparse
import os
import sys
import time

import keras
import numpy as np


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Linear segmentation probe on frozen DINOv2 patch tokens (skimage coins) and "
                    "nearest-neighbour patch matching under a horizontal flip (skimage astronaut).")
    parser.add_argument("--preset", default=None,
                        help="run directory, preset folder or hf:// URI (default: a randomly initialized "
                             "dinov2_vit_tiny4, with a warning)")
    parser.add_argument("--grid", type=int, default=24,
                        help="patch rows of each input; images are resized to grid x patch size pixels "
                             "(default 24)")
    parser.add_argument("--epochs", type=int, default=300, help="probe training epochs (default 300)")
    parser.add_argument("--out", default="dense_features.png", help="PNG to write (default dense_features.png)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--quick", action="store_true", help="a 12-patch grid and 50 epochs (a smoke test)")
    return parser.parse_args(argv)


def load_backbone(preset):
    from keras_dinov2 import DINOv2Backbone

    if preset is None:
        print("WARNING: no --preset given; using a randomly initialized dinov2_vit_tiny4. Its patch tokens are "
              "random projections of the pixels, not learned features.")
        return DINOv2Backbone.from_preset("dinov2_vit_tiny4", load_weights=False)
    if os.path.isdir(os.path.join(preset, "teacher_preset")):
        preset = os.path.join(preset, "teacher_preset")
    return DINOv2Backbone.from_preset(preset)


def coins_and_mask():
    """The coins photo (H, W) uint8 and its coin mask (H, W) bool, from a classical segmentation."""
    from scipy import ndimage
    from skimage import data, filters, segmentation

    image = data.coins()
    # Marker-based watershed on the Sobel gradient: sure background below 30, sure coin above 150.
    markers = np.zeros(image.shape, np.int32)
    markers[image < 30] = 1
    markers[image > 150] = 2
    mask = ndimage.binary_fill_holes(segmentation.watershed(filters.sobel(image), markers) == 2)
    regions, _ = ndimage.label(mask)
    sizes = np.bincount(regions.ravel())
    sizes[0] = 0  # the background
    return image, sizes[regions] >= 100


def patch_labels(mask, grid):
    """Fraction of coin pixels per patch >= 0.5, on a `grid` (rows, cols) of patches."""
    from PIL import Image

    rows, cols = grid
    small = Image.fromarray(mask.astype(np.uint8) * 255).resize((cols * 8, rows * 8), Image.BILINEAR)
    fraction = np.asarray(small, np.float32).reshape(rows, 8, cols, 8).mean(axis=(1, 3)) / 255.0
    return fraction >= 0.5


def tokens_and_pixels(backbone, image, grid):
    """Patch tokens (rows * cols, D) and raw patch pixels (rows * cols, p * p * 3) of one image."""
    from keras_dinov2.visualize import patch_features, prepare_images

    patch = backbone.patch_size
    size = (grid[0] * patch, grid[1] * patch)
    normalized, _ = prepare_images([image], size)
    tokens = patch_features(backbone, normalized)[0]
    pixels = normalized[0].reshape(grid[0], patch, grid[1], patch, 3).transpose(0, 2, 1, 3, 4)
    return tokens.reshape(-1, tokens.shape[-1]), pixels.reshape(grid[0] * grid[1], -1)


def train_probe(features, labels, epochs, seed):
    """A logistic-regression probe: standardization + Dense(1), trained full-batch with Adam."""
    normalization = keras.layers.Normalization()
    normalization.adapt(features)
    probe = keras.Sequential([
        keras.Input((features.shape[1],)),
        normalization,
        keras.layers.Dense(1, kernel_initializer=keras.initializers.GlorotUniform(seed=seed)),
    ])
    probe.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.BinaryCrossentropy(from_logits=True))
    probe.fit(features, labels.astype("float32")[:, None], batch_size=len(features), epochs=epochs,
              shuffle=False, verbose=0)
    return probe


def score(probe, features, labels):
    logits = keras.ops.convert_to_numpy(probe.predict(features, batch_size=len(features), verbose=0))
    prediction = logits[:, 0] > 0
    accuracy = 100.0 * np.mean(prediction == labels)
    union = np.logical_or(prediction, labels).sum()
    iou = 100.0 * np.logical_and(prediction, labels).sum() / max(union, 1)
    return prediction, accuracy, iou


def flip_matching(backbone, grid):
    """Fraction (%) of flipped-picture patches whose nearest neighbour is the mirrored patch (+-1 patch)."""
    from skimage import data

    image = data.astronaut()
    tokens, _ = tokens_and_pixels(backbone, image, (grid, grid))
    flipped, _ = tokens_and_pixels(backbone, image[:, ::-1], (grid, grid))
    a = tokens / np.linalg.norm(tokens, axis=1, keepdims=True)
    b = flipped / np.linalg.norm(flipped, axis=1, keepdims=True)
    nearest = np.argmax(b @ a.T, axis=1)
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    found_rows, found_cols = np.divmod(nearest, grid)
    correct = (np.abs(found_rows - rows) <= 1) & (np.abs(found_cols - (grid - 1 - cols)) <= 1)
    return 100.0 * correct.mean()


def save_picture(path, image, labels, prediction, grid):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, prediction = labels.reshape(grid), prediction.reshape(grid)
    errors = np.zeros(grid + (3,))
    errors[prediction & ~labels] = (1.0, 0.2, 0.2)   # false coin: red
    errors[~prediction & labels] = (0.2, 0.4, 1.0)   # missed coin: blue
    errors[prediction == labels] = (0.9, 0.9, 0.9)
    panels = [(image, "held-out half", "gray"), (labels, "labels (watershed)", "gray"),
              (prediction, "probe on patch tokens", "gray"), (errors, "errors", None)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.6))
    for ax, (panel, title, cmap) in zip(axes, panels):
        ax.imshow(panel, cmap=cmap, interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    start = time.time()
    backbone = load_backbone(args.preset)
    rows = 12 if args.quick else args.grid
    epochs = 50 if args.quick else args.epochs
    image, mask = coins_and_mask()
    half = image.shape[1] // 2
    grid = (rows, max(1, round(rows * half / image.shape[0])))
    print(f"Backend {keras.backend.backend()}; backbone {backbone.num_layers} blocks, width "
          f"{backbone.hidden_dim}, patch {backbone.patch_size}; coins halves as {grid[0]} x {grid[1]} patches "
          f"({grid[0] * backbone.patch_size} x {grid[1] * backbone.patch_size} px).")

    train_tokens, train_pixels = tokens_and_pixels(backbone, image[:, :half], grid)
    test_tokens, test_pixels = tokens_and_pixels(backbone, image[:, half:], grid)
    train_labels = patch_labels(mask[:, :half], grid).reshape(-1)
    test_labels = patch_labels(mask[:, half:], grid).reshape(-1)
    print(f"Training patches {len(train_labels)} ({100 * train_labels.mean():.0f}% coin), held-out patches "
          f"{len(test_labels)} ({100 * test_labels.mean():.0f}% coin).")

    probe = train_probe(train_tokens, train_labels, epochs, args.seed)
    prediction, accuracy, iou = score(probe, test_tokens, test_labels)
    _, pixel_accuracy, pixel_iou = score(train_probe(train_pixels, train_labels, epochs, args.seed),
                                         test_pixels, test_labels)
    print(f"Segmentation probe on patch tokens: held-out per-patch accuracy {accuracy:.1f}%, coin IoU {iou:.1f}%")
    print(f"Same probe on raw patch pixels:     held-out per-patch accuracy {pixel_accuracy:.1f}%, "
          f"coin IoU {pixel_iou:.1f}%")

    matched = flip_matching(backbone, rows)
    print(f"Flip matching on astronaut ({rows} x {rows} patches): {matched:.1f}% of patches find the mirrored "
          "patch (+-1) as nearest neighbour")

    from keras_dinov2.visualize import prepare_images

    _, display = prepare_images([image[:, half:]], (grid[0] * 8, grid[1] * 8))
    save_picture(args.out, display[0], test_labels, prediction, grid)
    print(f"Wrote {args.out} ({time.time() - start:.0f} s).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
