"""Image forwarding: signed image URLs, the on-disk cache, and streaming a task's image from its upstream.

Upstream image links (Discord's CDN) expire after about a day. mjctl hands out its own URLs instead
(``<public_url>/mj/image/<mj_id>?sig=…``), streams the upstream body through in chunks (memory stays flat
whatever the size) and keeps a finished task's image on disk the first time it passes, so the URL keeps
working after the upstream link has died.

- The cache file of a task is named from a hash of its id (never from the id itself), one file per image,
  written to a temp file and renamed into place only when complete: a reader sees a whole image or none,
  and two concurrent first downloads leave one complete file.
- Only finished (SUCCESS) images are cached and served as immutable; a preview of a running task is
  forwarded live.
- Every upstream failure before the first byte is an ``ImageUnavailable`` (502). A failure after the
  first byte (the upstream breaks off, or sends more or less than it declared) raises ``ImageTruncated``
  from the iterator, and the caller must abort the connection rather than end the response normally.
- A body without a declared length is spooled to a temp file first (bounded by ``max_bytes``) so that
  it can be checked and served with a length — never presented truncated.

This module knows nothing of the web framework or the CLI.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import queue
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable, Iterator
from urllib.parse import quote

import httpx

from mjctl import __version__, crypto
from mjctl.errors import MjctlError

if TYPE_CHECKING:
    from mjctl.config import Settings
    from mjctl.models import Task

log = logging.getLogger("mjctl.images")

PURPOSE = "image"  # the crypto purpose of image signatures
ROUTE = "/mj/image/"
#: Task ids the image endpoint accepts (upstream ids are 16 digits; leave room for other gateways).
MJ_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
READ_CHUNK = 256 * 1024  # chunks served from cache files
#: Content types kept in the cache, and the extension their files get.
EXTENSIONS = {
    "image/png": ".png", "image/jpeg": ".jpg", "image/gif": ".gif", "image/webp": ".webp",
    "image/avif": ".avif", "image/bmp": ".bmp", "image/tiff": ".tiff", "image/heic": ".heic",
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


# -- signed URLs ---------------------------------------------------------------------------------------


def sign_image(secret: bytes, mj_id: str) -> str:
    """The ``sig`` parameter that opens the image of task mj_id."""
    return crypto.sign(secret, PURPOSE, mj_id)


def verify_image(secret: bytes, mj_id: str, sig: str | None) -> bool:
    """Whether sig was made for exactly this id (constant-time)."""
    return crypto.verify(secret, PURPOSE, mj_id, sig)


def public_base(settings: Settings) -> str:
    """``[server] public_url`` without a trailing slash; ``http://<host>:<port>`` when it is empty."""
    configured = (settings.server.public_url or "").strip()
    if configured:
        return configured.rstrip("/")
    host = settings.server.host or "127.0.0.1"
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.server.port}"


def image_url_for(settings: Settings) -> Callable[[Task], str] | None:
    """The function giving a task's forwarded image URL, or None when ``[images] forward`` is off.

    The URL is ``<public_url>/mj/image/<mj_id>?sig=<sig>``; callers apply it only to tasks that have an
    image (a task without one keeps "").
    """
    if not settings.images.forward:
        return None
    base = public_base(settings) + ROUTE
    secret = crypto.server_secret(settings)

    def image_url(task: Task) -> str:
        return f"{base}{quote(task.mj_id, safe='')}?sig={sign_image(secret, task.mj_id)}"

    return image_url


# -- what a request needs from the task row ---------------------------------------------------------


