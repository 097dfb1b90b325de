"""`mjctl serve --workers N`: N processes answer on one port, a killed worker is replaced, and SIGTERM or
Ctrl-C to the parent stops them all cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.helpers import free_port, temp_database, wait_until


def children_of(pid: int) -> set[int]:
    """The worker processes of pid (multiprocessing's resource tracker, also a child, is left out)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            try:
                if b"resource_tracker" in (entry / "cmdline").read_bytes():
                    continue
            except OSError:
                continue
            found.add(int(entry.name))
    return found


def answers(url: str, n: int = 20) -> bool:
    """n requests, each on a new connection, all answered."""
    try:
        return all(httpx.get(url + "/healthz", timeout=2).status_code == 200 for _ in range(n))
    except httpx.HTTPError:
        return False


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/workers.db"
        return
    with temp_database("postgres") as url:
        yield url


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_workers_share_the_port_survive_a_killed_worker_and_stop_together(tmp_path, db_url, sig):
    port = free_port()
    env = {**os.environ, "MJCTL_DATABASE_URL": db_url, "MJCTL_SERVER_SECRET": "t", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mjctl", "serve", "--workers", "2", "--port", str(port),
                             "--threads", "4", "--no-poll"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: len(children_of(proc.pid)) == 2 and answers(url, 1) or proc.poll() is not None,
                   timeout=20, message="two workers up")
        assert proc.poll() is None, proc.stderr.read()
        workers = sorted(children_of(proc.pid))
        os.kill(workers[0], signal.SIGKILL)
        wait_until(lambda: len(children_of(proc.pid) - {workers[0]}) == 2, timeout=10, message="a replacement")
        # The replacement is a process before its socket accepts (it connects to the database first): wait
        # for the server to answer every request again, rather than asking at the moment it was spawned.
        wait_until(lambda: answers(url), timeout=20, message="every request answered after the kill")
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert f"serving on {url} (2 workers x 4 threads, no poller)" in err
    assert "Unexpected exit from worker" in err, err
    assert err.rstrip().endswith("mjctl server stopped.")


def test_workers_report_a_busy_port_in_one_sentence(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        env = {**os.environ, "MJCTL_DATABASE_URL": f"sqlite:///{tmp_path}/w.db", "MJCTL_SERVER_SECRET": "t"}
        proc = subprocess.run([sys.executable, "-m", "mjctl", "serve", "--workers", "3", "--port",
                               str(s.getsockname()[1])], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=30)
    assert proc.returncode == 1
    assert proc.stderr.startswith("Error: Cannot listen on 127.0.0.1:") and "Traceback" not in proc.stderr
