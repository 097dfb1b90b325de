"""Real MP4 bytes for simulated video results.

The simulator ships one small clip (``clip.mp4``: VP9 in MP4, 64x64 pixels, one second, ``moov`` before
``mdat`` so a player can start and seek while it streams). Each task's video is that clip followed by a
``free`` box, which every MP4 reader skips: it makes the bytes differ per task (its key) and, for
benchmarks, pads the file to any size.
"""

from __future__ import annotations

import hashlib
import struct
from functools import cache
from importlib import resources

BOX_HEADER = 8


@cache
def clip() -> bytes:
    return resources.files("mjctl.sim").joinpath("clip.mp4").read_bytes()


def make_mp4(key: str, size: int | None = None) -> bytes:
    """A playable MP4 unique to key, ``size`` bytes long when size is larger than the clip plus 40 bytes."""
    base = clip()
    tag = hashlib.sha256(key.encode()).digest()
    length = max(BOX_HEADER + len(tag), (size or 0) - len(base))
    return base + struct.pack(">I", length) + b"free" + tag + bytes(length - BOX_HEADER - len(tag))
