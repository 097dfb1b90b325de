"""How much upstream-bound work one user may have in flight in this process.

The server caps upstream-bound requests as a whole (``[relay] max_in_flight``, see mjctl.httpserver); this
caps each user's share (``[relay] max_in_flight_per_user``), so one user with a script cannot take every
upstream slot from the others. Counted per process: with several workers a user may have that many in each.
"""

from __future__ import annotations

import threading


class UserGate:
    def __init__(self, limit: int):
        self.limit = limit
        self._lock = threading.Lock()
        self._counts: dict[int, int] = {}

    def acquire(self, user_id: int) -> bool:
        """Take one of user_id's slots; False when they have none left."""
        with self._lock:
            held = self._counts.get(user_id, 0)
            if held >= self.limit:
                return False
            self._counts[user_id] = held + 1
            return True

    def release(self, user_id: int) -> None:
        with self._lock:
            left = self._counts[user_id] - 1
            if left:
                self._counts[user_id] = left
            else:
                del self._counts[user_id]

    def held(self, user_id: int) -> int:
        with self._lock:
            return self._counts.get(user_id, 0)
