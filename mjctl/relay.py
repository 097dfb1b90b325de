"""The midjourney-proxy relay: submitting on a user's behalf, charging exactly, and the upstream task shape.

A submission goes through four steps, only the first and the last inside a transaction:

1. **reserve and write ahead** — in a write transaction (the user's row locked on PostgreSQL/MySQL;
   SQLite's IMMEDIATE transaction serialises writers anyway) the quota available is the balance minus the
   user's live reservations; when it covers the price a ``Reservation`` row holds it, else the submission
   is refused (code 4, HTTP 403) and the upstream is never called. Parallel submissions therefore cannot
   all pass a balance check that only one of them can afford. The same transaction writes a
   ``PendingSubmission`` (:mod:`mjctl.pending`) with a fresh random nonce.
2. **forward** to the upstream, outside any transaction, failing over to the next channel on
   ``UpstreamUnavailable`` only. The upstream gets the submission's own notify link
   (``/mj/notify/<channel id>/<nonce>?sig=…``, :func:`notify_hook_url`) and ``mjctl:<nonce>`` as its
   ``state`` (the user's state stays in mjctl), both of which it echoes in its task reports;
3. **record** — on acceptance (codes 1, 21, 22) one transaction deletes the pending record and the
   reservation, creates the task row (keeping the nonce) and charges it with a ledger entry
   (``accounts.charge``); on rejection it deletes them and records a FAILURE task with quota 0, leaving
   the ledger alone. An accepted id that another task of the channel already has is a protocol failure:
   nothing is recorded or charged, the older task is not touched, and the caller gets code 9;
4. a process that died between 1 and 3 leaves the pending record: the poller finds the upstream task
   carrying its nonce and records and charges it then, or drops the record uncharged when no upstream has
   it by the time the reservation expires (:func:`mjctl.pending.adopt`).

A reservation must outlive the upstream calls it covers, or a second submission could take the quota the
first one is about to be charged: every call has a total deadline (``submit_deadline``, connect to last
byte), the reservation lasts one deadline per channel it may try plus ``RESERVATION_SLACK``, and no call
is given a deadline reaching past the reservation's expiry minus that slack.

Fetch and the listings answer from the local store, scoped to the caller, in the upstream's camelCase
shape (``upstream_shape``) so that another gateway could use mjctl as its upstream.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import peewee

from mjctl import accounts, crypto, pending, tasks, upstream_text
from mjctl import channels as channel_health
from mjctl.channels import client_for
from mjctl.db import retry_transaction, write_tx
from mjctl.errors import MjctlError
from mjctl.images.common import ROUTE as IMAGE_ROUTE
from mjctl.images.urls import ResultLinks
from mjctl.models import Channel, PendingSubmission, Task, User
from mjctl.protocol import MODES, NO_ACCOUNT_CODE, PREFIX_MODES
from mjctl.upstream import (
    PREFIXES,
    SUBMIT_KINDS,
    Deadline,
    SubmitResult,
    UpstreamClient,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamUnauthorized,
    UpstreamUnavailable,
)

log = logging.getLogger("mjctl.relay")

__all__ = [
    "SUBMIT_KINDS", "PREFIXES", "Envelope", "action_for", "submit", "image_seed", "fetch", "list_latest",
    "list_by_condition", "upstream_shape", "notify_hook_url", "available_quota",
]

Envelope = tuple[int, dict[str, Any]]
#: The kind under which a face swap (``/mj/insight-face/swap``) goes through :func:`submit`.
SWAP_FACE = "swap-face"
ImageUrl = ResultLinks | None

#: The action (and price key) of each kind that names it by itself; the others read it from the body.
KIND_ACTIONS = {"imagine": "IMAGINE", "describe": "DESCRIBE", "blend": "BLEND", "shorten": "SHORTEN",
                "video": "VIDEO", "edits": "EDITS", "upload-discord-images": "UPLOAD", SWAP_FACE: "SWAP_FACE"}
#: Kinds that continue an earlier task: they go to its channel and need the caller to own it and, but for
#: modal, to have finished with SUCCESS. A video continues one when it names a taskId.
FOLLOW_UP_KINDS = ("action", "modal", "change", "simple-change")
CHANGE_ACTIONS = {"U": "UPSCALE", "V": "VARIATION", "R": "REROLL"}
LATEST_LIMIT = 100
MAX_IDS = 1000
RESERVATION_SLACK = 60.0  # seconds a reservation outlives the deadlines of the upstream calls it covers
NOTIFY_PATH = "/mj/notify/"
MAX_ID_CHARS = 64  # Task.mj_id
MAX_STATE_CHARS = 1024
#: The text fields of a submission and their longest accepted length (None: the body limit only). prompt's
#: limit is [relay] max_prompt_chars. prompt, state and notifyHook are stored as sent; customId, action and
#: content decide the action and price; base64 images are forwarded, never stored.
TEXT_FIELDS: dict[str, int | None] = {
    "state": MAX_STATE_CHARS, "taskId": MAX_ID_CHARS, "customId": 256, "action": 32,
    "content": MAX_ID_CHARS + 64, "notifyHook": 2048, "botType": 32, "dimensions": 32,
    "motion": 16, "imageUrl": 2048, "base64": None, "maskBase64": None, "image": None,
    "sourceBase64": None, "targetBase64": None,
}


def envelope(code: int, description: str, result: Any = None, properties: dict | None = None) -> dict:
    """midjourney-proxy's answer: result is a task id, or the links of an upload."""
    return {"code": code, "description": description, "result": result, "properties": properties or {}}


