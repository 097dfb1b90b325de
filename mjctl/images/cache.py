"""The on-disk cache: one file per finished image, named from a hash of its task's row, written atomically.

Files are keyed by the task row (its id, and its upstream id), never by the upstream id alone: upstream ids
repeat across channels, and a cache keyed by them served one user's image for another's task. Earlier
versions did key files by the upstream id; such a file is still used, and moved under its task's key, when
exactly one task has that id (claim_legacy_file) — it cannot be fetched again once the upstream's link has
expired, but with several tasks sharing the id nothing says whose image it is.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from mjctl.images.common import (
    _CACHE_NAME,
    EXTENSIONS,
    READ_CHUNK,
    STALE_TEMP_SECONDS,
    TEMP_DIR,
    TYPES_BY_EXTENSION,
)
from mjctl.images.store import ByteRange, StoredBody, StoredImage, hashed, row_key

if TYPE_CHECKING:
    from mjctl.images.urls import ImageSource

log = logging.getLogger("mjctl.images")


# -- the cache ---------------------------------------------------------------------------------------


class ImageCache:
    """The local result store: finished images on disk, ``<dir>/<h[:2]>/<h>.<ext>`` with h a hash of the
    task's row (key_for). Its ``.tmp`` folder also receives the downloads an S3 store uploads."""

    kind = "local"

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    @property
    def location(self) -> str:
        return str(self.directory)

    @staticmethod
    def key_for(source: ImageSource) -> str:
        """The file name (without extension) of a source's image: see mjctl.images.store.row_key."""
        return row_key(source)

    @staticmethod
    def legacy_key(mj_id: str) -> str:
        """The legacy file name: the image of upstream id mj_id keyed by that id alone, whichever task it was."""
        return hashed(mj_id)

    @staticmethod
    def accepts(content_type: str) -> bool:
        return content_type in EXTENSIONS

    def path_for(self, source: ImageSource, content_type: str) -> Path | None:
        """Where the image of source with this content type lives; None for a type the cache does not keep."""
        return self._path(self.key_for(source), content_type)

    def _path(self, key: str, content_type: str) -> Path | None:
        ext = EXTENSIONS.get(content_type)
        if ext is None:
            return None
        return self.directory / key[:2] / f"{key}{ext}"

    def find(self, source: ImageSource | str) -> StoredImage | None:
        """The cached image of source; given a bare upstream id, its legacy file."""
        return self._find_key(self.legacy_key(source) if isinstance(source, str) else self.key_for(source))

    def _find_key(self, key: str) -> StoredImage | None:
        folder = self.directory / key[:2]
        for ext, content_type in TYPES_BY_EXTENSION.items():
            path = folder / f"{key}{ext}"
            try:
                st = path.stat()
            except OSError:
                continue
            return StoredImage(key, content_type, st.st_size, st.st_mtime, path)
        return None

    def adopt(self, legacy: StoredImage, source: ImageSource) -> StoredImage | None:
        """Move a legacy file under source's key (an atomic rename); the file now there, or None when the
        move failed. Only for a source whose upstream id belongs to it alone: see claim_legacy_file."""
        target = self.path_for(source, legacy.content_type)
        if target is None or legacy.path is None:
            return None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(legacy.path, target)
        except FileNotFoundError:  # another request moved it first
            return self.find(source)
        except OSError as exc:
            log.warning("cannot move the cached image %s under its task's key: %s", legacy.path.name, exc)
            return None
        return self.find(source)

    def temp_file(self) -> tuple[IO[bytes], Path]:
        """A new, exclusive temp file inside the cache folder (so the final rename is atomic)."""
        folder = self.directory / TEMP_DIR
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="img-", suffix=".part", dir=folder)
        return os.fdopen(fd, "wb"), Path(name)

    def commit(self, temp: Path, target: Path) -> Path:
        """Move a complete temp file into place atomically; a concurrent writer of the same image just
        replaces an identical file."""
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, target)
        return target

    def put_file(self, path: Path, source: ImageSource, content_type: str) -> Path | None:
        """Keep a complete temp file (of this folder) as source's image: renamed into place, whole or not at
        all. Returns the file now there; raises StoreUnavailable when the disk refuses."""
        from mjctl.images.store import StoreUnavailable

        target = self.path_for(source, content_type)
        if target is None:
            return None
        try:
            return self.commit(path, target)
        except OSError as exc:
            raise StoreUnavailable(f"cannot write {self.directory}: {exc.strerror or exc}") from None

    def open_image(self, source: ImageSource, byte_range: ByteRange | None = None) -> StoredBody | None:
        """Source's image (or one range of it), opened now so that a concurrent prune cannot pull it away;
        None when there is none or it cannot be read (an unreadable file is a miss, with a log line)."""
        found = self.find(source)
        return open_file(found.path, found.content_type, byte_range) if found is not None and found.path else None

    @staticmethod
    def presign(source: ImageSource, seconds: int) -> str | None:
        """Files have no links of their own: images are always served through mjctl."""
        return None

    def entries(self) -> Iterator[StoredImage]:
        """Every image kept here (temp files left out), for `mjctl images migrate`."""
        for path, st, temp in self._entries():
            if not temp:
                key, ext = path.name.split(".", 1)
                yield StoredImage(key, TYPES_BY_EXTENSION["." + ext], st.st_size, st.st_mtime, path)

    def _entries(self) -> Iterator[tuple[Path, os.stat_result, bool]]:
        """(path, stat, is_temp) for every file mjctl wrote here; anything else in the folder is left alone."""
        if not self.directory.is_dir():
            return
        with os.scandir(self.directory) as top:
            for entry in top:
                if not entry.is_dir(follow_symlinks=False):
                    continue
                temp = entry.name == TEMP_DIR
                if not temp and not re.fullmatch(r"[0-9a-f]{2}", entry.name):
                    continue
                with os.scandir(entry.path) as inner:
                    for item in inner:
                        if not item.is_file(follow_symlinks=False):
                            continue
                        if temp and not (item.name.startswith("img-") and item.name.endswith(".part")):
                            continue
                        if not temp and not _CACHE_NAME.match(item.name):
                            continue
                        try:
                            yield Path(item.path), item.stat(follow_symlinks=False), temp
                        except FileNotFoundError:
                            continue

    def prune(self, older_than_seconds: float, *, now: float | None = None, temp_only: bool = False) -> dict:
        """Delete images cached more than older_than_seconds ago, and temp files left by dead downloads
        (temp_only: only those, as when this folder only spools for an S3 store).

        Returns ``{"removed", "removed_bytes", "kept", "kept_bytes", "temp_removed"}``.
        """
        now = time.time() if now is None else now
        result = {"removed": 0, "removed_bytes": 0, "kept": 0, "kept_bytes": 0, "temp_removed": 0}
        for path, st, temp in list(self._entries()):
            age = now - st.st_mtime
            if temp:
                if age > max(STALE_TEMP_SECONDS, older_than_seconds):
                    if _unlink(path):
                        result["temp_removed"] += 1
                continue
            if temp_only:
                continue
            if age > older_than_seconds:
                if _unlink(path):
                    result["removed"] += 1
                    result["removed_bytes"] += st.st_size
            else:
                result["kept"] += 1
                result["kept_bytes"] += st.st_size
        return result

    def stats(self) -> dict:
        """``{"store", "directory", "files", "bytes", "oldest", "newest", "temp_files", "temp_bytes"}`` (times
        in epoch seconds, 0 when empty)."""
        out: dict[str, Any] = {"store": self.location, "directory": str(self.directory), "files": 0, "bytes": 0,
                               "oldest": 0, "newest": 0, "temp_files": 0, "temp_bytes": 0}
        oldest = newest = None
        for _path, st, temp in self._entries():
            if temp:
                out["temp_files"] += 1
                out["temp_bytes"] += st.st_size
                continue
            out["files"] += 1
            out["bytes"] += st.st_size
            oldest = st.st_mtime if oldest is None else min(oldest, st.st_mtime)
            newest = st.st_mtime if newest is None else max(newest, st.st_mtime)
        out["oldest"], out["newest"] = int(oldest or 0), int(newest or 0)
        return out


