"""`mjctl stats` and `mjctl tasks export`: task statistics as a table (or the API's JSON), and every
matching task as CSV or JSON lines. Both read the local store, or a remote mjctl with --server."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from mjctl.cli.output import JsonOut, examples
from mjctl.cli.state import state

app = typer.Typer()

GROUP_HELP = "Group by day, hour, action, status, mode, channel or user (days and hours are UTC)."
BAR_WIDTH = 20

Since = Annotated[str | None, typer.Option("--since", help="Submitted at or after: epoch, ISO-8601, or an age "
                                           "like 7d.")]
Until = Annotated[str | None, typer.Option("--until", help="Submitted at or before: epoch, ISO-8601, or an age.")]
Mine = Annotated[bool, typer.Option("--mine", help="Only the tasks of the user whose token is in $MJCTL_TOKEN.")]
User = Annotated[str | None, typer.Option("--user", help="Only this user's tasks.")]
Channel = Annotated[str | None, typer.Option("--channel", help="Only this channel's tasks (id or name; an id with "
                                             "--server).")]
Status = Annotated[str | None, typer.Option("--status", help="Exact status, e.g. SUCCESS.")]
Action = Annotated[str | None, typer.Option("--action", help="Exact action, e.g. IMAGINE.")]
Server = Annotated[str | None, typer.Option("--server", help="Read a remote mjctl over HTTP ($MJCTL_SERVER).")]


@app.command("stats", epilog=examples(
    'mjctl stats',
    'mjctl stats --since 30d --by channel',
    'mjctl stats --since 2026-11-01 --until 2026-11-30 --by action --json',
))
def stats(
    ctx: typer.Context,
    since: Annotated[str | None, typer.Option("--since", help="Submitted at or after: epoch, ISO-8601, or an age "
                                              "(default 7d; 0 = every task).")] = "7d",
    until: Until = None,
    by: Annotated[str | None, typer.Option("--by", help=GROUP_HELP)] = "day",
    mine: Mine = False,
    user: User = None,
    channel: Channel = None,
    status: Status = None,
    action: Action = None,
    server: Server = None,
    json_out: JsonOut = False,
) -> None:
    """Task statistics per day (or hour, action, status, mode, channel, user): counts, success rate, quota, and
    queue and run times, with a bar per row; --json prints the API's data object."""
    from mjctl.cli.output import print_json
    from mjctl.stats import check_group

    st = state(ctx)
    st.override("client", "server", server)
    settings = st.settings()
    group_by = check_group(by, admin=True)
    if settings.client.server:
        data = _remote_json(settings, "/api/mj/stats", _remote_params(
            mine=mine, user=user, channel=channel, status=status, action=action, since=since, until=until,
            extra={"group_by": group_by} if group_by else {}))
    else:
        from mjctl.stats import compute_stats

        filters, admin = _local_filter(st, mine=mine, user=user, channel=channel, status=status, action=action,
                                       since=since, until=until)
        data = compute_stats(filters, check_group(group_by, admin=admin))
    if json_out:
        print_json(data)
        return
    render_stats(data)


def render_stats(data: dict) -> None:
    """One row per group and a total row: counts, rate, quota, percentiles, and a bar of the tasks."""
    from mjctl.cli.output import table
    from mjctl.cli.state import env

    tty = env().stdout_isatty
    group_by = data.get("group_by")
    key_title = (group_by or "all").upper() + (" (UTC)" if group_by in ("day", "hour") and tty else "")
    columns = [key_title, "TASKS", "SUCCESS", "FAILURE", "CANCEL", "UNFINISHED", "SUCCESS %", "CHARGED", "REFUNDED",
               "QUEUE P50", "QUEUE P95", "RUN P50", "RUN P95"]
    groups = data["groups"]
    most = max([g["tasks"] for g in groups] + [1])
    rows = []
    for group in groups + [{"key": "total", **data["totals"]}]:
        key = group["key"]
        if tty and group.get("name"):
            key = f"{group['name']} ({key})"
        rows.append([("-" if key in (None, "") else key), group["tasks"], group["success"], group["failure"],
                     group["cancel"], group["unfinished"], _rate(group["success_rate"]), group["quota_charged"],
                     group["quota_refunded"], *(_seconds(group[name]) for name in (
                         "queue_seconds_p50", "queue_seconds_p95", "run_seconds_p50", "run_seconds_p95"))])
    if tty:  # the bar: each group's tasks against the largest group's
        for row, group in zip(rows, groups):
            row.append(_bar(group["tasks"], most))
        rows[-1].append("")
        columns.append("")
    table(columns, rows)
    if tty and data.get("percentiles") == "sampled":
        from mjctl.cli.output import info

        info("Queue and run times are estimated from a sample of the tasks.")


