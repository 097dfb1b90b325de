"""Client for a midjourney-proxy upstream (Java, C# or a re-exposing gateway), on httpx.

Every answer shape (docs/upstream.md) becomes a typed outcome: envelopes (accepted or rejected) are a
:class:`SubmitResult`; everything else raises a subclass of :class:`UpstreamError`:

- :class:`UpstreamUnavailable`  connection error, timeout, 5xx — worth failing over to another channel
- :class:`UpstreamUnauthorized` 401 (empty body, plain text or JSON)
- :class:`UpstreamRateLimited`  429, with ``retry_after`` seconds when the upstream said so
- :class:`UpstreamProtocolError` malformed JSON, a wrong shape, the C# ``{"success": false, "code": -1}``

Task dicts are returned exactly as the upstream's camelCase JSON. Error messages never contain the secret.

Every call has a total deadline (:class:`Deadline`): connecting, sending and the whole answer. httpx's own
timeouts are per socket operation, so an upstream that trickles its answer a byte every few seconds would
never time out; the relay's quota reservation must outlive the call it covers, so the call must end.

Submit answers are checked and cleaned by :mod:`mjctl.upstream_text` (an id that is not an id is a protocol
error); the same module cleans task reports where they are applied.

Fetching what an upstream points at (result images) is another matter: the URL is the upstream's to
choose, so :func:`deadline_transport` with ``guarded=True`` connects only where the thread's
:class:`FetchPolicy` allows (:func:`guarded_by`). See that class for the rule and why it is enforced where
the socket is opened.
"""

from __future__ import annotations

import contextlib
import email.utils
import ipaddress
import json
import socket
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpcore
import httpx

from mjctl import __version__, jsontext, upstream_text
from mjctl.protocol import ACCEPTED_CODES, FINISHED_STATUSES, PREFIXES, SUBMIT_KINDS, SWAP_FACE_PATH

__all__ = [
    "ACCEPTED_CODES",
    "AnswerRefused",
    "Deadline",
    "DeadlineExceeded",
    "FINISHED_STATUSES",
    "FetchPolicy",
    "FetchRefused",
    "MAX_ANSWER_BYTES",
    "PREFIXES",
    "SUBMIT_KINDS",
    "ProbeResult",
    "SubmitResult",
    "UpstreamClient",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamRateLimited",
    "UpstreamUnauthorized",
    "UpstreamUnavailable",
    "bounded_by",
    "deadline_transport",
    "guarded_by",
    "is_public_address",
    "read_within",
    "task_is_finished",
]



class UpstreamError(Exception):
    """Any failure to get a usable answer from an upstream."""

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return self.message


class UpstreamUnavailable(UpstreamError):
    """Connection refused or reset, timeout, or a 5xx: the relay fails over to another channel."""


class UpstreamUnauthorized(UpstreamError):
    """The upstream refused the secret (401)."""


class UpstreamRateLimited(UpstreamError):
    """429 Too Many Requests; ``retry_after`` is in seconds when the upstream gave one."""

    def __init__(self, message: str, *, status: int | None = 429, retry_after: float | None = None):
        super().__init__(message, status=status)
        self.retry_after = retry_after


class UpstreamProtocolError(UpstreamError):
    """An answer that is not the midjourney-proxy API: bad JSON, a wrong shape, a C# error object."""


@dataclass(frozen=True)
class SubmitResult:
    """The ``{code, description, result, properties}`` envelope, accepted or not."""

    code: int
    description: str
    result: str | None
    properties: dict[str, Any] = field(default_factory=dict)
    http_status: int = 200
    #: The links an upload-discord-images answer carries in result (a list there, not a task id).
    links: tuple[str, ...] = ()

    @property
    def task_id(self) -> str | None:
        return self.result

    @property
    def accepted(self) -> bool:
        """True for 1 (submitted), 21 (waiting for a modal) and 22 (queued)."""
        return self.code in ACCEPTED_CODES


