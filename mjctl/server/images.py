"""GET /mj/image/<mj_id>: a task's image, streamed from the upstream or served from the cache (docs/api.md).

Access: a valid ``sig`` for this id, or the token of the task's owner or an admin; ``[images] sign = false``
makes it public. The task row is read (and the caller checked) in a database connection that is closed
before the upstream is contacted, so a slow upstream or a slow client never holds a connection, and the
streamed body touches no database.
"""

from __future__ import annotations

import errno
import logging

import bottle
import peewee

from mjctl import images
from mjctl.images import ImageForwarder, ImageSource, ImageStream, ImageTruncated, ImageUnavailable
from mjctl.server.app import AppContext, json_error
from mjctl.server.auth import request_token
from mjctl.server.openapi import error_responses, header_param, query_param

log = logging.getLogger("mjctl.server")

FORWARDER_KEY = "images.forwarder"
#: Headers every image answer carries: an image never runs as a document on our origin.
SAFE_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'; sandbox"}


def forwarder(ctx: AppContext) -> ImageForwarder:
    fw = ctx.cache.get(FORWARDER_KEY)
    if fw is None:
        fw = ctx.cache[FORWARDER_KEY] = ImageForwarder(ctx.settings)
    return fw


def find_source(ctx: AppContext, mj_id: str, sig: str | None, token: str | None) -> ImageSource:
    """The image source of mj_id if the caller may see it; raises the JSON error response otherwise.

    The signature is checked before the database is touched, so a wrong one says nothing about which
    ids exist.
    """
    from mjctl import accounts
    from mjctl.models import Task

    public = not ctx.settings.images.sign
    signed = bool(sig) and images.verify_image(ctx.secret, mj_id, sig)
    if not (public or signed or token):
        if sig:
            raise json_error(403, "The image signature is not valid for this id.")
        raise json_error(401, "This image needs its signed link or an access token.",
                         {"WWW-Authenticate": "Bearer"})
    if not images.MJ_ID_RE.match(mj_id):
        raise json_error(404, f"No task with id {mj_id[:64]!r}.")
    from mjctl.db import connection

    with connection():
        user = None
        if not (public or signed):
            user = accounts.authenticate(token)
            if user is None:
                if sig:
                    raise json_error(403, "The image signature is not valid for this id.")
                raise json_error(401, "The access token is not valid.", {"WWW-Authenticate": "Bearer"})
            if not user.enabled:
                raise json_error(403, "This user is disabled.")
        query = Task.select().where(Task.mj_id == mj_id)
        if user is not None and not user.is_admin:
            own = query.where(Task.user_id == user.id).order_by(Task.id.desc()).first()
            if own is None:
                if query.exists():
                    raise json_error(403, "This image belongs to another user's task.")
                raise json_error(404, f"No task with id {mj_id!r}.")
            task = own
        else:
            task = query.order_by(Task.id.desc()).first()
        if task is None:
            raise json_error(404, f"No task with id {mj_id!r}.")
        if not task.image_url:
            raise json_error(404, f"Task {mj_id} has no image.")
        return ImageSource.from_task(task)


class StreamBody:
    """The response body: the image's chunks; a failure after the first byte aborts the connection
    (a short body against the declared Content-Length) instead of ending it as if complete."""

    def __init__(self, stream: ImageStream):
        self.stream = stream

    def __iter__(self):
        sent = False
        try:
            for chunk in self.stream:
                sent = True
                yield chunk
        except ImageTruncated as exc:
            if not sent:  # Bottle reads the first chunk before sending headers: a JSON 502 is still possible
                self.stream.close()
                raise json_error(502, exc.message) from None
            log.warning("aborting an image response: %s", exc.message)
            # cheroot drops a connection quietly on this error; the client sees the body cut short.
            raise ConnectionAbortedError(errno.ECONNABORTED, exc.message) from None

    def close(self) -> None:
        self.stream.close()


def install(app: bottle.Bottle, ctx: AppContext) -> None:
    ctx.openapi.operation(
        "/mj/image/<mj_id>", "get", tags=["images"],
        summary="A task's result image, forwarded from its upstream or served from the cache.",
        description="Allowed with the `sig` of the task's forwarded URL, or with the token of the task's owner "
                    "or an admin. Streams the image with its Content-Type and Content-Length; supports "
                    "If-None-Match. Errors are JSON.",
        parameters=[query_param("sig", {"type": "string"}, "The signature from the forwarded image URL."),
                    header_param("If-None-Match", "An ETag from an earlier answer; 304 when it still matches.")],
        responses={200: {"description": "The image.", "content": {"image/*": {"schema": {"type": "string",
                                                                                          "format": "binary"}}}},
                   304: {"description": "Not modified."},
                   **error_responses(401, 403, 404, 502, 500,
                                     e502="The upstream failed, timed out, sent no image or one too large.")},
    )

    @app.get("/mj/image/<mj_id>", db=False)
    def image(mj_id: str):
        request = bottle.request
        try:
            source = find_source(ctx, mj_id, request.query.get("sig") or None, request_token(request))
        except peewee.PeeweeException as exc:
            log.error("GET /mj/image: database error: %s", exc)
            return json_error(500, "The database failed; try again later.")
        if images.etag_matches(request.get_header("If-None-Match"), source.etag):
            return bottle.HTTPResponse(status=304, headers={
                "ETag": source.etag, "Cache-Control": images.IMMUTABLE if source.final else images.REVALIDATE})
        try:
            stream = forwarder(ctx).open(source)
        except ImageUnavailable as exc:
            log.warning("image %s: %s", source.mj_id, exc.message)
            return json_error(502, exc.message)
        headers = {"Content-Type": stream.content_type, "ETag": stream.etag,
                   "Cache-Control": stream.cache_control, "X-Cache": "HIT" if stream.cached else "MISS",
                   **SAFE_HEADERS}
        if stream.length is not None:
            headers["Content-Length"] = str(stream.length)
        return bottle.HTTPResponse(StreamBody(stream), status=200, headers=headers)
