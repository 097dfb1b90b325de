"""Settings from the defaults, `mjctl.toml`, `MJCTL_<SECTION>_<KEY>` variables and command-line overrides.

Later sources win: default < file < environment < option. Every value remembers where it came from so
`mjctl config show` can say so. Paths are resolved against the config file's folder (or the working
folder when there is no file). This module knows nothing of the CLI or the web server.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints

from mjctl.errors import ConfigError

Check = Callable[[Any], str | None]


def setting(default: Any, help: str, check: Check | None = None) -> Any:
    """A key of a settings section: its default, the help text `config show` and mjctl.toml share, and an
    optional check saying what is wrong with a value (the end of the error sentence) or None."""
    return field(default=default, metadata={"help": help, "check": check})


def _positive(value: float) -> str | None:
    return " must be greater than zero." if value <= 0 else None


def _port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else " must be a port between 0 and 65535."


def _pool_size(value: int) -> str | None:
    return " must be 0 (sized to the threads) or more." if value < 0 else None


def _log_level(value: str) -> str | None:
    return None if value.lower() in ("debug", "info", "warning", "error") else " must be debug, info, warning or error."


def _hosts(value: str) -> str | None:
    for entry in split_list(value):
        if not _HOST_OR_CIDR.match(entry):
            return f": {entry!r} is not a host name, an IP address or a CIDR."
    return None


def _quota(value: int) -> str | None:
    return " must not be negative." if value < 0 else None


def _store(value: str) -> str | None:
    if value == "local":
        return None
    from mjctl.images.store import parse_store_url

    problem = parse_store_url(value)[2]
    return f": {problem}" if problem else None


def _http_url(value: str) -> str | None:
    if value and not re.match(r"^https?://[^/\s]+(/\S*)?$", value):
        return f" must be an http:// or https:// URL, not {value!r}."
    return None


def _presign_seconds(value: int) -> str | None:
    if value > 604800:
        return " must be at most 604800 (7 days, the longest a presigned link lives)."
    return _positive(value)


@dataclass(frozen=True)
class DatabaseSettings:
    """[database]: where tasks, users, channels and the ledger live."""

    url: str = setting("sqlite:///mjctl.db", "sqlite:///PATH, postgresql://USER@HOST:PORT/DB or mysql://USER@HOST:PORT/DB")
    pool_size: int = setting(0, "connections kept per process (PostgreSQL and MySQL); 0 = [server] threads + [poller] concurrency + 2", _pool_size)
    pool_timeout: float = setting(5.0, "seconds to wait for a free pooled connection")
    connect_timeout: int = setting(5, "seconds to wait when opening a connection")
    stale_timeout: int = setting(300, "seconds after which an idle pooled connection is replaced")
    busy_timeout: float = setting(5.0, "seconds to wait for a lock before failing (SQLite busy timeout, PostgreSQL lock_timeout, MySQL lock waits)")


@dataclass(frozen=True)
class ServerSettings:
    """[server]: `mjctl serve`, the HTTP API, the relay, image forwarding and the web page."""

    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(8080, "port to listen on", _port)
    public_url: str = setting("", "base of every URL mjctl hands out; default http://HOST:PORT")
    threads: int = setting(16, "worker threads of the HTTP server", _positive)
    workers: int = setting(1, "server processes sharing the port (mjctl serve --workers); PostgreSQL or MariaDB recommended above 1", _positive)
    secret: str = setting("", "HMAC key for signed URLs and secret storage; generated into secret_file when empty")
    secret_file: str = setting("mjctl.secret", "where a generated secret is kept (mode 0600)")
    max_connections: int = setting(4096, "open client connections per server process; more wait in the listen queue")
    header_timeout: float = setting(10.0, "seconds a client has to send a request's headers (an idle keep-alive connection is closed after as long)")
    body_timeout: float = setting(10.0, "seconds a client has to send a request's body before it is answered 408")
    max_header_bytes: int = setting(16384, "largest request head (request line and headers), in bytes; larger is answered 431")
    max_body_bytes: int = setting(33554432, "largest request body, in bytes (blend and describe carry base64 images); larger is answered 413 unread")


@dataclass(frozen=True)
class PollerSettings:
    """[poller]: tracking unfinished tasks (`mjctl poll`, and inside `mjctl serve`)."""

    interval: float = setting(15.0, "seconds between polling cycles", _positive)
    batch_size: int = setting(100, "task ids per list-by-condition request", _positive)
    request_timeout: float = setting(15.0, "seconds before an upstream request is given up", _positive)
    task_timeout: int = setting(3600, "seconds after submission when an unfinished task fails", _positive)
    in_server: bool = setting(True, "mjctl serve also runs the poller")
    concurrency: int = setting(4, "channels polled in parallel", _positive)
    lease_seconds: float = setting(120.0, "how long a poller's claim on a channel lasts without renewal")


@dataclass(frozen=True)
class ImagesSettings:
    """[images]: result images handed out through mjctl's own signed URLs, and their cache."""

    forward: bool = setting(True, "hand out mjctl's own image URLs instead of the upstream's")
    sign: bool = setting(True, "image URLs need a signature or the owner's token")
    cache_dir: str = setting("", "where finished images are kept; default: images/ next to the database")
    max_bytes: int = setting(104857600, "largest image forwarded, in bytes", _positive)
    timeout: float = setting(30.0, "seconds before an upstream image request is given up", _positive)
    max_streams: int = setting(64, "image and video answers served at once per process, streaming to their clients included; more are answered 429", _positive)
    max_streams_per_user: int = setting(16, "answers of one user's images and videos served at once per process (whoever asks, by link or token); more are answered 429", _positive)
    allow_hosts: str = setting("", "comma-separated host names, IPs or CIDRs image fetches may reach although they are not public (an internal object store); a channel's own origin is always allowed", _hosts)
    store: str = setting("local", "where finished images are kept: local (cache_dir) or s3://BUCKET/PREFIX, shared by every host", _store)
    s3_endpoint_url: str = setting("", "S3 endpoint for MinIO, Ceph, R2 and other S3-compatible stores; empty = AWS", _http_url)
    s3_region: str = setting("", "the bucket's region; empty = AWS_REGION, the AWS config file, else us-east-1")
    s3_access_key_id: str = setting("", "only if the standard AWS variables and files cannot be used")
    s3_secret_access_key: str = setting("", "only if the standard AWS variables and files cannot be used")
    s3_connect_timeout: float = setting(3.0, "seconds to open a connection to the store", _positive)
    s3_read_timeout: float = setting(10.0, "seconds the store may stay silent during a call before it is given up", _positive)
    s3_attempts: int = setting(2, "attempts per store call (the first included) before it fails", _positive)
    redirect: bool = setting(False, "answer images kept in an S3 store with a redirect to a short-lived presigned link")
    redirect_seconds: int = setting(300, "how long a presigned link of [images] redirect stays valid", _presign_seconds)


