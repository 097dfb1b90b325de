"""The HTTP server: free ports, clean stops, concurrency and chunk-by-chunk streaming."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import httpx
import pytest

from mjctl.httpserver import ServerThread

ROOT = Path(__file__).resolve().parents[1]




def hello_app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello " + environ["PATH_INFO"].encode()]


def test_start_binds_a_free_port_and_serves_until_stopped():
    server = ServerThread(hello_app).start()
    try:
        assert server.port and server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}"
        assert httpx.get(server.url + "/x").text == "hello /x"
    finally:
        server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/x", timeout=1)
    server.stop()  # a second stop is harmless


def test_context_manager_and_busy_port():
    with ServerThread(hello_app) as first:
        assert httpx.get(first.url).status_code == 200
        with pytest.raises(OSError):
            ServerThread(hello_app, port=first.port).start()


def test_requests_are_served_concurrently():
    barrier = threading.Barrier(2, timeout=5)

    def app(environ, start_response):
        barrier.wait()  # only returns when both requests are being handled at once
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    with ServerThread(app, threads=4) as server:
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(httpx.get(server.url).status_code))
                   for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert results == [200, 200]


def test_generator_bodies_stream_chunk_by_chunk():
    release = threading.Event()

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/octet-stream")])

        def body():
            yield b"first-chunk"
            release.wait(5)  # the client must see the first chunk before the second exists
            yield b"second-chunk"

        return body()

    with ServerThread(app) as server, httpx.Client() as client:
        with client.stream("GET", server.url) as response:
            chunks = response.iter_raw()
            first = next(chunks)
            assert first.startswith(b"first-chunk") and not release.is_set()
            release.set()
            rest = b"".join(chunks)
        assert (first + rest).endswith(b"second-chunk")


def test_a_stream_cut_short_by_the_bridge_closing_is_closed_and_not_reported(caplog):
    """Stopping the server while a body streams ends the stream quietly: its close() still runs (a cache
    file is finished there) and no error is logged for a pool that is gone."""
    produced, closed = threading.Event(), threading.Event()
    release = threading.Event()

    class Body:
        def __iter__(self):
            yield b"first-chunk"
            produced.set()
            release.wait(5)
            yield b"second-chunk"

        def close(self):
            closed.set()

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return Body()

    caplog.set_level("INFO", logger="mjctl")
    with ServerThread(app) as server, httpx.Client() as client:
        with client.stream("GET", server.url) as response:
            next(response.iter_raw())
            assert produced.wait(5)
            server.bridge.close()  # the pools end while the second chunk is being made
            release.set()
            assert closed.wait(5)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_serve_forever_stops_cleanly_on_sigterm_and_sigint():
    script = textwrap.dedent(
        """
        import sys
        from mjctl.httpserver import serve_forever
        def app(environ, start_response):
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok"]
        serve_forever(app, "127.0.0.1", 0, 4, on_ready=lambda url: print(url, flush=True))
        print("stopped", flush=True)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env)
        try:
            url = proc.stdout.readline().strip()
            assert httpx.get(url).text == "ok"
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err
        assert "stopped" in out
        assert "Traceback" not in err
