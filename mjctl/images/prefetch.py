"""Fetching finished images into the cache in the background, without ever blocking the caller."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from mjctl.images.common import ImageUnavailable
from mjctl.images.forward import ImageForwarder
from mjctl.images.urls import ImageSource

if TYPE_CHECKING:
    from mjctl.config import Settings
    from mjctl.models import Task

log = logging.getLogger("mjctl.images")


# -- prefetching -----------------------------------------------------------------------------------


class ImagePrefetcher:
    """Fetches finished tasks' images into the cache in the background.

    ``submit`` never blocks: it puts the task on a bounded queue and returns False (with a log line) when
    the queue is full. Worker threads (daemons, started on first use) look a task up by its row id (or by
    an mj_id that exactly one task has) in a connection of their own, or take a Task / ImageSource as
    given, and skip images already cached, under the task's key or (claimed) under its bare mj_id.
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
        key = self._key(item)
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
            key = self._key(item)
            with self._lock:
                self._busy += 1
                self._pending.discard(key)
            try:
                self._handle(item)
            except Exception:  # a worker must survive anything one task does
                self.counts["failed"] += 1
                log.exception("image prefetch of %s failed", key)
            finally:
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()

    def _key(self, item: int | str | ImageSource) -> str:
        """What makes two queued items the same download: a source's cache key (its task row), else the
        row id or mj_id it was queued by."""
        return self._forwarder.cache.key_for(item) if isinstance(item, ImageSource) else repr(item)

    def _handle(self, item: int | str | ImageSource) -> None:
        source = item if isinstance(item, ImageSource) else _lookup_source(item)
        if source is None or not source.final or not source.url:
            self.counts["skipped"] += 1
            return
        cache = self._forwarder.cache
        if cache.find(source) is not None or (cache.find(source.mj_id) is not None and _claim(cache, source)):
            self.counts["cached"] += 1
            return
        try:
            got = self._forwarder.fetch_to_cache(source)
        except ImageUnavailable as exc:
            self.counts["failed"] += 1
            log.warning("image prefetch of %s failed: %s", source.mj_id, exc.message)
            return
        self.counts["fetched" if got is not None else "skipped"] += 1


def _claim(cache, source: ImageSource) -> bool:
    """Whether a file cached under source's bare mj_id (by an earlier version) is now source's own: it is
    moved under source's key when source's task is the only one with that id (claim_legacy_file)."""
    from mjctl.db import connection
    from mjctl.images.cache import claim_legacy_file

    with connection():
        return claim_legacy_file(cache, source) is not None


def _lookup_source(key: int | str) -> ImageSource | None:
    """The ImageSource of a task by row id, or by an mj_id that exactly one task has (several tasks with
    the id: nothing, as nothing says which one was meant), read in a connection closed before any download."""
    from mjctl.db import connection
    from mjctl.models import Task
    from mjctl.tasks import sole_task

    with connection():
        task = Task.get_or_none(Task.id == key) if isinstance(key, int) else sole_task(key)
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