@dataclass(frozen=True)
class RelaySettings:
    """[relay]: what a submission may carry and how much upstream-bound work runs at once."""

    max_prompt_chars: int = setting(8000, "longest prompt a submission may carry")
    max_in_flight: int = setting(64, "upstream-bound requests (submissions, image-seed, cancel, face swap) served at once per process; more are answered 429")
    max_in_flight_per_user: int = setting(8, "upstream-bound requests one user may have in flight at once per process; more are answered 429")
    channel_cooldown: float = setting(300.0, "seconds a channel stays out of rotation after \"no available account\", "
                                             "a refused secret or 3 transport failures in a row; 0 = never")


@dataclass(frozen=True)
class ClientSettings:
    """[client]: the CLI reading a remote mjctl (`tasks list --server`) and `--mine`."""

    server: str = setting("", "remote mjctl for `tasks list --server` (also $MJCTL_SERVER)")
    token: str = setting("", "your access token for --mine and remote mode (also $MJCTL_TOKEN)")


def _log_format(value: str) -> str | None:
    return None if value in ("text", "json") else " must be text or json."


@dataclass(frozen=True)
class LogSettings:
    """[log]"""

    level: str = setting("info", "debug, info, warning or error", _log_level)
    format: str = setting("text", "text (timestamped lines) or json (one JSON object per line, for log collectors)",
                          _log_format)


@dataclass(frozen=True)
class MetricsSettings:
    """[metrics]: GET /metrics, in the Prometheus text format."""

    public: bool = setting(False, "GET /metrics answers without a token (otherwise an admin token is needed)")


