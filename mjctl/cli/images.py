"""`mjctl images …`: the image cache (prune, stats).

The image modules (httpx underneath) are imported inside each command, so that `mjctl --help` does not
load them.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from mjctl.cli.output import Group, JsonOut, examples, human_size, human_time, print_json, table
from mjctl.cli.state import state
from mjctl.textsafe import visible

app = typer.Typer(cls=Group, no_args_is_help=True, help="Manage the image cache.")


@app.command("prune", epilog=examples('mjctl images prune --older-than 7d'))
def prune(
    ctx: typer.Context,
    older_than: Annotated[str, typer.Option("--older-than", help="Remove images cached longer ago than this "
                                            "(30d, 12h, seconds).")] = "30d",
    json_out: JsonOut = False,
) -> None:
    """Remove cached images older than --older-than (and temp files left by interrupted downloads)."""
    from mjctl.images import ImageCache
    from mjctl.timeparse import parse_duration

    seconds = parse_duration(older_than, option="--older-than")
    settings = state(ctx).settings()
    cache = ImageCache(settings.images.cache_dir)
    result = {"directory": str(cache.directory), "older_than": seconds, **cache.prune(seconds)}
    if json_out:
        print_json(result)
        return
    sys.stdout.write(visible(f"Removed {result['removed']} image(s) ({human_size(result['removed_bytes'])}) older "
                             f"than {older_than} from {cache.directory}; {result['kept']} "
                             f"({human_size(result['kept_bytes'])}) kept.") + "\n")  # a folder name is data


@app.command("stats", epilog=examples('mjctl images stats --json'))
def stats(ctx: typer.Context, json_out: JsonOut = False) -> None:
    """How many images the cache holds, their total size and age."""
    from mjctl.images import ImageCache

    settings = state(ctx).settings()
    data = ImageCache(settings.images.cache_dir).stats()
    if json_out:
        print_json(data)
        return
    table(["FIELD", "VALUE"], [
        ("directory", data["directory"]),
        ("images", data["files"]),
        ("size", human_size(data["bytes"])),
        ("oldest", human_time(data["oldest"])),
        ("newest", human_time(data["newest"])),
        ("unfinished downloads", data["temp_files"]),
    ])
