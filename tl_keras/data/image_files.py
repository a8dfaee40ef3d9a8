"""What an image file's first bytes say before it is decoded: its size and its EXIF orientation.

TensorFlow decodes pixels only: no TF op reads EXIF, so photos from phones would train sideways, and
decoding is the first moment TF learns an image's size, too late to refuse a 30,000 x 30,000 one.
Folder datasets and --mode=predict read both here, in plain Python, and apply the orientation with
`apply_orientation` after decoding.
"""

import struct

import tensorflow as tf

# JPEG markers that carry no length (standalone), and the start-of-frame markers that hold the size.
_STANDALONE = frozenset([0x01, *range(0xD0, 0xD9)])
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_SOS, _APP1, _ORIENTATION_TAG = 0xDA, 0xE1, 0x0112


def _jpeg_segments(data: bytes):
    """(marker, payload) of each JPEG segment before the image data; stops quietly where data ends."""
    if not data.startswith(b"\xff\xd8"):
        return
    i = 2
    while i + 1 < len(data):
        if data[i] != 0xFF:
            return
        marker = data[i + 1]
        if marker == 0xFF:  # Fill byte.
            i += 1
            continue
        i += 2
        if marker in _STANDALONE:
            continue
        if marker == _SOS or i + 2 > len(data):
            return
        (length,) = struct.unpack(">H", data[i:i + 2])
        yield marker, data[i + 2:i + length]
        i += length


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1..8) of JPEG bytes; 1 (as stored) when absent, unreadable or not a JPEG."""
    for marker, payload in _jpeg_segments(data):
        if marker == _APP1 and payload.startswith(b"Exif\x00\x00"):
            return _tiff_orientation(payload[6:])
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    try:
        order = {b"II": "<", b"MM": ">"}[tiff[:2]]
        magic, ifd = struct.unpack(order + "HI", tiff[2:8])
        if magic != 42:
            return 1
        (count,) = struct.unpack(order + "H", tiff[ifd:ifd + 2])
        for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
            tag, kind = struct.unpack(order + "HH", tiff[entry:entry + 4])
            if tag == _ORIENTATION_TAG and kind == 3:  # SHORT
                (value,) = struct.unpack(order + "H", tiff[entry + 8:entry + 10])
                return value if 1 <= value <= 8 else 1
    except (KeyError, struct.error):
        pass
    return 1


def header_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) that the first bytes of a JPEG, PNG, GIF, BMP or WebP file declare, else None.

    Enough to refuse an image over a pixel limit before decoding allocates it.
    """
    try:
        if data.startswith(b"\xff\xd8"):
            for marker, payload in _jpeg_segments(data):
                if marker in _SOF:
                    return struct.unpack(">HH", payload[1:5])
            return None
        if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR":
            width, height = struct.unpack(">II", data[16:24])
            return height, width
        if data[:6] in (b"GIF87a", b"GIF89a"):
            width, height = struct.unpack("<HH", data[6:10])
            return height, width
        if data.startswith(b"BM"):
            (header,) = struct.unpack("<I", data[14:18])
            if header == 12:  # OS/2 BITMAPCOREHEADER
                width, height = struct.unpack("<HH", data[18:22])
            else:
                width, height = struct.unpack("<ii", data[18:26])
            return abs(height), abs(width)  # A negative height means rows stored top-down.
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp_size(data)
    except struct.error:
        return None
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return height & 0x3FFF, width & 0x3FFF
    if chunk == b"VP8L" and data[20:21] == b"\x2f":
        (bits,) = struct.unpack("<I", data[21:25])
        return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return height, width
    return None


# The ops that undo each EXIF orientation (as PIL's ImageOps.exif_transpose does), on [..., H, W, C].
_UNDO = {
    1: lambda image: image,
    2: tf.image.flip_left_right,
    3: lambda image: tf.image.rot90(image, 2),
    4: tf.image.flip_up_down,
    5: tf.image.transpose,
    6: lambda image: tf.image.rot90(image, 3),
    7: lambda image: tf.image.rot90(tf.image.transpose(image), 2),
    8: lambda image: tf.image.rot90(image, 1),
}


def apply_orientation(image: tf.Tensor, orientation) -> tf.Tensor:
    """The image [H, W, C] (or a batch of them) turned upright for an EXIF orientation.

    `orientation` may be a Python int or a scalar int tensor (inside tf.data graphs); values outside
    1..8 leave the image as it is. Orientations 5 to 8 swap height and width.
    """
    if isinstance(orientation, int):
        return _UNDO.get(orientation, _UNDO[1])(image)
    index = tf.cast(orientation, tf.int32) - 1
    branches = [lambda o=o: _UNDO[o](image) for o in range(1, 9)]
    return tf.switch_case(index, branches, default=lambda: image)