@dataclass
class _Refusal(Exception):
    """A submission refused before or instead of being forwarded; becomes (status, envelope)."""

    status: int
    code: int
    description: str

    def answer(self) -> Envelope:
        return self.status, envelope(self.code, self.description)


# --- actions and prices ----------------------------------------------------------------------------

def action_for_custom_id(custom_id: str) -> str:
    """The task action a button's customId starts (UPSCALE for ``MJ::JOB::upsample::1::…``); ACTION when
    the button is not one we know."""
    cid = (custom_id or "").lower()
    if "inpaint" in cid:
        return "INPAINT"
    if "customzoom" in cid or "outpaint" in cid:
        return "ZOOM"
    if "::upsample" in cid:
        return "UPSCALE"
    if "variation" in cid:
        return "VARIATION"
    if "::reroll" in cid:
        return "REROLL"
    if "::pan_" in cid:
        return "PAN"
    return "ACTION"


def action_for(kind: str, body: dict) -> str:
    """The action (and so the price) of a submission of ``kind`` with ``body``."""
    if kind in KIND_ACTIONS:
        return KIND_ACTIONS[kind]
    if kind == "action":
        return action_for_custom_id(str(body.get("customId") or ""))
    if kind == "change":
        action = str(body.get("action") or "").upper()
        return action if action in CHANGE_ACTIONS.values() else "ACTION"
    if kind == "simple-change":
        parts = str(body.get("content") or "").split()
        letter = parts[1][:1].upper() if len(parts) > 1 else ""
        return CHANGE_ACTIONS.get(letter, "ACTION")
    return "MODAL"


def _parent_id(kind: str, body: dict) -> str | None:
    if kind == "simple-change":
        parts = str(body.get("content") or "").split()
        return parts[0] if parts else None
    value = body.get("taskId")
    return str(value) if isinstance(value, (str, int)) and str(value) else None


def check_fields(settings, body: dict) -> None:
    """Raise _Refusal (400, code 4) when a known field of body has the wrong type or is too long, so that
    nothing is reserved, stored or forwarded for it. null counts as absent; taskId may be a number, as the
    Java upstream accepts (ids are digits)."""
    limits = {"prompt": settings.relay.max_prompt_chars, **TEXT_FIELDS}
    for name, limit in limits.items():
        value = body.get(name)
        if value is None:
            continue
        if name == "taskId" and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise _Refusal(400, 4, f"{name} must be a string")
        if limit is not None and len(value) > limit:
            raise _Refusal(400, 4, f"{name} is longer than {limit} characters")
    images = body.get("base64Array")
    if images is not None and not (isinstance(images, list) and all(isinstance(i, str) for i in images)):
        raise _Refusal(400, 4, "base64Array must be a list of strings")


# --- reservations -----------------------------------------------------------------------------------

def available_quota(user_id: int, now: float | None = None) -> int:
    """The balance minus the user's live reservations."""
    now = time.time() if now is None else now
    balance = User.select(User.quota).where(User.id == user_id).scalar() or 0
    return int(balance) - pending.held(user_id, now)


def _write_ahead(user_id: int, price: int, ttl: float, fields: dict[str, Any]) -> PendingSubmission:
    """Reserve price for ttl seconds and write the pending record, in one transaction. Raises _Refusal."""
    return pending.write_ahead(user_id, price, ttl, fields, refuse=lambda reason: _Refusal(403, 4, reason))


