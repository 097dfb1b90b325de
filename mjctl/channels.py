"""Upstream channels: midjourney-proxy deployments with a base URL, a secret (sealed at rest) and a priority."""

from __future__ import annotations

from urllib.parse import urlparse

import httpx
import peewee

from mjctl import crypto
from mjctl.accounts import validate_name
from mjctl.db import write_tx
from mjctl.errors import Conflict, NotFound, UsageError
from mjctl.models import Channel
from mjctl.upstream import UpstreamClient


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
    channel = get_channel(ref)
    with write_tx():
        Channel.update(enabled=enabled).where(Channel.id == channel.id).execute()
    return Channel.get_by_id(channel.id)


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
                          connect_timeout=min(5.0, timeout), transport=transport)


def channel_dict(channel: Channel) -> dict:
    return {
        "id": channel.id,
        "name": channel.name,
        "base_url": channel.base_url,
        "enabled": bool(channel.enabled),
        "priority": channel.priority,
        "has_secret": bool(channel.secret_sealed),
        "created_at": int(channel.created_at),
    }
