"""The source images the benchmarks share: crops of scikit-learn's sample photographs."""

import numpy as np

SEED = 0


def photo_crops(count, height, width, seed=SEED):
    """`count` uint8 RGB crops of height x width from scikit-learn's two sample photographs.

    The photographs take turns; each crop's corner is drawn from `seed`'s generator. None when
    scikit-learn or its data files are missing.
    """
    rng = np.random.default_rng(seed)
    try:
        from sklearn.datasets import load_sample_images

        photos = [np.asarray(p, np.uint8) for p in load_sample_images().images]
    except Exception:  # scikit-learn missing, or its data files
        return None
    if not photos:
        return None
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        top = int(rng.integers(0, photo.shape[0] - height + 1))
        left = int(rng.integers(0, photo.shape[1] - width + 1))
        crops.append(photo[top : top + height, left : left + width])
    return crops


def source_images(count, size=256, seed=SEED):
    """(`count` uint8 RGB images of size x size, what they are).

    Crops of scikit-learn's sample photographs, or smooth random color fields (low-frequency
    noise upsampled, plus a little grain) where scikit-learn is missing.
    """
    crops = photo_crops(count, size, size, seed)
    if crops is not None:
        return np.stack(crops), "crops of scikit-learn's sample photographs"
    rng = np.random.default_rng(seed)
    coarse = rng.random((count, 8, 8, 3))
    fields = coarse.repeat(size // 8, axis=1).repeat(size // 8, axis=2)
    fields = fields + 0.05 * rng.standard_normal(fields.shape)
    return np.clip(fields * 255, 0, 255).astype(np.uint8), "synthetic color fields"
