"""The midjourney-proxy compatible relay and the push endpoint (docs/api.md; the protocol: docs/upstream.md).

Every answer here, errors included, is the upstream's ``{"code", "description", "result", "properties"}``
envelope (or a task / list of tasks), because the callers are midjourney-proxy clients. These routes skip
the app's JSON-error and store plugins and do both themselves with that envelope.

Choices where upstreams differ: an unknown id on fetch is HTTP 404 ``{"code": 3, "description": "task not
found"}`` (the Java upstream's empty 200 and the C# 204 are hard for clients to tell from a crash); an
upstream's own rejection (codes 3, 4, 23, 24 …) is passed on with the upstream's HTTP status.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging

import bottle
import peewee

from mjctl import crypto, jsontext, relay
from mjctl.errors import MjctlError, first_line
from mjctl.protocol import SWAP_FACE_PATH
from mjctl.server.app import AppContext
from mjctl.server.auth import authenticate_request
from mjctl.server.capacity import UserGate
from mjctl.server.openapi import header_param, json_response, query_param

log = logging.getLogger("mjctl.server.relay")

MAX_BODY = 32 * 1024 * 1024  # blend and describe carry base64 images
PLUGINS_SKIPPED = ["mjctl_errors", "mjctl_store"]


def answer(status: int, body, headers: dict[str, str] | None = None) -> bottle.HTTPResponse:
    return bottle.HTTPResponse(json.dumps(body, ensure_ascii=False), status=status,
                               headers={"Content-Type": "application/json", **(headers or {})})


def failure(status: int, code: int, description: str) -> bottle.HTTPResponse:
    return answer(status, relay.envelope(code, description))


BUSY = "the database is busy; try again shortly"


def enveloped(callback, *, reads_only: bool = False):
    """Run a relay route with a database connection; any failure is an upstream-style envelope. A route
    that only reads (reads_only) is retried on a fresh connection when its connection turns out dead.
    A busy or unreachable store (a lock, pool or connect timeout: ``mjctl.db.busy_error``) is a 503 with
    code 9 once its bounded wait is over, so a client can tell it from mjctl failing (500)."""

    @functools.wraps(callback)
    def wrapper(*args, **kwargs):
        from mjctl.db import busy_error, call_with_connection

        try:
            return call_with_connection(callback, *args, retry=reads_only, **kwargs)
        except bottle.HTTPResponse:
            raise
        except MjctlError as exc:  # 401/403 from authentication, mostly; 503 from a busy store
            if exc.http_status >= 500:
                log.error("%s %s: %s", bottle.request.method, bottle.request.path, exc.message)
                return failure(exc.http_status, 9, BUSY if busy_error(exc) is not None else exc.message)
            code = 3 if exc.http_status == 404 else 4
            return failure(exc.http_status, code, exc.message)
        except Exception as exc:  # the relay's one place where a crash becomes a 500
            detail = first_line(exc)
            if busy_error(exc) is not None:  # a full pool is a ValueError, not a PeeweeException
                log.error("%s %s: database busy: %s", bottle.request.method, bottle.request.path, detail)
                return failure(503, 9, BUSY)
            if isinstance(exc, peewee.PeeweeException):
                log.error("%s %s: database error: %s", bottle.request.method, bottle.request.path, detail)
                return failure(500, 9, "the database failed; try again later")
            log.exception("unhandled error in %s %s", bottle.request.method, bottle.request.path)
            return failure(500, 9, "internal server error")

    return wrapper


def json_body() -> dict:
    """The request's JSON object; a 400 code-4 envelope when it is missing, malformed or not an object.
    Read strictly (jsontext.loads_strict): a body that is only JSON to a lenient parser — NaN, a lone
    surrogate escape, deep nesting — is refused here rather than stored or forwarded."""
    length = bottle.request.content_length
    if length > MAX_BODY:
        raise failure(413, 4, f"the body is larger than {MAX_BODY} bytes")
    raw = bottle.request.body.read(MAX_BODY + 1)
    try:
        body = jsontext.loads_strict(raw)
    except jsontext.StrictJSONError as exc:
        raise failure(400, 4, f"the body is {exc}") from None
    if not isinstance(body, dict):
        raise failure(400, 4, "the body must be a JSON object")
    return body


def install(app: bottle.Bottle, ctx: AppContext) -> None:
    settings = ctx.settings

    def route(rule: str, method: str, callback, *, reads_only: bool = False) -> None:
        app.route(rule, method, enveloped(callback, reads_only=reads_only), skip=PLUGINS_SKIPPED)

    gate = UserGate(settings.relay.max_in_flight_per_user)

    @contextlib.contextmanager
    def user_slot(user):
        """Hold one of the user's upstream-bound slots, or answer "queue full" (code 23, HTTP 429)."""
        if not gate.acquire(user.id):
            raise answer(429, relay.envelope(
                23, f"queue full: you already have {gate.limit} requests waiting on upstreams; try again shortly"),
                headers={"Retry-After": "1"})
        try:
            yield
        finally:
            gate.release(user.id)

    for prefix in relay.PREFIXES:
        def submit(kind: str, prefix: str = prefix):
            user = authenticate_request(bottle.request)
            if kind not in relay.SUBMIT_KINDS:
                return failure(404, 3, f"unknown submit kind {kind!r}")
            body = json_body()
            with user_slot(user):
                status, body = relay.submit(settings, user, kind, body, prefix)
            return answer(status, body)

        def fetch(mj_id: str):
            user = authenticate_request(bottle.request)
            task = relay.fetch(user, mj_id, ctx.image_url)
            if task is None:
                return failure(404, 3, "task not found")
            return answer(200, task)

        def list_by_condition():
            user = authenticate_request(bottle.request)
            ids = json_body().get("ids")
            if not isinstance(ids, list):
                return failure(400, 4, "ids must be a list of task ids")
            return answer(200, relay.list_by_condition(user, ids, ctx.image_url))

        def list_latest():
            user = authenticate_request(bottle.request)
            return answer(200, relay.list_latest(user, ctx.image_url))

        def image_seed(mj_id: str, prefix: str = prefix):
            user = authenticate_request(bottle.request)
            with user_slot(user):
                status, body = relay.image_seed(settings, user, mj_id, prefix)
            return answer(status, body)

        def swap_face(prefix: str = prefix):
            user = authenticate_request(bottle.request)
            body = json_body()
            with user_slot(user):
                status, body = relay.submit(settings, user, relay.SWAP_FACE, body, prefix)
            return answer(status, body)

        def cancel(mj_id: str):
            user = authenticate_request(bottle.request)
            with user_slot(user):
                status, body = relay.cancel(settings, user, mj_id)
            return answer(status, body)

        route(f"{prefix}/mj/submit/<kind>", "POST", submit)
        route(f"{prefix}/mj/task/<mj_id>/fetch", "GET", fetch, reads_only=True)
        route(f"{prefix}/mj/task/list-by-condition", "POST", list_by_condition, reads_only=True)
        route(f"{prefix}/mj/task/list", "GET", list_latest, reads_only=True)
        route(f"{prefix}/mj/task/<mj_id>/image-seed", "GET", image_seed, reads_only=True)
        route(f"{prefix}{SWAP_FACE_PATH}", "POST", swap_face)
        route(f"{prefix}/mj/task/<mj_id>/cancel", "POST", cancel)

    def notify(channel_id: int, nonce: str | None = None):
        """A push through a notify link. A per-task link (with nonce) changes only the unfinished task it
        was made for; the old per-channel link only tasks submitted before links were per task."""
        from mjctl import reports

        sig = bottle.request.query.get("sig")
        if nonce is None:
            good = crypto.verify(ctx.secret, "notify", str(channel_id), sig)
        else:
            good = bool(sig) and crypto.same(relay.notify_signature(settings, channel_id, nonce), sig)
        if not good:
            return failure(403, 4, "missing or wrong signature")
        report = json_body()
        if not report.get("id"):
            return failure(400, 4, "the body is not a task: it has no id")
        if not isinstance(report["id"], str) or len(report["id"]) > relay.MAX_ID_CHARS:
            return failure(400, 4, f"id must be a string of at most {relay.MAX_ID_CHARS} characters")
        target = reports.push_target(channel_id, report["id"], nonce)
        if target.scope:
            _remember_channel_secret(channel_id)  # a push may arrive before this process made any client
        if target.verdict == "refused":
            return failure(403, 4, "this notify link is not for that task")
        if target.verdict == "finished":
            return failure(410, 4, "the task of this notify link is finished; the link no longer works")
        if target.verdict == "pending":
            return answer(200, relay.envelope(1, "not recorded yet: ignored", str(report["id"])))
        stats = reports.apply_report(channel_id, report, target.scope) if target.scope else None
        if stats is None or stats.unknown:
            note = "unknown task: ignored"
        elif stats.updated:
            note = "applied"
        else:
            note = "nothing to change: ignored"
        return answer(200, relay.envelope(1, note, str(report["id"])))

    @functools.lru_cache(maxsize=1024)
    def _remember_channel_secret(channel_id: int) -> None:
        """Scrub the channel's secret from what its pushes carry, once per channel and process."""
        from mjctl import channels, upstream_text

        try:
            upstream_text.remember_secret(channels.channel_secret(settings, channels.get_channel(channel_id)))
        except MjctlError:
            pass  # a removed channel: its pushes match no task anyway

    route("/mj/notify/<channel_id:int>", "POST", notify)
    route("/mj/notify/<channel_id:int>/<nonce:re:[A-Za-z0-9_-]{16,32}>", "POST", notify)
    _document(ctx)