def _drop_tx(record: PendingSubmission) -> None:
    """Give a submission up uncharged: its pending record and reservation go."""
    retry_transaction(lambda: pending.drop(record), what="releasing a reservation")


# --- submitting -------------------------------------------------------------------------------------

NOTIFY_TASK_PURPOSE = "notify-task"


def notify_signature(settings, channel_id: int, nonce: str | None = None) -> str:
    """The signature of a notify link: over the channel id and the submission's nonce; over the channel id
    alone for the per-channel links of tasks submitted before links were per task."""
    secret = crypto.server_secret(settings)
    if nonce is None:
        return crypto.sign(secret, "notify", str(channel_id))
    return crypto.sign(secret, NOTIFY_TASK_PURPOSE, f"{channel_id}/{nonce}")


def notify_hook_url(settings, channel_id: int, nonce: str | None = None) -> str | None:
    """The signed push URL one submission's upstream should call, when [server] public_url is set.

    It authorises pushes about that one task only (the report's id must be the task's, on that channel)
    and stops working when the task finishes, so a link that leaks through an upstream exposes one running
    task. Without a nonce: the old per-channel form, still accepted for tasks that have no nonce; mjctl no
    longer hands it out."""
    base = (settings.server.public_url or "").strip().rstrip("/")
    if not base:
        return None
    sig = notify_signature(settings, channel_id, nonce)
    if nonce is None:
        return f"{base}{NOTIFY_PATH}{channel_id}?sig={sig}"
    return f"{base}{NOTIFY_PATH}{channel_id}/{nonce}?sig={sig}"


def submit_deadline(settings) -> float:
    """Seconds one upstream call may take in all (connect to last byte): ``[poller] request_timeout``."""
    return settings.poller.request_timeout


def reservation_ttl(settings, channels: int) -> float:
    """How long a reservation lasts: a whole deadline for every channel the submission may fail over to,
    plus RESERVATION_SLACK for the database work around the calls."""
    return submit_deadline(settings) * max(1, channels) + RESERVATION_SLACK


def _client(settings, channel: Channel) -> UpstreamClient:
    return client_for(settings, channel, timeout=submit_deadline(settings))


def mode_of(prefix: str, body: dict, parent: Task | None) -> str:
    """The generation speed a submission asks for: its path prefix (/mj-relax: RELAX), else the first mode
    of the C# upstream's ``accountFilter.modes`` in its body, else its parent's; "" when none says."""
    if prefix:
        return PREFIX_MODES[prefix]
    account_filter = body.get("accountFilter")
    modes = account_filter.get("modes") if isinstance(account_filter, dict) else None
    for mode in modes if isinstance(modes, list) else []:
        if isinstance(mode, str) and mode.upper() in MODES:
            return mode.upper()
    return parent.mode if parent is not None else ""


def _inherited_prefix(parent: Task) -> str:
    """The speed prefix the parent was submitted under, which its channel therefore serves ("" if none)."""
    prefix = parent.properties_dict().get("speedPrefix")
    return prefix if isinstance(prefix, str) and prefix in PREFIXES else ""


def _follows_up(kind: str, body: dict) -> bool:
    return kind in FOLLOW_UP_KINDS or (kind == "video" and body.get("taskId") not in (None, ""))


def _owned_parent(user: User, kind: str, body: dict) -> Task:
    """The earlier task a follow-up continues: the caller's, finished with SUCCESS (a modal step continues
    a task waiting for it). Raises _Refusal before anything is reserved."""
    parent_id = _parent_id(kind, body)
    if not parent_id:
        field = "content" if kind == "simple-change" else "taskId"
        raise _Refusal(400, 4, f"{field} is required")
    parent = tasks.owned_task(user.id, parent_id)
    if parent is None:
        # Someone else's task reads exactly like a missing one: ids of others are not disclosed.
        raise _Refusal(404, 3, f"task {parent_id} not found")
    if kind != "modal" and parent.status != "SUCCESS":
        raise _Refusal(409, 4, f"task {parent_id} has not finished with SUCCESS (it is {parent.status}); "
                               f"only a successful task's result can be acted on")
    return parent


