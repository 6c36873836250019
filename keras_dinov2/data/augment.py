"""The DINOv2 multi-crop augmentation as stateless TensorFlow ops (runs inside `tf.data`).

Images are float32 RGB in [0, 1], (H, W, 3), until the final normalization. Every random draw is a stateless op
keyed by a (2,) seed, so a crop depends only on its seed: the pipeline is reproducible under parallel `map`.

Differences from the reference (torchvision on PIL images), on purpose or by necessity:

- The pixels stay float between steps; PIL rounds to uint8 after each one.
- Resizing is TensorFlow's antialiased bicubic (Keys a = -0.5, the kernel PIL uses too); edge handling differs
  slightly from PIL's.
- Hue is shifted in float HSV (`tf.image.rgb_to_hsv`); torchvision on PIL shifts the uint8 hue channel.
- Per crop, torchvision draws its random numbers one transform at a time; here one stateless draw of a fixed
  vector of uniforms drives every choice of a crop (same distributions, different streams).
- Contrast blends toward the mean of the grayscale image, as torchvision does, without PIL's rounding of the mean.
"""

from __future__ import annotations

import functools
import math

import tensorflow as tf

from keras_dinov2.config import DataConfig

__all__ = [
    "random_resized_crop",
    "color_jitter",
    "to_grayscale",
    "gaussian_blur",
    "solarize",
    "normalize",
    "MultiCropAugmentation",
]

# Luma weights of ITU-R 601-2, the ones torchvision and PIL use for grayscale.
_LUMA = (0.299, 0.587, 0.114)

# Layout of the uniform draws of one crop (one stateless draw of _NUM_DRAWS numbers per crop).
_CROP_ATTEMPTS = (
    10  # torchvision's RandomResizedCrop tries 10 boxes, then falls back to a center crop
)
_FLIP = 4 * _CROP_ATTEMPTS
_JITTER_APPLY = _FLIP + 1
_JITTER_FACTORS = _JITTER_APPLY + 1  # 4 draws: brightness, contrast, saturation, hue
_JITTER_ORDER = (
    _JITTER_FACTORS + 4
)  # 4 draws whose argsort is the order of the four jitter operations
_GRAY = _JITTER_ORDER + 4
_BLUR_APPLY = _GRAY + 1
_BLUR_SIGMA = _BLUR_APPLY + 1
_SOLARIZE = _BLUR_SIGMA + 1
_NUM_DRAWS = _SOLARIZE + 1


def crop_box(height, width, u, scale, ratio):
    """torchvision's RandomResizedCrop box: 10 tries at once, the first that fits wins, else a center crop.

    `u` holds 40 uniforms per box, shape (..., 40); returns top, left, crop height, crop width, each of shape (...),
    so the boxes of all crops of an image come from one set of ops.
    """
    h_f = tf.cast(height, tf.float32)
    w_f = tf.cast(width, tf.float32)
    u = tf.reshape(u, tf.concat([tf.shape(u)[:-1], [_CROP_ATTEMPTS, 4]], 0))
    area = h_f * w_f * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = tf.exp(log_low + (log_high - log_low) * u[..., 1])
    crop_w = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
    crop_h = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
    ok = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    top = tf.cast(tf.floor(u[..., 2] * tf.cast(height - crop_h + 1, tf.float32)), tf.int32)
    left = tf.cast(tf.floor(u[..., 3] * tf.cast(width - crop_w + 1, tf.float32)), tf.int32)
    first = tf.argmax(tf.cast(ok, tf.int32), axis=-1, output_type=tf.int32)

    # Fallback (no try fits): the largest box of the clamped aspect ratio, centered.
    in_ratio = w_f / h_f
    fb_w = tf.where(
        in_ratio < ratio[0],
        width,
        tf.where(in_ratio > ratio[1], tf.cast(tf.round(h_f * ratio[1]), tf.int32), width),
    )
    fb_h = tf.where(in_ratio < ratio[0], tf.cast(tf.round(w_f / ratio[0]), tf.int32), height)
    fb_w = tf.clip_by_value(fb_w, 1, width)
    fb_h = tf.clip_by_value(fb_h, 1, height)
    fb_top = (height - fb_h) // 2
    fb_left = (width - fb_w) // 2

    found = tf.reduce_any(ok, axis=-1)

    def pick(tries, fallback):
        chosen = tf.gather(tries, first[..., None], axis=-1, batch_dims=len(first.shape))[..., 0]
        return tf.where(found, chosen, fallback)

    top, left = pick(top, fb_top), pick(left, fb_left)
    crop_h, crop_w = pick(crop_h, fb_h), pick(crop_w, fb_w)
    # U can round to 1.0 in float32; keep the box inside the image.
    top = tf.clip_by_value(top, 0, height - crop_h)
    left = tf.clip_by_value(left, 0, width - crop_w)
    return top, left, crop_h, crop_w


