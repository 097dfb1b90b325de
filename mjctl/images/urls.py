"""Signed image URLs, and what a request needs from a task row (ImageSource, ETags)."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote

from mjctl import crypto
from mjctl.images.common import (
    MAX_VIDEOS,
    PURPOSE,
    ROUTE,
    ROW_PARAM,
    TASK_PURPOSE,
    VIDEO_PARAM,
    VIDEO_PURPOSE,
    VIDEO_ROUTE,
)

if TYPE_CHECKING:
    from mjctl.config import Settings
    from mjctl.models import Task
    from mjctl.tasks import TaskRow


# -- signed URLs ---------------------------------------------------------------------------------------

URL_CACHE_SIZE = 16384  # signed URLs kept per app (about 3 MB): 160 pages of 100 items


def sign_image(secret: bytes, mj_id: str) -> str:
    """The ``sig`` of a legacy link, signed over the upstream id alone (links handed out before tasks were
    told apart by their rows). Still verified, never made any more: see verify_image."""
    return crypto.sign(secret, PURPOSE, mj_id)


def verify_image(secret: bytes, mj_id: str, sig: str | None) -> bool:
    """Whether sig is a legacy link's signature for exactly this id (constant-time). Such a link opens the
    image only while one task has the id: it does not say which task it was made for."""
    return crypto.verify(secret, PURPOSE, mj_id, sig)


def _task_message(task_id: int, mj_id: str) -> str:
    # The row id is digits, so the first ":" ends it whatever the upstream id holds.
    return f"{int(task_id)}:{mj_id}"


def sign_task_image(secret: bytes, task_id: int, mj_id: str) -> str:
    """The ``sig`` that opens the image of the task in row task_id, whose upstream id is mj_id. Signed
    over both, under a purpose of its own, so it opens that row only (never another task that has or
    later gets the same upstream id) and can never pass for a legacy signature or the reverse."""
    return crypto.sign(secret, TASK_PURPOSE, _task_message(task_id, mj_id))


def verify_task_image(secret: bytes, task_id: int, mj_id: str, sig: str | None) -> bool:
    """Whether sig was made by sign_task_image for exactly this row and id (constant-time)."""
    return crypto.verify(secret, TASK_PURPOSE, _task_message(task_id, mj_id), sig)


def _video_message(task_id: int, mj_id: str, index: int) -> str:
    return f"{int(task_id)}:{int(index)}:{mj_id}"


def sign_task_video(secret: bytes, task_id: int, mj_id: str, index: int) -> str:
    """The ``sig`` that opens video number index of the task in row task_id (purpose of its own, so an
    image link's signature never opens a video or the reverse)."""
    return crypto.sign(secret, VIDEO_PURPOSE, _video_message(task_id, mj_id, index))


def verify_task_video(secret: bytes, task_id: int, mj_id: str, index: int, sig: str | None) -> bool:
    return crypto.verify(secret, VIDEO_PURPOSE, _video_message(task_id, mj_id, index), sig)


def video_list(video_url: str | None, video_urls: str | None) -> list[str]:
    """A task's videos in link order: video_url, then the entries of video_urls (a JSON array of URLs) that
    are not the same URL; at most MAX_VIDEOS."""
    urls = [video_url] if video_url else []
    try:
        listed = json.loads(video_urls) if video_urls else []
    except ValueError:
        listed = []
    for entry in listed if isinstance(listed, list) else []:
        if isinstance(entry, str) and entry and entry not in urls:
            urls.append(entry)
    return urls[:MAX_VIDEOS]


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


def image_url_for(settings: Settings) -> ResultLinks | None:
    """The function giving a task's forwarded image URL, or None when ``[images] forward`` is off.

    The URL is ``<public_url>/mj/image/<mj_id>?t=<row id>&sig=<sig>``, the signature over the row id and
    the upstream id (sign_task_image): upstream ids repeat across channels, so a link names its task by
    row. The upstream id stays in the path for people and tools that read it. Callers apply the function
    only to tasks that have an image (a task without one keeps ""); a task not yet stored has no link.
    """
    if not settings.images.forward:
        return None
    return ResultLinks(public_base(settings), crypto.server_secret(settings))


class ResultLinks:
    """The signed links of a task's results: called with a task, its image link; :meth:`videos` gives its
    video links (``<public_url>/mj/video/<mj_id>?t=<row id>&i=<n>&sig=…``, one per entry of
    :func:`video_list`), in the shapes the listing uses."""

    def __init__(self, base: str, secret: bytes):
        self._image_base = base + ROUTE
        self._video_base = base + VIDEO_ROUTE
        self._image_key = crypto.derive_key(secret, TASK_PURPOSE)
        self._video_key = crypto.derive_key(secret, VIDEO_PURPOSE)
        # A listing page signs every item: HMAC and quoting were ~40% of the time of /api/mj/self. The URL
        # of a row never changes for a given secret and base (its upstream id is in the key too: migration
        # 6 renames duplicates), so recent ones are kept.
        self.image = functools.lru_cache(maxsize=URL_CACHE_SIZE)(self._image)

    def _image(self, task_id: int, mj_id: str) -> str:
        sig = crypto.sign_with_key(self._image_key, _task_message(task_id, mj_id))
        return f"{self._image_base}{quote(mj_id, safe='')}?{ROW_PARAM}={task_id}&sig={sig}"

    def video(self, task_id: int, mj_id: str, index: int) -> str:
        sig = crypto.sign_with_key(self._video_key, _video_message(task_id, mj_id, index))
        return f"{self._video_base}{quote(mj_id, safe='')}?{ROW_PARAM}={task_id}&{VIDEO_PARAM}={index}&sig={sig}"

    def __call__(self, task: Task | TaskRow) -> str:
        if task.id is None:
            return ""
        return self.image(task.id, task.mj_id)

    def videos(self, task_id: int | None, mj_id: str, video_url: str, video_urls: str) -> tuple[str, str]:
        """(video_url, video_urls) as handed out: each of the task's videos as mjctl's own link;
        video_urls stays a JSON-array string. Empty strings stay empty."""
        found = video_list(video_url, video_urls)
        if task_id is None or not found:
            return video_url, video_urls
        index = {url: i for i, url in enumerate(found)}
        first = self.video(task_id, mj_id, 0) if video_url else ""
        listed = ""
        if video_urls:
            try:
                entries = json.loads(video_urls)
            except ValueError:
                entries = []
            entries = entries if isinstance(entries, list) else []
            listed = json.dumps([self.video(task_id, mj_id, index[e]) for e in entries
                                 if isinstance(e, str) and e in index])
        return first, listed


# -- what a request needs from the task row ---------------------------------------------------------


@dataclass(frozen=True)
class ImageSource:
    """A task's image as read from its row, so nothing after the lookup needs the database."""

    mj_id: str
    url: str
    final: bool  # the task succeeded: its image will not change, so it is cached and served as immutable
    #: The task's row: what the cache keys its file by (upstream ids repeat across channels). None only for
    #: a source made by hand for a URL, which is then cached under that URL (see ImageCache.key_for).
    task_id: int | None = None
    #: The task's channel: its name (for log lines) and base URL, whose origin an image may always come
    #: from (mjctl.upstream.FetchPolicy). Empty: only public hosts and [images] allow_hosts.
    channel: str = ""
    channel_url: str = ""
    #: Which of the task's videos (video_list order) this source is; None: the task's image.
    video: int | None = None
    #: The task's owner (a user id): whose share of the image answers served at once a request for it takes.
    owner: int | None = None

    @classmethod
    def from_task(cls, task: Task, video: int | None = None) -> ImageSource:
        """The task's image, or its video number ``video`` (url "" when it has no such video)."""
        channel, channel_url = _channel_of(task)
        if video is None:
            url = task.image_url or ""
        else:
            videos = video_list(task.video_url, task.video_urls)
            url = videos[video] if 0 <= video < len(videos) else ""
        return cls(mj_id=task.mj_id, url=url, final=task.status == "SUCCESS", task_id=task.id,
                   channel=channel, channel_url=channel_url, video=video, owner=task.user_id)

    @classmethod
    def all_of(cls, task: Task) -> list[ImageSource]:
        """The task's image and each of its videos: what a prefetch keeps."""
        sources = [cls.from_task(task)] if task.image_url else []
        return sources + [cls.from_task(task, i) for i in range(len(video_list(task.video_url, task.video_urls)))]

    @property
    def kind(self) -> str:
        return "image" if self.video is None else "video"

    @property
    def etag(self) -> str:
        """A strong validator known before any byte is fetched: the image behind one URL never changes."""
        digest = hashlib.sha256(f"{self.mj_id}\0{self.url}".encode()).hexdigest()[:32]
        return f'"{digest}"'


def _channel_of(task: Task) -> tuple[str, str]:
    """The name and base URL of a task's channel; empty for a task without one (or whose channel was
    removed), whose images then come only from public hosts and [images] allow_hosts."""
    if getattr(task, "channel_id", None) is None:
        return "", ""
    from mjctl.models import Channel

    row = Channel.select(Channel.name, Channel.base_url).where(Channel.id == task.channel_id).first()
    return (row.name, row.base_url) if row is not None else ("", "")


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an If-None-Match header names etag (weak comparison, as RFC 9110 asks for GET)."""
    if not if_none_match:
        return False
    value = if_none_match.strip()
    if value == "*":
        return True
    bare = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == bare for tag in value.split(","))
