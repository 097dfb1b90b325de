"""notifyHook delivery: a ticker notices status/progress changes, a sender POSTs them (no retries).

Faults ``push_duplicate`` and ``push_out_of_order`` repeat a snapshot or send the previous (older)
snapshot again right after a newer one, as real upstreams do.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import httpx

from mjctl.sim.engine import Engine

_STOP = object()


class Pusher:
    def __init__(self, engine: Engine, count: Callable[[str], None]):
        self.engine = engine
        self._count = count
        self._queue: queue.Queue[Any] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._start_lock = threading.Lock()

    def ensure_running(self) -> None:
        with self._start_lock:
            if self._threads and all(t.is_alive() for t in self._threads):
                return
            self._stop.clear()
            self._queue = queue.Queue()
            self._threads = [
                threading.Thread(target=self._tick_loop, name="sim-push-ticker", daemon=True),
                threading.Thread(target=self._send_loop, args=(self._queue,), name="sim-push-sender", daemon=True),
            ]
            for thread in self._threads:
                thread.start()

    def stop(self) -> None:
        with self._start_lock:
            self._stop.set()
            self._queue.put(_STOP)
            for thread in self._threads:
                thread.join(timeout=10)
            self._threads = []

    def _interval(self) -> float:
        return min(max(self.engine.settings.step_seconds / 4, 0.005), 0.25)

    def _tick_loop(self) -> None:
        while not self._stop.wait(self._interval()):
            self.tick()

    def tick(self) -> None:
        """Queue a push for every change since the last tick (public so tests can drive it)."""
        for hook, snapshot, previous in self.engine.changed_snapshots():
            self._queue.put((hook, snapshot))
            if self.engine.fault("push_duplicate"):
                self._count("push_duplicated")
                self._queue.put((hook, snapshot))
            if previous is not None and self.engine.fault("push_out_of_order"):
                self._count("push_out_of_order")
                self._queue.put((hook, previous))

    def _send_loop(self, jobs: queue.Queue[Any]) -> None:
        with httpx.Client(timeout=httpx.Timeout(5.0, connect=2.0)) as client:
            while True:
                job = jobs.get()
                if job is _STOP:
                    return
                hook, snapshot = job
                try:
                    response = client.post(hook, json=snapshot)
                    self._count("push_sent" if response.status_code < 400 else "push_failed")
                except httpx.HTTPError:
                    self._count("push_failed")