#: [prices] out of the box: action -> (quota, help). The section is open: any action name may have a price.
DEFAULT_PRICES: dict[str, tuple[int, str]] = {
    "default": (1000, "quota for an action without its own price"),
    "IMAGINE": (1000, ""),
    "UPSCALE": (500, ""),
    "VARIATION": (1000, ""),
    "REROLL": (1000, ""),
    "DESCRIBE": (500, ""),
    "BLEND": (1000, ""),
    "SHORTEN": (500, ""),
    "ZOOM": (1000, ""),
    "PAN": (1000, ""),
    "MODAL": (0, "the modal step after a code-21 action (the action was charged)"),
    "VIDEO": (1000, "image to video (/mj/submit/video)"),
    "EDITS": (1000, "an image edited by a prompt (/mj/submit/edits)"),
    "SWAP_FACE": (1000, "a face swap (/mj/insight-face/swap)"),
    "UPLOAD": (0, "upload-discord-images, per request (no task is made); 0 = free"),
}


#: Generation speeds that may have prices of their own: ``[prices.relax]`` in mjctl.toml,
#: ``MJCTL_PRICES_RELAX_IMAGINE`` in the environment; kept in [prices] as ``relax.IMAGINE``.
PRICE_MODES = ("fast", "relax", "turbo")


class Prices(Mapping[str, int]):
    """[prices]: the quota charged per action (upper case) when a submission is accepted, read-only. The
    DEFAULT_PRICES come first, each replaced by the quota given for it; actions given a price of their own
    follow. ``default`` prices an action without one. A mode's own price of an action is the key
    ``<mode>.<ACTION>`` (``relax.IMAGINE``), from the ``[prices.relax]`` table."""

    __slots__ = ("_quotas",)

    def __init__(self, quotas: Mapping[str, int] | None = None):
        self._quotas = {action: quota for action, (quota, _help) in DEFAULT_PRICES.items()}
        self._quotas.update(quotas or {})

    def __getitem__(self, action: str) -> int:
        return self._quotas[action]

    def __iter__(self) -> Iterator[str]:
        return iter(self._quotas)

    def __len__(self) -> int:
        return len(self._quotas)

    def __repr__(self) -> str:
        return f"Prices({self._quotas!r})"

    def of(self, action: str, mode: str = "") -> int:
        """The quota for an action (any case) in a mode: the mode's own price when [prices.<mode>] names
        the action, else [prices]' price of it, else the default price."""
        action = action.upper()
        if mode:
            quota = self._quotas.get(f"{mode.lower()}.{action}")
            if quota is not None:
                return quota
        return self._quotas.get(action, self._quotas["default"])


#: The sections in the order mjctl.toml and `config show` list them.
SECTIONS: dict[str, type] = {
    "database": DatabaseSettings, "server": ServerSettings, "poller": PollerSettings, "images": ImagesSettings,
    "relay": RelaySettings, "prices": Prices, "client": ClientSettings, "log": LogSettings,
    "metrics": MetricsSettings,
}


def _schema() -> dict[str, dict[str, tuple[Any, type, str]]]:
    schema: dict[str, dict[str, tuple[Any, type, str]]] = {}
    for name, cls in SECTIONS.items():
        if cls is Prices:
            schema[name] = {action: (quota, int, help) for action, (quota, help) in DEFAULT_PRICES.items()}
        else:
            types = get_type_hints(cls)
            schema[name] = {f.name: (f.default, types[f.name], f.metadata["help"]) for f in fields(cls)}
    return schema


#: section -> key -> (default, type, help), read from the section classes above. The repository's
#: mjctl.toml documents the same keys.
SCHEMA: dict[str, dict[str, tuple[Any, type, str]]] = _schema()
_CHECKS: dict[tuple[str, str], Check] = {
    (name, f.name): f.metadata["check"] for name, cls in SECTIONS.items() if cls is not Prices
    for f in fields(cls) if f.metadata["check"] is not None}

SECRET_KEYS = {("server", "secret"), ("client", "token"), ("images", "s3_access_key_id"),
               ("images", "s3_secret_access_key")}
PATH_KEYS = {("images", "cache_dir"), ("server", "secret_file")}
#: Variables the contract names outside the MJCTL_<SECTION>_<KEY> scheme.
ALIASES = {"MJCTL_TOKEN": ("client", "token"), "MJCTL_SERVER": ("client", "server")}
#: Sections whose keys are open (any action name may have a price).
OPEN_SECTIONS = {"prices"}


