"""Settings from the defaults, `mjctl.toml`, `MJCTL_<SECTION>_<KEY>` variables and command-line overrides.

Later sources win: default < file < environment < option. Every value remembers where it came from so
`mjctl config show` can say so. Paths are resolved against the config file's folder (or the working
folder when there is no file). This module knows nothing of the CLI or the web server.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mjctl.errors import ConfigError

#: section -> key -> (default, type, help). The repository's mjctl.toml documents the same keys.
SCHEMA: dict[str, dict[str, tuple[Any, type, str]]] = {
    "database": {
        "url": ("sqlite:///mjctl.db", str, "sqlite:///PATH, postgresql://USER@HOST:PORT/DB or mysql://USER@HOST:PORT/DB"),
        "pool_size": (0, int, "connections kept per process (PostgreSQL and MySQL); "
                              "0 = [server] threads + [poller] concurrency + 2"),
        "pool_timeout": (5.0, float, "seconds to wait for a free pooled connection"),
        "connect_timeout": (5, int, "seconds to wait when opening a connection"),
        "stale_timeout": (300, int, "seconds after which an idle pooled connection is replaced"),
        "busy_timeout": (5.0, float, "seconds to wait for a lock before failing (SQLite busy timeout, PostgreSQL lock_timeout, MySQL lock waits)"),
    },
    "server": {
        "host": ("127.0.0.1", str, "address to listen on"),
        "port": (8080, int, "port to listen on"),
        "public_url": ("", str, "base of every URL mjctl hands out; default http://HOST:PORT"),
        "threads": (16, int, "worker threads of the HTTP server"),
        "workers": (1, int, "server processes sharing the port (mjctl serve --workers); PostgreSQL or MariaDB recommended above 1"),
        "secret": ("", str, "HMAC key for signed URLs and secret storage; generated into secret_file when empty"),
        "secret_file": ("mjctl.secret", str, "where a generated secret is kept (mode 0600)"),
        "max_connections": (4096, int, "open client connections per server process; more wait in the listen queue"),
        "header_timeout": (10.0, float, "seconds a client has to send a request's headers (an idle keep-alive connection is closed after as long)"),
        "body_timeout": (10.0, float, "seconds a client has to send a request's body before it is answered 408"),
        "max_header_bytes": (16384, int, "largest request head (request line and headers), in bytes; larger is answered 431"),
        "max_body_bytes": (33554432, int, "largest request body, in bytes (blend and describe carry base64 images); larger is answered 413 unread"),
    },
    "poller": {
        "interval": (15.0, float, "seconds between polling cycles"),
        "batch_size": (100, int, "task ids per list-by-condition request"),
        "request_timeout": (15.0, float, "seconds before an upstream request is given up"),
        "task_timeout": (3600, int, "seconds after submission when an unfinished task fails"),
        "in_server": (True, bool, "mjctl serve also runs the poller"),
        "concurrency": (4, int, "channels polled in parallel"),
        "lease_seconds": (120.0, float, "how long a poller's claim on a channel lasts without renewal"),
    },
    "images": {
        "forward": (True, bool, "hand out mjctl's own image URLs instead of the upstream's"),
        "sign": (True, bool, "image URLs need a signature or the owner's token"),
        "cache_dir": ("", str, "where finished images are kept; default: images/ next to the database"),
        "max_bytes": (104857600, int, "largest image forwarded, in bytes"),
        "timeout": (30.0, float, "seconds before an upstream image request is given up"),
        "allow_hosts": ("", str, "comma-separated host names, IPs or CIDRs image fetches may reach although "
                                 "they are not public (an internal object store); a channel's own origin "
                                 "is always allowed"),
        "store": ("local", str, "where finished images are kept: local (cache_dir) or s3://BUCKET/PREFIX, shared by every host"),
        "s3_endpoint_url": ("", str, "S3 endpoint for MinIO, Ceph, R2 and other S3-compatible stores; empty = AWS"),
        "s3_region": ("", str, "the bucket's region; empty = AWS_REGION, the AWS config file, else us-east-1"),
        "s3_access_key_id": ("", str, "only if the standard AWS variables and files cannot be used"),
        "s3_secret_access_key": ("", str, "only if the standard AWS variables and files cannot be used"),
        "s3_connect_timeout": (3.0, float, "seconds to open a connection to the store"),
        "s3_read_timeout": (10.0, float, "seconds the store may stay silent during a call before it is given up"),
        "s3_attempts": (2, int, "attempts per store call (the first included) before it fails"),
        "redirect": (False, bool, "answer images kept in an S3 store with a redirect to a short-lived presigned link"),
        "redirect_seconds": (300, int, "how long a presigned link of [images] redirect stays valid"),
    },
    "relay": {
        "max_prompt_chars": (8000, int, "longest prompt a submission may carry"),
        "max_in_flight": (64, int, "upstream-bound requests (submissions, image-seed, image streaming) served at once per process; more are answered 429"),
        "max_in_flight_per_user": (8, int, "upstream-bound requests one user may have in flight at once per process; more are answered 429"),
    },
    "prices": {
        "default": (1000, int, "quota for an action without its own price"),
        "IMAGINE": (1000, int, ""),
        "UPSCALE": (500, int, ""),
        "VARIATION": (1000, int, ""),
        "REROLL": (1000, int, ""),
        "DESCRIBE": (500, int, ""),
        "BLEND": (1000, int, ""),
        "SHORTEN": (500, int, ""),
        "ZOOM": (1000, int, ""),
        "PAN": (1000, int, ""),
        "MODAL": (0, int, "the modal step after a code-21 action (the action was charged)"),
    },
    "client": {
        "server": ("", str, "remote mjctl for `tasks list --server` (also $MJCTL_SERVER)"),
        "token": ("", str, "your access token for --mine and remote mode (also $MJCTL_TOKEN)"),
    },
    "log": {
        "level": ("info", str, "debug, info, warning or error"),
    },
}

SECRET_KEYS = {("server", "secret"), ("client", "token"), ("images", "s3_access_key_id"),
               ("images", "s3_secret_access_key")}
PATH_KEYS = {("images", "cache_dir"), ("server", "secret_file")}
#: Variables the contract names outside the MJCTL_<SECTION>_<KEY> scheme.
ALIASES = {"MJCTL_TOKEN": ("client", "token"), "MJCTL_SERVER": ("client", "server")}
#: Sections whose keys are open (any action name may have a price).
OPEN_SECTIONS = {"prices"}


class Section(dict):
    """A section's values, readable as attributes (settings.server.port)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass
