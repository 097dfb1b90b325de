"""The root command: global options, the central error handler, and the command groups."""

from __future__ import annotations

import sys
from typing import Any

import typer
from typer._click import exceptions as click_exceptions  # Typer's own copy of Click
from typer.core import TyperGroup

from mjctl import __version__
from mjctl.cli.state import CliState, state
from mjctl.errors import first_line


class MjctlGroup(TyperGroup):
    """Turns every error into one sentence on stderr and an exit code (1 failed, 2 usage)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        argv = list(sys.argv[1:] if args is None else args)
        show_traceback = "--traceback" in argv
        try:
            rv = super().main(argv, prog_name or "mjctl", complete_var, standalone_mode=False, **extra)
        except click_exceptions.NoArgsIsHelpError as exc:  # bare `mjctl users`: show its help
            exc.ctx.get_help()  # Rich help prints itself
            sys.exit(0)
        except click_exceptions.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except typer.Abort:
            _fail("Interrupted.", 130)
        except KeyboardInterrupt:
            _fail("Interrupted.", 130)
        except Exception as exc:  # the one place that maps errors to messages
            if show_traceback:
                raise
            message, code = describe_exception(exc)
            _fail(message, code)
        sys.exit(rv if isinstance(rv, int) else 0)


def describe_exception(exc: BaseException) -> tuple[str, int]:
    from mjctl.errors import MjctlError

    if isinstance(exc, MjctlError):
        return exc.message, exc.exit_code
    module = type(exc).__module__ or ""
    if module.startswith("peewee") or module.startswith("playhouse"):
        detail = first_line(exc)
        return f"Database error: {detail}.", 1
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}.", 1
    return f"Unexpected {type(exc).__name__}: {exc} (run with --traceback for details).", 1


def _fail(message: str, code: int) -> None:
    from mjctl.textsafe import visible

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
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"mjctl {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def root(
    ctx: typer.Context,
    config: str | None = typer.Option(None, "--config", "-c",
                                      help="Config file (default: $MJCTL_CONFIG or ./mjctl.toml)."),
    database: str | None = typer.Option(None, "--database", help="Database URL, overriding [database] url."),
    traceback: bool = typer.Option(False, "--traceback", help="Show the full traceback of an unexpected error."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """mjctl: a task store, relay, poller, image forwarder, HTTP API, CLI and web page for Midjourney tasks."""
    ctx.obj = CliState(config=config, database_url=database, traceback=traceback)


@app.command("init")
def init_cmd(
    ctx: typer.Context,
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Create or upgrade the database schema and, when no root user exists, create `root` and print its token once."""
    from mjctl import accounts
    from mjctl.cli.output import info, print_json
    from mjctl.db import current_version
    from mjctl.models import ROLE_ROOT, User

    settings = state(ctx).open_store()
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


def _register() -> None:
    """Every command group and command, each from its own module (cheap to import: the core and the heavy
    libraries are imported inside the commands)."""
    from mjctl.cli import channels, config_cmd, demo, images, poll, serve, simulate, tasks, users

    app.add_typer(users.app, name="users", help="Manage users, their quota and their tokens.")
    app.add_typer(channels.app, name="channels", help="Manage upstream midjourney-proxy channels.")
    app.add_typer(tasks.app, name="tasks", help="List, show, submit, watch and save tasks.")
    app.add_typer(images.app, name="images", help="Manage the image cache.")
    app.add_typer(config_cmd.app, name="config", help="Show the effective configuration.")
    app.command("serve")(serve.serve)
    app.command("poll")(poll.poll)
    app.command("simulate")(simulate.simulate)
    app.command("demo")(demo.demo)


_register()


def main() -> None:
    app()
