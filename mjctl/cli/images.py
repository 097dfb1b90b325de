"""`mjctl images …`: the result store (prune, stats, migrate).

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

app = typer.Typer(cls=Group, no_args_is_help=True, help="Manage the image store (the local folder or an S3 bucket).")


@app.command("prune", epilog=examples('mjctl images prune --older-than 7d'))
def prune(
    ctx: typer.Context,
    older_than: Annotated[str, typer.Option("--older-than", help="Remove images cached longer ago than this "
                                            "(30d, 12h, seconds).")] = "30d",
    json_out: JsonOut = False,
) -> None:
    """Remove images stored longer ago than --older-than (and temp files left by interrupted downloads), from
    the local folder or the S3 bucket of [images] store."""
    from mjctl.images import result_store
    from mjctl.timeparse import parse_duration

    seconds = parse_duration(older_than, option="--older-than")
    store = result_store(state(ctx).settings())
    result = {"store": store.location, "older_than": seconds, **store.prune(seconds)}
    if json_out:
        print_json(result)
        return
    sys.stdout.write(visible(f"Removed {result['removed']} image(s) ({human_size(result['removed_bytes'])}) older "
                             f"than {older_than} from {store.location}; {result['kept']} "
                             f"({human_size(result['kept_bytes'])}) kept.") + "\n")  # a folder name is data


@app.command("stats", epilog=examples('mjctl images stats --json'))
def stats(ctx: typer.Context, json_out: JsonOut = False) -> None:
    """How many images the store (the local folder or the S3 bucket) holds, their total size and age."""
    from mjctl.images import result_store

    data = result_store(state(ctx).settings()).stats()
    if json_out:
        print_json(data)
        return
    table(["FIELD", "VALUE"], [
        ("store", data["store"]),
        ("images", data["files"]),
        ("size", human_size(data["bytes"])),
        ("oldest", human_time(data["oldest"])),
        ("newest", human_time(data["newest"])),
        ("unfinished downloads", data["temp_files"]),
    ])


@app.command("migrate", epilog=examples("mjctl images migrate --to s3://mjctl-images/prod"))
def migrate(
    ctx: typer.Context,
    to: Annotated[str, typer.Option("--to", help="The bucket to copy into: s3://BUCKET/PREFIX (reached through "
                                    "the [images] s3_* settings).")],
    json_out: JsonOut = False,
) -> None:
    """Copy the local image folder ([images] cache_dir) into an S3 store. Resumable: images the bucket already
    holds are skipped, so running it again after an interruption copies only the rest."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from mjctl.cli.output import console, info
    from mjctl.errors import UsageError
    from mjctl.images import ImageCache
    from mjctl.images.migrate import migrate as copy_images
    from mjctl.images.s3 import S3Store
    from mjctl.images.store import parse_store_url

    settings = state(ctx).open_store()  # the task rows, for images cached under bare upstream ids
    if parse_store_url(to)[2]:
        raise UsageError(f"--to {parse_store_url(to)[2]}")
    local = ImageCache(settings.images.cache_dir)
    target = S3Store.from_settings(settings, local, url=to)
    with Progress(TextColumn("copying"), BarColumn(), MofNCompleteColumn(), console=console(), disable=json_out,
                  transient=True) as bar:
        job = bar.add_task("copy", total=None)
        result = copy_images(local, target, lambda done, total, _bytes: bar.update(job, completed=done, total=total))
    if json_out:
        print_json(result)
        return
    info(f"Copied {result['copied']} image(s) ({human_size(result['copied_bytes'])}) from {result['from']} to "
         f"{result['to']}; {result['skipped']} were there already.")