class Settings:
    values: dict[str, Section]
    sources: dict[tuple[str, str], str]
    config_path: Path | None
    base_dir: Path

    def __getattr__(self, name: str) -> Section:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def price(self, action: str) -> int:
        prices = self.values["prices"]
        return int(prices.get(action.upper(), prices["default"]))

    def resolve_path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.base_dir / path)

    def database_url(self) -> str:
        """The database URL with a relative SQLite path made absolute against base_dir."""
        url = self.values["database"]["url"]
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            rest = url[len("sqlite:///"):]
            if rest and rest != ":memory:":
                return "sqlite:///" + str(self.resolve_path(rest))
        return url

    def redacted(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for section, values in self.values.items():
            out[section] = {}
            for key, value in values.items():
                if (section, key) in SECRET_KEYS and value:
                    value = "********"
                elif (section, key) in {("database", "url"), ("images", "s3_endpoint_url")}:
                    value = redact_url(value)
                out[section][key] = value
        return out


def redact_url(url: str) -> str:
    """Hide a password in a database URL (scheme://user:pass@host)."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    if ":" in creds:
        creds = creds.split(":", 1)[0] + ":********"
    return f"{scheme}://{creds}@{host}"


def _coerce(value: Any, typ: type, where: str, section: str, key: str) -> Any:
    """Convert a value from TOML or an environment string to the key's type, or say what is wrong."""
    problem = f"{where}: [{section}] {key}"
    if isinstance(value, str) and typ is not str:
        text = value.strip()
        if typ is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{problem} must be true or false, not {value!r}.")
        try:
            return typ(text)
        except ValueError:
            raise ConfigError(f"{problem} must be {_type_word(typ)}, not {value!r}.") from None
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{problem} must be true or false, not {value!r}.")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{problem} must be an integer, not {value!r}.")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{problem} must be a number, not {value!r}.")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{problem} must be a string, not {value!r}.")
    return value


def _type_word(typ: type) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[typ]


def _validate(section: str, key: str, value: Any, where: str) -> None:
    problem = f"{where}: [{section}] {key}"
    if section == "prices" and value < 0:
        raise ConfigError(f"{problem} must not be negative.")
    if (section, key) in {("server", "port")} and not 0 <= value <= 65535:
        raise ConfigError(f"{problem} must be a port between 0 and 65535.")
    positive = {("server", "threads"), ("server", "workers"), ("poller", "batch_size"), ("poller", "interval"),
                ("poller", "request_timeout"), ("poller", "task_timeout"), ("poller", "concurrency"),
                ("images", "max_bytes"), ("images", "timeout"), ("images", "s3_connect_timeout"),
                ("images", "s3_read_timeout"), ("images", "s3_attempts"), ("images", "redirect_seconds")}
    if (section, key) in positive and value <= 0:
        raise ConfigError(f"{problem} must be greater than zero.")
    if (section, key) == ("database", "pool_size") and value < 0:
        raise ConfigError(f"{problem} must be 0 (sized to the threads) or more.")
    if (section, key) == ("log", "level") and value.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"{problem} must be debug, info, warning or error.")
    if (section, key) == ("images", "store") and value != "local":
        from mjctl.images.store import parse_store_url

        problem_text = parse_store_url(value)[2]
        if problem_text:
            raise ConfigError(f"{problem}: {problem_text}")
    if (section, key) == ("images", "s3_endpoint_url") and value and not re.match(r"^https?://[^/\s]+(/\S*)?$", value):
        raise ConfigError(f"{problem} must be an http:// or https:// URL, not {value!r}.")
    if (section, key) == ("images", "redirect_seconds") and value > 604800:
        raise ConfigError(f"{problem} must be at most 604800 (7 days, the longest a presigned link lives).")
    if (section, key) == ("images", "allow_hosts"):
        for entry in split_list(value):
            if not _HOST_OR_CIDR.match(entry):
                raise ConfigError(f"{problem}: {entry!r} is not a host name, an IP address or a CIDR.")


