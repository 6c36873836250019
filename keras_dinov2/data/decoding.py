"""Decoding encoded images in the tf.data graph: files to float32 RGB, palette BMPs, and the pixel-count guard.

A header that declares more than `max_image_pixels` pixels raises before anything decodes it (a decompression bomb
is refused before any pixel buffer is allocated); the pipelines turn that error into a skipped, named file.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from keras_dinov2.data.image_headers import DEFAULT_MAX_IMAGE_PIXELS, image_header_size

__all__ = ["check_image_pixels", "decode_image_file", "explain_image_size", "header_pixels", "to_rgb_float"]


def to_rgb_float(image):
    """uint8 / float image with 1, 3 or 4 channels -> float32 RGB in [0, 1]."""
    if image.dtype != tf.float32:
        image = tf.image.convert_image_dtype(image, tf.float32)
    channels = image.shape[-1]
    if channels == 1:
        image = tf.tile(image, [1, 1, 3])
    elif channels == 4:
        image = image[..., :3]
    elif channels is None:
        raise ValueError("image channels must be known (1, 3 or 4).")
    return image


def _le_int(header, offset, dtype=tf.int32):
    size = {tf.int32: 4, tf.uint16: 2}[dtype]
    return tf.cast(tf.io.decode_raw(tf.strings.substr(header, offset, size), dtype)[0], tf.int32)


def _bmp_header(data):
    """The first 54 bytes of `data`, zero-padded, so that parsing a short file raises no error here."""
    return tf.strings.substr(tf.strings.join([tf.strings.substr(data, 0, 54), b"\0" * 54]), 0, 54)


def _is_indexed_bmp(data):
    """True for an uncompressed BMP with 1, 4 or 8 bits per pixel (colors from a palette)."""
    header = _bmp_header(data)
    bits = _le_int(header, 28, tf.uint16)
    return (
        tf.equal(tf.strings.substr(header, 0, 2), b"BM")
        & tf.equal(_le_int(header, 30), 0)
        & ((bits == 1) | (bits == 4) | (bits == 8))
    )


def _decode_indexed_bmp(data):
    """uint8 RGB (H, W, 3) of an uncompressed 1, 4 or 8 bit BMP, through its palette.

    TensorFlow's BMP decoder returns the palette indices of 8-bit files as gray levels and rejects 1 and 4-bit
    files; this reads the rows (padded to 4 bytes, bottom-up unless the height is negative), unpacks the indices
    and looks up the BGR(A) palette that follows the info header.
    """
    header = _bmp_header(data)
    width, height = _le_int(header, 18), _le_int(header, 22)
    rows = tf.abs(height)
    bits = _le_int(header, 28, tf.uint16)
    row_bytes = (bits * width + 31) // 32 * 4
    pixels = tf.io.decode_raw(
        tf.strings.substr(data, _le_int(header, 10), row_bytes * rows), tf.uint8
    )
    pixels = tf.reshape(pixels, [rows, row_bytes])
    per_byte = 8 // bits
    # The pixels of a byte, most significant bits first: shift right by (per_byte - 1 - j) * bits, mask.
    shifts = tf.cast((per_byte - 1 - tf.range(per_byte)) * bits, tf.uint8)
    indices = tf.bitwise.bitwise_and(
        tf.bitwise.right_shift(pixels[:, :, None], shifts[None, None, :]),
        tf.cast(tf.bitwise.left_shift(1, bits) - 1, tf.uint8),
    )
    indices = tf.reshape(indices, [rows, row_bytes * per_byte])[:, :width]
    indices = tf.cond(height > 0, lambda: tf.reverse(indices, [0]), lambda: indices)
    colors = _le_int(header, 46)
    colors = tf.where(colors > 0, colors, tf.bitwise.left_shift(1, bits))
    palette = tf.io.decode_raw(
        tf.strings.substr(data, 14 + _le_int(header, 14), 4 * colors), tf.uint8
    )
    palette = tf.reverse(tf.reshape(palette, [colors, 4])[:, :3], [1])  # BGR(A) -> RGB
    return tf.gather(palette, tf.cast(indices, tf.int32))

def _unsigned(head, offset, size, big_endian=False):
    """int64 value of the `size` bytes of `head` at `offset` (a string tensor long enough)."""
    values = tf.cast(tf.io.decode_raw(tf.strings.substr(head, offset, size), tf.uint8), tf.int64)
    weights = 256 ** np.arange(size, dtype=np.int64)
    return tf.reduce_sum(values * (weights[::-1] if big_endian else weights))


def header_pixels(data):
    """int64: width * height declared by the header of encoded image bytes (see `image_header_size`); 0 when
    the format is not recognized (decoding then fails or succeeds on its own)."""
    head = tf.strings.substr(tf.strings.join([tf.strings.substr(data, 0, 32), b"\0" * 32]), 0, 32)

    def starts(prefix, offset=0):
        return tf.equal(tf.strings.substr(head, offset, len(prefix)), prefix)

    def signed32(value):
        return tf.abs(tf.where(value >= 2**31, value - 2**32, value))

    u = lambda offset, size, big=False: _unsigned(head, offset, size, big)  # noqa: E731
    b = [u(21 + i, 1) for i in range(4)]  # the VP8L size bits
    candidates = [
        (starts(b"\x89PNG\r\n\x1a\n"), u(16, 4, True) * u(20, 4, True)),
        (starts(b"GIF8"), u(6, 2) * u(8, 2)),
        (starts(b"BM") & tf.equal(u(14, 4), 12), u(18, 2) * u(20, 2)),
        (starts(b"BM"), signed32(u(18, 4)) * signed32(u(22, 4))),
        (starts(b"RIFF") & starts(b"WEBPVP8X", 8), (1 + u(24, 3)) * (1 + u(27, 3))),
        (starts(b"RIFF") & starts(b"WEBPVP8L", 8),
         (1 + (b[0] + b[1] % 64 * 256)) * (1 + (b[1] // 64 + b[2] * 4 + b[3] % 16 * 1024))),
        (starts(b"RIFF") & starts(b"WEBPVP8 ", 8), (u(26, 2) % 16384) * (u(28, 2) % 16384)),
    ]
    pixels = tf.constant(0, tf.int64)
    for matches, count in reversed(candidates):  # the first match wins
        pixels = tf.where(matches, count, pixels)

    def jpeg_pixels():
        shape = tf.cast(tf.image.extract_jpeg_shape(data), tf.int64)
        return shape[0] * shape[1]

    return tf.cond(starts(b"\xff\xd8"), jpeg_pixels, lambda: pixels)


def check_image_pixels(data, max_image_pixels):
    """`data`, once its header is known to declare at most `max_image_pixels` pixels (else an error is raised
    before anything decodes it, which the pipelines turn into a skipped, named file). None: no limit."""
    if max_image_pixels is None:
        return data
    check = tf.debugging.assert_less_equal(
        header_pixels(data), tf.constant(max_image_pixels, tf.int64),
        message=f"the image header declares more pixels than max_image_pixels={max_image_pixels}",
    )
    with tf.control_dependencies([check]):
        return tf.identity(data)


def explain_image_size(max_image_pixels):
    """name (a file path) -> a note when its header declares more than `max_image_pixels` pixels."""

    def explain(name):
        size = image_header_size(name) if max_image_pixels is not None and os.path.isfile(name) else None
        if size is None or size[0] * size[1] <= max_image_pixels:
            return ""
        return (f"{size[0]} x {size[1]} = {size[0] * size[1]:,} pixels, over the limit of "
                f"{max_image_pixels:,}")

    return explain


def decode_image_file(path, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    """float32 RGB (H, W, 3) in [0, 1] of the image file at `path` (string tensor), any format `tf.io.decode_image`
    reads plus 1, 4 and 8-bit palette BMPs; raises (in the graph) when its header declares more than
    `max_image_pixels` pixels."""
    data = check_image_pixels(tf.io.read_file(path), max_image_pixels)
    image = tf.cond(
        _is_indexed_bmp(data),
        lambda: _decode_indexed_bmp(data),
        lambda: tf.io.decode_image(data, channels=3, expand_animations=False),
    )
    image.set_shape([None, None, 3])
    return tf.image.convert_image_dtype(image, tf.float32)