def _document(ctx: AppContext) -> None:
    api = ctx.openapi
    nullable_string = {"type": ["string", "null"]}
    nullable_ms = {"type": ["integer", "null"], "description": "Epoch milliseconds; null until known."}
    envelope = api.schema("RelayEnvelope", {
        "type": "object",
        "required": ["code", "description"],
        "description": "midjourney-proxy's SubmitResult; also every relay error. Codes: 1 accepted, 21 waiting "
                       "for a modal, 22 queued, 23 queue full, 24 banned prompt, 3 not found, 4 invalid "
                       "(also: no or bad token, insufficient quota), 9 system error (upstream unreachable, 401, "
                       "429 or invalid answer).",
        "properties": {"code": {"type": "integer"}, "description": {"type": "string"},
                       "result": nullable_string, "properties": {"type": "object"}},
    })
    task = api.schema("RelayTask", {
        "type": "object",
        "required": ["id", "action", "status", "progress", "submitTime", "buttons", "properties"],
        "properties": {
            "id": {"type": "string"}, "action": {"type": "string"},
            "status": {"enum": ["NOT_START", "SUBMITTED", "MODAL", "IN_PROGRESS", "SUCCESS", "FAILURE", "CANCEL"]},
            "progress": nullable_string, "prompt": {"type": "string"}, "promptEn": nullable_string,
            "description": nullable_string, "state": nullable_string,
            "submitTime": nullable_ms, "startTime": nullable_ms, "finishTime": nullable_ms,
            "imageUrl": nullable_string, "videoUrl": nullable_string,
            "videoUrls": {"type": ["array", "null"], "items": {"type": "object"}},
            "failReason": nullable_string, "buttons": {"type": "array", "items": {"type": "object"}},
            "properties": {"type": "object"},
        },
    })
    task_list = {"type": "array", "items": task}

    def errors(*statuses: int, **notes: str) -> dict:
        text = {400: "Malformed or hostile JSON body (too deep, NaN, a lone surrogate), a field of the wrong "
                     "type or too long (code 4).", 401: "No token or an unknown token (code 4).",
                403: "A disabled user, or insufficient quota (code 4; the upstream was not called).",
                404: "Unknown task, or a task of another user (code 3).",
                409: "The task acted on is not in a state that allows it: not finished with SUCCESS, or "
                     "already finished (code 4).",
                429: "Queue full (code 23, with Retry-After): the caller already has [relay] "
                     "max_in_flight_per_user requests waiting on upstreams, or the server its [relay] "
                     "max_in_flight; or the upstream is rate limiting (code 9).",
                500: "mjctl or its store failed (code 9).",
                502: "The upstream refused mjctl's secret or answered off-protocol (code 9).",
                503: "No upstream channel is reachable, or the store is busy (code 9)."}
        text.update({int(k[1:]): v for k, v in notes.items()})
        return {s: json_response(envelope, text[s]) for s in statuses}

    auth = [header_param("mj-api-secret", "An mjctl access token (alternative to Authorization).")]
    body = {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}}
    for prefix in relay.PREFIXES:
        speed = f" (speed prefix {prefix}, forwarded to the upstream)" if prefix else ""
        api.operation(
            f"{prefix}/mj/submit/<kind>", "post", tags=["relay"], parameters=auth, request_body=body,
            summary=f"Submit a Midjourney task through an upstream channel{speed}.",
            description="kind is imagine, action, modal, change, simple-change, describe, blend, shorten, video, "
                        "edits or upload-discord-images. "
                        "The price of the action ([prices]) is held before the upstream is called and charged "
                        "when it accepts (codes 1, 21, 22); a rejection is recorded as a FAILURE task and charges "
                        "nothing. action/modal/change/simple-change (and video with a taskId) go to the channel "
                        "of the earlier task, which must be the caller's and, but for modal, finished with "
                        "SUCCESS (else 409, code 4). upload-discord-images makes no task: its result is the "
                        "list of the images' links, free unless [prices] UPLOAD is set. "
                        "An upstream rejection is answered with the upstream's status. "
                        "The server itself answers a body over [server] max_body_bytes 413 unread, and one that "
                        "does not arrive within [server] body_timeout 408, both as {\"success\": false, \"message\"}.",
            responses={200: json_response(envelope, "The upstream's SubmitResult."),
                       **errors(400, 401, 403, 404, 409, 429, 500, 502, 503)})
        api.operation(
            f"{prefix}{SWAP_FACE_PATH}", "post", tags=["relay"], parameters=auth, request_body=body,
            summary=f"Swap a face (InsightFace): sourceBase64's face onto targetBase64{speed}.",
            description="A SWAP_FACE task, priced by [prices] SWAP_FACE and relayed like a submission "
                        "(C# upstreams only; a channel without the route is skipped).",
            responses={200: json_response(envelope, "The upstream's SubmitResult."),
                       **errors(400, 401, 403, 429, 500, 502, 503)})
        api.operation(
            f"{prefix}/mj/task/<mj_id>/cancel", "post", tags=["relay"], parameters=auth,
            summary="Cancel one of the caller's unfinished tasks.",
            description="Asked of the task's upstream (C# upstreams offer it). When it agrees the task is CANCEL "
                        "and its quota is refunded, exactly once. A finished task is 409 (code 4); an upstream "
                        "that cannot cancel is 501 (code 4); nothing changes in either case.",
            responses={200: json_response(envelope, "Cancelled; result is the task id."),
                       501: json_response(envelope, "The task's upstream cannot cancel tasks (code 4)."),
                       **errors(401, 403, 404, 409, 429, 500, 502, 503)})
        api.operation(
            f"{prefix}/mj/task/<mj_id>/fetch", "get", tags=["relay"], parameters=auth,
            summary="One of the caller's tasks, in the upstream's shape (times in milliseconds).",
            description="Answered from mjctl's store. An unknown id (or another user's) is HTTP 404 "
                        "{\"code\": 3, \"description\": \"task not found\"}, not the Java upstream's empty 200.",
            responses={200: json_response(task, "The task."), **errors(401, 403, 404, 500)})
        api.operation(
            f"{prefix}/mj/task/list-by-condition", "post", tags=["relay"], parameters=auth, request_body=body,
            summary="The caller's tasks among {\"ids\": [...]}; unknown ids are left out.",
            responses={200: json_response(task_list, "The tasks found."), **errors(400, 401, 403, 500)})
        api.operation(
            f"{prefix}/mj/task/list", "get", tags=["relay"], parameters=auth,
            summary="The caller's latest 100 tasks, newest first.",
            responses={200: json_response(task_list, "The tasks."), **errors(401, 403, 500)})
        api.operation(
            f"{prefix}/mj/task/<mj_id>/image-seed", "get", tags=["relay"], parameters=auth,
            summary="The seed of one of the caller's tasks, asked of its upstream (free).",
            responses={200: json_response(envelope, "The seed in result."),
                       **errors(401, 403, 404, 429, 500, 502, 503)})
    notify_sig = [query_param("sig", {"type": "string"}, "The signature mjctl put into the hook it forwarded.",
                              required=True)]
    api.operation(
        "/mj/notify/<channel_id:int>/<nonce>", "post", tags=["relay"], secured=False, request_body=body,
        parameters=notify_sig,
        summary="notifyHook callbacks from an upstream (a task JSON) about the one task the link was made for.",
        description="Each submission is forwarded with its own link; a push through it is applied, like a poll "
                    "report, only to that task (its id must be the report's id) and only while the task is "
                    "unfinished. Progress never goes backwards, so duplicate or out-of-order pushes are harmless.",
        responses={200: json_response(envelope, "Applied, or ignored with a note in description."),
                   410: json_response(envelope, "The link's task is finished; nothing was changed (code 4)."),
                   **errors(400, 403, 500, e403="Missing or wrong signature, or a report about another task.")})
    api.operation(
        "/mj/notify/<channel_id:int>", "post", tags=["relay"], secured=False, request_body=body,
        parameters=notify_sig,
        summary="The per-channel notify link of tasks submitted before links were per task.",
        description="Applied only to tasks of the channel that have no per-task link; a report about any other "
                    "task is refused. A task mjctl does not know is answered 200 with a note.",
        responses={200: json_response(envelope, "Applied, or ignored with a note in description."),
                   **errors(400, 403, 500, e403="Missing or wrong signature, or a task with its own link.")})
