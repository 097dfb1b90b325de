"""Structured logs: [log] format = "json" makes every line one JSON object with the request's id; every
answer carries X-Request-Id; text lines are timestamped; secrets never reach a line."""

from __future__ import annotations

import dataclasses
import json
import logging
import re

import httpx
import pytest


def app_client(settings):
    from mjctl.server import create_app

    def installer(app, ctx):
        @app.get("/_test/log", db=False, openapi=False)
        def noisy():
            logging.getLogger("mjctl.server").warning("inside the route \x1b[31m red")
            return {"success": True}

    return httpx.Client(transport=httpx.WSGITransport(app=create_app(settings, extra=[installer])),
                        base_url="http://mjctl")


def lines_of(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_json_lines_carry_the_callers_request_id(store, capsys):
    from mjctl.logs import configure_logging

    configure_logging("info", "json")
    with app_client(store) as client:
        response = client.get("/_test/log?x=1", headers={"X-Request-Id": "trace-42.a:b"})
    assert response.headers["x-request-id"] == "trace-42.a:b"
    entries = [json.loads(line) for line in lines_of(capsys)]
    assert len(entries) == 2
    for entry in entries:
        assert {"timestamp", "level", "logger", "message", "request_id"} <= set(entry)
        assert entry["request_id"] == "trace-42.a:b"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", entry["timestamp"])
    route, access = entries
    assert route["logger"] == "mjctl.server" and route["level"] == "WARNING"
    assert route["message"] == "inside the route \x1b[31m red"  # exact once parsed, escaped on the line
    assert access["logger"] == "mjctl.access" and access["status"] == 200 and access["method"] == "GET"
    assert access["path"] == "/_test/log?x=1" and access["duration_ms"] >= 0


@pytest.mark.parametrize("given", ["", "x" * 129, "a b", "<script>", "id\nforged: line", "a/b"])
def test_an_unfit_request_id_is_replaced_by_a_new_one(store, given):
    headers = {"X-Request-Id": given.encode("utf-8")} if given else {}
    with app_client(store) as client:
        first = client.get("/healthz", headers=headers)
        second = client.get("/healthz", headers=headers)
    rid = first.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid) and rid != second.headers["x-request-id"]


def test_errors_and_unknown_paths_carry_a_request_id_too(store):
    with app_client(store) as client:
        for response in (client.get("/nowhere"), client.get("/api/mj/self"), client.post("/healthz")):
            assert response.status_code in (401, 404, 405)
            assert response.headers["x-request-id"]


def test_text_lines_are_timestamped_and_tagged(store, capsys):
    from mjctl.logs import configure_logging

    configure_logging("info", "text")
    with app_client(store) as client:
        client.get("/_test/log", headers={"X-Request-Id": "abc"})
    route, access = lines_of(capsys)
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d WARNING mjctl.server \[abc\]: inside", route)
    assert "\x1b" not in route and "\\x1b[31m" in route
    assert " INFO mjctl.access [abc]: " in access and "GET /_test/log 200" in access


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_known_secrets_never_reach_a_line(store, capsys, fmt):
    from mjctl import upstream_text
    from mjctl.logs import configure_logging

    upstream_text.remember_secret("channel-secret-0042")
    configure_logging("info", fmt)
    log = logging.getLogger("mjctl.poller")
    log.error("upstream said: bad secret channel-secret-0042")
    try:
        raise ValueError("channel-secret-0042 in a traceback")
    except ValueError:
        log.exception("failed")
    text = capsys.readouterr().err
    assert "channel-secret-0042" not in text and "***" in text


def test_log_format_is_checked(tmp_path):
    from mjctl.config import load_settings
    from mjctl.errors import ConfigError

    assert load_settings(None, {("log", "format"): "json"}).log.format == "json"
    with pytest.raises(ConfigError, match=r"\[log\] format must be text or json"):
        load_settings(None, {("log", "format"): "xml"})


def test_the_bridges_own_refusals_carry_a_request_id_too(store):
    """A body over [server] max_body_bytes is refused before the app is reached; the answer has an id all
    the same."""
    import socket

    from mjctl.httpserver import ServerThread
    from mjctl.server import make_bridge

    store.server = dataclasses.replace(store.server, max_body_bytes=100)
    with ServerThread(make_bridge(store)) as server, socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /mj/submit/imagine HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    lines = head.split(b"\r\n\r\n")[0].decode("latin-1").lower().splitlines()
    assert lines[0].split()[1] == "413"
    assert any(re.fullmatch(r"x-request-id: [0-9a-f]{32}", line) for line in lines), lines
