"""GET /mj/image/<mj_id>: a task's image, streamed from the result store or the upstream (docs/api.md).

A task is its row: upstream ids repeat across channels, so the links mjctl hands out name the row
(``?t=<row id>&sig=…``, the signature over row id and upstream id). Access: such a link; a legacy link
(``?sig=…`` over the upstream id alone), which opens the image only while
exactly one task has that id; or the token of the task's owner (their own task with that id) or an admin;
``[images] sign = false`` makes images public.

Nothing here tells anyone which ids exist: an unknown id, another user's task, and a signature made for
another row or id are all the same 404 (status and body). The task row is read (and the caller checked) in
a database connection that is closed before the upstream is contacted, so a slow upstream or a slow client
never holds a connection, and the streamed body touches no database; a database that fails that read is a
503, to be retried.

One user's images and videos are served at most ``[images] max_streams_per_user`` at a time per process,
whoever asks for them (a signed link needs no token): more are answered 429 at once, so a client that opens
downloads of one task's image and never reads them holds that many and no more of the server's
``[images] max_streams``.

An image from the store answers one byte range when asked (``Range: bytes=…``, 206; 416 past its end);
with ``[images] redirect`` and an S3 store, a stored image is answered with a redirect to a short-lived
presigned link instead, so its bytes do not pass through mjctl.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
from collections.abc import Callable

import bottle
import peewee

from mjctl import images
from mjctl.errors import first_line
from mjctl.images import ImageForwarder, ImageSource, ImageStream, ImageTruncated, ImageUnavailable
from mjctl.images.store import RangeNotSatisfiable, parse_range
from mjctl.server.app import AppContext, busy_error, json_error
from mjctl.server.auth import request_token
from mjctl.server.openapi import error_responses, header_param, query_param

log = logging.getLogger("mjctl.server")

FORWARDER_KEY = "images.forwarder"
GATE_KEY = "images.streams_per_user"
#: Headers every image answer carries: an image never runs as a document on our origin.
SAFE_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'; sandbox"}
#: The one answer for every image the caller may not know of: unknown, someone else's, or a signature that
#: is not this row's. Always the same status and body, so that none of them tells which ids exist.
NOT_FOUND_STATUS = 404
NOT_FOUND_MESSAGE = "No such image: the task does not exist, or this link or token does not open it."
STREAMS_429 = ("Too many image and video answers are being served at once: by this server process "
               "([images] max_streams) or of this task's owner ([images] max_streams_per_user); with Retry-After.")
MAX_ROW_ID = 2**63 - 1
#: Rows named in the answer to an admin whose id matches several tasks.
MAX_LISTED = 20


def forwarder(ctx: AppContext) -> ImageForwarder:
    fw = ctx.cache.get(FORWARDER_KEY)
    if fw is None:
        fw = ctx.cache[FORWARDER_KEY] = ImageForwarder(ctx.settings)
    return fw


def stream_gate(ctx: AppContext):
    """The per-process count of image and video answers being served, by the owner of the task."""
    from mjctl.server.capacity import UserGate

    gate = ctx.cache.get(GATE_KEY)
    if gate is None:
        gate = ctx.cache[GATE_KEY] = UserGate(ctx.settings.images.max_streams_per_user)
    return gate


def not_found() -> bottle.HTTPResponse:
    return json_error(NOT_FOUND_STATUS, NOT_FOUND_MESSAGE)


def _row_id(raw: str | None) -> int | None:
    """The row id of a ``t`` parameter; None when absent. Raises the 404 for anything but a row id."""
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 19) or not 0 < int(raw) <= MAX_ROW_ID:
        raise not_found()
    return int(raw)


def _video_index(raw: str | None) -> int:
    """Which video a ``i`` parameter names (0 when absent). Raises the 404 for anything but a small number."""
    if raw is None:
        return 0
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 2) or int(raw) >= images.MAX_VIDEOS:
        raise not_found()
    return int(raw)


def find_source(ctx: AppContext, mj_id: str, sig: str | None, token: str | None,
                row: str | None = None, video: int | None = None) -> ImageSource:
    """The image source of the task (mj_id, and row when given) if the caller may see it; raises the JSON
    error response otherwise.

    Signatures are checked before the database is touched; one that does not fit (made for another row or
    id, or none at all) without a token is the same 404 as an unknown id, so a wrong one says nothing
    about which ids exist either.
    """
    from mjctl import accounts
    from mjctl.images.cache import claim_legacy_file

    task_id = _row_id(row)
    public = not ctx.settings.images.sign
    if video is not None:  # video links always name their row: there are no legacy ones
        signed = task_id is not None and bool(sig) and images.verify_task_video(ctx.secret, task_id, mj_id,
                                                                                 video, sig)
    elif task_id is not None:
        signed = bool(sig) and images.verify_task_image(ctx.secret, task_id, mj_id, sig)
    else:
        signed = bool(sig) and images.verify_image(ctx.secret, mj_id, sig)
    if not (public or signed or token):
        if sig:
            raise not_found()
        raise json_error(401, "This image needs its signed link or an access token.",
                         {"WWW-Authenticate": "Bearer"})
    if not images.MJ_ID_RE.fullmatch(mj_id):
        raise not_found()
    from mjctl.db import request_connection

    with request_connection():
        user = None
        if not (public or signed):
            user = accounts.authenticate(token)
            if user is None:
                raise json_error(401, "The access token is not valid.", {"WWW-Authenticate": "Bearer"})
            if not user.enabled:
                raise json_error(403, "This user is disabled.")
        task = _lookup(mj_id, task_id, user)
        if task is None:
            raise not_found()
        if video is not None:
            source = ImageSource.from_task(task, video)
            if not source.url:
                raise json_error(404, f"Task {mj_id} has no video {video}.")
            return source
        if not task.image_url:
            raise json_error(404, f"Task {mj_id} has no image.")
        source = ImageSource.from_task(task)
        # A file an earlier version cached under the bare mj_id becomes this task's, when it is the only
        # task with that id; the check reads the database only when such a file exists.
        claim_legacy_file(forwarder(ctx).store, source)
        return source


def _lookup(mj_id: str, task_id: int | None, user):
    """The task the request names, or None. user is None when a signature (or sign = false) opened it."""
    from mjctl import tasks
    from mjctl.models import Task

    if task_id is not None:  # a signed link's row: only the columns a source needs (building a whole row's
        # SELECT cost more than the lookup itself)
        fields = (Task.id, Task.mj_id, Task.user_id, Task.channel_id, Task.status, Task.image_url, Task.video_url,
                  Task.video_urls)
        task = Task.select(*fields).where((Task.id == task_id) & (Task.mj_id == mj_id)).first()
        if task is not None and user is not None and not user.is_admin and task.user_id != user.id:
            return None
        return task
    if user is None:  # a legacy link, or public images: an id names a task only while one task has it
        return tasks.sole_task(mj_id)
    if not user.is_admin:
        return tasks.owned_task(user.id, mj_id)
    found = tasks.tasks_with_mj_id(mj_id, limit=MAX_LISTED + 1)
    if len(found) > 1:
        rows = ", ".join(str(t.id) for t in found[:MAX_LISTED]) + (", …" if len(found) > MAX_LISTED else "")
        raise json_error(409, f"Several tasks have the id {mj_id} (rows {rows}); "
                              f"add ?{images.ROW_PARAM}=<row id> to choose one.")
    return found[0] if found else None


class StreamBody:
    """The response body: the image's chunks; a failure after the first byte aborts the connection
    (a short body against the declared Content-Length) instead of ending it as if complete."""

    def __init__(self, stream: ImageStream, on_close: Callable[[], None] | None = None):
        self.stream = stream
        self._on_close = on_close
        self._lock = threading.Lock()

    def __iter__(self):
        sent = False
        try:
            for chunk in self.stream:
                sent = True
                yield chunk
        except ImageTruncated as exc:
            if not sent:  # Bottle reads the first chunk before sending headers: a JSON 502 is still possible
                self.close()
                raise json_error(502, exc.message) from None
            log.warning("aborting an image response: %s", exc.message)
            # cheroot drops a connection quietly on this error; the client sees the body cut short.
            raise ConnectionAbortedError(errno.ECONNABORTED, exc.message) from None

    def close(self) -> None:
        """Close the stream and give back its place among the owner's answers (once, however often called)."""
        with self._lock:
            on_close, self._on_close = self._on_close, None
        try:
            self.stream.close()
        finally:
            if on_close is not None:
                on_close()


