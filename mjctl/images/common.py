"""Constants and errors shared by the image modules."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from mjctl.errors import MjctlError

if TYPE_CHECKING:
    pass


PURPOSE = "image"  # the crypto purpose of the first image links, signed over the upstream id alone
TASK_PURPOSE = "image-task"  # the crypto purpose of image links bound to a task row (row id and upstream id)
ROUTE = "/mj/image/"
ROW_PARAM = "t"  # the query parameter naming the task row in an image link
VIDEO_ROUTE = "/mj/video/"
VIDEO_PURPOSE = "video-task"  # the crypto purpose of video links (row id, upstream id and which video)
VIDEO_PARAM = "i"  # the query parameter naming which of a task's videos a video link opens
MAX_VIDEOS = 16  # videos per task that get links
#: Task ids the image endpoint accepts (upstream ids are 16 digits; leave room for other gateways; "~" is
#: in the ids migration 6 gave to duplicates, ``<mj_id>~<row id>``).
MJ_ID_RE = re.compile(r"[A-Za-z0-9_.:~-]{1,64}")  # use fullmatch: "$" would let a trailing newline through
READ_CHUNK = 256 * 1024  # chunks served from cache files
#: Content types kept in the cache, and the extension their files get.
EXTENSIONS = {
    "image/png": ".png", "image/jpeg": ".jpg", "image/gif": ".gif", "image/webp": ".webp",
    "image/avif": ".avif", "image/bmp": ".bmp", "image/tiff": ".tiff", "image/heic": ".heic",
    "video/mp4": ".mp4", "video/webm": ".webm", "video/quicktime": ".mov",
}
TYPES_BY_EXTENSION = {ext: ctype for ctype, ext in EXTENSIONS.items()}
_CACHE_NAME = re.compile(r"^[0-9a-f]{40}(" + "|".join(re.escape(e) for e in TYPES_BY_EXTENSION) + r")$")
TEMP_DIR = ".tmp"
STALE_TEMP_SECONDS = 3600  # a temp file this old belongs to a download that died with its process
IMMUTABLE = "private, max-age=31536000, immutable"
REVALIDATE = "private, no-cache"


class ImageUnavailable(MjctlError):
    """The upstream gave no usable image: unreachable, too slow, non-2xx, not an image, or too large."""

    http_status = 502


class ImageTooLarge(ImageUnavailable):
    """The image is larger than ``[images] max_bytes``."""


class ImageTruncated(ImageUnavailable):
    """The upstream failed after the first byte was passed on; the response must be aborted."""
