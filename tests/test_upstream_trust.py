"""What mjctl trusts an upstream with, against a hostile simulator and a real mjctl server.

An upstream chooses the image URLs mjctl fetches, and writes texts mjctl stores and relays. Here the
simulator's hostile switches play an upstream the attacker controls, and a small HTTP server on another
loopback port plays an internal service that must stay out of reach.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
from dataclasses import replace

import httpx
import pytest

from mjctl.httpserver import ServerThread
from mjctl.sim.png import make_png
from tests.books import assert_books, balance, ledger_total
from tests.helpers import wait_until
from tests.relay_helpers import SIM_SECRET, start_relay

PNG = make_png("internal-store", None)


class Internal:
    """The "internal service": another loopback port, which records every request that reaches it."""

    def __init__(self):
        self.hits: list[str] = []
        self._lock = threading.Lock()
        self.server = ServerThread(self._app, threads=4).start()
        self.url = self.server.url
        self.port = self.server.port

    def _app(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        with self._lock:
            self.hits.append(path)
        if path.endswith(".png"):  # an image, so that only the policy can stop it
            start_response("200 OK", [("Content-Type", "image/png"), ("Content-Length", str(len(PNG)))])
            return [PNG]
        body = b"internal: the admin password is hunter2"
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    def stop(self):
        self.server.stop()


@pytest.fixture
def internal():
    service = Internal()
    yield service
    service.stop()


@pytest.fixture
def env(store):
    relay = start_relay(store)
    yield relay
    from mjctl.images import stop_shared_prefetchers

    stop_shared_prefetchers()
    relay.server.stop()
    relay.sim.stop()


def local(mj_id: str):
    from mjctl.models import Task

    return Task.select().where(Task.mj_id == mj_id).order_by(Task.id.desc()).first()


def finished(env, prompt: str = "a fox", user: str = "alice", status: str = "SUCCESS"):
    """Submit through the relay and poll (the real poller) until mjctl has the task finished."""
    from mjctl.poller import poll_once

    answer = env.submit("imagine", {"prompt": prompt}, user=user)
    assert answer.status_code == 200, answer.text
    mj_id = answer.json()["result"]

    def done():
        poll_once(env.settings)
        task = local(mj_id)
        return task if task.status == status else None

    return wait_until(done, message=f"task {mj_id} is {status} in mjctl")


def image_of(env, mj_id: str, user: str = "alice") -> httpx.Response:
    """The task's image through the link the relay hands out."""
    with env.client(user) as c:
        link = c.get(f"/mj/task/{mj_id}/fetch").json()["imageUrl"]
    path = httpx.URL(link).raw_path.decode()  # public_url is not set: the link names the default port
    assert path.startswith("/mj/image/")
    with env.client(None) as c:
        return c.get(path)


