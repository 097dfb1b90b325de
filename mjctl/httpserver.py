"""The HTTP server under every mjctl app: granian's Rust event loop owns the connections, Python threads
only ever see complete requests.

Why this shape: a thread-per-connection server (cheroot, waitress) lets sixteen idle sockets, or a client
that sends a header line every few seconds, hold every thread it has. Here the connections live in
granian (tokio and hyper, HTTP/1.1 and HTTP/2), which enforces the header-size limit (431) and the
header-read timeout, closes idle keep-alive connections after that timeout, and caps the open connections
per process (more wait in the kernel's listen queue). The WSGI app is reached through :class:`WSGIBridge`,
an ASGI application (granian's ASGI writes wait for the client, its RSGI ones do not) that:

- answers a declared body over ``max_body_bytes`` with 413 before reading any of it, reads the rest
  (chunked bodies included) on the event loop with a deadline (408 when the client stalls, never a
  thread held), and hands the app a complete, bounded ``wsgi.input``;
- runs the app in one of three thread pools: upstream-bound routes (submissions, image-seed, cancel:
  see :data:`UPSTREAM_BOUND`) in one, bounded by ``max_in_flight``; image and video answers
  (:data:`MEDIA_ROUTES`) in another, bounded by ``max_media_streams``; each answered 429 when full, so
  clients holding downloads open cannot refuse anyone a submission; everything else (listings,
  ``/healthz``, the page) in the third, so a hanging upstream cannot starve the API;
- streams iterable bodies chunk by chunk (each ``next()`` on a pool thread, each write awaited on the
  loop until the client has taken it), so an image of any size passes with flat memory, a slow reader
  holds no thread, and one that stops reading is dropped after ``send_timeout``.

:class:`ServerThread` runs an app in this process (tests, the simulator, the demo); :func:`serve_processes`
runs ``mjctl serve``'s worker processes under granian's supervisor.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

__all__ = ["Limits", "WSGIBridge", "ServerThread", "serve_forever", "serve_processes", "probe_port",
           "UPSTREAM_BOUND", "MEDIA_ROUTES"]

log = logging.getLogger("mjctl.httpserver")

#: Routes whose work waits on an upstream: relay submissions (every speed prefix), image-seed, cancel and
#: face swap. They run in the bounded upstream pool.
UPSTREAM_BOUND = re.compile(r"^/mj(?:-[a-z]+)?/(?:submit/|insight-face/|task/[^/]+/(?:image-seed|cancel)$)")
#: The forwarded images and videos: streamed from the result store or an upstream for as long as the client
#: takes to read them, in a bounded pool of their own.
MEDIA_ROUTES = re.compile(r"^/mj/(?:image|video)/")

WSGIApp = Callable[..., Iterable[bytes]]
Answer = tuple[int, list[tuple[str, str]], bytes]


@dataclass(frozen=True)
class Limits:
    """What one server process allows a client. The defaults are mjctl.toml's."""

    threads: int = 16  # API threads
    max_in_flight: int = 64  # upstream-bound requests at once (their own threads)
    max_media_streams: int = 64  # image and video answers at once (their own threads)
    max_connections: int = 4096
    header_timeout: float = 10.0
    body_timeout: float = 10.0
    max_header_bytes: int = 16384
    max_body_bytes: int = 32 * 1024 * 1024
    send_timeout: float = 30.0  # a streamed answer's client must take each chunk within this

    @classmethod
    def from_settings(cls, settings) -> Limits:
        server, relay = settings.server, settings.relay
        return cls(threads=server.threads, max_in_flight=relay.max_in_flight,
                   max_media_streams=settings.images.max_streams,
                   max_connections=server.max_connections, header_timeout=server.header_timeout,
                   body_timeout=server.body_timeout, max_header_bytes=server.max_header_bytes,
                   max_body_bytes=server.max_body_bytes, send_timeout=3 * server.body_timeout)


def _json_answer(status: int, message: str, *, close: bool = False) -> Answer:
    import orjson

    headers = [("content-type", "application/json")]
    if close:
        headers.append(("connection", "close"))
    return status, headers, orjson.dumps({"success": False, "message": message})


def default_overloaded(path: str) -> Answer:
    """The 429 answered when the upstream-bound pool is full (mjctl.server replaces it per route family)."""
    answer = _json_answer(429, "Too many requests are waiting on upstreams; try again shortly.")
    answer[1].append(("retry-after", "1"))
    return answer


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


