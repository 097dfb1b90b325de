"""Hostile clients through real sockets: idle and header-dripping connections, huge headers, stalled, oversized
and chunked bodies, and more upstream-bound work than the caps allow.

Each test checks the answer (status, envelope, how fast) and that the store did not change: no task, no
charge, no ledger row, no reservation beyond what an accepted request explains. The server runs with small
limits (header and body timeouts of 1 s, a 64 KiB body limit, 4 API threads, 4 upstream slots and 2 per
user, 4 image and video answers and 4 per owner) so the cases stay fast; one test runs a real `mjctl serve`
process the same way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import orjson
import pytest

from tests.books import assert_books, balance, ledger_total
from tests.helpers import free_port, make_settings, wait_until
from tests.relay_helpers import start_relay

USERS = ("alice", "bob", "carol")
HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
MAX_BODY = 64 * 1024
LIMITS = dict(server__header_timeout=HEADER_TIMEOUT, server__body_timeout=BODY_TIMEOUT,
              server__max_body_bytes=MAX_BODY, server__threads=4,
              relay__max_in_flight=4, relay__max_in_flight_per_user=2,
              images__max_streams=4, images__max_streams_per_user=4)
PROMPT = {"prompt": "a red fox in the snow"}


# -- the server and the store ---------------------------------------------------------------------------------


@contextlib.contextmanager
def relay_env(tmp_path, new_store, **limits):
    """A relay server and its simulator with LIMITS (changed by limits), and the users, for one test."""
    settings = new_store(make_settings(tmp_path, **{**LIMITS, **limits}))
    relay = start_relay(settings, users=tuple((name, 10_000) for name in USERS), threads=32)
    host, port = relay.url.removeprefix("http://").rsplit(":", 1)
    try:
        yield SimpleNamespace(relay=relay, url=relay.url, addr=(host, int(port)), tokens=relay.tokens,
                              bridge=relay.server.bridge, sim=relay.sim.sim)
    finally:
        relay.server.stop()
        relay.sim.stop()


@pytest.fixture
def env(tmp_path, new_store):
    with relay_env(tmp_path, new_store) as made:
        yield made


def store_state() -> tuple:
    """Everything a request could change: the tasks, the reservations, and every user's books."""
    from mjctl.models import Ledger, Reservation, Task, User

    tasks = [(t.mj_id, t.user_id, t.status, t.quota) for t in Task.select().order_by(Task.id)]
    users = [(u.name, u.quota, u.used_quota) for u in User.select().order_by(User.id)]
    ledger = [(r.user_id, r.kind, r.amount) for r in Ledger.select().order_by(Ledger.id)]
    return tasks, users, ledger, Reservation.select().count()


def timed_get(url: str, path: str, token: str | None = None) -> tuple[httpx.Response, float]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    began = time.monotonic()
    response = httpx.get(url + path, headers=headers, timeout=10)
    return response, time.monotonic() - began


def assert_api_answers_fast(env, limit: float = 1.0) -> None:
    """/healthz and an authenticated listing answer 200 within `limit` seconds, each on a new connection."""
    health, took = timed_get(env.url, "/healthz")
    assert health.status_code == 200 and took < limit, (health.status_code, took)
    mine, took = timed_get(env.url, "/api/mj/self", env.tokens["alice"])
    assert mine.status_code == 200 and took < limit, (mine.status_code, took)
    assert mine.json()["success"] is True


# -- raw sockets ---------------------------------------------------------------------------------------------


class Answer(SimpleNamespace):
    status: int
    headers: dict
    body: bytes
    seconds: float

    def json(self):
        return orjson.loads(self.body)


