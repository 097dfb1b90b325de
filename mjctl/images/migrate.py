"""Copying a local image folder into an S3 store (`mjctl images migrate --to s3://…`).

Resumable: the bucket is listed one two-hex folder at a time and only the images it does not hold yet are
uploaded, each by one PUT (whole or not at all), so a migration stopped part-way (Ctrl-C, the store going
down) picks up where it stopped when run again. The local files are left in place.

Files that early versions cached under the bare upstream id are first moved under their task's key where
exactly one task has that id (as the local store does on first request): a bucket is only ever read by
task key.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from mjctl.images.cache import ImageCache, claim_legacy_file
from mjctl.images.s3 import S3Store
from mjctl.images.urls import ImageSource

#: progress(done, total, bytes copied so far), called after each image.
Progress = Callable[[int, int, int], None]


def claim_legacy_files(local: ImageCache) -> int:
    """Move the files of local named by a bare upstream id under the key of the one task with that id;
    how many were moved. Reads every succeeded task's id once (in a connection of its own)."""
    names = {image.key for image in local.entries()}
    if not names:
        return 0
    from mjctl.db import connection
    from mjctl.models import Task

    claimed = 0
    with connection():
        finished = Task.select().where((Task.status == "SUCCESS") & (Task.image_url != ""))
        for task in finished.iterator():
            if local.legacy_key(task.mj_id) in names and claim_legacy_file(local, ImageSource.from_task(task)):
                claimed += 1
    return claimed


def migrate(local: ImageCache, target: S3Store, progress: Progress | None = None) -> dict:
    """Upload every image of local that target lacks (after claim_legacy_files). Returns ``{"from", "to",
    "total", "copied", "copied_bytes", "skipped", "vanished", "claimed"}`` (skipped: already in the bucket;
    vanished: removed locally while the migration ran; claimed: legacy files moved under their task's key).
    Raises StoreUnavailable when the bucket cannot be listed or written: what was copied stays copied."""
    claimed = claim_legacy_files(local)
    total = sum(1 for _ in local.entries())
    result: dict[str, Any] = {"from": local.location, "to": target.location, "total": total, "copied": 0,
                              "copied_bytes": 0, "skipped": 0, "vanished": 0, "claimed": claimed}
    done = 0
    for folder, images in itertools.groupby(local.entries(), key=lambda image: image.key[:2]):
        there = target.names_in(folder)
        for image in images:
            if image.key in there:
                result["skipped"] += 1
            elif image.path is None or not image.path.exists():
                result["vanished"] += 1
            else:
                target.put_named(image.path, image.key, image.content_type)
                result["copied"] += 1
                result["copied_bytes"] += image.size
            done += 1
            if progress is not None:
                progress(done, total, result["copied_bytes"])
    return result