def _channels_for(parent: Task | None) -> list[Channel]:
    if parent is None:
        channels = channel_health.in_rotation_order(channel_health.list_channels(enabled_only=True))
        if not channels:
            raise _Refusal(503, 9, "no upstream channel is enabled")
        return channels
    channel = Channel.get_or_none(Channel.id == parent.channel_id)
    if channel is None or not channel.enabled:
        raise _Refusal(503, 9, f"the channel of task {parent.mj_id} is no longer available")
    return [channel]


def _forward(settings, channels: list[Channel], kind: str, body: dict, prefix: str,
             not_after: float | None = None, record: PendingSubmission | None = None) -> tuple[Channel, SubmitResult]:
    """Send to the first channel that answers; raises _Refusal when none gives a usable answer.

    not_after (monotonic) is when the calls must be over: no call starts with less than a second left or
    runs past it, so the reservation covering them cannot expire while one is still open. With the
    submission's pending record, each channel gets the submission's own notify link and its nonce as
    state, and a channel failed over to is added to the record before it is called.

    Besides an unreachable channel, two answers send the submission on to the next channel when there is
    one: "no account available" (code 3 to a submission that continues no task: the upstream has no
    Discord account left to run it) and 404/405 without an envelope (the upstream does not offer the
    route, as a Java upstream does not offer video)."""
    failures: list[str] = []
    for position, channel in enumerate(channels):
        deadline = Deadline(submit_deadline(settings))
        if not_after is not None:
            if not_after - time.monotonic() < 1.0:
                failures.append(f"{channel.name}: not tried, no time left")
                break
            if deadline.at > not_after:
                deadline = Deadline(not_after - time.monotonic())
        outgoing = dict(body)
        if record is not None:
            outgoing["state"] = pending.upstream_state(record.nonce)
            hook = notify_hook_url(settings, channel.id, record.nonce)
            if hook:
                outgoing["notifyHook"] = hook
            if position > 0:
                retry_transaction(lambda: pending.note_channel(record, channel.id),  # noqa: B023 - called before the loop moves on
                                  what="noting a failover")
        try:
            client = _client(settings, channel)
        except MjctlError as exc:  # a secret sealed under another server secret
            log.error("channel %s: %s", channel.name, exc.message)
            failures.append(f"{channel.name}: unusable secret")
            continue
        last = position == len(channels) - 1
        try:
            with client:
                if kind == SWAP_FACE:
                    result = client.swap_face(outgoing, prefix, deadline=deadline)
                else:
                    result = client.submit(kind, outgoing, prefix, deadline=deadline)
            channel_health.note_success(channel)
            if result.code == NO_ACCOUNT_CODE and len(channels) > 1:  # only a new task has several channels
                channel_health.cool_down(settings, channel, f"no account available: {result.description}")
                if not last:
                    failures.append(f"{channel.name}: no account available")
                    continue
            return channel, result
        except UpstreamUnavailable as exc:
            log.warning("channel %s unavailable, failing over: %s", channel.name, exc)
            channel_health.note_failure(settings, channel, str(exc))
            failures.append(f"{channel.name}: {exc}")
        except UpstreamUnauthorized as exc:
            log.error("channel %s refused its secret: %s", channel.name, exc)
            channel_health.cool_down(settings, channel, "the upstream refused mjctl's secret")
            if not last:
                failures.append(f"{channel.name}: refused mjctl's secret")
                continue
            raise _Refusal(502, 9, f"the upstream refused mjctl's credentials (channel {channel.name})") from None
        except UpstreamRateLimited:
            raise _Refusal(429, 9, f"the upstream is rate limiting (channel {channel.name}); try again later") from None
        except UpstreamProtocolError as exc:
            if exc.status in (404, 405):
                log.warning("channel %s does not offer %s: %s", channel.name, kind, exc)
                failures.append(f"{channel.name}: does not offer {kind}")
                if last:
                    raise _Refusal(502, 9, f"no upstream channel offers {kind}") from None
                continue
            log.error("channel %s answered off-protocol: %s", channel.name, exc)
            raise _Refusal(502, 9, f"the upstream gave an invalid answer (channel {channel.name})") from None
    log.error("no channel answered: %s", "; ".join(failures))
    raise _Refusal(503, 9, "no upstream channel is reachable; try again later")