def _rate(value: float | None) -> str:
    from mjctl.charts import rate_text

    return "-" if value is None else rate_text(value)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _bar(n: int, most: int) -> str:
    filled = round(BAR_WIDTH * n / most) if most else 0
    return "█" * filled + "░" * (BAR_WIDTH - filled)


def _local_filter(st, *, since: str | None, until: str | None, **options: Any):
    """The local TaskFilter (the listing's, from `tasks list`'s options); admin unless --mine."""
    from mjctl.cli.tasks import build_filter
    from mjctl.timeparse import parse_time

    settings = st.open_store()
    start = parse_time(since, option="--since") if since and since not in ("0", "all") else None
    end = parse_time(until, option="--until") if until else None
    return build_filter(mj_id=None, token=settings.client.token, start=start, end=end, **options)


def _remote_params(*, mine: bool, user: str | None, channel: str | None, status: str | None,
                   action: str | None, since: str | None, until: str | None, extra: dict) -> dict[str, Any]:
    """The query of a remote call: the server scopes it by the token (a user's own tasks, an admin's all)."""
    from mjctl.errors import UsageError
    from mjctl.timeparse import parse_time

    if user:
        raise UsageError("--user is not supported with --server; use --mine with that user's token.")
    params: dict[str, Any] = dict(extra)
    if channel:
        if not channel.isdigit():
            raise UsageError(f"--channel must be a channel id (a number) with --server, not {channel!r}.")
        params["channel_id"] = int(channel)
    if status:
        params["status"] = status.upper()
    if action:
        params["action"] = action.upper()
    if since and since not in ("0", "all"):
        params["start_timestamp"] = parse_time(since, option="--since")
    if until:
        params["end_timestamp"] = parse_time(until, option="--until")
    return params


#: How a remote server's refusal reads, by status: (error class name, what it means).
_REFUSALS = {400: ("UsageError", "rejected the request"), 401: ("MjctlError", "rejected the token in $MJCTL_TOKEN "
                                                                              "or [client] token"),
             403: ("MjctlError", "refused")}


def _remote(settings, path: str, params: dict[str, Any], *, stream: bool = False):
    """(client, response) from the remote server, the response open as a stream with stream=True; the
    caller closes both. Refusals become errors."""
    import httpx

    from mjctl import errors
    from mjctl.cli.remote import CONNECT_TIMEOUT_SECONDS, TIMEOUT_SECONDS, message_of

    server = (settings.client.server or "").strip().rstrip("/")
    if not server.startswith(("http://", "https://")):
        raise errors.UsageError(f"The server {server!r} is not an http:// or https:// URL.")
    token = (settings.client.token or "").strip()
    if not token:
        raise errors.UsageError("Reading a remote server needs your token in $MJCTL_TOKEN or [client] token.")
    client = httpx.Client(timeout=httpx.Timeout(TIMEOUT_SECONDS, connect=CONNECT_TIMEOUT_SECONDS))
    request = client.build_request("GET", server + path, params=params, headers={"Authorization": f"Bearer {token}"})
    try:
        response = client.send(request, stream=stream)
    except httpx.HTTPError as exc:
        client.close()
        raise errors.MjctlError(f"Cannot reach the mjctl server at {server}: {exc or type(exc).__name__}.") from None
    if response.status_code != 200:
        response.read()
        client.close()
        kind, meaning = _REFUSALS.get(response.status_code, ("MjctlError", f"answered {response.status_code}"))
        raise getattr(errors, kind)(f"The server at {server} {meaning}: {message_of(response)}")
    return client, response


