"""Fetching finished images into the result store in the background, without ever blocking the caller."""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from mjctl.images.common import ImageUnavailable
from mjctl.images.forward import ImageForwarder
from mjctl.images.store import StoreUnavailable
from mjctl.images.urls import ImageSource

if TYPE_CHECKING:
    from mjctl.config import Settings
    from mjctl.models import Task

log = logging.getLogger("mjctl.images")

#: Seconds before each new attempt at an image the store could not take (about 40 minutes in all, well
#: within the day an upstream's link lives); then it is left to the first request for it.
RETRY_DELAYS = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 600.0, 600.0)


# -- prefetching -----------------------------------------------------------------------------------


class ImagePrefetcher:
    """Fetches finished tasks' images into the cache in the background.

    ``submit`` never blocks: it puts the task on a bounded queue and returns False (with a log line) when
    the queue is full. Worker threads (daemons, started on first use) look a task up by its row id (or by
    an mj_id that exactly one task has) in a connection of their own, or take a Task / ImageSource as
    given, and skip images already stored, under the task's key or (claimed) under its bare mj_id.

    When the store cannot be read or written (down, slow, refusing), the image is tried again later
    (``retry_delays``, one log line each time) by the same workers, with nothing blocked meanwhile; at most
    queue_size such retries wait at once. An upstream that cannot give the image is not retried.
    """

    def __init__(self, settings: Settings, *, workers: int = 2, queue_size: int = 1000,
                 forwarder: ImageForwarder | None = None, retry_delays: tuple[float, ...] = RETRY_DELAYS):
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
        self._retry_delays = tuple(retry_delays)
        self._retries: list[tuple[float, int, ImageSource, int]] = []  # (due, order, source, attempts so far)
        self._order = itertools.count()
        self.counts = {"fetched": 0, "cached": 0, "skipped": 0, "failed": 0, "dropped": 0, "retried": 0}

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

    def _next(self) -> tuple[int | str | ImageSource, int] | None:
        """The next item and how many attempts it has had: a retry that is due, else a queued item."""
        with self._lock:
            if self._retries and self._retries[0][0] <= time.monotonic():
                _due, _order, source, attempts = heapq.heappop(self._retries)
                self._busy += 1
                return source, attempts
        try:
            item = self._queue.get(timeout=0.2)
        except queue.Empty:
            return None
        with self._lock:
            self._busy += 1
            self._pending.discard(self._key(item))
        return item, 0

    def _run(self) -> None:
        while not self._stop.is_set():
            got = self._next()
            if got is None:
                continue
            item, attempts = got
            key = self._key(item)
            try:
                self._handle(item, attempts)
            except Exception:  # a worker must survive anything one task does
                self.counts["failed"] += 1
                log.exception("image prefetch of %s failed", key)
            finally:
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()

    def _key(self, item: int | str | ImageSource) -> str:
        """What makes two queued items the same download: a source's store key (its task row), else the
        row id or mj_id it was queued by."""
        return self._forwarder.store.key_for(item) if isinstance(item, ImageSource) else repr(item)

    def _handle(self, item: int | str | ImageSource, attempts: int = 0) -> None:
        source = item if isinstance(item, ImageSource) else _lookup_source(item)
        if source is None or not source.final or not source.url:
            self.counts["skipped"] += 1
            return
        store = self._forwarder.store
        try:
            if store.find(source) is not None or (store.find(source.mj_id) is not None and _claim(store, source)):
                self.counts["cached"] += 1
                return
            got = self._forwarder.fetch_to_cache(source)
        except StoreUnavailable as exc:
            self._retry(source, attempts, exc.message)
            return
        except ImageUnavailable as exc:
            self.counts["failed"] += 1
            log.warning("image prefetch of %s failed: %s", source.mj_id, exc.message)
            return
        self.counts["fetched" if got is not None else "skipped"] += 1

    def _retry(self, source: ImageSource, attempts: int, reason: str) -> None:
        """Try source again after the next delay, or give up (one log line either way)."""
        if attempts >= len(self._retry_delays):
            self.counts["failed"] += 1
            log.warning("image prefetch of %s given up after %d attempts: %s", source.mj_id, attempts + 1, reason)
            return
        delay = self._retry_delays[attempts]
        with self._lock:
            if len(self._retries) >= self._queue.maxsize:
                self.counts["dropped"] += 1
                log.warning("image prefetch of %s dropped (%d retries already waiting): %s", source.mj_id,
                            len(self._retries), reason)
                return
            heapq.heappush(self._retries, (time.monotonic() + delay, next(self._order), source, attempts + 1))
            self.counts["retried"] += 1
        log.warning("image prefetch of %s: %s; trying again in %g s", source.mj_id, reason, delay)

    def retries_waiting(self) -> int:
        """Images waiting to be tried again because the store could not take them."""
        with self._lock:
            return len(self._retries)


def _claim(cache: object, source: ImageSource) -> bool:
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
    """The process's prefetcher for this store and cache folder (created on first use)."""
    key = f"{settings.images.store}\0{settings.images.cache_dir}"
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
    """What the poller calls when a task reaches SUCCESS: queue its image and videos for the store without
    blocking.

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
        if task.status == "SUCCESS":
            for source in ImageSource.all_of(task):  # its image and each of its videos
                worker.submit(source)

    hook.prefetcher = worker  # type: ignore[attr-defined]
    return hook
