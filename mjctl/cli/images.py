"""`mjctl images …`: the image cache (prune, stats), and `mjctl tasks image` (registered by mjctl.cli.tasks)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from mjctl.cli.state import state
from mjctl.textsafe import visible

app = typer.Typer(no_args_is_help=True)

JSON = typer.Option(False, "--json", help="Print JSON.")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} bytes"


@app.command("prune")
def prune(
    ctx: typer.Context,
    older_than: str = typer.Option("30d", "--older-than",
                                   help="Remove images cached longer ago than this (30d, 12h, seconds)."),
    json_out: bool = JSON,
) -> None:
    """Remove cached images older than --older-than (and temp files left by interrupted downloads)."""
    from mjctl.cli.output import print_json
    from mjctl.images import ImageCache
    from mjctl.timeparse import parse_duration

    seconds = parse_duration(older_than, option="--older-than")
    settings = state(ctx).settings()
    cache = ImageCache(settings.images.cache_dir)
    result = {"directory": str(cache.directory), "older_than": seconds, **cache.prune(seconds)}
    if json_out:
        print_json(result)
        return
    sys.stdout.write(visible(f"Removed {result['removed']} image(s) ({_size(result['removed_bytes'])}) older than "
                             f"{older_than} from {cache.directory}; {result['kept']} ({_size(result['kept_bytes'])}) "
                             f"kept.") + "\n")  # a folder name is shown escaped like any data


@app.command("stats")
def stats(ctx: typer.Context, json_out: bool = JSON) -> None:
    """How many images the cache holds, their total size and age."""
    from mjctl.cli.output import human_time, print_json, table
    from mjctl.images import ImageCache

    settings = state(ctx).settings()
    data = ImageCache(settings.images.cache_dir).stats()
    if json_out:
        print_json(data)
        return
    table(["FIELD", "VALUE"], [
        ("directory", data["directory"]),
        ("images", data["files"]),
        ("size", _size(data["bytes"])),
        ("oldest", human_time(data["oldest"])),
        ("newest", human_time(data["newest"])),
        ("unfinished downloads", data["temp_files"]),
    ])


def task_image(
    ctx: typer.Context,
    mj_id: str = typer.Argument(..., help="The task id."),
    row: int | None = typer.Option(None, "--row", min=1,
                                   help="The task's row id, to choose one of several tasks that share MJ_ID."),
    output: str | None = typer.Option(None, "--output", "-o",
                                      help="File to write (default: MJ_ID.<ext> here; - for stdout)."),
    json_out: bool = JSON,
) -> None:
    """Save a task's image, from the cache or fetched from its upstream (and cached when the task succeeded).
    When several tasks share the id (upstreams on different channels can give the same one), --row says
    which."""
    from mjctl.cli.output import info, print_json
    from mjctl.cli.tasks import tasks_named
    from mjctl.errors import NotFound, UsageError
    from mjctl.images import EXTENSIONS, ImageForwarder, ImageSource
    from mjctl.images.cache import claim_legacy_file

    settings = state(ctx).open_store()
    found = tasks_named(mj_id, row)
    if len(found) > 1:
        rows = ", ".join(f"{t.id} (channel {t.channel_id}, user {t.user_id})" for t in found)
        raise UsageError(f"{len(found)} tasks have the id {mj_id!r}: rows {rows}; choose one with --row.")
    task = found[0]
    if not task.image_url:
        raise NotFound(f"Task {mj_id} has no image (status {task.status}).")
    if output == "-" and json_out:
        raise UsageError("--json cannot be combined with -o - (both write to stdout).")
    source = ImageSource.from_task(task)
    with ImageForwarder(settings) as forwarder:
        claim_legacy_file(forwarder.cache, source)  # a file cached under the bare id by an earlier version
        if output == "-":
            stream = forwarder.save(source, sys.stdout.buffer)
            sys.stdout.buffer.flush()
            return
        stream = forwarder.open(source)
        try:
            safe_id = "".join(c if c.isalnum() or c in "-_" else "_" for c in mj_id)
            ext = EXTENSIONS.get(stream.content_type.split(";")[0], ".img")
            path = Path(output) if output else Path(f"{safe_id}{ext}")
            if path.is_dir():
                raise UsageError(f"{path} is a folder; give a file name with -o.")
            part = path.with_name(path.name + ".part")
            written = 0
            try:
                with open(part, "wb") as fh:
                    for chunk in stream:
                        fh.write(chunk)
                        written += len(chunk)
                os.replace(part, path)
            except BaseException:
                part.unlink(missing_ok=True)
                raise
        finally:
            stream.close()
    result = {"mj_id": mj_id, "row": task.id, "path": str(path), "bytes": written,
              "content_type": stream.content_type, "from_cache": stream.cached}
    if json_out:
        print_json(result)
        return
    info(f"Saved the image of task {mj_id} ({_size(written)}, {stream.content_type}"
         f"{', from the cache' if stream.cached else ''}) to {path}.")