def _local_id() -> str:
    return f"{int(time.time() * 1000)}{random.randrange(1000):03d}"


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def submit(settings, user: User, kind: str, body: dict, prefix: str = "") -> Envelope:
    """Relay one submission for user; returns (HTTP status, upstream-style envelope).

    Refusals (unknown kind, a field of the wrong type or too long, a task the caller does not own,
    insufficient quota, no channel) never reach the upstream and change nothing. See the module docstring
    for how charging stays exact.
    """
    if kind not in SUBMIT_KINDS and kind != SWAP_FACE:
        return 404, envelope(3, f"unknown submit kind {kind!r}")
    if prefix not in PREFIXES:
        return 404, envelope(3, f"unknown speed prefix {prefix!r}")
    if not isinstance(body, dict):
        return 400, envelope(4, "the body must be a JSON object")
    if kind == "upload-discord-images":
        return upload_images(settings, user, body, prefix)
    caller_hook = body.get("notifyHook")
    try:
        check_fields(settings, body)
        parent = _owned_parent(user, kind, body) if _follows_up(kind, body) else None
        # The task waiting in MODAL that this modal step moves on (None for anything else).
        modal_parent = parent if kind == "modal" and parent is not None and parent.status == "MODAL" else None
        action = action_for(kind, body)
        if not prefix and parent is not None:  # a follow-up keeps its parent's speed unless it names one
            prefix = _inherited_prefix(parent)
        mode = mode_of(prefix, body, parent)
        price = settings.price("MODAL" if kind == "modal" else action, mode)
        channels = _channels_for(parent)
        ttl = reservation_ttl(settings, len(channels))
        local_properties: dict[str, Any] = {}
        if caller_hook:
            local_properties["notifyHook"] = _text(caller_hook)
        if prefix:
            local_properties["speedPrefix"] = prefix
        fields = dict(nonce=pending.new_nonce(), kind=kind, action=action, channel_ids=str(channels[0].id), mode=mode,
                      parent_task_id=modal_parent.id if modal_parent else None, state=_text(body.get("state")),
                      prompt=_text(body.get("prompt")),
                      properties=json.dumps(local_properties, ensure_ascii=False) if local_properties else "")
        record = retry_transaction(lambda: _write_ahead(user.id, price, ttl, fields), what="reserving quota")
        # Counted from after the reservation was written, so the calls end RESERVATION_SLACK before it does.
        not_after = time.monotonic() + ttl - RESERVATION_SLACK
    except _Refusal as refusal:
        return refusal.answer()

    forwarded = {k: v for k, v in body.items() if k != "notifyHook"}
    try:
        channel, result = _forward(settings, channels, kind, forwarded, prefix, not_after, record)
    except _Refusal as refusal:
        _drop_tx(record)
        return refusal.answer()
    except BaseException:
        _drop_tx(record)
        raise

    answer = envelope(result.code, result.description, result.result,
                      relay_properties(result.properties, _public_base(settings)))

    def record_outcome() -> int | None:
        """Write the outcome; returns the HTTP status, or None for an accepted id that another task of the
        channel already has (the pending record and reservation go all the same). Retried whole after a
        deadlock."""
        with write_tx():
            claimed = pending.claim(record)
            if not result.accepted:
                mj_id = result.result
                if not mj_id or pending.id_taken(channel.id, mj_id):
                    mj_id = _local_id()  # a rejection names no task; it must not take another's id
                Task.create(mj_id=mj_id, status="FAILURE", progress="", quota=0, unfinished=0, mode=record.mode,
                            fail_reason=result.description or f"rejected by the upstream (code {result.code})",
                            prompt_en=_text(result.properties.get("promptEn")), finish_time=int(time.time()),
                            user_id=user.id, channel_id=channel.id, action=action, code=result.code,
                            description=result.description[:1000], state=record.state,
                            prompt=record.prompt if kind != "modal" else "", nonce=record.nonce,
                            properties=json.dumps({**result.properties, **local_properties}, ensure_ascii=False),
                            submit_time=int(time.time()))
                return result.http_status  # as the upstream said it: 200 (Java) or 404 (C# code 3)
            mj_id = result.result or _local_id()
            if not claimed and pending.recorded(channel.id, mj_id, record.nonce) is not None:
                return 200  # a poller adopted it while the answer was on its way: already recorded and charged
            status = "MODAL" if result.code == 21 else ("NOT_START" if result.code == 22 else "SUBMITTED")
            if modal_parent is not None and modal_parent.mj_id == mj_id:
                _continue_modal(modal_parent, body, result, status, price)
                return 200
            done = None if modal_parent is not None else _finished_at_once(result)
            if done and _own_task(user.id, channel.id, mj_id):
                answer["code"] = 1
                return 200  # the caller's own finished task, named again: nothing new to record or charge
            if pending.id_taken(channel.id, mj_id):
                return None
            task = pending.create_task(record, channel.id, mj_id, status="SUCCESS" if done else status,
                                       code=result.code, description=result.description,
                                       properties=result.properties)
            if done:
                now = int(time.time())
                Task.update(progress="100%", image_url=done, start_time=now, finish_time=now, unfinished=0,
                            updated_at=time.time()).where(Task.id == task.id).execute()
                answer["code"] = 1  # to the caller it is a task like any other, only finished already
        return 200

    try:
        status = retry_transaction(record_outcome, what=f"recording task {result.result}")
    except peewee.IntegrityError:
        # Another task of the channel took the id between the check and the insert (a unique index said so).
        _drop_tx(record)
        status = None
    if status is not None:
        return status, answer
    log.error("channel %s answered a submission of user %s with %r, an id another task of the channel already "
              "has: not recorded, not charged", channel.name, user.id, result.result)
    return 502, envelope(9, f"the upstream gave an invalid answer (channel {channel.name})")