def refusals(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mjctl.images" and "refused" in r.getMessage()]


def assert_refused_quietly(answer: httpx.Response, mj_id: str, internal: Internal, caplog) -> None:
    """A 502 worded like any unreachable image, nothing about the target; the internal service untouched;
    one log line naming the channel, not the whole URL."""
    assert answer.status_code == 502
    assert answer.json()["message"] == f"Cannot reach the upstream for the image of task {mj_id}."
    assert str(internal.port) not in answer.text and "loopback" not in answer.text
    assert internal.hits == []
    lines = wait_until(lambda: refusals(caplog), message="the refusal is logged")
    assert all(line.startswith("channel sim: refused to fetch the image of task") for line in lines)
    assert any(f"127.0.0.1:{internal.port}" in line for line in lines)
    assert not any("/secret" in line for line in lines)  # the host and port only, never the upstream's path


# -- where images come from -----------------------------------------------------------------------------


def test_an_image_url_to_another_loopback_port_is_refused(env, internal, caplog):
    caplog.set_level(logging.INFO, logger="mjctl")
    env.sim.sim.update({"image_url": f"{internal.url}/secret/admin.png?x=1"})
    task = finished(env)
    assert_refused_quietly(image_of(env, task.mj_id), task.mj_id, internal, caplog)


def test_a_redirect_from_the_channels_origin_to_loopback_is_refused(env, internal, caplog):
    caplog.set_level(logging.INFO, logger="mjctl")
    env.sim.sim.update({"redirect_to": f"{internal.url}/secret/admin.png"})
    task = finished(env)  # its imageUrl is the simulator's own /attachments/ link: the channel's origin
    answer = image_of(env, task.mj_id)
    assert env.sim.sim.stats()["image"] >= 1  # the first hop, to the channel, was made
    assert_refused_quietly(answer, task.mj_id, internal, caplog)


def test_a_name_that_resolves_to_a_private_address_is_refused(env, internal, caplog):
    caplog.set_level(logging.INFO, logger="mjctl")
    env.sim.sim.update({"image_url": f"http://localhost:{internal.port}/secret/admin.png"})
    task = finished(env)
    answer = image_of(env, task.mj_id)
    assert answer.status_code == 502 and internal.hits == []
    assert any("localhost resolves to 127.0.0.1" in line for line in wait_until(lambda: refusals(caplog)))

    # The channel's origin is its base URL's host as written: another name for the same port is not it.
    sim_port = httpx.URL(env.sim.url).port
    env.sim.sim.update({"image_url": None, "redirect_to": f"http://localhost:{sim_port}/attachments/x/y.png"})
    other = finished(env, prompt="a hare")
    assert image_of(env, other.mj_id).status_code == 502


def test_a_host_in_allow_hosts_is_fetched(env, internal):
    # before the first image request
    env.settings.images = replace(env.settings.images, allow_hosts="minio.internal, 127.0.0.0/8")
    env.sim.sim.update({"image_url": f"{internal.url}/bucket/fox.png"})
    task = finished(env)
    answer = image_of(env, task.mj_id)
    assert answer.status_code == 200 and answer.content == PNG
    assert "/bucket/fox.png" in internal.hits


def test_the_channels_own_origin_is_fetched(env):
    task = finished(env)
    assert httpx.URL(task.image_url).host == "127.0.0.1"  # loopback, as private as it gets
    answer = image_of(env, task.mj_id)
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    assert answer.content == httpx.get(task.image_url).content


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
    ("240.0.0.1", False), ("255.255.255.255", False), ("::1", False), ("::", False), ("fe80::1", False),
    ("fc00::1", False), ("ff02::1", False), ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False),
    ("2002:7f00:1::", False), ("64:ff9b::a00:1", False), ("::ffff:8.8.8.8", True),
])
def test_what_counts_as_public(address, public):
    from mjctl.upstream import is_public_address

    assert is_public_address(ipaddress.ip_address(address)) is public


# -- upstream text ---------------------------------------------------------------------------------------


def test_an_oversized_description_is_stored_and_relayed_capped(env):
    from mjctl.upstream_text import MAX_TEXT_CHARS

    env.sim.sim.update({"description_chars": 3_000_000})
    task = finished(env)
    assert len(task.description) == MAX_TEXT_CHARS and task.description.endswith("…")
    assert task.description.startswith("/imagine a fox")
    with env.client() as c:
        shown = c.get(f"/mj/task/{task.mj_id}/fetch").json()
        listed = c.get("/mj/task/list").json()
    assert shown["description"] == task.description
    assert [t["description"] for t in listed] == [task.description]


