"""`mjctl users …`: accounts, balances and tokens.

The core (peewee underneath) is imported inside each command, so that `mjctl --help` does not load it.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from mjctl.cli.output import Group, JsonOut, examples, human_time, print_json, table
from mjctl.cli.state import state
from mjctl.errors import UsageError

app = typer.Typer(cls=Group, no_args_is_help=True, help="Manage users, their quota and their tokens.")

USER_COLUMNS = ["ID", "NAME", "ROLE", "ENABLED", "QUOTA", "USED"]
UserName = Annotated[str, typer.Argument(help="User name, or id.")]


def _user_rows(users):
    return [(u["id"], u["name"], u["role"], u["enabled"], u["quota"], u["used_quota"]) for u in users]


@app.command("add", epilog=examples(
    'mjctl users add alice --quota 10000',
    'mjctl users add ops --role admin --json',
))
def add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The new user's name.")],
    role: Annotated[str, typer.Option("--role", help="user, admin or root.")] = "user",
    quota: Annotated[str, typer.Option("--quota", help="Opening balance.")] = "0",
    json_out: JsonOut = False,
) -> None:
    """Create a user and print a new access token (shown only once)."""
    from mjctl import accounts

    state(ctx).open_store(create=True)
    user, token = accounts.create_user(name, role=role, quota=quota)
    data = accounts.user_dict(user) | {"token": token}
    if json_out:
        print_json(data)
        return
    sys.stdout.write(f"Created user {user.name!r} (role {user.role_name}, quota {user.quota}).\n")
    sys.stdout.write(f"Token (shown only this once):\n{token}\n")


@app.command("list", epilog=examples('mjctl users list', 'mjctl users list --json'))
def list_(ctx: typer.Context, json_out: JsonOut = False) -> None:
    """List every user with role, state and balance."""
    from mjctl import accounts

    state(ctx).open_store()
    users = [accounts.user_dict(u) for u in accounts.list_users()]
    if json_out:
        print_json({"items": users, "total": len(users)})
        return
    table(USER_COLUMNS, _user_rows(users))


@app.command("show", epilog=examples('mjctl users show alice', 'mjctl users show 3 --json'))
def show(ctx: typer.Context, name: UserName, json_out: JsonOut = False) -> None:
    """One user: balance (`quota`), `used_quota`, tokens and the latest ledger entries."""
    from mjctl import accounts

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


@app.command("set", epilog=examples(
    'mjctl users set alice --quota 500',
    'mjctl users set alice --role admin --disable',
))
def set_(
    ctx: typer.Context,
    name: UserName,
    quota: Annotated[str | None, typer.Option("--quota", help="New balance (recorded in the ledger).")] = None,
    role: Annotated[str | None, typer.Option("--role", help="user, admin or root.")] = None,
    enable: Annotated[bool | None, typer.Option("--enable/--disable", help="Enable or disable the user.")] = None,
    json_out: JsonOut = False,
) -> None:
    """Change a user's balance, role or enabled state. A disabled user's tokens stop working at once."""
    from mjctl import accounts

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


@app.command("topup", context_settings={"ignore_unknown_options": True}, epilog=examples(
    'mjctl users topup alice 5000',
    'mjctl users topup alice -500 --reason "refund to card"',
))
def topup(
    ctx: typer.Context,
    name: UserName,
    amount: Annotated[str, typer.Argument(help="Quota to add, a whole number; a negative one (-500) is deducted.")],
    reason: Annotated[str | None, typer.Option("--reason", help="Recorded in the ledger (default: top-up, or "
                                               "deduction).")] = None,
    json_out: JsonOut = False,
) -> None:
    """Add quota to a user's balance, or deduct it with a negative amount; one transaction, one ledger entry.
    A deduction is recorded as an adjustment and refused when the balance does not cover it."""
    from mjctl import accounts

    state(ctx).open_store()
    user = accounts.topup(name, amount, reason)
    if json_out:
        print_json(accounts.user_dict(user))
        return
    sys.stdout.write(f"User {user.name!r} now has quota {user.quota}.\n")


@app.command("token", epilog=examples('mjctl users token alice', 'mjctl users token alice --revoke'))
def token(
    ctx: typer.Context,
    name: UserName,
    revoke: Annotated[bool, typer.Option("--revoke", help="Revoke all of the user's tokens instead.")] = False,
    json_out: JsonOut = False,
) -> None:
    """Issue a further token (shown once), or revoke all of the user's tokens."""
    from mjctl import accounts

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
