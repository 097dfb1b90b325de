"""`mjctl users …`: accounts, balances and tokens."""

from __future__ import annotations

import sys

import typer

from mjctl.cli.state import state

app = typer.Typer(no_args_is_help=True)

JSON = typer.Option(False, "--json", help="Print JSON.")


def _user_rows(users):
    return [(u["id"], u["name"], u["role"], u["enabled"], u["quota"], u["used_quota"]) for u in users]


USER_COLUMNS = ["ID", "NAME", "ROLE", "ENABLED", "QUOTA", "USED"]


@app.command("add")
def add(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The new user's name."),
    role: str = typer.Option("user", "--role", help="user, admin or root."),
    quota: str = typer.Option("0", "--quota", help="Opening balance."),
    json_out: bool = JSON,
) -> None:
    """Create a user and print a new access token (shown only once)."""
    from mjctl import accounts
    from mjctl.cli.output import print_json

    state(ctx).open_store()
    user, token = accounts.create_user(name, role=role, quota=quota)
    data = accounts.user_dict(user) | {"token": token}
    if json_out:
        print_json(data)
        return
    sys.stdout.write(f"Created user {user.name!r} (role {user.role_name}, quota {user.quota}).\n")
    sys.stdout.write(f"Token (shown only this once):\n{token}\n")


@app.command("list")
def list_(ctx: typer.Context, json_out: bool = JSON) -> None:
    """List every user with role, state and balance."""
    from mjctl import accounts
    from mjctl.cli.output import print_json, table

    state(ctx).open_store()
    users = [accounts.user_dict(u) for u in accounts.list_users()]
    if json_out:
        print_json({"items": users, "total": len(users)})
        return
    table(USER_COLUMNS, _user_rows(users))


@app.command("show")
def show(ctx: typer.Context, name: str = typer.Argument(..., help="User name."), json_out: bool = JSON) -> None:
    """One user: balance (`quota`), `used_quota`, tokens and the latest ledger entries."""
    from mjctl import accounts
    from mjctl.cli.output import human_time, print_json, table

    state(ctx).open_store()
    user = accounts.get_user(name)
    data = accounts.user_dict(user)
    data["tokens"] = accounts.token_count(user.id)
    data["ledger"] = [
        {"id": e.id, "kind": e.kind, "amount": e.amount, "balance_after": e.balance_after, "task_id": e.task_id,
         "reason": e.reason, "created_at": int(e.created_at)}
        for e in accounts.ledger_for(user.id, 20)
    ]
    if json_out:
        print_json(data)
        return
    fields = ("id", "name", "role", "enabled", "quota", "used_quota", "tokens")
    table(["FIELD", "VALUE"], [(k, data[k]) for k in fields])
    if data["ledger"]:
        table(["WHEN", "KIND", "AMOUNT", "BALANCE", "TASK", "REASON"],
              [(human_time(e["created_at"]), e["kind"], e["amount"], e["balance_after"], e["task_id"] or "",
                e["reason"]) for e in data["ledger"]], title="latest ledger entries")


@app.command("set")
def set_(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="User name."),
    quota: str | None = typer.Option(None, "--quota", help="New balance (recorded in the ledger)."),
    role: str | None = typer.Option(None, "--role", help="user, admin or root."),
    enable: bool | None = typer.Option(None, "--enable/--disable", help="Enable or disable the user."),
    json_out: bool = JSON,
) -> None:
    """Change a user's balance, role or enabled state. A disabled user's tokens stop working at once."""
    from mjctl import accounts
    from mjctl.cli.output import print_json
    from mjctl.errors import UsageError

    if quota is None and role is None and enable is None:
        raise UsageError("Nothing to change; give --quota, --role, --enable or --disable.")
    state(ctx).open_store()
    user = accounts.set_user(name, quota=quota, role=role, enabled=enable)
    data = accounts.user_dict(user)
    if json_out:
        print_json(data)
        return
    sys.stdout.write(f"User {user.name!r}: role {data['role']}, {'enabled' if data['enabled'] else 'disabled'}, "
                     f"quota {data['quota']}.\n")


@app.command("topup")
def topup(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="User name."),
    amount: str = typer.Argument(..., help="Quota to add (a whole number > 0)."),
    reason: str = typer.Option("top-up", "--reason", help="Recorded in the ledger."),
    json_out: bool = JSON,
) -> None:
    """Add quota to a user's balance (one transaction, one ledger entry)."""
    from mjctl import accounts
    from mjctl.cli.output import print_json

    state(ctx).open_store()
    user = accounts.topup(name, amount, reason)
    if json_out:
        print_json(accounts.user_dict(user))
        return
    sys.stdout.write(f"User {user.name!r} now has quota {user.quota}.\n")


@app.command("token")
def token(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="User name."),
    revoke: bool = typer.Option(False, "--revoke", help="Revoke all of the user's tokens instead."),
    json_out: bool = JSON,
) -> None:
    """Issue a further token (shown once), or revoke all of the user's tokens."""
    from mjctl import accounts
    from mjctl.cli.output import print_json

    state(ctx).open_store()
    if revoke:
        count = accounts.revoke_tokens(name)
        if json_out:
            print_json({"name": name, "revoked": count})
        else:
            sys.stdout.write(f"Revoked {count} token(s) of {name!r}.\n")
        return
    new = accounts.issue_token(name)
    if json_out:
        print_json({"name": name, "token": new})
    else:
        sys.stdout.write(f"New token for {name!r} (shown only this once):\n{new}\n")