@dataclass(frozen=True)
class ImageSource:
    """A task's image as read from its row, so nothing after the lookup needs the database."""

    mj_id: str
    url: str
    final: bool  # the task succeeded: its image will not change, so it is cached and served as immutable

    @classmethod
    def from_task(cls, task: Task) -> ImageSource:
        return cls(mj_id=task.mj_id, url=task.image_url or "", final=task.status == "SUCCESS")

    @property
    def etag(self) -> str:
        """A strong validator known before any byte is fetched: the image behind one URL never changes."""
        digest = hashlib.sha256(f"{self.mj_id}\0{self.url}".encode()).hexdigest()[:32]
        return f'"{digest}"'


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an If-None-Match header names etag (weak comparison, as RFC 9110 asks for GET)."""
    if not if_none_match:
        return False
    value = if_none_match.strip()
    if value == "*":
        return True
    bare = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == bare for tag in value.split(","))


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


# -- streaming -------------------------------------------------------------------------------------


@dataclass
class ImageStream:
    """An open image: iterate for its bytes, then close (closing also releases the upstream connection
    and any temp file, even when iteration never started)."""

    content_type: str
    length: int | None
    etag: str
    cached: bool  # served from the cache
    final: bool
    chunks: Iterator[bytes]
    _cleanup: list[Callable[[], None]] = field(default_factory=list)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.chunks)

    def close(self) -> None:
        close = getattr(self.chunks, "close", None)
        if close is not None:
            close()
        while self._cleanup:
            try:
                self._cleanup.pop()()
            except Exception:  # noqa: BLE001 - cleanup must not mask the response's own outcome
                log.debug("image stream cleanup failed", exc_info=True)

    @property
    def cache_control(self) -> str:
        return IMMUTABLE if self.final else REVALIDATE


class ImageForwarder:
    """Opens task images from the cache or the upstream; one shared httpx client, safe across threads."""

    def __init__(self, settings: Settings, *, transport: httpx.BaseTransport | None = None):
        images = settings.images
        self.max_bytes = int(images.max_bytes)
        self.timeout = float(images.timeout)
        self.cache = ImageCache(images.cache_dir)
        self._client = httpx.Client(
            timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0)),
            follow_redirects=True,
            max_redirects=5,
            headers={"User-Agent": f"mjctl/{__version__}", "Accept": "image/*", "Accept-Encoding": "identity"},
            transport=transport,
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ImageForwarder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def open(self, source: ImageSource) -> ImageStream:
        """The image's bytes from the cache, or from the upstream (filling the cache when final).

        Raises ImageUnavailable before anything is read when the upstream cannot give a usable image.
        """
        if source.final:
            cached = self.cache.find(source.mj_id)
            if cached is not None:
                stream = self._file_stream(cached.path, cached.content_type, source, cached=True)
                if stream is not None:
                    return stream
        if not source.url:
            raise ImageUnavailable(f"Task {source.mj_id} has no image.")
        response = self._request(source)
        try:
            content_type = self._check(response, source)
            length = _declared_length(response)
        except BaseException:
            response.close()
            raise
        if length is None:
            return self._spool(response, source, content_type)
        chunks = self._tee(response, source, content_type, length)
        return ImageStream(content_type=response.headers.get("content-type", content_type), length=length,
                           etag=source.etag, cached=False, final=source.final, chunks=chunks,
                           _cleanup=[response.close])

    def fetch_to_cache(self, source: ImageSource) -> CachedImage | None:
        """Make sure a finished task's image is in the cache; returns it (None when it cannot be kept:
        the task is not finished or the type is not one the cache keeps). Raises ImageUnavailable."""
        if not source.final:
            return None
        cached = self.cache.find(source.mj_id)
        if cached is not None:
            return cached
        stream = self.open(source)
        try:
            for _chunk in stream:
                pass
        finally:
            stream.close()
        return self.cache.find(source.mj_id)

    def save(self, source: ImageSource, out: IO[bytes]) -> ImageStream:
        """Write the image to out; returns the (closed) stream describing it."""
        stream = self.open(source)
        try:
            for chunk in stream:
                out.write(chunk)
        finally:
            stream.close()
        return stream

    # -- internals ---------------------------------------------------------------------------------

    def _request(self, source: ImageSource) -> httpx.Response:
        try:
            request = self._client.build_request("GET", source.url)
            return self._client.send(request, stream=True)
        except httpx.TimeoutException:
            raise ImageUnavailable(
                f"The upstream did not deliver the image of task {source.mj_id} within {self.timeout:g} s.") from None
        except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
            raise ImageUnavailable(
                f"Cannot reach the upstream for the image of task {source.mj_id}: {_reason(exc)}.") from None

    def _check(self, response: httpx.Response, source: ImageSource) -> str:
        if not 200 <= response.status_code < 300:
            hint = " (its link has probably expired)" if response.status_code in (403, 404, 410) else ""
            raise ImageUnavailable(
                f"The upstream answered HTTP {response.status_code} for the image of task {source.mj_id}{hint}.")
        content_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if not content_type.startswith("image/"):
            raise ImageUnavailable(
                f"The upstream sent {content_type or 'no content type'} instead of an image for task {source.mj_id}.")
        length = _declared_length(response)
        if length is not None and length > self.max_bytes:
            raise ImageTooLarge(self._too_large(source))
        return content_type

    def _too_large(self, source: ImageSource) -> str:
        return f"The image of task {source.mj_id} is larger than the limit of {self.max_bytes} bytes."

    def _tee(self, response: httpx.Response, source: ImageSource, content_type: str,
             length: int) -> Iterator[bytes]:
        """Pass the body on chunk by chunk, copying it into a temp file that becomes the cache entry
        only when exactly `length` bytes arrived. A failed cache write never disturbs the client."""
        target = self.cache.path_for(source.mj_id, content_type) if source.final else None
        temp: IO[bytes] | None = None
        temp_path: Path | None = None
        received = 0
        try:
            if target is not None:
                try:
                    temp, temp_path = self.cache.temp_file()
                except OSError as exc:
                    log.warning("image cache unavailable (%s); forwarding %s without caching", exc, source.mj_id)
            try:
                for chunk in response.iter_raw():
                    received += len(chunk)
                    if received > length:
                        raise ImageTruncated(f"The upstream sent more than the {length} bytes it declared "
                                             f"for the image of task {source.mj_id}.")
                    if temp is not None:
                        try:
                            temp.write(chunk)
                        except OSError as exc:
                            log.warning("cannot write the image cache (%s); %s stays uncached", exc, source.mj_id)
                            temp = _discard(temp, temp_path)
                    yield chunk
            except httpx.HTTPError as exc:
                raise ImageTruncated(f"The upstream broke off the image of task {source.mj_id} after "
                                     f"{received} of {length} bytes: {_reason(exc)}.") from None
            if received != length:
                raise ImageTruncated(f"The upstream broke off the image of task {source.mj_id} after "
                                     f"{received} of {length} bytes.")
            if temp is not None and target is not None and temp_path is not None:
                temp.close()
                temp = None
                try:
                    self.cache.commit(temp_path, target)
                    temp_path = None
                except OSError as exc:
                    log.warning("cannot store the image of %s in the cache: %s", source.mj_id, exc)
        finally:
            response.close()
            _discard(temp, temp_path)

    def _spool(self, response: httpx.Response, source: ImageSource, content_type: str) -> ImageStream:
        """A body of unknown length: download it to a temp file (at most max_bytes), then serve that."""
        temp, temp_path = self.cache.temp_file()
        size = 0
        try:
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > self.max_bytes:
                    raise ImageTooLarge(self._too_large(source))
                temp.write(chunk)
            temp.close()
        except httpx.TimeoutException:
            _discard(temp, temp_path)
            raise ImageUnavailable(
                f"The upstream did not deliver the image of task {source.mj_id} within {self.timeout:g} s.") from None
        except httpx.HTTPError as exc:
            _discard(temp, temp_path)
            raise ImageUnavailable(
                f"The upstream broke off the image of task {source.mj_id}: {_reason(exc)}.") from None
        except BaseException:
            _discard(temp, temp_path)
            raise
        finally:
            response.close()
        target = self.cache.path_for(source.mj_id, content_type) if source.final else None
        if target is not None:
            try:
                path = self.cache.commit(temp_path, target)
            except OSError as exc:
                log.warning("cannot store the image of %s in the cache: %s", source.mj_id, exc)
            else:
                stream = self._file_stream(path, content_type, source, cached=False)
                if stream is not None:
                    return stream
        stream = self._file_stream(temp_path, content_type, source, cached=False, delete=True)
        if stream is None:
            raise ImageUnavailable(f"The image of task {source.mj_id} vanished while it was being served.")
        return stream

    def _file_stream(self, path: Path, content_type: str, source: ImageSource, *, cached: bool,
                     delete: bool = False) -> ImageStream | None:
        """Stream a file opened now (a concurrent prune cannot pull it away); None if it is gone."""
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed by the stream
        except FileNotFoundError:
            return None
        if delete:
            _unlink(path)  # the open handle keeps the bytes until it is closed
        size = os.fstat(fh.fileno()).st_size
        # Slicing a memory map copies from the page cache without a read() call per chunk: each call
        # gives the GIL away and, with many concurrent downloads, waits to get it back.
        try:
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except (OSError, ValueError):  # a file system without mmap: plain reads
            mapped = None

        def chunks() -> Iterator[bytes]:
            try:
                if mapped is None:
                    while block := fh.read(READ_CHUNK):
                        yield block
                    return
                for start in range(0, size, READ_CHUNK):
                    yield mapped[start:start + READ_CHUNK]
            finally:
                release()

        def release() -> None:
            if mapped is not None and not mapped.closed:
                mapped.close()
            fh.close()

        return ImageStream(content_type=content_type, length=size, etag=source.etag, cached=cached,
                           final=source.final, chunks=chunks(), _cleanup=[release])


def _declared_length(response: httpx.Response) -> int | None:
    """The body length the upstream declared, when it can be trusted to count the bytes we forward."""
    if response.headers.get("content-encoding", "identity").strip().lower() not in ("", "identity"):
        return None
    try:
        value = int(response.headers.get("content-length", ""))
    except ValueError:
        return None
    return value if value >= 0 else None


def _discard(fh: IO[bytes] | None, path: Path | None) -> None:
    if fh is not None:
        try:
            fh.close()
        except OSError:
            pass
    if path is not None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove the temp file %s: %s", path, exc)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__).rstrip(".")


# -- prefetching -----------------------------------------------------------------------------------


class ImagePrefetcher:
    """Fetches finished tasks' images into the cache in the background.

    ``submit`` never blocks: it puts the task on a bounded queue and returns False (with a log line) when
    the queue is full. Worker threads (daemons, started on first use) look a task up by id or mj_id in a
    connection of their own, or take a Task / ImageSource as given, and skip images already cached.
    """

    def __init__(self, settings: Settings, *, workers: int = 2, queue_size: int = 1000,
                 forwarder: ImageForwarder | None = None):
        self._forwarder = forwarder or ImageForwarder(settings)
        self._own_forwarder = forwarder is None
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._workers = max(1, workers)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._stop = threading.Event()
        self._idle = threading.Condition(self._lock)
        self._busy = 0
        self.counts = {"fetched": 0, "cached": 0, "skipped": 0, "failed": 0, "dropped": 0}

    def submit(self, item: int | str | Task | ImageSource) -> bool:
        """Queue a task (its row id, mj_id, Task or ImageSource) for prefetching; False when dropped."""
        if self._stop.is_set():
            return False
        if not isinstance(item, (int, str, ImageSource)):
            item = ImageSource.from_task(item)
        key = item.mj_id if isinstance(item, ImageSource) else repr(item)
        with self._lock:
            if key in self._pending:
                return True
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                self.counts["dropped"] += 1
                log.warning("image prefetch queue is full (%d); dropped %s", self._queue.maxsize, key)
                return False
            self._pending.add(key)
            self._start_workers()
        return True

    def _start_workers(self) -> None:
        while len(self._threads) < self._workers:
            thread = threading.Thread(target=self._run, name=f"image-prefetch-{len(self._threads)}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted so far has been handled (tests, orderly shutdown)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the workers after their current download; queued tasks are dropped."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        if self._own_forwarder:
            self._forwarder.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            key = item.mj_id if isinstance(item, ImageSource) else repr(item)
            with self._lock:
                self._busy += 1
                self._pending.discard(key)
            try:
                self._handle(item)
            except Exception:  # noqa: BLE001 - a worker must survive anything one task does
                self.counts["failed"] += 1
                log.exception("image prefetch of %s failed", key)
            finally:
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()

    def _handle(self, item: int | str | ImageSource) -> None:
        source = item if isinstance(item, ImageSource) else _lookup_source(item)
        if source is None or not source.final or not source.url:
            self.counts["skipped"] += 1
            return
        if self._forwarder.cache.find(source.mj_id) is not None:
            self.counts["cached"] += 1
            return
        try:
            got = self._forwarder.fetch_to_cache(source)
        except ImageUnavailable as exc:
            self.counts["failed"] += 1
            log.warning("image prefetch of %s failed: %s", source.mj_id, exc.message)
            return
        self.counts["fetched" if got is not None else "skipped"] += 1


def _lookup_source(key: int | str) -> ImageSource | None:
    """The ImageSource of a task by row id or mj_id, read in a connection closed before any download."""
    from mjctl.db import connection
    from mjctl.models import Task

    with connection():
        if isinstance(key, int):
            task = Task.get_or_none(Task.id == key)
        else:
            task = Task.select().where(Task.mj_id == key).order_by(Task.id.desc()).first()
        return ImageSource.from_task(task) if task is not None else None


_shared: dict[str, ImagePrefetcher] = {}
_shared_lock = threading.Lock()


def shared_prefetcher(settings: Settings) -> ImagePrefetcher:
    """The process's prefetcher for this cache folder (created on first use)."""
    key = str(settings.images.cache_dir)
    with _shared_lock:
        prefetcher = _shared.get(key)
        if prefetcher is None or prefetcher._stop.is_set():
            prefetcher = _shared[key] = ImagePrefetcher(settings)
        return prefetcher


def stop_shared_prefetchers(timeout: float = 5.0) -> None:
    with _shared_lock:
        prefetchers = list(_shared.values())
        _shared.clear()
    for prefetcher in prefetchers:
        prefetcher.stop(timeout)


def prefetch_hook(settings: Settings, prefetcher: ImagePrefetcher | None = None) -> Callable[[Task], None]:
    """What the poller calls when a task reaches SUCCESS: queue its image for the cache without blocking.

    Uses the process's shared prefetcher unless one is given (``hook.prefetcher`` is the one in use).
    With ``[images] forward = false`` nothing is served from the cache, so the hook does nothing.
    """
    if not settings.images.forward:
        def ignore(task: Task) -> None:
            return None

        ignore.prefetcher = None  # type: ignore[attr-defined]
        return ignore
    worker = prefetcher or shared_prefetcher(settings)

    def hook(task: Task) -> None:
        if task.status == "SUCCESS" and task.image_url:
            worker.submit(ImageSource.from_task(task))

    hook.prefetcher = worker  # type: ignore[attr-defined]
    return hook
