"""How many patches the iBOT masks of a batch may hold: the reference's stratified targets, in plain NumPy.

Kept apart from the TensorFlow masking ops so that the batch contract (`keras_dinov2.data.batch`), which the
pretrainer and the distribution engines read, imports no backend framework.
"""

from __future__ import annotations

import numpy as np

from keras_dinov2.config import MaskingConfig

__all__ = ["mask_buffer_size", "mask_strata"]


def mask_strata(num_images: int, num_patches: int, config: MaskingConfig | None = None):
    """Return the per-stratum bounds (low, high) of masked-patch targets, as two int NumPy arrays.

    Image i of the int(num_images * mask_sample_probability) masked ones gets a target int(N * U(p_i, p_i+1)),
    p = linspace(ratio_min, ratio_max, count + 1); so its target lies in [int(N * p_i), int(N * p_i+1)].

    Args:
        num_images: int. Global-crop images in the batch (2 * batch size).
        num_patches: int. N, patches per image.
        config: MaskingConfig or None, default None (reference defaults).

    Example:
        >>> low, high = mask_strata(4, 256)
        >>> high.tolist()
        [76, 128]
    """
    config = config or MaskingConfig()
    num_masked = int(num_images * config.mask_sample_probability)
    ratios = np.linspace(*config.mask_ratio_min_max, num_masked + 1)
    # A hair of slack so ratios meant to be exact (0.25 * 64 = 16) do not truncate to one less through rounding.
    counts = np.floor(num_patches * ratios + 1e-9).astype(np.int64)
    return counts[:-1], counts[1:]


def mask_buffer_size(num_images: int, num_patches: int, config: MaskingConfig | None = None) -> int:
    """Return M, the static length of the masked-patch buffer: the reference's sum_i int(N * p_i+1).

    No batch can mask more patches than this, because the block generator never exceeds an image's target.

    Args:
        num_images: int. Global-crop images in the batch (2 * batch size).
        num_patches: int. N, patches per image.
        config: MaskingConfig or None, default None (reference defaults).

    Example:
        >>> mask_buffer_size(4, 256)
        204
    """
    _, high = mask_strata(num_images, num_patches, config)
    # At least one entry so the buffer has a valid shape even when nothing is ever masked.
    return max(int(high.sum()), 1)