def _finished_at_once(result: SubmitResult) -> str | None:
    """The image URL of a code-21 answer that says the task exists and has finished ("task already exists"
    with ``properties.status`` SUCCESS and an ``imageUrl``): the task is recorded finished, charged, with that
    image. None for any other answer, code 21's "waiting for a modal step" included."""
    properties = result.properties
    if result.code != 21 or str(properties.get("status") or "").upper() != "SUCCESS":
        return None
    url = upstream_text.clean_url(properties.get("imageUrl"))
    return url if url and url.startswith(("https://", "http://")) else None


def _own_task(user_id: int, channel_id: int, mj_id: str) -> bool:
    return Task.select(Task.id).where((Task.channel_id == channel_id) & (Task.mj_id == mj_id)
                                      & (Task.user_id == user_id)).exists()


def upload_images(settings, user: User, body: dict, prefix: str = "") -> Envelope:
    """Relay ``upload-discord-images``: the upstream answers at once with the images' links, no task is
    made. Free unless ``[prices] UPLOAD`` is set; then that price is held like a submission's and charged
    (one ledger entry, no task) when the upstream accepts, released when it does not."""
    try:
        check_fields(settings, body)
        images = body.get("base64Array")
        if not isinstance(images, list) or not images:
            raise _Refusal(400, 4, "base64Array must be a non-empty list of data URLs")
        channels = _channels_for(None)
        price = settings.price("UPLOAD")
        ttl = reservation_ttl(settings, len(channels))
        record = None
        if price:
            fields = dict(nonce=pending.new_nonce(), kind="upload", action="UPLOAD",
                          channel_ids=str(channels[0].id), parent_task_id=None, state="", prompt="", properties="")
            record = retry_transaction(lambda: _write_ahead(user.id, price, ttl, fields), what="reserving quota")
        not_after = time.monotonic() + ttl - RESERVATION_SLACK
    except _Refusal as refusal:
        return refusal.answer()
    forwarded = {k: v for k, v in body.items() if k not in ("notifyHook", "state")}
    try:
        channel, result = _forward(settings, channels, "upload-discord-images", forwarded, prefix, not_after)
    except _Refusal as refusal:
        if record is not None:
            _drop_tx(record)
        return refusal.answer()
    except BaseException:
        if record is not None:
            _drop_tx(record)
        raise
    if record is not None:
        if result.accepted:
            def charge_upload() -> None:
                with write_tx():
                    if pending.claim(record):
                        accounts.charge(user.id, price, task_id=None,
                                        reason=f"UPLOAD {len(result.links)} image(s) via {channel.name}")
            retry_transaction(charge_upload, what="charging an upload")
        else:
            _drop_tx(record)
    return (200 if result.accepted else result.http_status), envelope(
        result.code, result.description, list(result.links) if result.accepted else None)


