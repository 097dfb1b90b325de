"""`tasks list --server URL`: reading a remote mjctl over HTTP.

`--mine` calls GET /api/mj/self, otherwise GET /api/mj/ (admin only). The answer's `data` is the same
envelope the local listing renders, so the table and --json are identical in both modes.
"""

from __future__ import annotations

from mjctl.errors import MjctlError, UsageError

TIMEOUT_SECONDS = 30.0
CONNECT_TIMEOUT_SECONDS = 5.0


def remote_list(settings, *, mine: bool, user: str | None, channel: str | None, mj_id: str | None,
                status: str | None, action: str | None, start: int | None, end: int | None, page: int,
                page_size: int, mode: str | None = None) -> tuple[dict, bool]:
    """One page from the server in [client] server; returns (envelope data, whether admin fields are in it)."""
    import httpx

    server = (settings.client.server or "").strip().rstrip("/")
    if not server.startswith(("http://", "https://")):
        raise UsageError(f"The server {server!r} is not an http:// or https:// URL.")
    token = (settings.client.token or "").strip()
    if not token:
        raise UsageError("Reading a remote server needs your token in $MJCTL_TOKEN or [client] token.")
    if user:
        raise UsageError("--user is not supported with --server; use --mine with that user's token.")
    params: dict[str, str | int] = {"p": page, "page_size": page_size}
    if channel:
        if mine:
            raise UsageError("--channel cannot be combined with --mine when reading a remote server.")
        if not channel.isdigit():
            raise UsageError(f"--channel must be a channel id (a number) with --server, not {channel!r}.")
        params["channel_id"] = int(channel)
    if mj_id:
        params["mj_id"] = mj_id
    if mode:
        if mine:
            raise UsageError("--mode cannot be combined with --mine when reading a remote server.")
        params["mode"] = mode
    if status:
        params["status"] = status.upper()
    if action:
        params["action"] = action.upper()
    if start is not None:
        params["start_timestamp"] = start
    if end is not None:
        params["end_timestamp"] = end
    url = server + ("/api/mj/self" if mine else "/api/mj/")
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    try:
        with httpx.Client(timeout=httpx.Timeout(TIMEOUT_SECONDS, connect=CONNECT_TIMEOUT_SECONDS)) as client:
            response = client.get(url, params=params, headers=headers)
    except httpx.TimeoutException:
        raise MjctlError(f"The mjctl server at {server} did not answer in time.") from None
    except httpx.HTTPError as exc:
        raise MjctlError(f"Cannot reach the mjctl server at {server}: {exc or type(exc).__name__}.") from None
    message = message_of(response)
    if response.status_code == 401:
        raise MjctlError(f"The server at {server} rejected the token in $MJCTL_TOKEN or [client] token: {message}")
    if response.status_code == 403:
        if not mine:  # a user's token asking for everyone's tasks
            raise MjctlError(f"The server at {server} refused ({message.rstrip('.')}); add --mine to list your "
                             "own tasks.")
        raise MjctlError(f"The server at {server} refused: {message}")
    if response.status_code == 400:
        raise UsageError(f"The server at {server} rejected the request: {message}")
    if response.status_code != 200:
        raise MjctlError(f"The server at {server} answered {response.status_code}: {message}")
    try:
        data = response.json()["data"]
        for key in ("items", "total", "page", "page_size"):
            data[key]
    except (ValueError, KeyError, TypeError):
        raise MjctlError(f"The server at {server} did not answer like an mjctl server.") from None
    return data, not mine


def message_of(response) -> str:
    """The message of a remote mjctl's answer, or its HTTP status when it has none."""
    try:
        message = response.json().get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message).strip() if message else f"HTTP {response.status_code}."
