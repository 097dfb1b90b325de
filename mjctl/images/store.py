"""The result store: where finished images are kept, behind one interface with two backends.

- ``local`` (mjctl.images.cache.ImageCache): files under ``[images] cache_dir``; nothing to run.
- ``s3://BUCKET/PREFIX`` (mjctl.images.s3.S3Store): objects in a bucket every host reads and writes, so
  an image fetched by one host's poller is served by all of them after the upstream's link has expired.

Both key an image by its task row (``key_for``: a hash of row id and upstream id), write it whole or not
at all, and give it back streamed, whole or as one byte range. A store that cannot be reached raises
StoreUnavailable, which callers turn into one log line and, when nothing else can serve the image, a 502.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from mjctl.errors import MjctlError

if TYPE_CHECKING:
    from mjctl.config import Settings
    from mjctl.images.urls import ImageSource

#: An S3 bucket name (the rules every S3-compatible service accepts).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class StoreUnavailable(MjctlError):
    """The result store cannot be used right now: unreachable, too slow, no such bucket, refused
    credentials, a full disk. The message says which, without any secret."""

    http_status = 502


class RangeNotSatisfiable(Exception):
    """A byte range that starts past the end of the image; ``size`` is the image's length."""

    def __init__(self, size: int):
        super().__init__(f"range not satisfiable (size {size})")
        self.size = size


@dataclass(frozen=True)
class ByteRange:
    """One range of a ``Range: bytes=…`` header: first-last, first- (to the end) or -n (the last n)."""

    first: int | None
    last: int | None

    def header(self) -> str:
        return f"bytes={'' if self.first is None else self.first}-{'' if self.last is None else self.last}"

    def resolve(self, size: int) -> tuple[int, int]:
        """(start, end inclusive) within an image of size bytes; raises RangeNotSatisfiable."""
        if self.first is None:  # a suffix: the last n bytes
            if not self.last or size == 0:
                raise RangeNotSatisfiable(size)
            return max(0, size - self.last), size - 1
        if self.first >= size:
            raise RangeNotSatisfiable(size)
        return self.first, size - 1 if self.last is None else min(self.last, size - 1)


_RANGE = re.compile(r"^bytes=(\d{0,19})-(\d{0,19})$")


def parse_range(header: str | None) -> ByteRange | None:
    """The one byte range a Range header asks for; None for no header, several ranges or anything
    malformed, which are answered with the whole image as HTTP allows."""
    match = _RANGE.match((header or "").strip().replace(" ", ""))
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first = int(match.group(1)) if match.group(1) else None
    last = int(match.group(2)) if match.group(2) else None
    if first is not None and last is not None and last < first:
        return None
    return ByteRange(first, last)


@dataclass(frozen=True)
class StoredImage:
    """An image the store holds: its key, type, length and when it was written (epoch seconds)."""

    key: str
    content_type: str
    size: int
    mtime: float
    path: Path | None = None  # the file, for the local store


@dataclass
class StoredBody:
    """An image opened in the store: ``chunks`` are bytes start..end (inclusive) of size; close() releases
    the file or connection (also when iteration never started)."""

    content_type: str
    size: int
    start: int
    end: int
    chunks: Iterator[bytes]
    close: Callable[[], None] = field(default=lambda: None)

    @property
    def partial(self) -> bool:
        return (self.start, self.end) != (0, self.size - 1)


class ResultStore(Protocol):
    """What the forwarder, the prefetcher and ``mjctl images`` need of a store."""

    kind: str  # "local" or "s3"

    @property
    def location(self) -> str:
        """For people: the folder, or s3://bucket/prefix."""

    def key_for(self, source: ImageSource) -> str: ...

    def accepts(self, content_type: str) -> bool: ...

    def find(self, source: ImageSource | str) -> StoredImage | None: ...

    def open_image(self, source: ImageSource, byte_range: ByteRange | None = None) -> StoredBody | None: ...

    def put_file(self, path: Path, source: ImageSource, content_type: str) -> Path | None: ...

    def presign(self, source: ImageSource, seconds: int) -> str | None: ...

    def temp_file(self): ...

    def stats(self) -> dict: ...

    def prune(self, older_than_seconds: float, *, now: float | None = None) -> dict: ...


def row_key(source: ImageSource) -> str:
    """The name of a source's image: a hash of its row id and upstream id (never the upstream id alone,
    which repeats across channels).

    The upstream id is part of it so that a database recreated from scratch, whose row ids start again at
    1, never meets the images of the old one. A source without a row (made by hand for a URL) is keyed by
    its URL, which no other task's image has. A task's videos are keyed like its image plus their number."""
    if source.task_id is not None and source.video is not None:
        return hashed(f"task\0{int(source.task_id)}\0{source.mj_id}\0video\0{int(source.video)}")
    if source.task_id is not None:
        return hashed(f"task\0{int(source.task_id)}\0{source.mj_id}")
    return hashed(f"url\0{source.mj_id}\0{source.url}")


def hashed(material: str) -> str:
    return hashlib.sha256(material.encode("utf-8")).hexdigest()[:40]


def parse_store_url(value: str) -> tuple[str, str, str]:
    """(bucket, prefix, problem) of an ``s3://BUCKET/PREFIX`` setting; problem is "" when it is usable."""
    if not value.startswith("s3://"):
        return "", "", f"must be local or s3://BUCKET/PREFIX, not {value!r}."
    bucket, _, prefix = value[len("s3://"):].partition("/")
    if not _BUCKET.match(bucket) or ".." in bucket:
        return "", "", f"{bucket!r} is not an S3 bucket name (3-63 of a-z 0-9 . -)."
    prefix = prefix.strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        return "", "", f"the prefix {prefix!r} has an empty, . or .. part."
    return bucket, prefix, ""


def result_store(settings: Settings) -> ResultStore:
    """The store ``[images] store`` names (local unless it is an s3:// URL). Building the S3 client is
    deferred to its first call, so a process that never touches an image does not pay for it."""
    from mjctl.images.cache import ImageCache

    spool = ImageCache(settings.images.cache_dir)
    where = settings.images.store or "local"
    if where == "local":
        return spool
    from mjctl.images.s3 import S3Store

    return S3Store.from_settings(settings, spool)