def test_the_channel_secret_in_a_fail_reason_is_scrubbed_everywhere(env, cli):
    from mjctl.models import Ledger

    env.sim.sim.update({"fail_rate": 1.0, "fail_reason": f"auth with mj-api-secret {SIM_SECRET} failed"})
    task = finished(env, status="FAILURE")
    expected = "auth with mj-api-secret *** failed"
    assert task.fail_reason == expected  # the store
    with env.client() as c:
        relayed = c.get(f"/mj/task/{task.mj_id}/fetch").json()  # the relay
        api = c.get("/api/mj/self").json()["data"]["items"]  # the API
    assert relayed["failReason"] == expected
    assert [item["fail_reason"] for item in api] == [expected]
    for args in (("tasks", "show", task.mj_id), ("tasks", "show", task.mj_id, "--json"), ("tasks", "list")):
        shown = cli(*args)  # the CLI
        assert shown.exit_code == 0, shown.output
        assert SIM_SECRET not in shown.output
        assert "***" in shown.output or args[1] == "list"  # the list has no fail_reason column
    assert all(SIM_SECRET not in row.reason for row in Ledger.select())  # the refund's reason
    assert balance("alice") == 10_000
    assert_books()


@pytest.mark.parametrize("result", [{"a": 1}, ["1730000000000123"], True, 1.5, "x" * 65, "a b", "../../etc",
                                    "1730000000000123\n"])
def test_a_result_that_is_not_a_task_id_is_a_protocol_error_and_charges_nothing(env, result):
    from mjctl.models import Reservation, Task

    env.sim.sim.update({"submit_result": result})
    books = ledger_total("alice")
    answer = env.submit("imagine", {"prompt": "a fox"})
    assert answer.status_code == 502 and answer.json()["code"] == 9
    assert Task.select().count() == 0
    assert Reservation.select().count() == 0
    assert balance("alice") == 10_000 and ledger_total("alice") == books
    assert_books()


def test_a_numeric_result_is_taken_as_its_digits(env):
    env.sim.sim.update({"submit_result": 1730000000000123})
    answer = env.submit("imagine", {"prompt": "a fox"})
    assert answer.status_code == 200 and answer.json()["result"] == "1730000000000123"
    assert local("1730000000000123").quota == 1000
    assert_books()


# -- what a relay answer carries ---------------------------------------------------------------------------


def no_push_links(data) -> None:
    text = json.dumps(data)
    assert "notifyHook" not in text and "/mj/notify/" not in text and "caller.example" not in text, text


def test_an_echoed_notify_hook_reaches_no_answer_and_no_terminal(env, cli):
    env.push_here()  # submissions carry mjctl's signed push link, which the upstream now echoes back
    env.sim.sim.update({"echo_hook": True})
    answer = env.submit("imagine", {"prompt": "a fox", "notifyHook": "https://caller.example/hook"})
    assert answer.status_code == 200
    no_push_links(answer.json())  # submit
    mj_id = answer.json()["result"]
    wait_until(lambda: local(mj_id).status == "SUCCESS", message="the pushes arrive")
    assert "notifyHook" in local(mj_id).properties  # stored: mjctl needs the caller's hook
    with env.client() as c:
        no_push_links(c.get(f"/mj/task/{mj_id}/fetch").json())  # fetch
        no_push_links(c.get("/mj/task/list").json())  # list
        no_push_links(c.post("/mj/task/list-by-condition", json={"ids": [mj_id]}).json())  # list-by-condition
        seed = c.get(f"/mj/task/{mj_id}/image-seed")  # image-seed, whose answer the upstream also decorates
    assert seed.status_code == 200 and seed.json()["result"]
    no_push_links(seed.json())
    for args in (("tasks", "show", mj_id), ("tasks", "show", mj_id, "--json")):
        shown = cli(*args)
        assert shown.exit_code == 0, shown.output
        assert "notifyHook" not in shown.output and "/mj/notify/" not in shown.output


# -- the size and coding of an answer ---------------------------------------------------------------------