class _BadBody(Exception):
    pass


class _Family:
    """Routes with a thread pool of their own and a cap on the requests in flight (refused beyond it)."""

    def __init__(self, routes: re.Pattern[str], limit: int, name: str):
        self.routes = routes
        self.limit = max(1, limit)
        self.name = name
        self.in_flight = 0  # only touched on the event loop
        self.pool: ThreadPoolExecutor | None = None

    def executor(self) -> ThreadPoolExecutor:
        if self.pool is None:
            self.pool = ThreadPoolExecutor(self.limit, thread_name_prefix=f"mjctl-{self.name}")
        return self.pool


class WSGIBridge:
    """An ASGI application serving a WSGI app from thread pools, with the request limits of ``limits``.

    ``upstream_routes`` and ``media_routes`` each run in a pool of their own, capped at ``max_in_flight``
    and ``max_media_streams`` requests; ``overloaded(path)`` builds the answer for one refused because its
    pool is full (the relay's callers expect their own envelope). Without them every request runs in the
    API pool (the simulator, test apps).
    """

    def __init__(self, app: WSGIApp, limits: Limits = Limits(), *,
                 overloaded: Callable[[str], Answer] = default_overloaded,
                 upstream_routes: re.Pattern[str] | None = None, media_routes: re.Pattern[str] | None = None,
                 multiprocess: bool = False):
        self.app = app
        self.limits = limits
        self.overloaded = overloaded
        self.multiprocess = multiprocess
        self._api_pool: ThreadPoolExecutor | None = None
        self._upstream = (_Family(upstream_routes, limits.max_in_flight, "upstream")
                          if upstream_routes is not None else None)
        self._media = _Family(media_routes, limits.max_media_streams, "media") if media_routes is not None else None
        self._families = tuple(f for f in (self._upstream, self._media) if f is not None)
        self.closed = False

    @property
    def upstream_in_flight(self) -> int:
        """Upstream-bound requests being served (submissions and the like)."""
        return self._upstream.in_flight if self._upstream is not None else 0

    @property
    def media_in_flight(self) -> int:
        """Image and video answers being served, streaming included."""
        return self._media.in_flight if self._media is not None else 0

    def close(self) -> None:
        self.closed = True  # streams cut short by the pools' end are the server stopping, not failures
        pools = [self._api_pool] + [family.pool for family in self._families]
        for pool in pools:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._api_pool = None
        for family in self._families:
            family.pool = None

    def _api(self) -> ThreadPoolExecutor:
        if self._api_pool is None:
            self._api_pool = ThreadPoolExecutor(max(1, self.limits.threads), thread_name_prefix="mjctl-api")
        return self._api_pool

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # no lifespan (ASGINL) and websockets are off: nothing else arrives
            return
        try:
            await self._handle(scope, receive, send)
        except asyncio.CancelledError:
            pass  # the server is stopping: nothing left to answer, and nothing to report
        except Exception:  # the loop must survive anything one request does
            log.exception("unhandled error serving %s %s", scope.get("method"), str(scope.get("path"))[:200])

    # -- one request -------------------------------------------------------------------------------

    async def _handle(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        limits = self.limits
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        length_text: bytes | None = None
        chunked = False
        for name, value in headers:
            if name == b"content-length":
                length_text = value
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
        length = 0
        if length_text is not None:
            try:
                length = int(length_text)
                if length < 0:
                    raise ValueError
            except ValueError:
                return await _send_answer(send, _json_answer(400, "Content-Length is not a number.", close=True))
        if length > limits.max_body_bytes:
            return await _send_answer(send, _json_answer(
                413, f"The request body is larger than {limits.max_body_bytes} bytes.", close=True))
        body = b""
        if length or chunked:
            try:
                body = await asyncio.wait_for(self._read_body(receive), limits.body_timeout)
            except TimeoutError:
                return await _send_answer(send, _json_answer(
                    408, f"The request body did not arrive within {limits.body_timeout:g} seconds.", close=True))
            except _BodyTooLarge:
                return await _send_answer(send, _json_answer(
                    413, f"The request body is larger than {limits.max_body_bytes} bytes.", close=True))
            except (_BadBody, _ClientGone):
                # granian reports a body it cannot frame (a bad chunk size) as a disconnect; a client that
                # really left will not read this, and the write fails harmlessly
                return await _send_answer(send, _json_answer(
                    400, "The request body is malformed or was cut off.", close=True))
            if length_text is not None and len(body) != length:
                return await _send_answer(send, _json_answer(
                    400, "The request body is shorter than its Content-Length.", close=True))
        path: str = scope["path"]
        family = next((f for f in self._families if f.routes.match(path) is not None), None)
        if family is not None:
            if family.in_flight >= family.limit:
                return await _send_answer(send, self.overloaded(path))
            family.in_flight += 1
        try:
            await self._respond(send, family.executor() if family is not None else self._api(),
                                self._environ(scope, headers, body, length_text is not None or chunked))
        finally:
            if family is not None:
                family.in_flight -= 1

    async def _read_body(self, receive: Any) -> bytes:
        limit = self.limits.max_body_bytes
        parts: list[bytes] = []
        size = 0
        while True:
            try:
                message = await receive()
            except Exception as exc:  # the server could not frame the body (a bad chunk size)
                raise _BadBody from exc
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _BodyTooLarge
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    def _environ(self, scope: dict[str, Any], headers: list[tuple[bytes, bytes]], body: bytes,
                 declared: bool) -> dict[str, Any]:
        server = scope.get("server") or ("localhost", 80)
        client = scope.get("client") or ("", 0)
        environ: dict[str, Any] = {
            "REQUEST_METHOD": scope["method"],
            "SCRIPT_NAME": "",
            # WSGI's native strings: the decoded path's bytes read as latin-1
            "PATH_INFO": scope["path"].encode("utf-8", "surrogateescape").decode("latin-1"),
            "QUERY_STRING": scope["query_string"].decode("latin-1"),
            "SERVER_NAME": str(server[0]),
            "SERVER_PORT": str(server[1]),
            "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
            "REMOTE_ADDR": str(client[0]),
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": scope.get("scheme", "http"),
            "wsgi.input": io.BytesIO(body),
            "wsgi.input_terminated": True,
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": self.multiprocess,
            "wsgi.run_once": False,
        }
        for raw_name, raw_value in headers:
            if raw_name == b"content-length" or raw_name == b"transfer-encoding":
                continue  # the body was read here: the app sees its exact length below
            name = raw_name.decode("latin-1")
            value = raw_value.decode("latin-1")
            key = "CONTENT_TYPE" if name == "content-type" else "HTTP_" + name.upper().replace("-", "_")
            environ[key] = f"{environ[key]},{value}" if key in environ else value
        if declared:
            environ["CONTENT_LENGTH"] = str(len(body))
        return environ

    async def _respond(self, send: Any, pool: ThreadPoolExecutor, environ: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        status, headers, first, rest = await loop.run_in_executor(pool, self._call_app, environ)
        start = {"type": "http.response.start", "status": status,
                 "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]}
        if rest is None:
            await send(start)
            await send({"type": "http.response.body", "body": first, "more_body": False})
            return
        result, iterator = rest
        timeout = self.limits.send_timeout
        try:
            # Each write waits for the client to take the previous ones (granian's ASGI applies
            # backpressure), so a reader that stalls costs a coroutine and a chunk, never a whole image;
            # one that stalls past send_timeout is dropped.
            await asyncio.wait_for(send(start), timeout)
            chunk: bytes | None = first
            while chunk is not None:
                if chunk:
                    await asyncio.wait_for(send({"type": "http.response.body", "body": chunk, "more_body": True}),
                                           timeout)
                chunk = await loop.run_in_executor(pool, _next_chunk, iterator)
            await asyncio.wait_for(send({"type": "http.response.body", "body": b"", "more_body": False}), timeout)
        except TimeoutError:
            log.warning("dropped a client that read nothing of %s for %g s", environ.get("PATH_INFO", "")[:200],
                        timeout)
        except Exception as exc:  # noqa: BLE001 - a client gone mid-stream, or the app failing mid-body
            if not (_is_disconnect(exc) or self.closed):
                log.error("streaming %s failed: %s", environ.get("PATH_INFO", "")[:200], exc)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                try:
                    await loop.run_in_executor(pool, _quietly, close)
                except RuntimeError:  # the pool is shut down: the server is stopping, close it here
                    _quietly(close)

    def _call_app(self, environ: dict[str, Any]) -> tuple[int, list[tuple[str, str]], bytes, Any]:
        """Run the app on a pool thread: (status, headers, the whole body or the first chunk, the rest)."""
        started: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None):
            if exc_info is not None and started:
                raise exc_info[1].with_traceback(exc_info[2])
            started[:] = [status, headers]
            return _no_write

        try:
            result = self.app(environ, start_response)
            if isinstance(result, (list, tuple)):
                body = b"".join(result)
                close = getattr(result, "close", None)
                if close is not None:
                    close()
                status, headers = started
                return int(status.split(" ", 1)[0]), list(headers), body, None
            iterator = iter(result)
            first = _next_chunk(iterator)  # a generator may call start_response on its first step
            status, headers = started
            if first is None:
                _quietly(getattr(result, "close", lambda: None))
                return int(status.split(" ", 1)[0]), list(headers), b"", None
            return int(status.split(" ", 1)[0]), list(headers), first, (result, iterator)
        except Exception:  # the app's own error handling failed; answer JSON anyway
            log.exception("unhandled error in %s %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"))
            return _json_answer(500, "Internal server error.") + (None,)


async def _send_answer(send: Any, answer: Answer) -> None:
    """An answer of the bridge's own (a refusal before the app is reached), with a fresh X-Request-Id like
    every answer of the app."""
    import uuid

    status, headers, body = answer
    await send({"type": "http.response.start", "status": status,
                "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
                + [(b"x-request-id", uuid.uuid4().hex.encode("ascii"))]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _no_write(data: bytes) -> None:
    raise RuntimeError("the WSGI write() callable is not supported; return an iterable")


def _next_chunk(iterator: Iterator[bytes]) -> bytes | None:
    try:
        return bytes(next(iterator))
    except StopIteration:
        return None


def _quietly(close: Callable[[], Any]) -> None:
    try:
        close()
    except Exception as exc:  # noqa: BLE001 - closing a finished body must not fail the request
        log.warning("closing a response body failed: %s", exc)


def _is_disconnect(exc: BaseException) -> bool:
    return isinstance(exc, ConnectionError) or "closed" in str(exc).lower() or "disconnect" in str(exc).lower()


# -- listening -------------------------------------------------------------------------------------


def probe_port(host: str, port: int) -> int:
    """Check that host:port is free and return it (a free one for port 0), or raise OSError.

    granian binds with SO_REUSEPORT (each worker process its own socket), which would let a second server
    silently share a port already in use; this plain bind refuses that, as a busy port should be refused.
    """
    infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    family, socktype, proto, _name, addr = infos[0]
    with socket.socket(family, socktype, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(1)
        return sock.getsockname()[1]


def wait_accepting(host: str, port: int, *, timeout: float, keep_waiting: Callable[[], bool] = lambda: True,
                   pause: Callable[[float], object] = time.sleep) -> bool:
    """Whether a server bound to host:port accepts a connection within timeout; gives up early (False) once
    keep_waiting() is false. pause sleeps between tries (an Event's wait ends the waiting with its event)."""
    deadline = time.monotonic() + timeout
    while keep_waiting() and time.monotonic() < deadline:
        try:
            with socket.create_connection((connect_host(host), port), timeout=min(1.0, timeout)):
                return True
        except OSError:
            pause(0.02)
    return False


def connect_host(host: str) -> str:
    """The address a local client uses to reach a server bound to ``host``."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)


def url_for(host: str, port: int) -> str:
    shown = connect_host(host)
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"


def _granian_options(limits: Limits) -> dict[str, Any]:
    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP1Settings
    from granian.log import LogLevels

    return dict(
        interface=Interfaces.ASGINL,  # ASGI without lifespan: its writes wait for slow readers
        http=HTTPModes.http1,
        websockets=False,
        backlog=1024,
        backpressure=limits.max_connections,
        http1_settings=HTTP1Settings(header_read_timeout=int(limits.header_timeout * 1000),
                                     keep_alive=True, max_buffer_size=max(8192, limits.max_header_bytes)),
        # granian's own log: errors only (a worker that died, a failed bind), on stderr like mjctl's own
        # lines (stdout is for data); mjctl's access log covers the requests
        log_enabled=True,
        log_level=LogLevels.error,
        log_dictconfig=_GRANIAN_LOG,
    )


_GRANIAN_LOG = {
    "formatters": {
        "generic": {"()": "logging.Formatter", "fmt": "%(asctime)s %(levelname)s granian: %(message)s"},
        "access": {"()": "logging.Formatter", "fmt": "%(message)s"},
    },
    "handlers": {
        "console": {"formatter": "generic", "class": "logging.StreamHandler", "stream": "ext://sys.stderr"},
        "access": {"formatter": "access", "class": "logging.StreamHandler", "stream": "ext://sys.stderr"},
    },
}


# -- in this process -------------------------------------------------------------------------------


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed (a quarter more requests per second through the bridge, measured on a
    bare endpoint), asyncio's own loop otherwise. granian's worker processes make the same choice."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()



class ServerThread:
    """Serve ``app`` from a background thread (granian embedded, on its own event loop); ``start()``
    returns once connections are accepted. Accepts a WSGI app or a ready :class:`WSGIBridge`."""

    def __init__(self, app: WSGIApp | WSGIBridge, host: str = "127.0.0.1", port: int = 0, threads: int = 16,
                 limits: Limits | None = None):
        if isinstance(app, WSGIBridge):
            self.bridge = app
        else:
            self.bridge = WSGIBridge(app, limits or Limits(threads=threads))
        self.host = host
        self._requested_port = port
        self.port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Any = None
        self._failure: list[BaseException] = []

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("server is not started")
        return url_for(self.host, self.port)

    def start(self) -> ServerThread:
        if self._thread is not None:
            raise RuntimeError("server already started")
        self.port = probe_port(self.host, self._requested_port)
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="http-server", daemon=True)
        self._thread.start()
        ready.wait(30)
        try:
            self._wait_accepting()
        except OSError:
            self.stop()
            if self._failure:
                raise self._failure[0] from None
            raise
        return self

    def _run(self, ready: threading.Event) -> None:
        from granian.server.embed import Server

        loop = _new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            self._server = Server(self.bridge, address=self.host, port=self.port or 0,
                                  **_granian_options(self.bridge.limits))
            ready.set()
            loop.run_until_complete(self._server.serve())
        except BaseException as exc:  # noqa: BLE001 - handed to start()
            self._failure.append(exc)
        finally:
            ready.set()
            self.bridge.close()
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    def _wait_accepting(self, timeout: float = 10.0) -> None:
        def alive() -> bool:
            return self._thread is not None and self._thread.is_alive()

        if self.port is None or not wait_accepting(self.host, self.port, timeout=timeout, keep_waiting=alive):
            raise OSError(f"the server on port {self.port} did not start")

    def stop(self) -> None:
        thread, loop, server = self._thread, self._loop, self._server
        if thread is None:
            return
        if loop is not None and server is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(server.stop)
            except RuntimeError:
                pass  # the loop ended on its own
        thread.join(timeout=15)
        self._thread = self._loop = self._server = None

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve_forever(app: WSGIApp | WSGIBridge, host: str, port: int, threads: int = 16,
                  on_ready: Callable[[str], None] | None = None, limits: Limits | None = None) -> None:
    """Serve ``app`` in this process until SIGTERM or SIGINT, then stop cleanly (no traceback).

    Must be called from the main thread (signal handlers can only be installed there).
    """
    import signal

    stop_event = threading.Event()

    def _handle(signum: int, frame: object) -> None:
        stop_event.set()

    previous = {sig: signal.signal(sig, _handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    server = ServerThread(app, host=host, port=port, threads=threads, limits=limits)
    try:
        server.start()
        if on_ready is not None:
            on_ready(server.url)
        while not stop_event.wait(0.5):
            pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -- worker processes ------------------------------------------------------------------------------


def serve_processes(target: Any, load: Callable[[Any], WSGIBridge], *, host: str, port: int, workers: int,
                    limits: Limits, grace_seconds: float = 40.0) -> None:
    """Run ``workers`` processes under granian's supervisor until SIGTERM or SIGINT.

    Each worker is a fresh interpreter (the spawn start method: nothing of this process, no database
    connection and no thread, crosses into it) that calls ``load(target)`` for its bridge; both must be
    picklable. A worker that dies is replaced. Returns after every worker has stopped.
    """
    import multiprocessing

    from granian.server import Server

    multiprocessing.set_start_method("spawn", force=True)
    server = Server("mjctl", address=host, port=port, workers=workers, respawn_failed_workers=True,
                    workers_kill_timeout=int(grace_seconds), **_granian_options(limits))
    server.target = target  # handed to load() in each worker
    try:
        server.serve(target_loader=load)
    except SystemExit as exc:  # granian exits 1 when workers kept crashing
        if exc.code:
            from mjctl.errors import MjctlError

            raise MjctlError("The server workers kept failing; see the log above.") from None
