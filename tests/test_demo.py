"""`mjctl demo` as a newcomer runs it: a real subprocess, its printed token, tasks reaching SUCCESS."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.slow

START_TIMEOUT = 30
SUCCESS_TIMEOUT = 60


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Demo:
    def __init__(self, folder, port: int):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MJCTL_")}
        self.process = subprocess.Popen([sys.executable, "-m", "mjctl", "demo", "--dir", str(folder),
                                         "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.process.poll() is not None:
                    pytest.fail(f"mjctl demo exited with {self.process.returncode}: {self.process.stderr.read()}")
                continue
            self.seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match
        pytest.fail(f"mjctl demo never printed {pattern!r}; it printed {''.join(self.seen)!r}")

    def stop(self, sig=signal.SIGTERM) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        return code, self.process.stderr.read()


@pytest.fixture
def demo(tmp_path):
    running = Demo(tmp_path / "demo", free_port())
    yield running
    if running.process.poll() is None:
        running.process.kill()
        running.process.wait()


def test_demo_runs_tasks_to_success_and_stops_cleanly_on_sigterm(demo, tmp_path):
    url = demo.wait_for(r"Web page:\s+(http://\S+?)/?\s", START_TIMEOUT).group(1)
    user_token = demo.wait_for(r"User token:\s+(\S+)", 5).group(1)
    admin_token = demo.wait_for(r"Admin token:\s+(\S+)", 5).group(1)
    demo.wait_for(r"Ctrl-C to stop", 5)
    assert (tmp_path / "demo" / "mjctl.db").exists()

    with httpx.Client(base_url=url, timeout=10) as client:
        assert client.get("/").status_code == 200  # the page
        mine = {"Authorization": f"Bearer {user_token}"}
        first = client.get("/api/mj/self", headers=mine).json()["data"]
        assert first["total"] >= 5
        assert all(item["quota"] > 0 for item in first["items"])  # charged through the relay

        deadline = time.monotonic() + SUCCESS_TIMEOUT
        items = first["items"]
        while not any(item["status"] == "SUCCESS" for item in items):
            assert time.monotonic() < deadline, f"no task reached SUCCESS within {SUCCESS_TIMEOUT}s: {items}"
            time.sleep(1)
            items = client.get("/api/mj/self", headers=mine).json()["data"]["items"]
        done = next(item for item in items if item["status"] == "SUCCESS")
        assert done["progress"] == "100%" and done["image_url"]
        assert client.get(done["image_url"]).headers["content-type"] == "image/png"

        everything = client.get("/api/mj/", headers={"Authorization": f"Bearer {admin_token}"}).json()["data"]
        assert everything["total"] == first["total"]

        # The printed hint works from any other folder: the demo's store, secret and links, nothing new there.
        hint = next(re.search(r"MJCTL_CONFIG=(\S+) mjctl tasks list", line) for line in demo.seen
                    if "MJCTL_CONFIG=" in line)
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        listed = run_mjctl(elsewhere, hint.group(1), "tasks", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        links = [i["image_url"] for i in json.loads(listed.stdout)["items"] if i["status"] == "SUCCESS"]
        assert links and client.get(links[0]).status_code == 200
        probe = run_mjctl(elsewhere, hint.group(1), "channels", "test", "demo-simulator")
        assert probe.returncode == 0 and "secret accepted" in probe.stdout, probe.stderr
        assert list(elsewhere.iterdir()) == []

    code, stderr = demo.stop(signal.SIGTERM)
    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert "mjctl demo stopped." in stderr


def test_demo_stops_cleanly_on_ctrl_c(demo):
    demo.wait_for(r"Ctrl-C to stop", START_TIMEOUT)
    code, stderr = demo.stop(signal.SIGINT)
    assert code == 0, stderr
    assert "Traceback" not in stderr


def run_mjctl(cwd, config: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MJCTL_")} | {"MJCTL_CONFIG": config}
    return subprocess.run([sys.executable, "-m", "mjctl", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60)


def test_a_busy_port_is_one_sentence_and_a_failed_start_leaves_no_folder(tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MJCTL_")} | {"TMPDIR": str(temp)}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        result = subprocess.run([sys.executable, "-m", "mjctl", "demo", "--port", port], capture_output=True,
                                text=True, timeout=60, env=env)
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1 and "in use" in result.stderr and "--port" in result.stderr
        assert "Traceback" not in result.stderr
        assert list(temp.iterdir()) == []
        # a start that fails after its folder was made (the simulator's port is taken) takes the folder away
        result = subprocess.run([sys.executable, "-m", "mjctl", "demo", "--dir", str(tmp_path / "new"), "--port", "0",
                                 "--sim-port", port], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 1 and "--sim-port" in result.stderr, result.stderr
    assert not (tmp_path / "new").exists()


def test_demo_refuses_a_folder_that_already_holds_one(tmp_path):
    (tmp_path / "mjctl.db").write_bytes(b"")
    result = subprocess.run([sys.executable, "-m", "mjctl", "demo", "--dir", str(tmp_path), "--port", "0"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "already holds a demo database" in result.stderr and "Traceback" not in result.stderr