class Answering:
    """An upstream on a real port that answers every call with one body, headers and chunking, and records
    the Accept-Encoding each request asked for."""

    def __init__(self):
        self.body = b"[]"
        self.headers: list[tuple[str, str]] = []
        self.chunk = 0  # 0: one piece with its Content-Length; else pieces of this size, no length
        self.asked: list[str] = []
        self.server = ServerThread(self._app, threads=2).start()

    def _app(self, environ, start_response):
        self.asked.append(environ.get("HTTP_ACCEPT_ENCODING", ""))
        headers = [("Content-Type", "application/json"), *self.headers]
        body = self.body
        if not self.chunk:
            if not any(name.lower() == "content-length" for name, _ in headers):
                headers.append(("Content-Length", str(len(body))))
            start_response("200 OK", headers)
            return [body]
        start_response("200 OK", headers)
        return (body[i:i + self.chunk] for i in range(0, len(body), self.chunk))


@pytest.fixture
def answering(monkeypatch):
    from mjctl import upstream

    monkeypatch.setattr(upstream, "MAX_ANSWER_BYTES", 4096)
    server = Answering()
    yield server
    server.server.stop()


def _task_list(n: int) -> bytes:
    return json.dumps([{"id": str(1000 + i), "status": "IN_PROGRESS", "progress": "5%"} for i in range(n)]).encode()


def _raw_deflate(data: bytes) -> bytes:
    import zlib

    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


@pytest.mark.parametrize("coding", ["", "gzip", "deflate", "raw deflate"])
def test_an_answer_within_the_cap_is_read_in_any_coding_mjctl_asks_for(answering, coding):
    import gzip
    import zlib

    from mjctl.upstream import UpstreamClient

    plain = _task_list(20)
    encode = {"": lambda b: b, "gzip": gzip.compress, "deflate": zlib.compress, "raw deflate": _raw_deflate}[coding]
    answering.body = encode(plain)
    if coding:
        answering.headers = [("Content-Encoding", coding.split()[-1])]
    with UpstreamClient(answering.server.url, SIM_SECRET) as client:
        tasks = client.list_by_condition([str(1000 + i) for i in range(20)])
    assert [t["id"] for t in tasks] == [str(1000 + i) for i in range(20)]
    assert answering.asked == ["gzip, deflate"]


@pytest.mark.parametrize("case, expected", [
    ("streamed past the cap", "answered with more than 4096 bytes"),
    ("announced past the cap", "announced an answer of 8192 bytes"),
    ("a gzip bomb", "more than 4096 bytes once decoded"),
    ("a coding not asked for", "content coding it was not asked for ('br')"),
    ("broken gzip", "not valid gzip"),
])
def test_an_answer_too_large_or_in_a_coding_not_asked_for_is_refused_unread(answering, case, expected):
    import gzip

    from mjctl.upstream import UpstreamClient, UpstreamProtocolError

    big = b"[" + b" " * 8190 + b"]"
    if case == "streamed past the cap":
        answering.body, answering.chunk = big, 512
    elif case == "announced past the cap":
        answering.body, answering.headers = b"[]", [("Content-Length", "8192")]
        answering.chunk = 2  # the body itself is short: the announcement alone is refused
    elif case == "a gzip bomb":
        answering.body = gzip.compress(b"[" + b" " * 3_000_000 + b"]")  # 700 times the cap
        answering.headers = [("Content-Encoding", "gzip")]
        assert len(answering.body) < 4096
    elif case == "a coding not asked for":
        answering.body, answering.headers = b"[]", [("Content-Encoding", "br")]
    else:
        answering.body, answering.headers = b"not gzip at all", [("Content-Encoding", "gzip")]
    with UpstreamClient(answering.server.url, SIM_SECRET) as client:
        with pytest.raises(UpstreamProtocolError) as caught:
            client.list_by_condition(["1000"])
        assert expected in str(caught.value)
        assert SIM_SECRET not in str(caught.value)
        answering.body, answering.headers, answering.chunk = _task_list(1), [], 0
        assert client.list_by_condition(["1000"])[0]["id"] == "1000"  # the client works on after a refusal