def _remote_json(settings, path: str, params: dict[str, Any]) -> dict:
    from mjctl.errors import MjctlError

    client, response = _remote(settings, path, params)
    client.close()
    try:
        data = response.json()["data"]
        data["totals"], data["groups"]
    except (ValueError, KeyError, TypeError):
        raise MjctlError("The server did not answer like an mjctl server.") from None
    return data


def export_tasks(
    ctx: typer.Context,
    fmt: Annotated[str, typer.Option("--format", "-f", help="csv (with a header row) or jsonl (one task per "
                                     "line).")] = "csv",
    output: Annotated[str | None, typer.Option("--output", "-o", help="Write to this file (default: "
                                               "stdout).")] = None,
    mine: Mine = False,
    user: User = None,
    channel: Channel = None,
    mj_id: Annotated[str | None, typer.Option("--mj-id", help="Exact task id.")] = None,
    status: Status = None,
    action: Action = None,
    since: Since = None,
    until: Until = None,
    server: Server = None,
) -> None:
    """Every matching task, newest first, as CSV or JSON lines (the listing's fields; with user and channel
    names for an administrator), with a progress bar on stderr."""
    from mjctl import export

    st = state(ctx)
    st.override("client", "server", server)
    settings = st.settings()
    fmt = export.check_format(fmt)
    out = open(output, "wb") if output else sys.stdout.buffer  # noqa: SIM115 - closed below, stdout is not
    try:
        with _progress() as progress:
            if settings.client.server:
                params = _remote_params(mine=mine, user=user, channel=channel, status=status, action=action,
                                        since=since, until=until, extra={"format": fmt})
                if mj_id:
                    params["mj_id"] = mj_id
                _copy_remote(settings, params, out, progress, fmt)
            else:
                from mjctl.cli.tasks import image_links
                from mjctl.tasks import count_tasks

                filters, admin = _local_filter(st, mine=mine, user=user, channel=channel, status=status,
                                               action=action, since=since, until=until)
                filters.mj_id = mj_id or None
                task = progress.add_task("export", total=count_tasks(filters))
                batches = _counted(export.iter_batches(filters, admin=admin, image_url=image_links(st)),
                                   progress, task)
                for chunk in export.encode(batches, fmt, admin=admin):
                    _write(out, chunk, output is None)
    finally:
        if output:
            out.close()
        else:
            out.flush()


def _counted(batches, progress, task):
    for items in batches:
        yield items
        progress.advance(task, len(items))


def _copy_remote(settings, params: dict, out, progress, fmt: str) -> None:
    task = progress.add_task("export", total=None)
    client, response = _remote(settings, "/api/mj/export", params, stream=True)
    try:
        first = True
        for chunk in response.iter_bytes():
            lines = chunk.count(b"\n")
            if first and fmt == "csv" and lines:
                lines -= 1  # the header
            first = False
            progress.advance(task, lines)
            _write(out, chunk, out is sys.stdout.buffer)
    finally:
        response.close()
        client.close()


def _write(out, chunk: bytes, to_stdout: bool) -> None:
    """Bytes as they are, except to a terminal, where characters it would act on are shown escaped."""
    from mjctl.cli.state import env

    if to_stdout and env().stdout_isatty:
        from mjctl.textsafe import visible

        chunk = visible(chunk.decode("utf-8", "replace"), newlines=True).encode("utf-8")
    out.write(chunk)


def _progress():
    """A progress bar on stderr (nothing when stderr is not a terminal)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mjctl.cli.state import env

    console = Console(stderr=True, no_color=not env().color)
    return Progress(TextColumn("exporting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True, disable=not console.is_terminal)