def install(app: bottle.Bottle, ctx: AppContext) -> None:
    ctx.openapi.operation(
        "/mj/image/<mj_id>", "get", tags=["images"],
        summary="A task's result image, forwarded from its upstream or served from the cache.",
        description="Allowed with the `t` and `sig` of the task's forwarded URL, with a legacy `sig` (over the "
                    "id alone) while exactly one task has the id, or with the token of the task's owner or an "
                    "admin. Streams the image with its Content-Type and Content-Length; supports "
                    "If-None-Match. Unknown ids, other users' tasks and signatures that do not fit all answer "
                    "the same 404. Errors are JSON.",
        parameters=[query_param(images.ROW_PARAM, {"type": "integer"},
                                "The task's row id, from the forwarded image URL."),
                    query_param("sig", {"type": "string"}, "The signature from the forwarded image URL."),
                    header_param("If-None-Match", "An ETag from an earlier answer; 304 when it still matches."),
                    header_param("Range", "One byte range (`bytes=0-1023`, `bytes=1024-`, `bytes=-512`) of an "
                                          "image served from the store; other images are sent whole."),
                    header_param("If-Range", "The ETag the Range was meant for; another ETag gets the whole image.")],
        responses={200: {"description": "The image.", "content": {"image/*": {"schema": {"type": "string",
                                                                                          "format": "binary"}}}},
                   206: {"description": "The requested byte range of a stored image (`Content-Range`).",
                         "content": {"image/*": {"schema": {"type": "string", "format": "binary"}}}},
                   302: {"description": "With `[images] redirect` and an S3 store: a short-lived presigned link "
                                        "to the stored image (`Location`)."},
                   304: {"description": "Not modified."},
                   **error_responses(401, 403, 404, 409, 416, 429, 502, 503, 500,
                                     e403="The user is disabled.",
                                     e409="An admin named an id several tasks share, without `t`.",
                                     e416="The range starts past the end of the image (`Content-Range: bytes */size`).",
                                     e429=STREAMS_429,
                                     e502="The upstream failed, timed out, sent no image or one too large, and the "
                                          "store does not hold it or cannot be reached.",
                                     e503="The database is busy or unreachable; try again shortly.")},
    )

    ctx.openapi.operation(
        "/mj/video/<mj_id>", "get", tags=["images"],
        summary="One of a task's result videos, forwarded from its upstream or served from the store.",
        description="The links a task's `video_url` and `video_urls` hold: `t` (the row), `i` (which video) and "
                    "`sig`; or the token of the task's owner or an admin with `i`. Everything else is as for "
                    "images: streamed, byte ranges once stored (so a player can seek), ETag, the same 404s.",
        parameters=[query_param(images.ROW_PARAM, {"type": "integer"}, "The task's row id, from the video link."),
                    query_param(images.VIDEO_PARAM, {"type": "integer", "minimum": 0},
                                "Which of the task's videos (0 = video_url)."),
                    query_param("sig", {"type": "string"}, "The signature from the video link."),
                    header_param("If-None-Match", "An ETag from an earlier answer; 304 when it still matches."),
                    header_param("Range", "One byte range of a video served from the store.")],
        responses={200: {"description": "The video.", "content": {"video/*": {"schema": {"type": "string",
                                                                                          "format": "binary"}}}},
                   206: {"description": "The requested byte range of a stored video (`Content-Range`).",
                         "content": {"video/*": {"schema": {"type": "string", "format": "binary"}}}},
                   302: {"description": "With `[images] redirect` and an S3 store: a short-lived presigned link."},
                   304: {"description": "Not modified."},
                   **error_responses(401, 403, 404, 409, 416, 429, 502, 503, 500,
                                     e403="The user is disabled.",
                                     e409="An admin named an id several tasks share, without `t`.",
                                     e416="The range starts past the end of the video.",
                                     e429=STREAMS_429,
                                     e502="The upstream failed and the store does not hold the video.",
                                     e503="The database is busy or unreachable; try again shortly.")},
    )

    @app.get("/mj/image/<mj_id>", db=False)
    def image(mj_id: str):
        return serve(mj_id, None)

    @app.get("/mj/video/<mj_id>", db=False)
    def video(mj_id: str):
        return serve(mj_id, _video_index(bottle.request.query.get(images.VIDEO_PARAM)))

    def serve(mj_id: str, video: int | None):
        request = bottle.request
        try:
            source = find_source(ctx, mj_id, request.query.get("sig") or None, request_token(request),
                                 request.query.get(images.ROW_PARAM), video)
        except bottle.HTTPResponse:
            raise
        except Exception as exc:  # sorted below: the database's failures, or a bug
            busy = busy_error(exc)  # a lock or pool timeout, a lost connection (a full pool is a ValueError)
            if busy is None and not isinstance(exc, peewee.PeeweeException):
                raise
            log.error("GET %s: database error: %s", request.path, first_line(exc))
            return json_error(503, busy.message if busy is not None else "The database failed; try again shortly.",
                              {"Retry-After": "2"})
        if images.etag_matches(request.get_header("If-None-Match"), source.etag):
            return bottle.HTTPResponse(status=304, headers={
                "ETag": source.etag, "Cache-Control": images.IMMUTABLE if source.final else images.REVALIDATE})
        fw = forwarder(ctx)
        if ctx.settings.images.redirect and (link := fw.presigned_url(source)) is not None:
            return bottle.HTTPResponse(status=302, headers={"Location": link, "Cache-Control": "no-store",
                                                            "ETag": source.etag, **SAFE_HEADERS})
        if_range = request.get_header("If-Range")
        byte_range = parse_range(request.get_header("Range")) if if_range in (None, source.etag) else None
        gate, owner = stream_gate(ctx), source.owner
        if owner is not None and not gate.acquire(owner):
            return json_error(429, f"Too many of this user's images and videos are being downloaded at once "
                                   f"(at most {gate.limit}); try again shortly.", {"Retry-After": "1"})
        with contextlib.ExitStack() as place:  # the owner's place is given back here, unless a body takes it
            if owner is not None:
                place.callback(gate.release, owner)
            try:
                stream = fw.open(source, byte_range)
            except RangeNotSatisfiable as exc:
                return json_error(416, f"The range starts past the end of the image ({exc.size} bytes).",
                                  {"Content-Range": f"bytes */{exc.size}"})
            except ImageUnavailable as exc:
                log.warning("%s %s: %s", source.kind, source.mj_id, exc.message)
                return json_error(502, exc.message)
            body = StreamBody(stream, place.pop_all().close)
        headers = {"Content-Type": stream.content_type, "ETag": stream.etag,
                   "Cache-Control": stream.cache_control, "X-Cache": "HIT" if stream.cached else "MISS",
                   **SAFE_HEADERS}
        if stream.cached:
            headers["Accept-Ranges"] = "bytes"
        if stream.content_range is not None:
            headers["Content-Range"] = stream.content_range
        if stream.length is not None:
            headers["Content-Length"] = str(stream.length)
        return bottle.HTTPResponse(body, status=206 if stream.content_range else 200, headers=headers)
