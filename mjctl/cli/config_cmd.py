"""`mjctl config show`."""

from __future__ import annotations

import typer

from mjctl.cli.output import Group, JsonOut, examples, print_json, table
from mjctl.cli.state import state

app = typer.Typer(cls=Group, no_args_is_help=True, help="Show the effective configuration.")


@app.command("show", epilog=examples(
    'mjctl config show',
    'MJCTL_CONFIG=/srv/mjctl/mjctl.toml mjctl config show --json',
))
def show(ctx: typer.Context, json_out: JsonOut = False) -> None:
    """Print the effective settings and where each came from (secrets redacted)."""
    from mjctl.config import describe_settings  # tomllib and dataclasses: 10 ms of `mjctl --help` at the top

    settings = state(ctx).settings()
    rows = describe_settings(settings)
    if json_out:
        print_json({
            "config_file": str(settings.config_path) if settings.config_path else None,
            "settings": settings.redacted(),
            "sources": {f"{r['section']}.{r['key']}": r["source"] for r in rows},
        })
        return
    title = f"config file: {settings.config_path or '(none)'}"
    table(["SECTION", "KEY", "VALUE", "SOURCE"], [(r["section"], r["key"], r["value"], r["source"]) for r in rows],
          title=title)
