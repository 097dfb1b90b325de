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
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import httpcore
import httpx

from mjctl import jsontext

__all__ = [
    "ACCEPTED_CODES",
    "Deadline",
    "DeadlineExceeded",
    "FINISHED_STATUSES",
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
    "read_within",
    "task_is_finished",
]

SUBMIT_KINDS = ("imagine", "action", "modal", "change", "simple-change", "describe", "blend", "shorten")
PREFIXES = ("", "/mj-fast", "/mj-relax", "/mj-turbo")
ACCEPTED_CODES = frozenset({1, 21, 22})
FINISHED_STATUSES = frozenset({"SUCCESS", "FAILURE", "CANCEL"})


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


def deadline_transport(**kwargs: Any) -> httpx.HTTPTransport:
    """An ``httpx.HTTPTransport`` (same arguments) whose sockets honour :func:`bounded_by`.

    httpx offers no public way to pass httpcore a network backend, so it is swapped in on the pool; were
    that attribute ever gone, the transport still works and only the per-chunk deadline checks remain.
    """
    transport = httpx.HTTPTransport(**kwargs)
    pool = getattr(transport, "_pool", None)
    backend = getattr(pool, "_network_backend", None)
    if backend is not None and not isinstance(backend, _DeadlineBackend):
        pool._network_backend = _DeadlineBackend(backend)
    return transport


def read_within(client: httpx.Client, request: httpx.Request, deadline: Deadline) -> httpx.Response:
    """Send request and read its whole answer by deadline; returns a read response.

    The one place a bounded exchange is implemented: the pool wait, connect and every read are capped at
    the time left (through :func:`deadline_transport`), and the deadline is checked after each chunk, so
    even on a transport without the cap (a test's mock) a trickle ends one chunk after the deadline.
    Raises ``DeadlineExceeded`` (an ``httpx.TimeoutException``) or httpx's own errors.
    """
    request.extensions["timeout"] = deadline.timeout(
        _connect_of(request.extensions.get("timeout"))).as_dict()
    with bounded_by(deadline):
        response = client.send(request, stream=True)
        if response.is_stream_consumed:  # a transport that answered from memory (a test's mock)
            response.close()
            return response
        try:
            raw = bytearray()
            for chunk in response.iter_raw():
                raw += chunk
                if deadline.expired():
                    raise DeadlineExceeded(f"no complete answer within {deadline.seconds:g} s", request=request)
        finally:
            response.close()
    # A new response over the raw bytes decodes them once, as httpx would have.
    return httpx.Response(response.status_code, headers=response.headers, content=bytes(raw), request=request,
                          extensions={"http_version": response.extensions.get("http_version", b"HTTP/1.1")})


def _connect_of(timeouts: Any) -> float | None:
    if isinstance(timeouts, dict):
        value = timeouts.get("connect")
        return float(value) if value is not None else None
    return None


_ssl_context = None
_ssl_lock = threading.Lock()


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
    ):
        self.base_url = base_url.rstrip("/")
        self._secret = secret or ""
        headers = {"Accept": "application/json"}
        if self._secret:
            headers["mj-api-secret"] = self._secret
        self.timeout = float(timeout)
        self._client = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            transport=transport if transport is not None else deadline_transport(verify=shared_ssl_context()),
            follow_redirects=False,
        )
        self._where = _redact_url(self.base_url)

    def __repr__(self) -> str:
        return f"UpstreamClient({self._where!r})"

    def close(self) -> None:
        self._client.close()

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

    def _send(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        timeout: float | None = None,
        deadline: Deadline | None = None,
    ) -> httpx.Response:
        """One bounded exchange: the whole answer arrives within ``timeout`` (the client's by default) or
        the call fails as ``UpstreamUnavailable``, like any other timeout."""
        if deadline is None:
            deadline = Deadline(self.timeout if timeout is None else timeout)
        kwargs: dict[str, Any] = {}
        if json_body is not None:
            kwargs["json"] = json_body
        where = f"{self._where}{path}"
        try:
            request = self._client.build_request(method, path, **kwargs)
            response = read_within(self._client, request, deadline)
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
        where = f"{self._where}{response.request.url.path}"
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
                self._clean(f"{self._where}{response.request.url.path} reported an error: {detail}"),
                status=response.status_code,
            )
        return data

    def _submit_result(self, response: httpx.Response) -> SubmitResult:
        if not response.content.strip():
            raise self._protocol(response, "answered with an empty body")
        data = self._json(response)
        if not isinstance(data, dict) or "code" not in data:
            raise self._protocol(response, "answered with something that is not a SubmitResult")
        try:
            code = int(data["code"])
        except (TypeError, ValueError):
            raise self._protocol(response, f"answered with a non-numeric code {data['code']!r}") from None
        if response.status_code >= 400 and code in ACCEPTED_CODES:
            raise self._protocol(response, "answered an error status with an accepted code")
        result = data.get("result")
        properties = data.get("properties")
        return SubmitResult(
            code=code,
            description=str(data.get("description") or ""),
            result=None if result in (None, "") else str(result),
            properties=properties if isinstance(properties, dict) else {},
            http_status=response.status_code,
        )

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
