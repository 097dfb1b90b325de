"""The on-disk cache: one file per finished image, named from a hash of the id, written atomically."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Iterator

from mjctl.images.common import _CACHE_NAME, EXTENSIONS, STALE_TEMP_SECONDS, TEMP_DIR, TYPES_BY_EXTENSION

if TYPE_CHECKING:
    pass


# -- the cache ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CachedImage:
    path: Path
    content_type: str
    size: int
    mtime: float


class ImageCache:
    """Finished images on disk: ``<dir>/<h[:2]>/<h>.<ext>`` with h a hash of the task id."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    @staticmethod
    def key(mj_id: str) -> str:
        return hashlib.sha256(mj_id.encode("utf-8")).hexdigest()[:40]

    def path_for(self, mj_id: str, content_type: str) -> Path | None:
        """Where the image of mj_id with this content type lives; None for a type the cache does not keep."""
        ext = EXTENSIONS.get(content_type)
        if ext is None:
            return None
        key = self.key(mj_id)
        return self.directory / key[:2] / f"{key}{ext}"

    def find(self, mj_id: str) -> CachedImage | None:
        key = self.key(mj_id)
        folder = self.directory / key[:2]
        for ext, content_type in TYPES_BY_EXTENSION.items():
            path = folder / f"{key}{ext}"
            try:
                st = path.stat()
            except OSError:
                continue
            return CachedImage(path, content_type, st.st_size, st.st_mtime)
        return None

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

    def prune(self, older_than_seconds: float, *, now: float | None = None) -> dict:
        """Delete images cached more than older_than_seconds ago, and temp files left by dead downloads.

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
            if age > older_than_seconds:
                if _unlink(path):
                    result["removed"] += 1
                    result["removed_bytes"] += st.st_size
            else:
                result["kept"] += 1
                result["kept_bytes"] += st.st_size
        return result

    def stats(self) -> dict:
        """``{"directory", "files", "bytes", "oldest", "newest", "temp_files", "temp_bytes"}`` (times in
        epoch seconds, 0 when empty)."""
        out = {"directory": str(self.directory), "files": 0, "bytes": 0, "oldest": 0, "newest": 0,
               "temp_files": 0, "temp_bytes": 0}
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


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False
