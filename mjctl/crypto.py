"""Tokens, signatures and secrets at rest.

- Access tokens are random, shown once, and stored only as a SHA-256 hash; any comparison of secret
  material goes through `hmac.compare_digest`.
- The server secret (`[server] secret`, or a generated key kept in `[server] secret_file`) signs image
  and notification URLs and seals channel secrets in the database, each use under its own derived key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from mjctl.errors import ConfigError, MjctlError

TOKEN_PREFIX = "mjk-"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def same(a: str | bytes, b: str | bytes) -> bool:
    """Constant-time equality for secret material."""
    if isinstance(a, str):
        a = a.encode("utf-8")
    if isinstance(b, str):
        b = b.encode("utf-8")
    return hmac.compare_digest(a, b)


def load_server_secret(configured: str, secret_file: str | os.PathLike) -> bytes:
    """The configured secret, else the one kept in secret_file, generating it (0600) on first use.

    Two processes starting at once agree: the file is created exclusively and the loser reads it.
    """
    if configured:
        return configured.encode("utf-8")
    path = Path(secret_file)
    for _ in range(50):
        try:
            data = path.read_bytes().strip()
        except FileNotFoundError:
            data = b""
        except OSError as exc:
            raise ConfigError(f"Cannot read the server secret file {path}: {exc.strerror}.") from None
        if len(data) >= 32:
            return data
        if data:  # a concurrent creator is mid-write
            import time

            time.sleep(0.01)
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        except OSError as exc:
            raise ConfigError(f"Cannot create the server secret file {path}: {exc.strerror}.") from None
        value = secrets.token_hex(32).encode("ascii")
        with os.fdopen(fd, "wb") as fh:
            fh.write(value + b"\n")
        return value
    raise ConfigError(f"The server secret file {path} is too short; delete it or set [server] secret.")


def derive_key(secret: bytes, purpose: str) -> bytes:
    return hmac.new(secret, b"mjctl:" + purpose.encode("utf-8"), hashlib.sha256).digest()


def sign(secret: bytes, purpose: str, message: str) -> str:
    """A URL-safe signature of message for one purpose (image URLs, notify hooks)."""
    return sign_with_key(derive_key(secret, purpose), message)


def sign_with_key(key: bytes, message: str) -> str:
    """sign() with the purpose key already derived (derive_key), for callers that sign many messages."""
    mac = hmac.digest(key, message.encode("utf-8"), "sha256")
    return base64.urlsafe_b64encode(mac[:18]).decode("ascii")


def verify(secret: bytes, purpose: str, message: str, signature: str | None) -> bool:
    if not signature:
        return False
    return same(sign(secret, purpose, message), signature)


def _keystream(key: bytes, nonce: bytes, length: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hmac.new(key, nonce + counter.to_bytes(8, "big"), hashlib.sha256).digest()
        counter += 1
    return bytes(out[:length])


def seal(secret: bytes, plaintext: str) -> str:
    """Encrypt-then-MAC a short secret (a channel's upstream secret) for storage."""
    data = plaintext.encode("utf-8")
    nonce = secrets.token_bytes(16)
    enc_key, mac_key = derive_key(secret, "seal-enc"), derive_key(secret, "seal-mac")
    body = bytes(a ^ b for a, b in zip(data, _keystream(enc_key, nonce, len(data))))
    tag = hmac.new(mac_key, nonce + body, hashlib.sha256).digest()[:16]
    return "v1:" + base64.urlsafe_b64encode(nonce + tag + body).decode("ascii")


def unseal(secret: bytes, sealed: str) -> str:
    if not sealed.startswith("v1:"):
        raise MjctlError("A stored channel secret is in an unknown format; set it again with `channels add`.")
    raw = base64.urlsafe_b64decode(sealed[3:].encode("ascii"))
    nonce, tag, body = raw[:16], raw[16:32], raw[32:]
    enc_key, mac_key = derive_key(secret, "seal-enc"), derive_key(secret, "seal-mac")
    if not hmac.compare_digest(tag, hmac.new(mac_key, nonce + body, hashlib.sha256).digest()[:16]):
        raise MjctlError(
            "A stored channel secret cannot be opened with this server secret; "
            "use the same [server] secret everywhere, or set the channel's secret again."
        )
    return bytes(a ^ b for a, b in zip(body, _keystream(enc_key, nonce, len(body)))).decode("utf-8")


_secret_cache: dict[tuple[str, str], bytes] = {}


def server_secret(settings) -> bytes:
    """The server secret of these settings (configured or generated), read once per process."""
    key = (settings.server.secret, settings.server.secret_file)
    value = _secret_cache.get(key)
    if value is None:
        value = _secret_cache[key] = load_server_secret(*key)
    return value