def random_resized_crop(
    image, size, seed, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), method="bicubic"
):
    """Crop a random box (area fraction in `scale`, log-uniform aspect in `ratio`) and resize it to size x size.

    torchvision's RandomResizedCrop: 10 tries, then a center crop of the clamped aspect ratio. Resizing is
    antialiased; values are clipped to [0, 1] afterwards (bicubic overshoots).

    Args:
        image: float32 tensor (H, W, C) in [0, 1].
        size: int. Output side.
        seed: int tensor (2,). Stateless seed.
        scale: (float, float), default (0.08, 1.0). Area fraction range.
        ratio: (float, float), default (3/4, 4/3). Aspect ratio (width / height) range.
        method: str, default "bicubic". A `tf.image.resize` method.

    Example:
        >>> random_resized_crop(tf.zeros([40, 30, 3]), 16, tf.constant([1, 2])).shape
        TensorShape([16, 16, 3])
    """
    u = tf.random.stateless_uniform([1, 4 * _CROP_ATTEMPTS], seed)
    return tf.clip_by_value(_resized_crops(image, size, u, scale, ratio, method)[0], 0.0, 1.0)


def _resized_crops(image, size, u, scale, ratio, method):
    """n resized crops (n, size, size, 3) before clipping (bicubic overshoots [0, 1]; the caller clips).

    `u` (n, 40): the uniforms of each crop's box.
    """
    shape = tf.shape(image)
    top, left, crop_h, crop_w = crop_box(shape[0], shape[1], u, scale, ratio)
    resized = []
    for i in range(u.shape[0]):
        crop = image[top[i] : top[i] + crop_h[i], left[i] : left[i] + crop_w[i]]
        resized.append(tf.image.resize(crop, [size, size], method=method, antialias=True))
    return tf.stack(resized)


def to_grayscale(image):
    """Return the luma (0.299 R + 0.587 G + 0.114 B) of RGB images, repeated over 3 channels.

    Args:
        image: float32 tensor (..., 3).

    Example:
        >>> to_grayscale(tf.ones([2, 2, 3])).shape
        TensorShape([2, 2, 3])
    """
    return tf.broadcast_to(_luma(image), tf.shape(image))


def _luma(x):
    return tf.reduce_sum(x * tf.constant(_LUMA, x.dtype), axis=-1, keepdims=True)


def _brightness(x, factor):
    return tf.clip_by_value(x * factor, 0.0, 1.0)


def _contrast(x, factor):
    return tf.clip_by_value(factor * x + (1.0 - factor) * tf.reduce_mean(_luma(x)), 0.0, 1.0)


def _saturation(x, factor):
    return tf.clip_by_value(factor * x + (1.0 - factor) * _luma(x), 0.0, 1.0)


def _hue(x, delta):
    hsv = tf.image.rgb_to_hsv(x)
    hue = tf.math.floormod(hsv[..., :1] + delta, 1.0)
    return tf.clip_by_value(tf.image.hsv_to_rgb(tf.concat([hue, hsv[..., 1:]], axis=-1)), 0.0, 1.0)


