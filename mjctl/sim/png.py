"""Real PNG bytes for simulated results, built with zlib and struct only.

Small images (the default) are a compressed gradient tinted by the task id; large ones (``size`` bytes,
for benchmarks) are random-looking pixels stored with zlib level 0, so a 50 MB file costs little CPU.
"""

from __future__ import annotations

import hashlib
import random
import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def _png(width: int, height: int, raw_rows: bytes, level: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"".join(
        (PNG_SIGNATURE, _chunk(b"IHDR", ihdr), _chunk(b"IDAT", zlib.compress(raw_rows, level)), _chunk(b"IEND", b""))
    )


def colour_for(key: str) -> tuple[int, int, int]:
    digest = hashlib.sha256(key.encode()).digest()
    return digest[0], digest[1], digest[2]


def make_png(key: str, size: int | None = None) -> bytes:
    """A valid PNG that differs per ``key``; about ``size`` bytes when given, else a few KB."""
    if size is None or size <= 8192:
        return _small_png(key)
    return _large_png(key, size)


def _small_png(key: str, width: int = 64, height: int = 64) -> bytes:
    r, g, b = colour_for(key)
    noise = random.Random(key).randbytes(width * height)
    rows = bytearray()
    for y in range(height):
        rows.append(0)
        for x in range(width):
            n = noise[y * width + x] & 0x3F
            rows += bytes(((r + x * 2 + n) & 0xFF, (g + y * 2 + n) & 0xFF, (b + n) & 0xFF))
    return _png(width, height, bytes(rows), 9)


def _large_png(key: str, size: int, width: int = 1024) -> bytes:
    row_len = width * 3
    height = max(1, size // (row_len + 1))
    pixels = random.Random(key).randbytes(row_len * height)
    rows = bytearray((row_len + 1) * height)
    view = memoryview(pixels)
    for y in range(height):  # filter byte 0 (None) stays 0 at the start of each row
        start = y * (row_len + 1) + 1
        rows[start : start + row_len] = view[y * row_len : (y + 1) * row_len]
    return _png(width, height, bytes(rows), 0)