@dataclass(frozen=True)
class ProbeResult:
    reachable: bool
    authorized: bool | None
    rtt_ms: float
    message: str


def task_is_finished(task: dict[str, Any]) -> bool:
    """Whether an upstream task is terminal — by ``status`` only, never by ``progress``."""
    return str(task.get("status") or "").upper() in FINISHED_STATUSES


# -- deadlines -------------------------------------------------------------------------------------------


class DeadlineExceeded(httpx.TimeoutException):
    """An exchange with an upstream outlived its total deadline (a timeout, so callers treat it as one)."""

    def __init__(self, message: str, *, request: httpx.Request | None = None):
        super().__init__(message, request=request)


class Deadline:
    """A moment (monotonic clock) by which an upstream exchange must be over, connect to last byte."""

    __slots__ = ("at", "seconds")

    def __init__(self, seconds: float):
        self.seconds = max(0.0, float(seconds))
        self.at = time.monotonic() + self.seconds

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def expired(self) -> bool:
        return self.remaining() <= 0

    def timeout(self, connect: float | None = None) -> httpx.Timeout:
        """httpx timeouts none of which reaches past the deadline (a floor of 1 ms: 0 would mean
        non-blocking sockets, not "already late")."""
        left = max(self.remaining(), 0.001)
        return httpx.Timeout(left, connect=min(left, connect) if connect is not None else left)


_bound = threading.local()


@contextlib.contextmanager
def bounded_by(deadline: Deadline) -> Iterator[Deadline]:
    """Within this block every socket operation of a :func:`deadline_transport` in this thread waits at
    most until the deadline (nested blocks: the earlier deadline wins). This is what cuts a trickle: a
    read that would go on past the deadline times out at it, however little the upstream sends."""
    outer = getattr(_bound, "deadline", None)
    _bound.deadline = deadline if outer is None or deadline.at < outer.at else outer
    try:
        yield deadline
    finally:
        _bound.deadline = outer


