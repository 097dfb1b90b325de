"""Upstream channels: midjourney-proxy deployments with a base URL, a secret (sealed at rest) and a priority."""

from __future__ import annotations

import logging
import threading
import time
from urllib.parse import urlparse

import httpx
import peewee

from mjctl import crypto
from mjctl.accounts import validate_name
from mjctl.db import write_tx
from mjctl.errors import Conflict, NotFound, UsageError
from mjctl.models import Channel
from mjctl.upstream import UpstreamClient

log = logging.getLogger("mjctl.channels")


def validate_base_url(url: str) -> str:
    parsed = urlparse((url or "").strip())
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UsageError(f"Base URL {url!r} is not valid; use http://HOST[:PORT][/PATH] or https://….")
    try:
        parsed.port  # noqa: B018 - reading it is the check: a bad port raises ValueError
    except ValueError:
        raise UsageError(f"Base URL {url!r} has an invalid port.") from None
    return url.strip().rstrip("/")


def add_channel(settings, name: str, base_url: str, secret: str, *, priority: int = 0, enabled: bool = True) -> Channel:
    validate_name(name, "channel")
    base_url = validate_base_url(base_url)
    sealed = crypto.seal(crypto.server_secret(settings), secret) if secret else ""
    try:
        with write_tx():
            channel = Channel.create(name=name, base_url=base_url, secret_sealed=sealed, priority=priority,
                                     enabled=enabled)
    except peewee.IntegrityError:
        raise Conflict(f"A channel named {name!r} already exists.") from None
    return channel


def get_channel(ref: str | int) -> Channel:
    """A channel by name, or by id when ref is all digits."""
    channel = None
    if isinstance(ref, int) or str(ref).isdigit():
        channel = Channel.get_or_none(Channel.id == int(ref))
    if channel is None:
        channel = Channel.get_or_none(Channel.name == str(ref))
    if channel is None:
        raise NotFound(f"No channel named {ref!r}.")
    return channel


def list_channels(enabled_only: bool = False) -> list[Channel]:
    query = Channel.select().order_by(Channel.priority.desc(), Channel.id)
    if enabled_only:
        query = query.where(Channel.enabled == True)  # noqa: E712 - peewee builds SQL from ==; `is True` would be a Python bool
    return list(query)


def set_enabled(ref: str | int, enabled: bool) -> Channel:
    """Enable or disable a channel; enabling also ends a cool-down (the operator says it is fine)."""
    channel = get_channel(ref)
    changes: dict = {"enabled": enabled}
    if enabled:
        changes.update(cooldown_until=0.0, health_reason="")
    with write_tx():
        Channel.update(**changes).where(Channel.id == channel.id).execute()
    return Channel.get_by_id(channel.id)


# --- health ---------------------------------------------------------------------------------------------

#: Consecutive transport failures (unreachable, timed out, 5xx) after which a channel cools down.
FAILURES_BEFORE_COOLDOWN = 3
_failures: dict[int, int] = {}
_failures_lock = threading.Lock()


def cooling_down(channel: Channel, now: float | None = None) -> bool:
    return float(channel.cooldown_until or 0) > (time.time() if now is None else now)


def cool_down(settings, channel: Channel, reason: str) -> None:
    """Put channel out of rotation for new submissions for [relay] channel_cooldown seconds: it is tried
    after every healthy channel, follow-ups of its tasks still go to it, and the poller keeps polling it.
    `channels enable` ends it early."""
    seconds = float(settings.relay.channel_cooldown)
    if seconds <= 0:
        return
    until = time.time() + seconds
    with write_tx():
        Channel.update(cooldown_until=until, health_reason=reason[:255]).where(Channel.id == channel.id).execute()
    log.warning("channel %s cools down for %.0f s: %s", channel.name, seconds, reason)


def note_failure(settings, channel: Channel, reason: str) -> None:
    """One more transport failure in a row; the FAILURES_BEFORE_COOLDOWN-th cools the channel down."""
    with _failures_lock:
        count = _failures[channel.id] = _failures.get(channel.id, 0) + 1
        if count >= FAILURES_BEFORE_COOLDOWN:
            _failures[channel.id] = 0
    if count >= FAILURES_BEFORE_COOLDOWN:
        cool_down(settings, channel, f"{count} failures in a row, the last: {reason}")


def note_success(channel: Channel) -> None:
    with _failures_lock:
        _failures.pop(channel.id, None)


def in_rotation_order(channels: list[Channel], now: float | None = None) -> list[Channel]:
    """Healthy channels first (in their order), then the cooling ones, soonest back first: a submission
    fails over to a cooling channel only when no healthy one could take it."""
    now = time.time() if now is None else now
    healthy = [c for c in channels if not cooling_down(c, now)]
    cooling = sorted((c for c in channels if cooling_down(c, now)), key=lambda c: float(c.cooldown_until))
    return healthy + cooling


def health(channel: Channel, now: float | None = None) -> str:
    """"ok", or why and until when the channel is out of rotation."""
    if not cooling_down(channel, now):
        return "ok"
    until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(channel.cooldown_until)))
    return f"cooling down until {until}: {channel.health_reason}"


def remove_channel(ref: str | int) -> Channel:
    """Delete a channel. Its unfinished tasks are failed and refunded by the next poll cycle."""
    channel = get_channel(ref)
    with write_tx():
        Channel.delete().where(Channel.id == channel.id).execute()
    return channel


def channel_secret(settings, channel: Channel) -> str:
    if not channel.secret_sealed:
        return ""
    return crypto.unseal(crypto.server_secret(settings), channel.secret_sealed)


def client_for(settings, channel: Channel, *, timeout: float, transport: httpx.BaseTransport | None = None
               ) -> UpstreamClient:
    """The one way to talk to a channel: its URL and decrypted secret, a total deadline of ``timeout`` seconds
    per call, and at most 5 s (or the deadline, if shorter) to connect."""
    return UpstreamClient(channel.base_url, channel_secret(settings, channel), timeout=timeout,
                          connect_timeout=min(5.0, timeout), transport=transport, channel=channel.name)


def channel_dict(channel: Channel) -> dict:
    return {
        "id": channel.id,
        "name": channel.name,
        "base_url": channel.base_url,
        "enabled": bool(channel.enabled),
        "priority": channel.priority,
        "has_secret": bool(channel.secret_sealed),
        "created_at": int(channel.created_at),
        "health": health(channel),
        "cooldown_until": float(channel.cooldown_until or 0) or None,
    }