def open_file(path: Path, content_type: str, byte_range: ByteRange | None = None, *,
              delete: bool = False) -> StoredBody | None:
    """A file's bytes (all, or one range) as a StoredBody, or None when it cannot be opened. delete: the
    name is removed at once (the open handle keeps the bytes until closed). Raises RangeNotSatisfiable."""
    try:
        fh = open(path, "rb")  # closed by the body's close()
    except FileNotFoundError:
        return None
    except OSError as exc:  # an unreadable cache file is a miss: the upstream is asked instead
        log.warning("cannot read the cached image %s: %s", path.name, exc)
        return None
    if delete:
        _unlink(path)
    size = os.fstat(fh.fileno()).st_size
    try:
        start, end = byte_range.resolve(size) if byte_range is not None else (0, size - 1)
    except BaseException:
        fh.close()
        raise
    # Slicing a memory map copies from the page cache without a read() call per chunk: each call gives the
    # GIL away and, with many concurrent downloads, waits to get it back.
    try:
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None
    except (OSError, ValueError):  # a file system without mmap: plain reads
        mapped = None

    def chunks() -> Iterator[bytes]:
        try:
            if mapped is None:
                fh.seek(start)
                left = end + 1 - start
                while left > 0 and (block := fh.read(min(READ_CHUNK, left))):
                    left -= len(block)
                    yield block
                return
            for at in range(start, end + 1, READ_CHUNK):
                yield mapped[at:min(at + READ_CHUNK, end + 1)]
        finally:
            release()

    def release() -> None:
        if mapped is not None and not mapped.closed:
            mapped.close()
        fh.close()

    return StoredBody(content_type, size, start, end, chunks(), release)


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False


def claim_legacy_file(cache: object, source: ImageSource) -> StoredImage | None:
    """On a miss under source's own key, the legacy file keyed by its bare upstream id,
    moved under source's key — but only when source's task is the one task with that upstream id (else
    nothing says whose image the file is, and it is left alone). None when there is nothing to claim.

    Reads the database (mjctl.tasks.sole_task) only when such a file exists: call it inside a connection,
    before any upstream is contacted. Only the local store has such files (an S3 store: nothing, and no
    request is made)."""
    if not isinstance(cache, ImageCache) or not source.final or source.task_id is None or source.video is not None:
        return None  # legacy files are images: a video never claims one
    if cache.find(source) is not None:
        return None
    legacy = cache.find(source.mj_id)
    if legacy is None:
        return None
    from mjctl.tasks import sole_task

    sole = sole_task(source.mj_id)
    if sole is None or sole.id != source.task_id:
        return None
    return cache.adopt(legacy, source)