@dataclass
class Settings:
    """The effective settings: a frozen, typed object per section, where each value came from (sources,
    keyed by (section, key)), the config file and the folder relative paths are resolved against.

    A section is replaced whole, never changed in place: ``settings.server =
    dataclasses.replace(settings.server, port=bound)``."""

    database: DatabaseSettings
    server: ServerSettings
    poller: PollerSettings
    images: ImagesSettings
    relay: RelaySettings
    prices: Prices
    client: ClientSettings
    log: LogSettings
    metrics: MetricsSettings
    sources: dict[tuple[str, str], str]
    config_path: Path | None
    base_dir: Path

    def section_values(self, section: str) -> dict[str, Any]:
        """One section as key -> value, in the documented order."""
        values = getattr(self, section)
        if isinstance(values, Prices):
            return dict(values)
        return {f.name: getattr(values, f.name) for f in fields(values)}

    def price(self, action: str, mode: str = "") -> int:
        return self.prices.of(action, mode)

    def resolve_path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.base_dir / path)

    def database_url(self) -> str:
        """The database URL with a relative SQLite path made absolute against base_dir."""
        url = self.database.url
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            rest = url[len("sqlite:///"):]
            if rest and rest != ":memory:":
                return "sqlite:///" + str(self.resolve_path(rest))
        return url

    def redacted(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for section in SECTIONS:
            out[section] = {}
            for key, value in self.section_values(section).items():
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
            converted = typ(text)
        except ValueError:
            raise ConfigError(f"{problem} must be {_type_word(typ)}, not {value!r}.") from None
        if typ is float and not math.isfinite(converted):
            raise ConfigError(f"{problem} must be a finite number, not {value!r}.")
        return converted
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
            if not math.isfinite(value):  # TOML has inf and nan
                raise ConfigError(f"{problem} must be a finite number, not {value!r}.")
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
    check = _quota if section in OPEN_SECTIONS else _CHECKS.get((section, key))
    problem = check(value) if check is not None else None
    if problem:
        raise ConfigError(f"{where}: [{section}] {key}{problem}")


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
    values: dict[str, dict[str, Any]] = {s: {k: d for k, (d, _, _) in keys.items()} for s, keys in SCHEMA.items()}
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
                if section in OPEN_SECTIONS and isinstance(raw, dict) and key.lower() in PRICE_MODES:
                    for action, quota in raw.items():  # [prices.relax] IMAGINE = 500
                        _set(values, sources, section, f"{key.lower()}.{action.upper()}", quota, str(path),
                             f"file {path}")
                    continue
                _set(values, sources, section, key, raw, str(path), f"file {path}")

    for name, raw in environ.items():
        if not name.startswith("MJCTL_"):
            continue
        env_section, env_key = ALIASES[name] if name in ALIASES else _env_target(name)
        if env_section is None or env_key is None:
            continue
        _set(values, sources, env_section, env_key, raw, f"${name}", f"env {name}")

    for (section, key), raw in (overrides or {}).items():
        if raw is None:
            continue
        _set(values, sources, section, key, raw, "command line", "option")

    base_dir = path.parent if path is not None else Path.cwd()
    settings = Settings(
        database=DatabaseSettings(**values["database"]), server=ServerSettings(**values["server"]),
        poller=PollerSettings(**values["poller"]), images=ImagesSettings(**values["images"]),
        relay=RelaySettings(**values["relay"]), prices=Prices(values["prices"]), client=ClientSettings(**values["client"]),
        log=LogSettings(**values["log"]), metrics=MetricsSettings(**values["metrics"]), sources=sources,
        config_path=path, base_dir=base_dir)
    cache_dir = settings.images.cache_dir
    cache_dir = str(settings.resolve_path(cache_dir) if cache_dir else _default_cache_dir(settings))
    settings.images = replace(settings.images, cache_dir=cache_dir)
    settings.server = replace(settings.server, secret_file=str(settings.resolve_path(settings.server.secret_file)))
    return settings


def _env_target(name: str) -> tuple[str | None, str | None]:
    rest = name[len("MJCTL_"):]
    for section in SCHEMA:
        prefix = section.upper() + "_"
        if rest.startswith(prefix):
            key = rest[len(prefix):]
            if section in OPEN_SECTIONS:
                mode, _, action = key.partition("_")
                if mode.lower() in PRICE_MODES and action:  # MJCTL_PRICES_RELAX_IMAGINE
                    return section, f"{mode.lower()}.{action.upper()}"
                return section, "default" if key.lower() == "default" else key.upper()
            return section, key.lower()
    return None, None


def _set(values, sources, section: str, key: str, raw: Any, where: str, source: str) -> None:
    schema = SCHEMA[section]
    typ: type
    if key not in schema:
        if section in OPEN_SECTIONS:
            typ = int
            mode, dot, action = key.partition(".")
            key = key if key == "default" else (f"{mode.lower()}.{action.upper()}" if dot else key.upper())
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