def _capped(timeout: float | None, late: type[Exception]) -> float | None:
    deadline = getattr(_bound, "deadline", None)
    if deadline is None:
        return timeout
    left = deadline.remaining()
    if left <= 0:
        raise late("the deadline of this upstream exchange has passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A socket stream whose every read and write is capped at the thread's deadline."""

    def __init__(self, stream: httpcore.NetworkStream):
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _capped(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _capped(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname,
                                                      _capped(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self, backend: httpcore.NetworkBackend):
        self._backend = backend

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        return _DeadlineStream(self._backend.connect_tcp(host, port, _capped(timeout, httpcore.ConnectTimeout),
                                                         local_address, socket_options))

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        return _DeadlineStream(self._backend.connect_unix_socket(path, _capped(timeout, httpcore.ConnectTimeout),
                                                                 socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


# -- where a fetch may connect ---------------------------------------------------------------------------


class FetchRefused(Exception):
    """A connection the thread's :class:`FetchPolicy` does not allow; nothing was connected to. The
    message names the address and is for the operator's log, never for a user (it would make mjctl a
    port scanner of its own network)."""

    def __init__(self, reason: str, host: str = "", port: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.host = host
        self.port = port


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def is_public_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ip is a public unicast address: not loopback, private, link-local, shared (CGNAT
    100.64/10), multicast, unspecified or reserved. IPv6 forms that carry an IPv4 address (IPv4-mapped,
    6to4, NAT64) are judged by that address: ``::ffff:127.0.0.1`` is loopback."""
    if ip.version == 6:
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public_address(embedded)
        if ip.is_site_local:
            return False
    return ip.is_global and not (ip.is_multicast or ip.is_loopback or ip.is_link_local or ip.is_private
                                 or ip.is_reserved or ip.is_unspecified)


def _kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """A word for why ip is not public, for the log."""
    inner = (ip.ipv4_mapped or ip.sixtofour) if isinstance(ip, ipaddress.IPv6Address) else None
    if inner is not None:
        return "an IPv6 form of " + _kind(inner)
    for word in ("loopback", "unspecified", "link_local", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{word}"):
            return f"a {word.replace('_', '-')} address"
    return "a non-public address"


def _port_of(url: httpx.URL) -> int:
    return url.port or {"https": 443, "http": 80}.get(url.scheme, 0)


@dataclass(frozen=True)
class FetchPolicy:
    """Where a fetch of something an upstream points at (an image, later a video) may connect:

    - the channel's own origin (the host and port of its base URL): the operator chose that address, and
      upstreams (the simulator among them) often live on private networks, so it may be anything;
    - a host named in ``[images] allow_hosts`` (any address), or an address inside one of its CIDRs;
    - any other name only when every address it resolves to is public (:func:`is_public_address`).

    Enforced in the network backend of a :func:`deadline_transport` made with ``guarded=True``, where the
    socket is opened: the name is resolved once, each address checked, and the socket connected to a
    checked address. httpcore still believes it connected to the name, so the Host header, TLS SNI and
    certificate verification all keep using the name: nothing can re-resolve it to another address
    between the check and the connection (DNS rebinding). Redirect hops are new requests and meet the same
    check; the client using it must not pool connections, or a connection opened under one channel's
    policy (to its private origin) could carry another channel's request.
    """

    channel: str = ""
    origin: tuple[str, int] | None = None  # host, port of the channel's base URL
    hosts: frozenset[str] = frozenset()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def build(cls, channel: str, base_url: str | None, allow_hosts: Iterable[str] = ()) -> FetchPolicy:
        """The policy of one channel (name, base URL) with the operator's allow list (names, IPs, CIDRs)."""
        origin = None
        if base_url:
            try:
                url = httpx.URL(base_url)
                if url.host and url.scheme in ("http", "https"):
                    origin = (url.host.lower().rstrip("."), _port_of(url))
            except (httpx.InvalidURL, ValueError):
                origin = None
        hosts, networks = set(), []
        for entry in allow_hosts:
            entry = entry.strip().lower().rstrip(".")
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                hosts.add(entry)
        return cls(channel=channel, origin=origin, hosts=frozenset(hosts), networks=tuple(networks))

    def _allowed(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if is_public_address(ip):
            return True
        mapped = ip.ipv4_mapped if ip.version == 6 else None
        return any(ip in net or (mapped is not None and mapped in net) for net in self.networks)

    def addresses(self, host: str, port: int) -> list[str]:
        """What to connect to for host:port: the name itself when it is trusted whole (the channel's origin,
        an allowed name), else its addresses, every one checked. Raises FetchRefused."""
        name = host.lower().rstrip(".")
        if (name, port) == self.origin or name in self.hosts:
            return [host]
        try:
            literal = ipaddress.ip_address(name.strip("[]"))
        except ValueError:
            literal = None
        if literal is not None:
            if not self._allowed(literal):
                raise FetchRefused(f"{literal} is {_kind(literal)}", host, port)
            return [str(literal)]
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from None
        found: list[str] = []
        for _family, _type, _proto, _name, sockaddr in infos:
            ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            if not self._allowed(ip):
                # One private answer among public ones is refused whole: it is how rebinding is tried.
                raise FetchRefused(f"{host} resolves to {ip}, {_kind(ip)}", host, port)
            if str(ip) not in found:
                found.append(str(ip))
        if not found:
            raise httpcore.ConnectError(f"{host} has no address")
        return found


_guard = threading.local()


@contextlib.contextmanager
def guarded_by(policy: FetchPolicy) -> Iterator[FetchPolicy]:
    """Within this block, connections a guarded transport opens in this thread follow policy."""
    outer = getattr(_guard, "policy", None)
    _guard.policy = policy
    try:
        yield policy
    finally:
        _guard.policy = outer


class _GuardedBackend(httpcore.NetworkBackend):
    """Connects only where the thread's FetchPolicy allows, to the very address it checked. Without a
    policy in force it connects nowhere: a guarded client used by mistake fails closed."""

    def __init__(self, backend: httpcore.NetworkBackend):
        self._backend = backend

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        policy = getattr(_guard, "policy", None)
        if policy is None:
            raise FetchRefused("no fetch policy is in force for this connection", host, port)
        last: Exception | None = None
        for address in policy.addresses(host, port):
            try:
                return self._backend.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        raise last if last is not None else httpcore.ConnectError(f"cannot connect to {host}")

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise FetchRefused("a fetch never goes to a unix socket", path)

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def deadline_transport(*, guarded: bool = False, **kwargs: Any) -> httpx.HTTPTransport:
    """An ``httpx.HTTPTransport`` (same arguments) whose sockets honour :func:`bounded_by`; with guarded,
    they also connect only where :func:`guarded_by` allows (see :class:`FetchPolicy`).

    httpx offers no public way to pass httpcore a network backend, so it is swapped in on the pool; were
    that attribute ever gone, an unguarded transport still works with only the per-chunk deadline checks,
    and a guarded one refuses to be made (it could not keep its promise).
    """
    transport = httpx.HTTPTransport(**kwargs)
    pool = getattr(transport, "_pool", None)
    backend = getattr(pool, "_network_backend", None)
    if pool is None or backend is None:
        if guarded:
            raise RuntimeError("this httpx/httpcore version does not let mjctl check where fetches connect")
        return transport
    if not isinstance(backend, _DeadlineBackend):
        pool._network_backend = _DeadlineBackend(_GuardedBackend(backend) if guarded else backend)
    return transport


#: The most an upstream API answer may hold, as sent and once decoded: a list-by-condition answer of 100
#: tasks is well under 1 MiB; the whole-list route of a busy upstream is the largest. More is refused
#: rather than held in memory, and a compressed answer is decoded only up to this size.
MAX_ANSWER_BYTES = 64 * 1024 * 1024
#: The content codings an upstream may answer in: what mjctl asks for, and decodes within the cap.
_CODINGS = {"gzip": zlib.MAX_WBITS | 16, "x-gzip": zlib.MAX_WBITS | 16, "deflate": zlib.MAX_WBITS}


class AnswerRefused(Exception):
    """An upstream answer mjctl will not read: larger than the cap, or in a coding it did not ask for."""


def read_within(transport: httpx.BaseTransport, request: httpx.Request, deadline: Deadline,
                limit: int = MAX_ANSWER_BYTES) -> httpx.Response:
    """Send request through transport and read its whole answer, at most limit bytes, by deadline; returns
    a read response, decoded (gzip or deflate, within the limit too).

    The one place a bounded exchange is implemented: the pool wait, connect and every read are capped at
    the time left (through :func:`deadline_transport`), and the deadline is checked after each chunk, so
    even on a transport without the cap (a test's mock) a trickle ends one chunk after the deadline.
    The transport is called directly: an upstream call needs none of what ``httpx.Client.send`` adds
    around it (cookies kept from answers, authentication flows, redirects, which mjctl never follows),
    and those layers cost a poll cycle more CPU than reading the answers' JSON.
    Raises ``DeadlineExceeded`` (an ``httpx.TimeoutException``), httpx's own errors, or
    :class:`AnswerRefused`.
    """
    request.extensions["timeout"] = deadline.timeout(
        _connect_of(request.extensions.get("timeout"))).as_dict()
    with bounded_by(deadline):
        response = transport.handle_request(request)
        response.request = request
        if response.is_stream_consumed:  # a transport that answered from memory (a test's mock)
            response.close()
            if len(response.content) > limit:
                raise AnswerRefused(f"answered with more than {limit} bytes")
            return response
        try:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > limit:
                raise AnswerRefused(f"announced an answer of {declared} bytes, more than {limit}")
            raw = bytearray()
            for chunk in response.iter_raw():
                raw += chunk
                if len(raw) > limit:
                    raise AnswerRefused(f"answered with more than {limit} bytes")
                if deadline.expired():
                    raise DeadlineExceeded(f"no complete answer within {deadline.seconds:g} s", request=request)
        finally:
            response.close()
    headers = response.headers
    content = bytes(raw)
    coding = headers.get("Content-Encoding", "").strip().lower()
    if coding and coding != "identity":
        content = _decoded(content, coding, limit)
        headers = headers.copy()
        del headers["Content-Encoding"]
        headers["Content-Length"] = str(len(content))
    return httpx.Response(response.status_code, headers=headers, content=content, request=request,
                          extensions={"http_version": response.extensions.get("http_version", b"HTTP/1.1")})


def _decoded(raw: bytes, coding: str, limit: int) -> bytes:
    """raw in one of the codings mjctl asks for, decoded to at most limit bytes (a small compressed answer
    can stand for gigabytes). A deflate body without its zlib header (some servers send one) is taken too."""
    wbits = _CODINGS.get(coding)
    if wbits is None:
        raise AnswerRefused(f"answered in a content coding it was not asked for ({coding[:32]!r})")
    for bits in (wbits, -zlib.MAX_WBITS) if coding == "deflate" else (wbits,):
        decoder = zlib.decompressobj(bits)
        try:
            content = decoder.decompress(raw, limit + 1)  # input left over means the output reached limit + 1
            if not decoder.unconsumed_tail:
                content += decoder.flush()
        except zlib.error:
            continue
        if len(content) > limit or decoder.unconsumed_tail:
            raise AnswerRefused(f"answered with more than {limit} bytes once decoded")
        return content
    raise AnswerRefused(f"answered with a body that is not valid {coding}")


def _connect_of(timeouts: Any) -> float | None:
    if isinstance(timeouts, dict):
        value = timeouts.get("connect")
        return float(value) if value is not None else None
    return None


_ssl_context = None
_ssl_lock = threading.Lock()
_JSON_BODY = {"Content-Type": "application/json"}
MAX_CACHED_URLS = 32  # per client: every route without a task id fits, and paths naming one cannot grow it


def shared_ssl_context():
    """One TLS context for every client of this process. httpx builds a new one per client by default,
    loading the CA bundle each time (~36 ms of CPU): two thirds of a relayed submission's cost."""
    global _ssl_context
    with _ssl_lock:
        if _ssl_context is None:
            import ssl

            import certifi

            _ssl_context = ssl.create_default_context(cafile=certifi.where())
    return _ssl_context


class UpstreamClient:
    """One thread-safe ``httpx.Client`` towards one upstream; use as a context manager or ``close()``.

    ``timeout`` is the total deadline of each call (connect, request and the whole answer), not httpx's
    per-read timeout; ``connect_timeout`` caps the connect phase within it.
    """

    def __init__(
        self,
        base_url: str,
        secret: str,
        *,
        timeout: float = 15.0,
        connect_timeout: float = 5.0,
        transport: httpx.BaseTransport | None = None,
        channel: str = "",
    ):
        self.base_url = base_url.rstrip("/")
        self.channel = channel  # the channel's name, for the request metrics
        self._secret = secret or ""
        upstream_text.remember_secret(self._secret)  # scrubbed from whatever an upstream writes
        headers = {"Accept": "application/json", "Accept-Encoding": "gzip, deflate",
                   "User-Agent": f"mjctl/{__version__}"}
        if self._secret:
            headers["mj-api-secret"] = self._secret
        self._headers = httpx.Headers(headers)
        self._json_headers = httpx.Headers({**headers, **_JSON_BODY})
        self.timeout = float(timeout)
        self._connect_timeout = float(connect_timeout)
        self._transport = transport if transport is not None else deadline_transport(verify=shared_ssl_context())
        self._where = _redact_url(self.base_url)
        self._urls: dict[str, httpx.URL] = {}  # by path: the routes without a task id in them, in practice

    def __repr__(self) -> str:
        return f"UpstreamClient({self._where!r})"

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> UpstreamClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- API -------------------------------------------------------------------------------------------

    def submit(self, kind: str, body: dict[str, Any], prefix: str = "", *,
               deadline: Deadline | None = None) -> SubmitResult:
        """POST ``{prefix}/mj/submit/{kind}``; rejections (codes 3, 4, 9, 23, 24 …) are results, not errors.

        deadline (default: ``timeout`` from now) lets the relay end the call before its quota
        reservation could expire."""
        if kind not in SUBMIT_KINDS:
            raise ValueError(f"unknown submit kind {kind!r}; expected one of {', '.join(SUBMIT_KINDS)}")
        if prefix not in PREFIXES:
            raise ValueError(f"unknown speed prefix {prefix!r}; expected one of {PREFIXES}")
        response = self._send("POST", f"{prefix}/mj/submit/{kind}", json_body=body, deadline=deadline)
        return self._submit_result(response, links=kind == "upload-discord-images")

    def swap_face(self, body: dict[str, Any], prefix: str = "", *, deadline: Deadline | None = None) -> SubmitResult:
        """POST ``{prefix}/mj/insight-face/swap`` (C# upstreams): a SWAP_FACE task, answered like a submit."""
        if prefix not in PREFIXES:
            raise ValueError(f"unknown speed prefix {prefix!r}; expected one of {PREFIXES}")
        response = self._send("POST", f"{prefix}{SWAP_FACE_PATH}", json_body=body, deadline=deadline)
        return self._submit_result(response)

    def cancel(self, task_id: str) -> SubmitResult:
        """POST ``/mj/task/<id>/cancel`` (C# upstreams). An upstream without the route answers 404 or 405:
        :class:`UpstreamProtocolError` with that status, or a rejection envelope."""
        response = self._send("POST", f"/mj/task/{_path_id(task_id)}/cancel", json_body={})
        return self._submit_result(response)

    def fetch(self, task_id: str) -> dict[str, Any] | None:
        """The task, or None when the upstream does not know it (200 empty body, 204, 404)."""
        response = self._send("GET", f"/mj/task/{_path_id(task_id)}/fetch")
        if response.status_code in (204, 404) or not response.content.strip():
            if response.status_code == 404 and response.content.strip():
                data = self._json(response)
                if not (isinstance(data, dict) and "code" in data and "id" not in data):
                    raise self._protocol(response, "answered 404 with something that is not an envelope")
            return None
        data = self._json(response)
        if isinstance(data, dict) and isinstance(data.get("id"), (str, int)):
            return data
        if isinstance(data, dict) and "code" in data and "success" not in data:
            return None  # a gateway's "task not found" envelope
        raise self._protocol(response, "answered fetch with something that is not a task")

    def list_by_condition(self, ids: list[str]) -> list[dict[str, Any]]:
        """The known tasks among ``ids`` (unknown ones are left out; the order is the upstream's)."""
        response = self._send("POST", "/mj/task/list-by-condition", json_body={"ids": list(ids)})
        return self._task_list(response)

    def list_tasks(self) -> list[dict[str, Any]]:
        return self._task_list(self._send("GET", "/mj/task/list"))

    def image_seed(self, task_id: str, *, timeout: float = 60.0) -> SubmitResult:
        """GET ``/mj/task/<id>/image-seed`` (slow on real upstreams: its own, longer total deadline)."""
        response = self._send("GET", f"/mj/task/{_path_id(task_id)}/image-seed", timeout=timeout)
        return self._submit_result(response)

    def probe(self) -> ProbeResult:
        """Reachability and secret check: a list-by-condition for an id that cannot exist."""
        started = time.perf_counter()
        try:
            self.list_by_condition(["0"])
        except UpstreamUnauthorized as exc:
            return ProbeResult(True, False, _ms(started), exc.message)
        except UpstreamUnavailable as exc:
            return ProbeResult(exc.status is not None, None, _ms(started), exc.message)
        except UpstreamError as exc:
            return ProbeResult(True, None, _ms(started), exc.message)
        return ProbeResult(True, True, _ms(started), "ok")

    # -- plumbing --------------------------------------------------------------------------------------

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """_exchange, timed into mjctl_upstream_request_seconds by channel, operation and outcome."""
        from mjctl import metrics

        with metrics.upstream_timer(self.channel or self._where, path):
            return self._exchange(method, path, **kwargs)

    def _exchange(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        timeout: float | None = None,
        deadline: Deadline | None = None,
    ) -> httpx.Response:
        """One bounded exchange: the whole answer arrives within ``timeout`` (the client's by default) or
        the call fails as ``UpstreamUnavailable``, like any other timeout; an answer over
        MAX_ANSWER_BYTES, or in a coding mjctl did not ask for, is ``UpstreamProtocolError``."""
        if deadline is None:
            deadline = Deadline(self.timeout if timeout is None else timeout)
        content = jsontext.dumps(json_body).encode() if json_body is not None else None
        where = f"{self._where}{path}"
        url = self._urls.get(path)
        if url is None:  # parsed once per path: merging the base URL and the path parses both every time
            url = httpx.URL(self.base_url + path)
            if len(self._urls) < MAX_CACHED_URLS:
                self._urls[path] = url
        try:
            request = httpx.Request(method, url, content=content,
                                    headers=self._json_headers if content is not None else self._headers,
                                    extensions={"timeout": {"connect": self._connect_timeout}})
            response = read_within(self._transport, request, deadline, MAX_ANSWER_BYTES)
        except AnswerRefused as exc:
            raise UpstreamProtocolError(self._clean(f"{where} {exc}")) from None
        except httpx.TimeoutException as exc:
            if isinstance(exc, DeadlineExceeded) or deadline.expired():  # cut at the deadline, trickling or not
                raise UpstreamUnavailable(self._clean(
                    f"{method} {where} timed out: no complete answer within {deadline.seconds:g} s")) from None
            raise UpstreamUnavailable(self._clean(f"{type(exc).__name__}: {method} {where} timed out")) from None
        except httpx.TransportError as exc:
            raise UpstreamUnavailable(self._clean(f"cannot reach {where}: {exc or type(exc).__name__}")) from None
        status = response.status_code
        if status == 401:
            detail = response.text.strip()[:200]
            text = f"{where} refused the secret (HTTP 401{': ' + detail if detail else ''})"
            raise UpstreamUnauthorized(self._clean(text), status=401)
        if status == 429:
            raise UpstreamRateLimited(
                self._clean(f"{where} is rate limiting (HTTP 429)"),
                retry_after=_retry_after(response.headers.get("Retry-After")),
            )
        if status >= 500:
            raise UpstreamUnavailable(self._clean(f"{where} failed with HTTP {status}"), status=status)
        if status == 403 and not _looks_like_envelope(response):
            raise UpstreamUnauthorized(self._clean(f"{where} refused access (HTTP 403)"), status=403)
        return response

    def _clean(self, message: str) -> str:
        if self._secret and self._secret in message:
            message = message.replace(self._secret, "***")
        return message

    def _protocol(self, response: httpx.Response, what: str) -> UpstreamProtocolError:
        where = _redact_url(str(response.request.url))
        return UpstreamProtocolError(self._clean(f"{where} {what} (HTTP {response.status_code})"),
                                     status=response.status_code)

    def _json(self, response: httpx.Response) -> Any:
        try:
            data = jsontext.loads(response.content)  # a 100-task list parses in a third of json's time
        except (ValueError, UnicodeDecodeError):
            raise self._protocol(response, "answered with malformed JSON") from None
        if isinstance(data, dict) and data.get("success") is False:
            detail = str(data.get("message") or data.get("description") or "no message")[:300]
            raise UpstreamProtocolError(
                self._clean(f"{_redact_url(str(response.request.url))} reported an error: {detail}"),
                status=response.status_code,
            )
        return data

    def _submit_result(self, response: httpx.Response, *, links: bool = False) -> SubmitResult:
        if not response.content.strip():
            raise self._protocol(response, "answered with an empty body")
        data = self._json(response)
        if not isinstance(data, dict) or "code" not in data:
            raise self._protocol(response, "answered with something that is not a SubmitResult")
        code = _code(data["code"])
        if code is None:
            raise self._protocol(response, "answered with a code that is not an integer")
        if response.status_code >= 400 and code in ACCEPTED_CODES:
            raise self._protocol(response, "answered an error status with an accepted code")
        result = data.get("result")
        if links and code in ACCEPTED_CODES:
            return SubmitResult(code=code, description=upstream_text.clean_text(data.get("description")) or "",
                                result=None, http_status=response.status_code,
                                links=self._links(response, result))
        if result in (None, ""):
            task_id = None
        else:
            try:
                task_id = upstream_text.task_id(result)
            except upstream_text.UpstreamTextError as exc:
                raise self._protocol(response, f"answered with an invalid result: {exc}") from None
        return SubmitResult(
            code=code,
            description=upstream_text.clean_text(data.get("description")) or "",
            result=task_id,
            properties=upstream_text.clean_properties(data.get("properties")),
            http_status=response.status_code,
        )

    def _links(self, response: httpx.Response, result: Any) -> tuple[str, ...]:
        """The URLs of an upload answer: a list of http(s) URLs, each at most MAX_URL_CHARS long."""
        if not isinstance(result, list) or len(result) > upstream_text.MAX_VIDEO_URLS:
            raise self._protocol(response, "answered an upload with a result that is not a list of links")
        links = []
        for item in result:
            url = upstream_text.clean_url(item) if isinstance(item, str) else None
            if not url or not url.startswith(("https://", "http://")):
                raise self._protocol(response, "answered an upload with a link that is not an http(s) URL")
            links.append(url)
        return tuple(links)

    def _task_list(self, response: httpx.Response) -> list[dict[str, Any]]:
        if response.status_code >= 400:
            raise self._protocol(response, "answered with an error status")
        if response.status_code == 204 or not response.content.strip():
            return []
        data = self._json(response)
        if data is None:
            return []
        if not isinstance(data, list) or not all(isinstance(t, dict) and "id" in t for t in data):
            raise self._protocol(response, "answered with something that is not a list of tasks")
        return data


def _code(value: Any) -> int | None:
    """A SubmitResult code: an integer, or its digits as a string (gateways send "1"); None otherwise
    (a boolean, a fraction, an object, a number no protocol uses)."""
    if isinstance(value, str) and 0 < len(value.strip()) <= 6:
        try:
            value = int(value.strip())
        except ValueError:
            return None
    if isinstance(value, int) and not isinstance(value, bool) and -100_000 < value < 100_000:
        return value
    return None


def _looks_like_envelope(response: httpx.Response) -> bool:
    try:
        data = json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and "code" in data and "success" not in data


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _redact_url(url: str) -> str:
    """The URL without any user:password part."""
    parsed = httpx.URL(url)
    if parsed.userinfo:
        parsed = parsed.copy_with(username=None, password=None)
    return str(parsed).rstrip("/")


def _path_id(task_id: str) -> str:
    task_id = str(task_id)
    if not task_id or "/" in task_id or task_id in (".", ".."):
        raise ValueError(f"invalid task id {task_id!r}")
    return task_id


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