#: An allow_hosts entry: a DNS name, an IPv4/IPv6 address or network (checked exactly where it is used).
_HOST_OR_CIDR = re.compile(r"^(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})|\[?[0-9A-Fa-f:.]+\]?)(?:/\d{1,3})?$")


def split_list(value: str) -> list[str]:
    """The entries of a comma-separated setting (spaces around them ignored, empty ones dropped)."""
    return [entry.strip() for entry in (value or "").split(",") if entry.strip()]


def find_config_file(explicit: str | os.PathLike | None, environ: dict[str, str]) -> Path | None:
    """--config PATH, then $MJCTL_CONFIG, then ./mjctl.toml; None when there is no file."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist.")
        return path.resolve()
    env_path = environ.get("MJCTL_CONFIG")
    if env_path:
        path = Path(env_path).expanduser()
        if not path.is_file():
            raise ConfigError(f"Config file {path} (from $MJCTL_CONFIG) does not exist.")
        return path.resolve()
    local = Path.cwd() / "mjctl.toml"
    return local.resolve() if local.is_file() else None


def load_settings(
    config: str | os.PathLike | None = None,
    overrides: dict[tuple[str, str], Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Build the effective settings. Raises ConfigError naming the file, the key and the problem."""
    environ = dict(os.environ if environ is None else environ)
    path = find_config_file(config, environ)
    values: dict[str, Section] = {s: Section({k: d for k, (d, _, _) in keys.items()}) for s, keys in SCHEMA.items()}
    sources: dict[tuple[str, str], str] = {(s, k): "default" for s, keys in SCHEMA.items() for k in keys}

    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}.") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"Cannot read config file {path}: {exc}.") from None
        for section, table in data.items():
            if section not in SCHEMA:
                raise ConfigError(f"{path}: unknown section [{section}].")
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: {section} must be a [section] table.")
            for key, raw in table.items():
                _set(values, sources, section, key, raw, str(path), f"file {path}")

    for name, raw in environ.items():
        if not name.startswith("MJCTL_"):
            continue
        if name in ALIASES:
            section, key = ALIASES[name]
        else:
            section, key = _env_target(name)
            if section is None:
                continue
        _set(values, sources, section, key, raw, f"${name}", f"env {name}")

    for (section, key), raw in (overrides or {}).items():
        if raw is None:
            continue
        _set(values, sources, section, key, raw, "command line", "option")

    base_dir = path.parent if path is not None else Path.cwd()
    settings = Settings(values=values, sources=sources, config_path=path, base_dir=base_dir)
    images = values["images"]
    if not images["cache_dir"]:
        images["cache_dir"] = str(_default_cache_dir(settings))
    else:
        images["cache_dir"] = str(settings.resolve_path(images["cache_dir"]))
    values["server"]["secret_file"] = str(settings.resolve_path(values["server"]["secret_file"]))
    return settings


def _env_target(name: str) -> tuple[str | None, str | None]:
    rest = name[len("MJCTL_"):]
    for section in SCHEMA:
        prefix = section.upper() + "_"
        if rest.startswith(prefix):
            key = rest[len(prefix):]
            if section in OPEN_SECTIONS:
                return section, "default" if key.lower() == "default" else key.upper()
            return section, key.lower()
    return None, None


def _set(values, sources, section: str, key: str, raw: Any, where: str, source: str) -> None:
    schema = SCHEMA[section]
    if key not in schema:
        if section in OPEN_SECTIONS:
            typ = int
            key = key if key == "default" else key.upper()
        else:
            raise ConfigError(f"{where}: unknown key {key!r} in [{section}].")
    else:
        typ = schema[key][1]
    value = _coerce(raw, typ, where, section, key)
    _validate(section, key, value, where)
    values[section][key] = value
    sources[(section, key)] = source


def _default_cache_dir(settings: Settings) -> Path:
    url = settings.database_url()
    if url.startswith("sqlite:///") and ":memory:" not in url:
        return Path(url[len("sqlite:///"):]).parent / "images"
    return settings.base_dir / "images"


def describe_settings(settings: Settings) -> list[dict[str, Any]]:
    """Rows for `config show`: section, key, value (secrets redacted), source."""
    redacted = settings.redacted()
    rows = []
    for section, values in redacted.items():
        for key, value in values.items():
            rows.append({"section": section, "key": key, "value": value,
                         "source": settings.sources.get((section, key), "default")})
    return rows
