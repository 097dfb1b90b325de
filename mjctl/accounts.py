"""Users, access tokens and the one function that moves quota.

Every change to a balance goes through `move_quota`, inside the caller's write transaction, and writes
a ledger row with the balance after it. A charge raises `used_quota`, a refund lowers it, so for every
user: sum of charges - sum of refunds == used_quota, and the ledger explains every balance.
"""

from __future__ import annotations

import re

import peewee

from mjctl import crypto
from mjctl.db import compiled, database, write_tx
from mjctl.errors import Conflict, InsufficientQuota, NotFound, UsageError
from mjctl.models import ROLES, Ledger, Token, User

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
MAX_QUOTA = 10**15


def validate_name(name: str, what: str = "user") -> str:
    if not NAME_RE.match(name or ""):
        raise UsageError(
            f"{what.capitalize()} name {name!r} is not valid: use 1-64 letters, digits, '_', '.', '@' or '-', "
            "starting with a letter or digit."
        )
    return name


def parse_role(role: str | int) -> int:
    if isinstance(role, int) and role in ROLES.values():
        return role
    value = ROLES.get(str(role).lower())
    if value is None:
        raise UsageError(f"Unknown role {role!r}; use user, admin or root.")
    return value


def validate_amount(amount, what: str = "quota", *, allow_zero: bool = True) -> int:
    if isinstance(amount, bool) or not isinstance(amount, int):
        try:
            amount = int(str(amount).strip())
        except ValueError:
            raise UsageError(f"The {what} must be a whole number, not {amount!r}.") from None
    if amount < 0 or (amount == 0 and not allow_zero):
        raise UsageError(f"The {what} must be {'zero or more' if allow_zero else 'greater than zero'}, not {amount}.")
    if amount > MAX_QUOTA:
        raise UsageError(f"The {what} {amount} is too large (the limit is {MAX_QUOTA}).")
    return amount


def move_quota(user_id: int, delta: int, kind: str, reason: str = "", *, task_id: int | None = None,
               used_delta: int = 0) -> int:
    """Change a balance by delta and record it; returns the balance after. Call inside write_tx().

    A negative delta that the balance does not cover raises InsufficientQuota and changes nothing.
    """
    query = User.update(quota=User.quota + delta, used_quota=User.used_quota + used_delta).where(User.id == user_id)
    if delta < 0:
        query = query.where(User.quota >= -delta)
    if query.execute() != 1:
        if not User.select().where(User.id == user_id).exists():
            raise NotFound(f"User {user_id} does not exist.")
        raise InsufficientQuota("The balance is too small for this.")
    balance = User.select(User.quota).where(User.id == user_id).scalar()
    Ledger.create(user_id=user_id, task_id=task_id, kind=kind, amount=delta, balance_after=balance, reason=reason)
    return balance


def charge(user_id: int, amount: int, *, task_id: int | None, reason: str) -> int:
    return move_quota(user_id, -amount, "charge", reason, task_id=task_id, used_delta=amount)


def refund(user_id: int, amount: int, *, task_id: int | None, reason: str) -> int:
    return move_quota(user_id, amount, "refund", reason, task_id=task_id, used_delta=-amount)


def get_user(ref: str) -> User:
    """A user by name or, when ref is all digits and no user has that name, by id."""
    user = User.get_or_none(User.name == ref)
    if user is None and str(ref).isdigit():
        user = User.get_or_none(User.id == int(ref))
    if user is None:
        raise NotFound(f"No user named {ref!r}." if not str(ref).isdigit() else f"No user with name or id {ref!r}.")
    return user


def list_users() -> list[User]:
    return list(User.select().order_by(User.id))


def create_user(name: str, role: str | int = "user", quota=0) -> tuple[User, str]:
    """A new user with an opening balance (recorded as a top-up) and a first token, shown once."""
    validate_name(name)
    role_value = parse_role(role)
    amount = validate_amount(quota)
    try:
        with write_tx():
            user = User.create(name=name, role=role_value, quota=0)
            if amount:
                move_quota(user.id, amount, "topup", "opening balance")
            token = _new_token(user.id)
    except peewee.IntegrityError:
        raise Conflict(f"A user named {name!r} already exists.") from None
    return User.get_by_id(user.id), token


def _new_token(user_id: int) -> str:
    token = crypto.new_token()
    Token.create(user_id=user_id, token_hash=crypto.hash_token(token), hint=token[:8])
    return token


def issue_token(name: str) -> str:
    user = get_user(name)
    with write_tx():
        return _new_token(user.id)


def revoke_tokens(name: str) -> int:
    user = get_user(name)
    with write_tx():
        return Token.delete().where(Token.user_id == user.id).execute()


def token_count(user_id: int) -> int:
    return Token.select().where(Token.user_id == user_id).count()


_USER_FIELDS = User._meta.sorted_field_names


def authenticate(token: str | None) -> User | None:
    """The user a token belongs to (enabled or not), or None. The hash is looked up by index and then
    compared in constant time. Every API request starts here, so the row becomes a User directly."""
    if not token:
        return None
    digest = crypto.hash_token(token.strip())
    sql, params = compiled(("authenticate",), lambda: _token_query(digest), [digest, 1])
    row = database.execute_sql(sql, params).fetchone()
    if row is None or not crypto.same(row[0], digest):
        return None
    return User(**dict(zip(_USER_FIELDS, row[1:])))


def _token_query(digest: str) -> peewee.Query:
    return (User.select(Token.token_hash, *(getattr(User, name) for name in _USER_FIELDS))
            .join(Token, on=(Token.user_id == User.id)).where(Token.token_hash == digest).limit(1))


def topup(name: str, amount, reason: str | None = None) -> User:
    """Add amount to a balance ("topup" in the ledger). A negative amount ("-5") is a deduction, recorded
    as an "adjust" entry and refused (InsufficientQuota) when the balance does not cover it."""
    text = str(amount).strip()
    deduction = text.startswith("-")
    value = validate_amount(text[1:] if deduction else text, "amount", allow_zero=False)
    user = get_user(name)
    with write_tx():
        if deduction:
            move_quota(user.id, -value, "adjust", reason or "deduction")
        else:
            move_quota(user.id, value, "topup", reason or "top-up")
    return User.get_by_id(user.id)


def set_user(name: str, *, quota=None, role=None, enabled: bool | None = None) -> User:
    """Change a user's role, enabled flag or balance; a new balance is recorded as an adjustment."""
    user = get_user(name)
    new_quota = validate_amount(quota) if quota is not None else None
    role_value = parse_role(role) if role is not None else None
    with write_tx():
        changes = {}
        if role_value is not None:
            changes["role"] = role_value
        if enabled is not None:
            changes["enabled"] = enabled
        if changes:
            User.update(**changes).where(User.id == user.id).execute()
        if new_quota is not None:
            current = User.select(User.quota).where(User.id == user.id).scalar()
            if new_quota != current:
                move_quota(user.id, new_quota - current, "adjust", "balance set by an administrator")
    return User.get_by_id(user.id)


def ledger_for(user_id: int, limit: int = 50) -> list[Ledger]:
    return list(Ledger.select().where(Ledger.user_id == user_id).order_by(Ledger.id.desc()).limit(limit))


def user_dict(user: User) -> dict:
    return {
        "id": user.id,
        "name": user.name,
        "role": user.role_name,
        "enabled": bool(user.enabled),
        "quota": int(user.quota),
        "used_quota": int(user.used_quota),
        "created_at": int(user.created_at),
    }
