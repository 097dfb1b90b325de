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
#: The submit routes after /mj/submit/. video, edits and upload-discord-images are served by the C#
#: midjourney-proxy only; a Java upstream answers them 404.
SUBMIT_KINDS = ("imagine", "action", "modal", "change", "simple-change", "describe", "blend", "shorten",
                "video", "edits", "upload-discord-images")
#: The face swap route (its own path, not under /mj/submit/), C# upstreams only.
SWAP_FACE_PATH = "/mj/insight-face/swap"
#: Submit answer code of an upstream that has no Discord account left to run the job on.
NO_ACCOUNT_CODE = 3
#: Generation speeds: a prefix's mode, and the modes an upstream's accountFilter understands.
PREFIX_MODES = {"/mj-fast": "FAST", "/mj-relax": "RELAX", "/mj-turbo": "TURBO"}
MODES = ("FAST", "RELAX", "TURBO")
#: Speed prefixes a client may put before /mj/...; accepted and stripped.
PREFIXES = ("", "/mj-fast", "/mj-relax", "/mj-turbo")