def cancel(settings, user: User, mj_id: str) -> Envelope:
    """Cancel one of the caller's unfinished tasks: the upstream of its channel is asked
    (``POST /mj/task/<id>/cancel``, which C# upstreams offer); when it agrees the task becomes CANCEL
    through the poller's own apply path and is refunded like a FAILURE, exactly once."""
    from mjctl import reports

    task = tasks.owned_task(user.id, mj_id)
    if task is None:
        return 404, envelope(3, "task not found")
    if task.unfinished == 0:
        return 409, envelope(4, f"task {mj_id} is already finished ({task.status})")
    channel = Channel.get_or_none(Channel.id == task.channel_id)
    if channel is None:
        return 409, envelope(4, f"the channel of task {mj_id} is gone; it cannot be cancelled")
    try:
        result = _ask(settings, channel, lambda client: client.cancel(mj_id))
    except _Refusal as refusal:
        return refusal.answer()
    except UpstreamProtocolError as exc:
        if exc.status in (404, 405):
            return 501, envelope(4, f"the upstream of task {mj_id} (channel {channel.name}) cannot cancel tasks")
        return 502, envelope(9, "the upstream gave an invalid answer")
    if not result.accepted:
        if result.http_status == 404:
            return 501, envelope(4, f"the upstream of task {mj_id} (channel {channel.name}) cannot cancel it: "
                                    f"{result.description or 'not found'}")
        return (result.http_status if 400 <= result.http_status < 500 else 409), envelope(
            result.code, result.description or "the upstream refused to cancel the task")
    report = {"id": mj_id, "status": "CANCEL", "progress": "", "finishTime": int(time.time() * 1000),
              "failReason": "cancelled by its owner"}
    reports.apply_report(channel.id, report, reports.PushScope(task.id))
    return 200, envelope(1, "cancelled", mj_id)


def _charge(task: Task, price: int) -> None:
    pending.charge(task, price)


def _continue_modal(parent: Task, body: dict, result: SubmitResult, status: str, price: int) -> None:
    """The modal step of a code-21 task: the same row moves on; it costs price("MODAL") on top."""
    changes: dict[str, Any] = dict(status=status, code=result.code, description=result.description[:1000],
                                   progress="0%" if status == "SUBMITTED" else "", updated_at=time.time(),
                                   quota=Task.quota + price)
    if isinstance(body.get("prompt"), str) and body["prompt"].strip():
        changes["prompt"] = body["prompt"]
    moved = Task.update(**changes).where((Task.id == parent.id) & (Task.status == "MODAL")).execute()
    if moved == 1:
        _charge(Task.get_by_id(parent.id), price)


def _ask(settings, channel: Channel, call: Callable[[UpstreamClient], SubmitResult]) -> SubmitResult:
    """call with a client of the task's channel. The failures every such call shares become a _Refusal
    (unreachable 503, refused secret 502, rate limited 429, an unreadable channel secret 502); an
    off-protocol answer is raised as it is, for the caller to read."""
    try:
        with _client(settings, channel) as client:
            return call(client)
    except UpstreamUnavailable:
        raise _Refusal(503, 9, "the upstream of this task is not reachable; try again later") from None
    except UpstreamUnauthorized:
        raise _Refusal(502, 9, "the upstream refused mjctl's credentials") from None
    except UpstreamRateLimited:
        raise _Refusal(429, 9, "the upstream is rate limiting; try again later") from None
    except MjctlError:  # a secret sealed under another server secret
        raise _Refusal(502, 9, "the channel's secret cannot be read") from None


def image_seed(settings, user: User, mj_id: str, prefix: str = "") -> Envelope:
    """The seed of one of the caller's tasks, asked of that task's channel (free of charge)."""
    task = tasks.owned_task(user.id, mj_id)
    if task is None:
        return 404, envelope(3, "task not found")
    try:
        (channel,) = _channels_for(task)
    except _Refusal as refusal:
        return refusal.answer()
    try:
        timeout = max(60.0, settings.poller.request_timeout)
        result = _ask(settings, channel, lambda client: client.image_seed(mj_id, timeout=timeout))
    except _Refusal as refusal:
        return refusal.answer()
    except UpstreamProtocolError:
        return 502, envelope(9, "the upstream gave an invalid answer")
    return (result.http_status if result.http_status < 500 else 502), envelope(
        result.code, result.description, result.result, relay_properties(result.properties, _public_base(settings)))


# --- reading ----------------------------------------------------------------------------------------

def _ms(seconds: int | None) -> int | None:
    return int(seconds) * 1000 if seconds else None


def _public_base(settings) -> str:
    """mjctl's public base (for relay_properties). Also puts the server secret among the secrets scrubbed
    from upstream text: it should never be there, and checking costs nothing."""
    from mjctl.images.urls import public_base

    upstream_text.remember_secret(crypto.server_secret(settings))
    return public_base(settings)


def _internal_url(text: str, base: str) -> bool:
    """Whether text is a URL of mjctl's own internals: its notify route (wherever it is served from), or
    anything under its public base other than its image links."""
    if NOTIFY_PATH in text:
        return True
    return bool(base) and text.startswith(base) and not text.startswith(base + IMAGE_ROUTE)


