"""The root command: global options, the central error handler, `mjctl init`, and the command groups.

Each command group is a module of its own (users, channels, tasks, images, config) and so is each
top-level command (serve, poll, simulate, demo). Those modules import only typer and the CLI's own helpers
at load time, so `mjctl --help` stays as fast as Typer itself.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer

from mjctl import __version__
from mjctl.cli import channels, config_cmd, demo, images, poll, serve, simulate, stats, tasks, users
from mjctl.cli.output import Group, JsonOut, examples, info, print_json
from mjctl.cli.state import CliState, state
from mjctl.errors import MjctlError, first_line
from mjctl.textsafe import visible


class MjctlGroup(Group):
    """Turns every error into one sentence on stderr and an exit code (1 failed, 2 usage)."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, windows_expand_args: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        show_traceback = "--traceback" in argv
        try:
            rv = super().main(argv, prog_name or "mjctl", complete_var, standalone_mode=False,
                              windows_expand_args=windows_expand_args, **extra)
        except typer.TyperException as exc:  # Typer's usage errors (bad option, missing argument, …)
            if type(exc).__name__ == "NoArgsIsHelpError":  # a bare `mjctl users`: its help, as for --help
                sys.stdout.write(exc.format_message().rstrip("\n") + "\n")
                sys.exit(0)
            _fail(exc.format_message(), exc.exit_code)
        except (typer.Abort, KeyboardInterrupt):
            _fail("Interrupted.", 130)
        except Exception as exc:  # the one place that maps errors to messages
            if show_traceback:
                raise
            message, code = describe_exception(exc)
            _fail(message, code)
        sys.exit(rv if isinstance(rv, int) else 0)


def describe_exception(exc: BaseException) -> tuple[str, int]:
    if isinstance(exc, MjctlError):
        return exc.message, exc.exit_code
    module = type(exc).__module__ or ""
    if module.startswith("peewee") or module.startswith("playhouse"):
        detail = first_line(exc)
        return f"Database error: {detail}.", 1
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}{where}.", 1
    return f"Unexpected {type(exc).__name__}: {exc} (run with --traceback for details).", 1


def _fail(message: str, code: int) -> None:
    message = visible(message.strip())  # it may quote a remote server's or an upstream's text
    if message and message[-1] not in ".!?":
        message += "."
    sys.stderr.write(f"Error: {message}\n")
    sys.exit(code)


app = typer.Typer(
    cls=MjctlGroup,
    help="Manage Midjourney image tasks behind midjourney-proxy upstreams.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=True,
    # help as wide as the terminal: command summaries are not cut at 80 columns on a wide one
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 200},
)
app.add_typer(users.app, name="users")
app.add_typer(channels.app, name="channels")
app.add_typer(tasks.app, name="tasks")
app.add_typer(images.app, name="images")
app.add_typer(config_cmd.app, name="config")
app.add_typer(serve.app)
app.add_typer(poll.app)
app.add_typer(simulate.app)
app.add_typer(demo.app)
app.add_typer(stats.app)


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"mjctl {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def root(
    ctx: typer.Context,
    config: Annotated[str | None, typer.Option("--config", "-c",
                                               help="Config file (default: $MJCTL_CONFIG or ./mjctl.toml).")] = None,
    database: Annotated[str | None, typer.Option("--database",
                                                 help="Database URL, overriding [database] url.")] = None,
    traceback: Annotated[bool, typer.Option("--traceback",
                                            help="Show the full traceback of an unexpected error.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """mjctl: a task store, relay, poller, image forwarder, HTTP API, CLI and web page for Midjourney tasks."""
    ctx.obj = CliState(config=config, database_url=database, traceback=traceback)


@app.command("init", epilog=examples(
    'mjctl init',
    'mjctl --database postgresql://mjctl@db:5432/mjctl init --json',
))
def init_cmd(ctx: typer.Context, json_out: JsonOut = False) -> None:
    """Create or upgrade the database schema and, when no root user exists, create `root` and print its token once."""
    from mjctl import accounts
    from mjctl.db import current_version
    from mjctl.models import ROLE_ROOT, User

    settings = state(ctx).open_store(create=True)
    result: dict[str, Any] = {"database": settings.redacted()["database"]["url"], "schema_version": current_version()}
    if not User.select().where(User.role >= ROLE_ROOT).exists():
        name = "root"
        while User.select().where(User.name == name).exists():
            name += "_"
        user, token = accounts.create_user(name, role="root")
        result["root_user"] = user.name
        result["token"] = token
    if json_out:
        print_json(result)
        return
    sys.stdout.write(f"Database ready at {result['database']} (schema version {result['schema_version']}).\n")
    if "token" in result:
        sys.stdout.write(f"Created user {result['root_user']!r} (role root). Its token, shown only this once:\n")
        sys.stdout.write(result["token"] + "\n")
    else:
        info("A root user already exists; no token was created.")


def main() -> None:
    app()
