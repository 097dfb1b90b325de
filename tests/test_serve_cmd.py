"""`mjctl serve` as a real process: it answers, logs each request, and stops cleanly on SIGTERM and Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import httpx
import pytest

from tests.helpers import wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tmp_path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "MJCTL_DATABASE_URL": f"sqlite:///{tmp_path}/serve.db", "MJCTL_SERVER_SECRET": "t",
           "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "mjctl", "serve", *args], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_answers_and_stops_cleanly(tmp_path, sig):
    port = free_port()
    proc = start(tmp_path, "--port", str(port), "--threads", "4", "--no-poll")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: healthy(url) or proc.poll() is not None, timeout=15, message="server up")
        assert proc.poll() is None, proc.stderr.read()
        assert httpx.get(url + "/api/mj/self").status_code == 401
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert f"serving on http://127.0.0.1:{port}" in err
    assert "GET /healthz 200" in err and "GET /api/mj/self 401" in err
    assert "stopped" in err


def test_the_serving_line_comes_once_the_port_accepts(tmp_path):
    """Whoever waits for the "serving on" line can connect the moment it appears (workers bind late)."""
    port = free_port()
    proc = start(tmp_path, "--port", str(port), "--threads", "2", "--no-poll")
    try:
        for line in proc.stderr:
            if "serving on" in line:
                break
        else:
            pytest.fail(f"no serving line; exit {proc.wait()}")
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    finally:
        proc.terminate()
        proc.communicate(timeout=15)


def test_a_busy_port_is_one_sentence_and_exit_1(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        proc = start(tmp_path, "--port", str(s.getsockname()[1]), "--no-poll")
        out, err = proc.communicate(timeout=15)
    assert proc.returncode == 1
    assert err.startswith("Error: Cannot listen on 127.0.0.1:") and "Traceback" not in err
