"""Who is calling: the token of a request, the user it belongs to, and the admin check.

A token is read from ``Authorization: Bearer <token>``, a bare token in ``Authorization`` (what some
midjourney-proxy clients send), or the ``mj-api-secret`` header. Tokens are checked by
``mjctl.accounts.authenticate`` (hashed, constant-time); nothing here compares them.
"""

from __future__ import annotations

from mjctl import accounts
from mjctl.errors import MjctlError
from mjctl.models import User


class Unauthorized(MjctlError):
    """No token, or a token that belongs to nobody (401)."""

    http_status = 401
    headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(MjctlError):
    """A known caller who may not do this: a disabled user, or a non-admin on an admin endpoint (403)."""

    http_status = 403


def request_token(request) -> str | None:
    """The token a request carries, or None. (Read from the WSGI environ: bottle's get_header builds a
    header view per call, a few percent of a listing request.)"""
    environ = request.environ
    header = (environ.get("HTTP_AUTHORIZATION") or "").strip()
    if header:
        scheme, _, rest = header.partition(" ")
        if scheme.lower() == "bearer":
            return rest.strip() or None
        if not rest:  # a bare token
            return header
        return None  # another scheme (Basic …): not ours
    return (environ.get("HTTP_MJ_API_SECRET") or "").strip() or None


def authenticate_request(request) -> User:
    """The enabled user behind a request's token; raises Unauthorized (401) or Forbidden (403)."""
    token = request_token(request)
    if not token:
        raise Unauthorized("Missing access token: send the header 'Authorization: Bearer <token>'.")
    user = accounts.authenticate(token)
    if user is None:
        raise Unauthorized("The access token is not valid.")
    if not user.enabled:
        raise Forbidden("This user is disabled.")
    return user


def require_admin(user: User) -> User:
    """user, when it is an admin or root; raises Forbidden otherwise."""
    if not user.is_admin:
        raise Forbidden("This endpoint needs an admin token; use /api/mj/self for your own tasks.")
    return user