def _jitter(x, u_factors, u_order, brightness, contrast, saturation, hue):
    """ColorJitter of one image (H, W, 3): factors from 4 uniforms, order = argsort of 4 more uniforms.

    torchvision draws a random permutation of (brightness, contrast, saturation, hue) per call; each slot here
    is a `switch_case`, so only the chosen operation runs.
    """

    def factor(v, spread):
        low = max(0.0, 1.0 - spread)
        return low + (1.0 + spread - low) * v

    operations = [
        (_brightness, factor(u_factors[0], brightness)),
        (_contrast, factor(u_factors[1], contrast)),
        (_saturation, factor(u_factors[2], saturation)),
        (_hue, -hue + 2.0 * hue * u_factors[3]),
    ]
    order = tf.argsort(u_order)

    def apply_slot(slot, x):
        branches = [functools.partial(fn, x, value) for fn, value in operations]
        return slot + 1, tf.ensure_shape(tf.switch_case(order[slot], branches), x.shape)

    # A loop over the 4 slots, not 4 unrolled switches: XLA then compiles each operation once, not 4 times.
    _, x = tf.while_loop(lambda slot, x: slot < 4, apply_slot, (tf.constant(0), x))
    return x


def color_jitter(image, seed, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1):
    """Apply torchvision-style ColorJitter: four random factors, applied in a random order.

    Brightness scales the pixels, contrast blends toward the mean gray level, saturation toward the grayscale
    image, hue rotates the hue channel; factors are uniform in [max(0, 1 - x), 1 + x] (hue: [-hue, hue]).

    Args:
        image: float32 tensor (H, W, 3) in [0, 1].
        seed: int tensor (2,). Stateless seed.
        brightness: float, default 0.4.
        contrast: float, default 0.4.
        saturation: float, default 0.2.
        hue: float, default 0.1.

    Example:
        >>> color_jitter(tf.fill([4, 4, 3], 0.5), tf.constant([0, 1])).shape
        TensorShape([4, 4, 3])
    """
    u = tf.random.stateless_uniform([8], seed)
    x = tf.convert_to_tensor(image, tf.float32)
    return _jitter(x, u[:4], u[4:], brightness, contrast, saturation, hue)


def gaussian_blur(image, sigma, kernel_size=9):
    """Blur with a separable Gaussian kernel of side `kernel_size` and std `sigma` pixels, reflect padding.

    Matches torchvision's GaussianBlur: kernel exp(-x^2 / (2 sigma^2)) on x = -k//2 .. k//2, normalized.
    (A depthwise convolution: TensorFlow's CPU kernel for it is several times faster than XLA's convolution.
    Inside the XLA-compiled crop stage the same blur is written as sums of shifted slices, which XLA fuses.)

    Args:
        image: float32 tensor (H, W, C) with a known channel count.
        sigma: float or float32 scalar tensor. Standard deviation in pixels.
        kernel_size: int, default 9. Odd kernel side.

    Example:
        >>> gaussian_blur(tf.zeros([16, 16, 3]), 1.0).shape
        TensorShape([16, 16, 3])
    """
    half = kernel_size // 2
    taps = tf.range(-half, half + 1, dtype=tf.float32)
    kernel = tf.exp(-0.5 * tf.square(taps / tf.cast(sigma, tf.float32)))
    kernel = kernel / tf.reduce_sum(kernel)
    channels = image.shape[-1]
    padded = tf.pad(image[None], [[0, 0], [half, half], [half, half], [0, 0]], mode="REFLECT")
    vertical = tf.tile(tf.reshape(kernel, [kernel_size, 1, 1, 1]), [1, 1, channels, 1])
    horizontal = tf.tile(tf.reshape(kernel, [1, kernel_size, 1, 1]), [1, 1, channels, 1])
    out = tf.nn.depthwise_conv2d(padded, vertical, [1, 1, 1, 1], "VALID")
    out = tf.nn.depthwise_conv2d(out, horizontal, [1, 1, 1, 1], "VALID")
    return out[0]


def shifted_slices_blur(image, sigma, kernel_size=9):
    """`gaussian_blur` as sums of shifted slices: the same values, and the fast form inside XLA on CPU."""
    half = kernel_size // 2
    taps = tf.range(-half, half + 1, dtype=tf.float32)
    kernel = tf.exp(-0.5 * tf.square(taps / tf.cast(sigma, tf.float32)))
    kernel = kernel / tf.reduce_sum(kernel)
    height, width = image.shape[0], image.shape[1]
    padded = tf.pad(image, [[half, half], [0, 0], [0, 0]], mode="REFLECT")
    rows = tf.add_n([kernel[i] * padded[i : i + height] for i in range(kernel_size)])
    padded = tf.pad(rows, [[0, 0], [half, half], [0, 0]], mode="REFLECT")
    return tf.add_n([kernel[i] * padded[:, i : i + width] for i in range(kernel_size)])