def relay_properties(properties: Any, base: str = "") -> dict[str, Any]:
    """properties as the relay may hand them to a user: no ``notifyHook`` at any depth (mjctl's own signed
    push link as the upstream echoes it, or the caller's own hook, which the protocol never returns) and
    no string that is a URL of mjctl's internals (:func:`_internal_url`; base is mjctl's public base)."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()
                    if k != "notifyHook" and not (isinstance(v, str) and _internal_url(v, base))}
        if isinstance(value, list):
            return [clean(v) for v in value if not (isinstance(v, str) and _internal_url(v, base))]
        return value

    return clean(properties) if isinstance(properties, dict) else {}


def _own_base(image_url: ImageUrl, task: Task) -> str:
    """mjctl's public base, read off the image link function (the one thing here that knows it); "" when
    images are not forwarded."""
    if image_url is None:
        return ""
    link = image_url(task) or ""
    at = link.find(IMAGE_ROUTE)
    return link[:at] if at > 0 else ""


def upstream_shape(task: Task, image_url: ImageUrl = None) -> dict[str, Any]:
    """A task as midjourney-proxy answers it (docs/upstream.md, "The task object"): camelCase, times in
    milliseconds.

    Only the fields the protocol defines, and none of mjctl's internals (:func:`relay_properties`). The
    upstream's texts were bounded and scrubbed when stored (mjctl.upstream_text); they are bounded again
    here, cheaply, for rows stored before that was so."""
    base = _own_base(image_url, task)
    properties = relay_properties(task.properties_dict(), base)
    image = task.image_url or None
    if image and image_url is not None:
        image = image_url(task) or image
    own = image_url is not None  # videos handed out as mjctl's own signed links, whatever the upstream's were
    video_url, video_urls = image_url.videos(task.id, task.mj_id, task.video_url, task.video_urls) if image_url \
        else (task.video_url, task.video_urls)
    try:
        urls = json.loads(video_urls) if video_urls else []
    except ValueError:
        urls = []
    if image and image_url is None and _internal_url(image, base):
        image = None
    if task.progress:
        progress = task.progress
    else:
        progress = "" if task.status in ("FAILURE", "CANCEL") else None
    return {
        "id": task.mj_id,
        "action": task.action,
        "status": task.status,
        "progress": progress,
        "prompt": task.prompt,
        "promptEn": upstream_text.clean_text(task.prompt_en, upstream_text.MAX_PROMPT_CHARS) or None,
        "description": upstream_text.clean_text(task.description) or None,
        "state": task.state or None,
        "submitTime": _ms(task.submit_time),
        "startTime": _ms(task.start_time),
        "finishTime": _ms(task.finish_time),
        "imageUrl": image,
        "videoUrl": video_url if video_url and (own or not _internal_url(video_url, base)) else None,
        "videoUrls": [{"url": u} for u in urls if isinstance(u, str) and (own or not _internal_url(u, base))]
        or None,
        "failReason": upstream_text.clean_text(task.fail_reason) or None,
        "buttons": upstream_text.clean_buttons(task.buttons_list()) or [],
        "properties": properties,
    }


def fetch(user: User, mj_id: str, image_url: ImageUrl = None) -> dict[str, Any] | None:
    """One of the caller's tasks in the upstream shape, or None (another user's task with that id too)."""
    task = tasks.owned_task(user.id, mj_id)
    return upstream_shape(task, image_url) if task is not None else None


def list_latest(user: User, image_url: ImageUrl = None, limit: int = LATEST_LIMIT) -> list[dict[str, Any]]:
    """The caller's latest tasks (100), newest first."""
    query = Task.select().where(Task.user_id == user.id).order_by(Task.id.desc()).limit(limit)
    return [upstream_shape(t, image_url) for t in query]


def list_by_condition(user: User, ids: list, image_url: ImageUrl = None) -> list[dict[str, Any]]:
    """The caller's tasks among ids (unknown and other users' ids are left out, as upstreams do)."""
    wanted = list(dict.fromkeys(str(i) for i in ids if isinstance(i, (str, int)) and str(i)))[:MAX_IDS]
    # One task per id, the newest of the caller's, as fetch answers (tasks.owned_tasks).
    return [upstream_shape(task, image_url) for task in tasks.owned_tasks(user.id, wanted)]