def read_answer(sock: socket.socket, began: float, timeout: float = 10.0) -> Answer:
    """Read one HTTP/1.1 answer (head, then Content-Length bytes or until the server closes)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            part = sock.recv(65536)
        except ConnectionResetError:
            part = b""
        if not part:
            raise AssertionError(f"the connection closed without an answer after {data[:200]!r}")
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "-1"))
    while length < 0 or len(body) < length:
        try:
            part = sock.recv(65536)
        except ConnectionResetError:
            part = b""
        if not part:
            break
        body += part
    return Answer(status=int(lines[0].split()[1]), headers=headers, body=body[:length] if length >= 0 else body,
                  seconds=time.monotonic() - began)


def exchange(addr, data: bytes, *, timeout: float = 10.0) -> Answer:
    """Send `data` (from another thread: the server may answer, and close, long before a huge request is all
    sent) and read the answer."""
    sock = socket.create_connection(addr)
    began = time.monotonic()

    def send() -> None:
        try:
            sock.sendall(data)
        except OSError:
            pass  # the server answered and closed early: that is the point

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        return read_answer(sock, began, timeout)
    finally:
        sock.close()
        sender.join(timeout=5)


def closed_by_server(sock: socket.socket) -> bool:
    """True once the peer closed (EOF or reset); reads and drops anything sent before closing."""
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return False
        except (ConnectionResetError, BrokenPipeError):
            return True
        if not data:
            return True


def open_idle(addr, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        sock = socket.create_connection(addr)
        sock.setblocking(False)
        socks.append(sock)
    return socks


class Dripper:
    """Connections that start a request and then send one header line every `every` seconds, forever; notes
    when the server cuts each one off."""

    def __init__(self, addr, n: int, every: float = 0.3):
        self.every = every
        self.socks = [socket.create_connection(addr) for _ in range(n)]
        self.opened = time.monotonic()
        self.cut: dict[int, float] = {}
        self.lines_sent = 0
        self._stop = threading.Event()
        for sock in self.socks:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: drip\r\n")
            sock.setblocking(False)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self.every):
            n += 1
            for i, sock in enumerate(self.socks):
                if i in self.cut:
                    continue
                if closed_by_server(sock):
                    self.cut[i] = time.monotonic() - self.opened
                    continue
                try:
                    sock.send(f"X-Drip-{n}: {'d' * 20}\r\n".encode())
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    self.cut[i] = time.monotonic() - self.opened
            self.lines_sent = n

    def all_cut(self) -> bool:
        return len(self.cut) == len(self.socks)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for sock in self.socks:
            sock.close()


def request(method: str, path: str, token: str | None = None, headers: dict | None = None,
            body: bytes = b"", extra: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: mjctl", "Connection: close"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n").encode() + extra + b"\r\n" + body


def chunked(*parts: bytes) -> bytes:
    return b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in parts) + b"0\r\n\r\n"


# -- idle and slow connections ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_300_idle_connections_neither_block_the_api_nor_stay_open(env):
    before = store_state()
    idle = open_idle(env.addr, 300)
    try:
        opened = time.monotonic()
        assert_api_answers_fast(env)
        assert not any(closed_by_server(s) for s in idle), "closed before header_timeout"
        wait_until(lambda: all(closed_by_server(s) for s in idle), timeout=HEADER_TIMEOUT + 4,
                   message="the server closes every idle connection after header_timeout")
        assert time.monotonic() - opened >= HEADER_TIMEOUT * 0.8
        assert_api_answers_fast(env)
    finally:
        for sock in idle:
            sock.close()
    assert store_state() == before


@pytest.mark.slow
def test_50_header_dripping_connections_are_cut_off_and_block_nothing(env):
    before = store_state()
    drip = Dripper(env.addr, 50, every=0.3)
    try:
        assert_api_answers_fast(env)
        wait_until(drip.all_cut, timeout=HEADER_TIMEOUT + 4,
                   message="every dripping connection is cut off after header_timeout")
        # cut off for being slow, not for anything they sent: a line every 0.3 s would have gone on forever
        assert min(drip.cut.values()) >= HEADER_TIMEOUT * 0.8, sorted(drip.cut.values())[:5]
        assert max(drip.cut.values()) < HEADER_TIMEOUT + 2, sorted(drip.cut.values())[-5:]
        assert drip.lines_sent >= 3
        assert_api_answers_fast(env)
    finally:
        drip.close()
    assert store_state() == before


def test_a_keep_alive_connection_idle_after_an_answer_is_closed(env):
    sock = socket.create_connection(env.addr)
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: mjctl\r\n\r\n")
        assert read_answer(sock, time.monotonic()).status == 200
        sock.setblocking(False)
        wait_until(lambda: closed_by_server(sock), timeout=HEADER_TIMEOUT + 4, message="idle keep-alive closed")
    finally:
        sock.close()


# -- oversized heads ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,header", [
    ("100 KB header", b"X-Padding: " + b"p" * 100_000 + b"\r\n"),
    ("10 MB Authorization", b"Authorization: Bearer " + b"t" * 10_000_000 + b"\r\n"),
    ("2,000 small headers", b"".join(b"X-H%d: v\r\n" % i for i in range(2000))),
])
def test_huge_heads_are_refused_at_once(env, name, header):
    before = store_state()
    for path in ("/healthz", "/api/mj/self", "/mj/submit/imagine"):
        answer = exchange(env.addr, request("POST", path, headers={"Content-Length": "2"}, extra=header, body=b"{}"))
        assert answer.status in (431, 400), (name, path, answer)
        assert answer.seconds < 1.0, (name, path, answer.seconds)
    assert_api_answers_fast(env)
    assert store_state() == before


def test_a_head_just_under_the_limit_is_served(env):
    from mjctl.config import SCHEMA

    limit = SCHEMA["server"]["max_header_bytes"][0]
    answer = exchange(env.addr, request("GET", "/api/mj/self", env.tokens["alice"],
                                        extra=b"X-Padding: " + b"p" * (limit - 1024) + b"\r\n"))
    assert answer.status == 200, answer


# -- bodies ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/mj/submit/imagine", "/mj/task/list-by-condition", "/api/mj/self"])
def test_a_body_shorter_than_its_content_length_is_408_and_holds_no_thread(env, path):
    """More stalled bodies than API threads (4) and upstream slots (4): each is answered 408 JSON after
    body_timeout, and /healthz and listings answer meanwhile."""
    before = store_state()
    token = env.tokens["alice"]
    stalled = []
    for _ in range(6):
        sock = socket.create_connection(env.addr)
        sock.sendall(request("POST", path, token, headers={"Content-Type": "application/json",
                                                            "Content-Length": "1000"}, body=b'{"prompt": "a'))
        stalled.append((sock, time.monotonic()))
    try:
        assert_api_answers_fast(env, limit=BODY_TIMEOUT * 0.8)  # before any stalled body is given up
        for sock, began in stalled:
            answer = read_answer(sock, began)
            assert answer.status == 408, answer
            assert answer.headers["content-type"] == "application/json"
            body = answer.json()
            assert body["success"] is False and "did not arrive" in body["message"], body
            assert BODY_TIMEOUT * 0.8 <= answer.seconds < BODY_TIMEOUT + 1.5, answer.seconds
            assert answer.headers.get("connection") == "close"
    finally:
        for sock, _ in stalled:
            sock.close()
    assert env.bridge.upstream_in_flight == 0
    assert_api_answers_fast(env)
    assert store_state() == before
    assert env.sim.stats()["imagine"] == 0


def test_a_body_dripped_a_byte_at_a_time_is_408_at_body_timeout(env):
    """body_timeout bounds the whole body, not the gap between two bytes."""
    before = store_state()
    sock = socket.create_connection(env.addr)
    began = time.monotonic()
    stop = threading.Event()

    def drip() -> None:
        while not stop.wait(0.2):
            try:
                sock.send(b" ")
            except OSError:
                return

    sock.sendall(request("POST", "/mj/submit/imagine", env.tokens["alice"], headers={"Content-Length": "100"},
                         body=b'{"prompt": "a"}'))
    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        answer = read_answer(sock, began)
    finally:
        stop.set()
        dripper.join(timeout=5)
        sock.close()
    assert answer.status == 408 and answer.json()["success"] is False, answer
    assert BODY_TIMEOUT * 0.8 <= answer.seconds < BODY_TIMEOUT + 1.5, answer.seconds
    assert store_state() == before


def test_a_chunked_body_that_never_ends_is_408(env):
    before = store_state()
    sock = socket.create_connection(env.addr)
    began = time.monotonic()
    try:
        sock.sendall(request("POST", "/mj/submit/imagine", env.tokens["alice"],
                             headers={"Transfer-Encoding": "chunked"}, body=b"5\r\n{\"pro\r\n"))
        answer = read_answer(sock, began)
    finally:
        sock.close()
    assert answer.status == 408 and answer.json()["success"] is False, answer
    assert answer.seconds < BODY_TIMEOUT + 1.5
    assert store_state() == before


def test_a_declared_body_over_the_limit_is_413_before_it_is_sent(env):
    before = store_state()
    for path in ("/mj/submit/blend", "/mj/task/list-by-condition", "/api/mj/self"):
        sock = socket.create_connection(env.addr)
        began = time.monotonic()
        try:
            # only the head: the answer must come without a byte of the body
            sock.sendall(request("POST", path, env.tokens["alice"],
                                 headers={"Content-Type": "application/json",
                                          "Content-Length": str(MAX_BODY + 1)}))
            answer = read_answer(sock, began, timeout=5)
        finally:
            sock.close()
        assert answer.status == 413, (path, answer)
        assert answer.json() == {"success": False, "message": f"The request body is larger than {MAX_BODY} bytes."}
        assert answer.seconds < 0.5, answer.seconds
    # a body exactly at the limit is read (and refused by the relay for what it is, not for its size)
    answer = exchange(env.addr, request("POST", "/mj/task/list-by-condition", env.tokens["alice"],
                                        headers={"Content-Length": str(MAX_BODY)},
                                        body=b'{"ids": []}' + b" " * (MAX_BODY - 11)))
    assert answer.status == 200, answer
    assert store_state() == before


def test_a_chunked_body_over_the_limit_is_413(env):
    before = store_state()
    piece = b" " * 16384
    answer = exchange(env.addr, request("POST", "/mj/submit/imagine", env.tokens["alice"],
                                        headers={"Transfer-Encoding": "chunked"},
                                        body=chunked(b'{"prompt": "a"', *([piece] * 5), b"}")))
    assert answer.status == 413 and answer.json()["success"] is False, answer
    assert store_state() == before


@pytest.mark.parametrize("name,head,body", [
    ("negative length", {"Content-Length": "-1"}, b""),
    ("length not a number", {"Content-Length": "12abc"}, b""),
    ("bad chunk size", {"Transfer-Encoding": "chunked"}, b"zz\r\n{}\r\n0\r\n\r\n"),
])
def test_malformed_framing_is_a_4xx(env, name, head, body):
    before = store_state()
    answer = exchange(env.addr, request("POST", "/mj/submit/imagine", env.tokens["alice"], headers=head, body=body),
                      timeout=BODY_TIMEOUT + 3)
    assert 400 <= answer.status < 500, (name, answer)
    assert store_state() == before
    assert env.sim.stats()["imagine"] == 0


def test_chunked_bodies_are_decoded(env):
    token = env.tokens["alice"]
    rows, total = ledger_total("alice")
    submit = exchange(env.addr, request("POST", "/mj/submit/imagine", token,
                                        headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
                                        body=chunked(b'{"prompt": ', b'"a red fox', b' in the snow"}')))
    assert submit.status == 200, submit
    assert submit.json()["code"] == 1, submit.body
    mj_id = submit.json()["result"]
    from mjctl.models import Task

    task = Task.get(Task.mj_id == mj_id)
    assert task.prompt == "a red fox in the snow"
    assert task.quota > 0 and balance("alice") == 10_000 - task.quota
    assert ledger_total("alice") == (rows + 1, total - task.quota)
    assert_books()

    before = store_state()
    listed = exchange(env.addr, b"POST /mj/task/list-by-condition HTTP/1.1\r\nHost: mjctl\r\nConnection: close\r\n"
                      + f"Authorization: Bearer {token}\r\n".encode()
                      + b'Transfer-Encoding: chunked\r\n\r\nb\r\n{"ids":[1]}\r\n0\r\n\r\n')
    assert listed.status == 200, listed
    assert listed.json() == []  # "1" is nobody's task id; the point is that the body was read
    mine = exchange(env.addr, request("POST", "/mj/task/list-by-condition", token,
                                      headers={"Transfer-Encoding": "chunked"},
                                      body=chunked(b'{"ids": ["', mj_id.encode(), b'"]}')))
    assert mine.status == 200 and [t["id"] for t in mine.json()] == [mj_id], mine
    assert store_state() == before


# -- upstream-bound work ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_upstream_bound_work_is_capped_and_cannot_starve_the_api(env):
    """A slow upstream (every answer 3 s late): two users fill the four upstream slots; everything beyond
    (a third from a user already at two, anyone's once all four are taken) is 429 code 23 at once, charged
    nothing, while /healthz and listings answer fast. Afterwards the books balance."""
    env.sim.update({"slow": 1.0, "slow_seconds": 3.0})
    before = {name: (balance(name), ledger_total(name)) for name in USERS}
    submit_url = env.url + "/mj/submit/imagine"
    results: dict[str, list] = {name: [] for name in USERS}
    lock = threading.Lock()

    client = httpx.Client(timeout=30, limits=httpx.Limits(max_connections=64))  # shared: no set-up per request

    def submit(user: str) -> httpx.Response:
        began = time.monotonic()
        response = client.post(submit_url, json=PROMPT, headers={"Authorization": f"Bearer {env.tokens[user]}"})
        with lock:
            results[user].append((response, time.monotonic() - began))
        return response

    def refused_fast(response: httpx.Response, took: float, why: str) -> None:
        assert response.status_code == 429, response.text
        body = response.json()
        assert body["code"] == 23 and "queue full" in body["description"] and body["result"] is None, body
        assert response.headers["retry-after"] == "1"
        assert took < 1.0, took  # at once: the slots are held for 3 s
        assert why in body["description"], body

    pool = ThreadPoolExecutor(16)
    try:
        held = [pool.submit(submit, "alice"), pool.submit(submit, "alice")]
        wait_until(lambda: env.bridge.upstream_in_flight == 2, timeout=5, message="alice's two are in flight")
        began = time.monotonic()
        third = client.post(submit_url, json=PROMPT, headers={"Authorization": f"Bearer {env.tokens['alice']}"})
        refused_fast(third, time.monotonic() - began, "you already have 2")
        held += [pool.submit(submit, "bob"), pool.submit(submit, "bob")]
        wait_until(lambda: env.bridge.upstream_in_flight == 4, timeout=5, message="four in flight")
        # the burst: 24 more from everyone while the four slots are held
        burst = [pool.submit(submit, USERS[i % 3]) for i in range(24)]
        for future in burst:
            future.result(timeout=10)
        for user in USERS:
            for response, took in results[user][-8:]:
                refused_fast(response, took, "too many submissions")
        assert_api_answers_fast(env, limit=0.5)
        # listings of every flavour answer while the upstream slots are full
        with env.relay.socket_client("carol") as carol:
            began = time.monotonic()
            assert carol.get("/mj/task/list").status_code == 200
            assert carol.post("/mj/task/list-by-condition", json={"ids": []}).status_code == 200
            assert time.monotonic() - began < 0.5
        assert env.bridge.upstream_in_flight == 4  # nothing finished meanwhile: the refusals really raced them
        accepted = [future.result(timeout=30) for future in held]
    finally:
        pool.shutdown(wait=True)
        client.close()
        env.sim.update({"slow": 0.0})
    assert all(r.status_code == 200 and r.json()["code"] in (1, 22) for r in accepted), [r.text for r in accepted]
    from mjctl.config import SCHEMA

    price = SCHEMA["prices"]["IMAGINE"][0]
    assert balance("alice") == before["alice"][0] - 2 * price
    assert balance("bob") == before["bob"][0] - 2 * price
    assert (balance("carol"), ledger_total("carol")) == before["carol"]  # refused every time: charged nothing
    assert ledger_total("alice") == (before["alice"][1][0] + 2, before["alice"][1][1] - 2 * price)
    assert_books()
    from mjctl.models import Reservation, Task

    assert Task.select().count() == 4 and Reservation.select().count() == 0
    assert env.sim.stats()["imagine"] == 4
    assert env.bridge.upstream_in_flight == 0


@pytest.mark.slow
def test_connections_over_max_connections_wait_until_idle_ones_are_closed(tmp_path):
    """The connection cap is per process and per connection, not per client: a client holding every slot
    with idle sockets delays everybody else until header_timeout closes them (a known limit, pinned here)."""
    from mjctl.db import open_store
    from mjctl.httpserver import ServerThread
    from mjctl.server import make_bridge

    settings = make_settings(tmp_path, server__header_timeout=HEADER_TIMEOUT, server__max_connections=20)
    open_store(settings)
    with ServerThread(make_bridge(settings)) as server:
        idle = open_idle(("127.0.0.1", server.port), 20)
        try:
            _, took = timed_get(server.url, "/healthz")
            assert HEADER_TIMEOUT * 0.8 <= took < HEADER_TIMEOUT + 2, took
        finally:
            for sock in idle:
                sock.close()
        _, took = timed_get(server.url, "/healthz")
        assert took < 0.5


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def unread_download(addr, path: str, token: str | None = None) -> socket.socket:
    """A download whose answer has begun (its head is here) and that reads no further: a small receive
    buffer, so the server's writes soon wait on it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(addr)
    sock.sendall(request("GET", path, token))
    sock.settimeout(10)
    assert sock.recv(12, socket.MSG_PEEK).startswith(b"HTTP/1.1 200")
    return sock


@pytest.mark.slow
def test_clients_that_do_not_read_an_image_hold_a_slot_not_the_image_and_are_dropped(env):
    """Writes wait for the client: readers that take nothing of a 16 MB image cost their download slots (four
    here) and a few buffered chunks each, not the image (64 MB for four); one more is refused 429; all are
    dropped once send_timeout (3 x body_timeout) passes, and their slots come back."""
    from mjctl.poller import drain_prefetch, poll_once

    env.sim.update({"image_bytes": 16_000_000})
    with env.relay.socket_client("alice") as alice:
        mj_id = alice.post("/mj/submit/imagine", json=PROMPT).json()["result"]
        wait_until(lambda: poll_once(env.relay.settings).succeeded, timeout=10, message="the task finished")
        drain_prefetch(env.relay.settings, 30)
        assert len(alice.get(f"/mj/image/{mj_id}").content) > 15_900_000
    before = _rss_mb()
    readers = []
    try:
        for _ in range(4):
            readers.append(unread_download(env.addr, f"/mj/image/{mj_id}", env.tokens["alice"]))
        wait_until(lambda: env.bridge.media_in_flight == 4, timeout=10, message="every reader holds its slot")
        grown = _rss_mb() - before
        assert grown < 32, f"{grown:.0f} MB held for 4 clients that read nothing of a 16 MB image"
        assert exchange(env.addr, request("GET", f"/mj/image/{mj_id}", env.tokens["alice"])).status == 429
        # nobody reads: each is dropped after send_timeout and its slot comes back
        wait_until(lambda: env.bridge.media_in_flight == 0, timeout=3 * BODY_TIMEOUT + 10,
                   message="stalled readers dropped")
    finally:
        for sock in readers:
            sock.close()


def _finished_image_link(env, user: str) -> str:
    """A finished task of user's and the path and query of its signed image link (which needs no token)."""
    from mjctl.poller import drain_prefetch, poll_once

    with env.relay.socket_client(user) as client:
        mj_id = client.post("/mj/submit/imagine", json=PROMPT).json()["result"]

        def finished():
            poll_once(env.relay.settings)
            task = client.get(f"/mj/task/{mj_id}/fetch").json()
            return task if task["status"] == "SUCCESS" else None

        task = wait_until(finished, timeout=15, message=f"{user}'s task finished")
    drain_prefetch(env.relay.settings, 30)
    link = httpx.URL(task["imageUrl"])
    return link.raw_path.decode("ascii")


def test_downloads_held_open_fill_the_download_slots_and_refuse_no_submission(env):
    """Clients that open downloads through a signed image link (no token) and never read them can fill the
    server's download slots (4 here): one more download is 429 at once, but submissions have slots of their
    own and are served meanwhile; the download slots come back when the clients leave."""
    env.sim.update({"image_bytes": 4_000_000})
    alice_link, bob_link = _finished_image_link(env, "alice"), _finished_image_link(env, "bob")
    readers = []
    try:
        for _ in range(4):
            readers.append(unread_download(env.addr, alice_link))
        wait_until(lambda: env.bridge.media_in_flight == 4, timeout=10, message="four downloads held open")
        refused = exchange(env.addr, request("GET", bob_link))
        assert refused.status == 429 and refused.json()["success"] is False, refused
        with env.relay.socket_client("carol") as carol:
            began = time.monotonic()
            submitted = carol.post("/mj/submit/imagine", json=PROMPT)
            assert submitted.status_code == 200 and submitted.json()["code"] == 1, submitted.text
            assert time.monotonic() - began < 5
        assert env.bridge.media_in_flight == 4
    finally:
        for sock in readers:
            sock.close()
    wait_until(lambda: env.bridge.media_in_flight == 0, timeout=10, message="the slots came back")
    assert httpx.get(env.url + bob_link, timeout=10).status_code == 200


def test_one_owners_downloads_are_capped_per_owner(tmp_path, new_store):
    """With a share of 2 per owner (of 4): after answers that stream nothing (416, HEAD, 304), two downloads
    of alice's image held open, a third of hers is 429 with a JSON message and Retry-After, whoever asks;
    bob's image is served; once one leaves, alice's is served again."""
    with relay_env(tmp_path, new_store, images__max_streams_per_user=2) as env:
        env.sim.update({"image_bytes": 4_000_000})
        alice_link, bob_link = _finished_image_link(env, "alice"), _finished_image_link(env, "bob")
        # answers that end without a stream, or whose stream is dropped unread, give their place back
        for _ in range(3):
            assert httpx.get(env.url + alice_link, headers={"Range": "bytes=99999999-"}).status_code == 416
            assert httpx.head(env.url + alice_link).status_code == 200
            assert httpx.get(env.url + alice_link, headers={"If-None-Match": "*"}).status_code == 304
        readers = []
        try:
            for _ in range(2):
                readers.append(unread_download(env.addr, alice_link))
            for token in (None, env.tokens["alice"], env.tokens["bob"]):
                refused = exchange(env.addr, request("GET", alice_link, token))
                assert refused.status == 429 and refused.headers["retry-after"] == "1", refused
                body = refused.json()
                assert body["success"] is False and "at most 2" in body["message"], body
            assert httpx.get(env.url + bob_link, timeout=10).status_code == 200
            readers.pop().close()
            wait_until(lambda: env.bridge.media_in_flight == 1, timeout=10, message="one download left")
            again = httpx.get(env.url + alice_link, timeout=10)
            assert again.status_code == 200 and len(again.content) > 3_900_000
        finally:
            for sock in readers:
                sock.close()
        wait_until(lambda: env.bridge.media_in_flight == 0, timeout=10, message="the slots came back")


# -- a real `mjctl serve` ----------------------------------------------------------------------------------


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


@pytest.mark.slow
def test_mjctl_serve_survives_idle_and_dripping_clients_and_stops_cleanly(tmp_path):
    port = free_port()
    env = {**os.environ, "MJCTL_DATABASE_URL": f"sqlite:///{tmp_path}/serve.db", "MJCTL_SERVER_SECRET": "t",
           "MJCTL_SERVER_HEADER_TIMEOUT": "1", "MJCTL_SERVER_BODY_TIMEOUT": "1", "MJCTL_SERVER_THREADS": "4",
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mjctl", "serve", "--port", str(port), "--no-poll"], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    addr = ("127.0.0.1", port)
    url = f"http://127.0.0.1:{port}"
    idle: list[socket.socket] = []
    drip = None

    def healthy() -> bool:
        try:
            return httpx.get(url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(lambda: healthy() or proc.poll() is not None, timeout=20, message="server up")
        assert proc.poll() is None, proc.stderr.read()
        workers = _children(proc.pid)
        assert workers, "mjctl serve runs its server in worker processes"
        rss_before = sum(_rss_kb(w) for w in workers)

        idle = open_idle(addr, 300)
        drip = Dripper(addr, 50, every=0.3)
        for _ in range(3):
            began = time.monotonic()
            assert httpx.get(url + "/healthz", timeout=5).status_code == 200
            assert time.monotonic() - began < 1.0
            assert httpx.get(url + "/api/mj/self", timeout=5).status_code == 401
        for _ in range(5):
            answer = exchange(addr, request("GET", "/healthz",
                                            extra=b"Authorization: Bearer " + b"t" * 10_000_000 + b"\r\n"))
            assert answer.status in (431, 400) and answer.seconds < 1.0, answer
        wait_until(lambda: all(closed_by_server(s) for s in idle), timeout=6, message="idle sockets closed")
        wait_until(drip.all_cut, timeout=6, message="dripping sockets cut off")
        rss_after = sum(_rss_kb(w) for w in workers)
        assert rss_after - rss_before < 50_000, (rss_before, rss_after)  # KiB: five 10 MB heads were not kept
        assert healthy()

        idle = open_idle(addr, 100)  # open connections do not delay a clean stop
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        assert time.monotonic() - began < 10
    finally:
        if drip is not None:
            drip.close()
        for sock in idle:
            sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    assert "stopped" in err


@pytest.mark.slow
def test_mjctl_serve_workers_stop_without_a_rust_panic(tmp_path):
    env = {**os.environ, "MJCTL_DATABASE_URL": f"sqlite:///{tmp_path}/serve.db", "MJCTL_SERVER_SECRET": "t",
           "PYTHONUNBUFFERED": "1"}
    for attempt in range(6):
        port = free_port()
        idle: list[socket.socket] = []
        proc = subprocess.Popen([sys.executable, "-m", "mjctl", "serve", "--port", str(port), "--no-poll"],
                                env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: _healthy(f"http://127.0.0.1:{port}") or proc.poll() is not None,  # noqa: B023 - waited for before the loop moves on
                       timeout=20)
            idle = open_idle(("127.0.0.1", port), 100)  # makes it likelier, not necessary
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=20)
        finally:
            for sock in idle:
                sock.close()
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 0 and "panicked" not in err, f"stop {attempt + 1}: {err}"


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
