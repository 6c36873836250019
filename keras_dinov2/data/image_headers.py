"""Image sizes read from file headers, without decoding: the guard against decompression bombs.

Decoders allocate what a header declares, so a tiny file can cost gigabytes (a 1.6 MB PNG declaring 23000 x 23000
pixels is 6 GB as float32). The data sources (in the tf.data graph) and `visualize.load_image` (here, in Python)
refuse files over a pixel limit before decoding them. Plain Python on bytes: no TensorFlow in this module.
"""

import io
import os

__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "image_header_size"]

# PIL's Image.MAX_IMAGE_PIXELS (a 1 GB buffer of 24-bit pixels / 4), the usual ceiling.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (not DHT, JPG, DAC)


def _jpeg_size(f):
    """(width, height) from the first start-of-frame segment of a JPEG stream positioned after its SOI."""
    for _ in range(10_000):  # segments before the frame header: APPn, COM, DQT, DHT...
        byte = f.read(1)
        if byte != b"\xff":  # segments follow each other directly
            return None
        while byte == b"\xff":  # fill bytes
            byte = f.read(1)
        if not byte:
            return None
        marker = byte[0]
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # no length field
            continue
        if marker in (0xD9, 0xDA):  # end of image or scan data before any frame header
            return None
        length = f.read(2)
        if len(length) < 2:
            return None
        length = int.from_bytes(length, "big")
        if marker in _JPEG_SOF:
            frame = f.read(5)
            if len(frame) < 5:
                return None
            return int.from_bytes(frame[3:5], "big"), int.from_bytes(frame[1:3], "big")
        if length < 2:
            return None
        f.seek(length - 2, os.SEEK_CUR)
    return None


def _signed32(value):
    return value - (1 << 32) if value >= 1 << 31 else value


def image_header_size(image):
    """(width, height) that an encoded image declares in its header, read without decoding it.

    Knows PNG (IHDR), JPEG (the first start-of-frame segment), GIF (logical screen), BMP (info header) and WebP
    (VP8, VP8L and VP8X chunks). Decoders allocate what the header declares, so this is what decoding would cost.

    Args:
        image: str or path-like (a file, of which only the header is read) or bytes.

    Returns:
        (width, height) as ints, or None when the format is not one of these or the header is cut short.

    Example:
        >>> image_header_size(b"GIF89a\x10\x00\x08\x00" + bytes(8))
        (16, 8)
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        f = io.BytesIO(bytes(image))
    else:
        f = open(os.fspath(image), "rb")
    with f:
        head = f.read(32).ljust(32, b"\0")
        if head.startswith(b"\x89PNG\r\n\x1a\n"):
            return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        if head.startswith(b"GIF8"):
            return int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")
        if head.startswith(b"BM"):
            if int.from_bytes(head[14:18], "little") == 12:  # OS/2 core header: 16-bit sides
                return int.from_bytes(head[18:20], "little"), int.from_bytes(head[20:22], "little")
            return (abs(_signed32(int.from_bytes(head[18:22], "little"))),
                    abs(_signed32(int.from_bytes(head[22:26], "little"))))
        if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
            chunk = head[12:16]
            if chunk == b"VP8X":
                return 1 + int.from_bytes(head[24:27], "little"), 1 + int.from_bytes(head[27:30], "little")
            if chunk == b"VP8L":
                b = head[21:25]
                return 1 + (b[0] | (b[1] & 0x3F) << 8), 1 + (b[1] >> 6 | b[2] << 2 | (b[3] & 0x0F) << 10)
            if chunk == b"VP8 ":
                return (int.from_bytes(head[26:28], "little") & 0x3FFF,
                        int.from_bytes(head[28:30], "little") & 0x3FFF)
            return None
        if head.startswith(b"\xff\xd8"):
            f.seek(2)
            return _jpeg_size(f)
    return None
