"""Facts of the midjourney-proxy protocol that the relay, the poller, the CLI and the simulator share.

docs/upstream.md describes the protocol; this module is the one home of its constants.
"""

from __future__ import annotations

#: Every status a task report may carry.
STATUSES = frozenset({"NOT_START", "SUBMITTED", "MODAL", "IN_PROGRESS", "SUCCESS", "FAILURE", "CANCEL"})
#: Statuses after which a task never changes again. A tuple: it is also bound into SQL `IN (...)` lists,
#: whose text must be the same in every process.
FINISHED_STATUSES = ("SUCCESS", "FAILURE", "CANCEL")
#: Submit answer codes that mean "accepted": 1 submitted, 21 waiting for a modal step, 22 queued.
ACCEPTED_CODES = frozenset({1, 21, 22})
#: The submit routes after /mj/submit/.
SUBMIT_KINDS = ("imagine", "action", "modal", "change", "simple-change", "describe", "blend", "shorten")
#: Speed prefixes a client may put before /mj/...; accepted and stripped.
PREFIXES = ("", "/mj-fast", "/mj-relax", "/mj-turbo")