def solarize(image, threshold=128.0):
    """Invert the pixels at or above `threshold` (on the 0-255 scale), like PIL's ImageOps.solarize.

    Example:
        >>> [round(float(v), 2) for v in solarize(tf.constant([0.2, 0.6, 1.0]))]
        [0.2, 0.4, 0.0]
    """
    return tf.where(image * 255.0 >= threshold, 1.0 - image, image)


def normalize(image, mean, std):
    """Return (image - mean) / std per channel.

    Example:
        >>> normalize(tf.ones([1, 1, 3]), (0.5,) * 3, (0.5,) * 3).numpy().tolist()
        [[[1.0, 1.0, 1.0]]]
    """
    return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


class MultiCropAugmentation:
    """The DINOv2 augmentation of one image: 2 global crops and N local crops, normalized.

    Every crop gets its own RandomResizedCrop and flip, color jitter (p 0.8; the four operations in a random order
    per crop, as torchvision does) and grayscale (p 0.2). Then global crop 1 is blurred with probability
    blur_probabilities[0] (intended 1.0); global crop 2 blurred with probability blur_probabilities[1] (0.1), then
    solarized with probability `solarize_probability` (0.2); local crops blurred with probability
    blur_probabilities[2] (0.5). Finally (x - mean) / std.

    Everything after the resize (clip, flip, jitter, grayscale, blur, solarize, normalization) runs as one
    XLA-compiled function per crop size when `jit_compile` is True: one call for the global crops, one loop over
    the local crops. On CPU that is several times faster than separate TensorFlow ops (whose broadcasting
    arithmetic on 3-channel pixels is slow), with the same values up to float rounding. The boxes of all crops
    are drawn by one set of ops; cropping and resizing (boxes of varying size) stay plain TensorFlow ops.

    Args:
        config: DataConfig or None, default None (`DataConfig()`: the ViT-14 recipe, 2 x 224 + 8 x 98).
        jit_compile: bool, default True. Compile the stage after the resize with XLA.

    Call arguments:
        image: float32 tensor (H, W, 3) in [0, 1].
        seed: int tensor (2,). Stateless seed; the crops of one image depend only on it.

    Returns:
        dict with "global_crops" float32 (2, G, G, 3) and "local_crops" float32 (n_local, L, L, 3).

    Example:
        >>> aug = MultiCropAugmentation(DataConfig.recipe("digits"))
        >>> out = aug(tf.random.uniform([40, 40, 3]), tf.constant([0, 7]))
        >>> out["global_crops"].shape, out["local_crops"].shape
        (TensorShape([2, 32, 32, 3]), TensorShape([8, 16, 16, 3]))
    """

    def __init__(self, config: DataConfig | None = None, jit_compile: bool = True):
        if config is None:
            config = DataConfig()
        if not isinstance(config, DataConfig):
            raise ValueError(
                f"MultiCropAugmentation: config must be a DataConfig; received {type(config).__name__}."
            )
        self.config = config
        self.jit_compile = bool(jit_compile)
        self.blur_probabilities = config.augmentation.resolved_blur_probabilities()
        self._compiled_finish = tf.function(
            self._finish_all, jit_compile=self.jit_compile, autograph=False
        )

    def _finish(self, x, draws, blur_probability, solarize_probability, may_blur, may_solarize):
        """Everything after the resize of one crop (S, S, 3): clip, flip, color jitter, grayscale, blur, solarize,
        normalize, driven by its row of uniform draws."""
        crops, aug = self.config.crops, self.config.augmentation
        x = tf.clip_by_value(x, 0.0, 1.0)  # bicubic overshoots
        if crops.flip_probability > 0:
            x = tf.cond(
                draws[_FLIP] < crops.flip_probability, lambda: tf.reverse(x, [1]), lambda: x
            )
        if aug.color_jitter_probability > 0:
            factors = draws[_JITTER_FACTORS : _JITTER_FACTORS + 4]
            order = draws[_JITTER_ORDER : _JITTER_ORDER + 4]
            x = tf.cond(
                draws[_JITTER_APPLY] < aug.color_jitter_probability,
                lambda: _jitter(
                    x, factors, order, aug.brightness, aug.contrast, aug.saturation, aug.hue
                ),
                lambda: x,
            )
        if aug.grayscale_probability > 0:
            x = tf.cond(
                draws[_GRAY] < aug.grayscale_probability, lambda: to_grayscale(x), lambda: x
            )
        if may_blur:
            low, high = aug.blur_sigma
            sigma = low + (high - low) * draws[_BLUR_SIGMA]
            # Shifted slices inside XLA (its convolution is slow on CPU); TensorFlow's depthwise kernel outside.
            blur = shifted_slices_blur if self.jit_compile else gaussian_blur
            x = tf.cond(
                draws[_BLUR_APPLY] < blur_probability,
                lambda: blur(x, sigma, aug.blur_kernel_size),
                lambda: x,
            )
        if may_solarize:
            x = tf.cond(
                draws[_SOLARIZE] < solarize_probability,
                lambda: solarize(x, aug.solarize_threshold),
                lambda: x,
            )
        return normalize(x, aug.mean, aug.std)

    def _finish_all(self, crops, draws, blur_probabilities, solarize_probabilities):
        """`_finish` of n crops of one size (n, S, S, 3), crop i driven by draws[i], in one compiled call."""
        # A loop over the crops (one compiled body, whatever their number); each crop's probabilities are values.
        blur = tf.constant(blur_probabilities, tf.float32)
        solarize = tf.constant(solarize_probabilities, tf.float32)
        may_blur, may_solarize = max(blur_probabilities) > 0, max(solarize_probabilities) > 0
        return tf.map_fn(
            lambda args: self._finish(args[0], args[1], args[2], args[3], may_blur, may_solarize),
            (crops, draws, blur, solarize),
            fn_output_signature=tf.TensorSpec(crops.shape[1:], tf.float32),
        )

    def crops(self, image, draws, size, scale, blur_probabilities, solarize_probabilities):
        """Augmented, normalized crops of side `size` (n, size, size, 3) of one image (see the class docstring).

        Args:
            image: float32 (H, W, 3) in [0, 1].
            draws: float32 (n, _NUM_DRAWS): row i drives every random choice of crop i.
            size: int. Output side.
            scale: (float, float). Area fraction range of the crop boxes.
            blur_probabilities: n floats.
            solarize_probabilities: n floats.
        """
        crops = self.config.crops
        resized = _resized_crops(
            image, size, draws[:, :_FLIP], scale, crops.aspect_ratio, crops.interpolation
        )
        return self._compiled_finish(
            tf.ensure_shape(resized, [len(blur_probabilities), size, size, 3]),
            draws,
            tuple(float(p) for p in blur_probabilities),
            tuple(float(p) for p in solarize_probabilities),
        )

    def __call__(self, image, seed):
        crops, aug = self.config.crops, self.config.augmentation
        image = tf.convert_to_tensor(image, tf.float32)
        n_local = crops.local_crops_number
        # One draw for all crops: row c drives crop c (0, 1 global; 2.. local).
        draws = tf.random.stateless_uniform([2 + n_local, _NUM_DRAWS], seed)
        g1, g2, local = self.blur_probabilities
        global_crops = self.crops(
            image,
            draws[:2],
            crops.global_crops_size,
            crops.global_crops_scale,
            (g1, g2),
            (0.0, aug.solarize_probability),
        )
        size = crops.local_crops_size
        if n_local:
            local_crops = self.crops(
                image,
                draws[2:],
                size,
                crops.local_crops_scale,
                (local,) * n_local,
                (0.0,) * n_local,
            )
        else:
            local_crops = tf.zeros([0, size, size, 3], tf.float32)
        return {"global_crops": global_crops, "local_crops": local_crops}
