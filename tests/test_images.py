"""Image forwarding (docs/api.md, GET /mj/image): signed URLs, the streaming proxy, the cache, prefetching and the CLI,
against the simulator and a real server on free ports."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass

import httpx
import pytest

from mjctl import accounts, crypto, images
from mjctl.httpserver import ServerThread
from mjctl.images import ImageCache, ImageForwarder, ImagePrefetcher, ImageSource, prefetch_hook
from mjctl.models import Task
from mjctl.sim import run_simulator_in_thread
from tests.helpers import make_settings, wait_until

SIM_SECRET = "sim-secret"


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def loopback_images(monkeypatch):
    """These tests' image hosts (the simulator, FakeUpstream) live on loopback and are not their tasks'
    channel: allow loopback, as an operator allows an internal object store (tests/test_upstream_trust.py
    covers the refusals)."""
    monkeypatch.setenv("MJCTL_IMAGES_ALLOW_HOSTS", "127.0.0.1")


def start_server(settings) -> ServerThread:
    from mjctl.server import create_app
    from mjctl.server.app import ROUTE_MODULES
    from mjctl.server.images import install

    extra = () if "mjctl.server.images" in ROUTE_MODULES else (install,)
    return ServerThread(create_app(settings, extra=extra), threads=8).start()


@pytest.fixture(scope="module")
def sim():
    handle = run_simulator_in_thread(step_seconds=0.01, seed=7, secret=SIM_SECRET, image_bytes=300_000)
    yield handle
    handle.stop()


def finished_image_url(sim) -> tuple[str, str]:
    """Run an imagine to SUCCESS on the simulator; (task id, its upstream image URL)."""
    headers = {"mj-api-secret": SIM_SECRET}
    reply = httpx.post(f"{sim.url}/mj/submit/imagine", json={"prompt": "a fox"}, headers=headers).json()
    task_id = reply["result"]

    def done():
        task = httpx.get(f"{sim.url}/mj/task/{task_id}/fetch", headers=headers).json()
        return task if task["status"] == "SUCCESS" else None

    return task_id, wait_until(done, message="simulated task finishes")["imageUrl"]


@dataclass
class Live:
    settings: object
    url: str
    http: httpx.Client
    tokens: dict
    users: dict

    def image(self, mj_id: str, *, sig: str | None = "auto", who: str | None = None, headers=None,
              row: int | None = None):
        """GET the image of mj_id: by default through the task's own link (its row and signature), with
        sig=None by token only, or with the sig (and row) given."""
        params = {}
        if sig == "auto":
            task = Task.get(Task.mj_id == mj_id)
            row, sig = task.id, images.sign_task_image(crypto.server_secret(self.settings), task.id, mj_id)
        if row is not None:
            params["t"] = row
        if sig is not None:
            params["sig"] = sig
        hdrs = dict(headers or {})
        if who:
            hdrs["Authorization"] = f"Bearer {self.tokens[who]}"
        return self.http.get(f"/mj/image/{mj_id}", params=params, headers=hdrs)

    def add_task(self, mj_id: str, url: str, *, owner: str = "alice", status: str = "SUCCESS") -> Task:
        return Task.create(user_id=self.users[owner], channel_id=1, mj_id=mj_id, status=status, image_url=url,
                           unfinished=0 if status == "SUCCESS" else 1)


def make_live(tmp_path, **overrides):
    settings = make_settings(tmp_path, **overrides)
    from mjctl.db import open_store

    open_store(settings)
    tokens, users = {}, {}
    for name, role in (("alice", "user"), ("bob", "user"), ("admin", "admin")):
        if accounts.User.get_or_none(accounts.User.name == name) is None:
            user, tokens[name] = accounts.create_user(name, role=role)
        else:
            user, tokens[name] = accounts.get_user(name), accounts.issue_token(name)
        users[name] = user.id
    server = start_server(settings)
    return server, Live(settings, server.url, httpx.Client(base_url=server.url, timeout=10), tokens, users)


@pytest.fixture
def live(tmp_path):
    server, handle = make_live(tmp_path)
    yield handle
    handle.http.close()
    server.stop()


def cache_files(settings) -> list[str]:
    root = settings.images.cache_dir
    out = []
    for folder, _dirs, files in os.walk(root):
        out += [os.path.relpath(os.path.join(folder, f), root) for f in files]
    return sorted(out)


class FakeUpstream:
    """A misbehaving image host: raw sockets, so it can lie about lengths and break off mid-body."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.release = threading.Event()
        self.hits: list[str] = []
        self.body = os.urandom(200_000)
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket):
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                part = conn.recv(4096)
                if not part:
                    return
                data += part
            path = data.split(b" ", 2)[1].decode()
            self.hits.append(path)
            body = self.body
            try:
                if path == "/html":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 5\r\n\r\nhello")
                elif path == "/error":
                    conn.sendall(b"HTTP/1.1 500 Oops\r\nContent-Type: image/png\r\nContent-Length: 0\r\n\r\n")
                elif path == "/big":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 999999999\r\n\r\n")
                elif path == "/slow":
                    self.release.wait(10)
                elif path in ("/unsized", "/unsized-big"):  # no Content-Length: the body ends with the connection
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nConnection: close\r\n\r\n")
                    conn.sendall(body if path == "/unsized" else body * 3)
                elif path == "/truncated":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n"
                                 b"Content-Length: %d\r\n\r\n" % len(body) + body[:50_000])
                    self.release.wait(0.2)
                elif path == "/gated.png":  # half the body, then wait for the test
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n"
                                 b"Content-Length: %d\r\n\r\n" % len(body) + body[:100_000])
                    self.release.wait(10)
                    conn.sendall(body[100_000:])
            except OSError:
                pass

    def close(self):
        self._stop = True
        self.release.set()
        self.sock.close()


@pytest.fixture
def fake():
    upstream = FakeUpstream()
    yield upstream
    upstream.close()


# -- forwarding and the cache -------------------------------------------------------------------------


def test_forwarded_image_is_byte_identical_and_then_cached(live, sim):
    task_id, url = finished_image_url(sim)
    live.add_task(task_id, url)
    direct = httpx.get(url)
    first = live.image(task_id)
    assert first.status_code == 200
    assert first.content == direct.content and len(first.content) > 250_000
    assert first.headers["content-type"] == "image/png"
    assert first.headers["content-length"] == str(len(direct.content))
    assert first.headers["x-cache"] == "MISS"
    assert first.headers["x-content-type-options"] == "nosniff"
    # The file is renamed into place just after the last byte went out; no temp file is left behind.
    wait_until(lambda: (f := cache_files(live.settings)) and len(f) == 1 and f[0].endswith(".png"))
    second = live.image(task_id)
    assert second.content == direct.content and second.headers["x-cache"] == "HIT"
    assert "immutable" in second.headers["cache-control"]
    assert second.headers["etag"] == first.headers["etag"]


def test_cached_image_is_still_served_after_the_upstream_link_expired(live, sim):
    task_id, url = finished_image_url(sim)
    live.add_task(task_id, url)
    original = live.image(task_id).content
    other_id, other_url = finished_image_url(sim)
    live.add_task(other_id, other_url)
    sim.sim.update({"image_ttl": 0})
    try:
        assert httpx.get(url).status_code == 403
        again = live.image(task_id)
        assert again.status_code == 200 and again.content == original
        expired = live.image(other_id)  # never fetched before its link died: nothing to serve
        assert expired.status_code == 502
        assert expired.headers["content-type"] == "application/json"
        assert "403" in expired.json()["message"] and expired.json()["success"] is False
    finally:
        sim.sim.update({"image_ttl": 86400.0})


def test_a_cached_image_answers_one_byte_range(live, sim):
    task_id, url = finished_image_url(sim)
    live.add_task(task_id, url)
    first = live.image(task_id, headers={"Range": "bytes=0-9"})  # from the upstream: always whole
    whole = first.content
    assert first.status_code == 200 and len(whole) > 1000 and "accept-ranges" not in first.headers
    # renamed into place: the download's temp file (img-*.part) sits in the same folder until then
    wait_until(lambda: [f for f in cache_files(live.settings) if not f.endswith(".part")],
               message="the image is cached")
    size = len(whole)
    cases = (("bytes=0-9", (0, 9)), ("bytes=1000-", (1000, size - 1)), ("bytes=-16", (size - 16, size - 1)),
             (f"bytes=5-{size + 99}", (5, size - 1)))
    for asked, (first_byte, last_byte) in cases:
        part = live.image(task_id, headers={"Range": asked})
        assert part.status_code == 206, asked
        assert part.content == whole[first_byte:last_byte + 1]
        assert part.headers["content-range"] == f"bytes {first_byte}-{last_byte}/{size}"
        assert part.headers["content-length"] == str(last_byte + 1 - first_byte)
    for ignored in ("bytes=0-1,5-9", "bytes=9-0", "items=0-9", "bytes=-"):  # several ranges or nonsense: all of it
        answer = live.image(task_id, headers={"Range": ignored})
        assert (answer.status_code, answer.content) == (200, whole), ignored
    past = live.image(task_id, headers={"Range": f"bytes={size}-"})
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{size}"
    assert past.json()["success"] is False
    etag = first.headers["etag"]
    assert live.image(task_id, headers={"Range": "bytes=0-9", "If-Range": etag}).status_code == 206
    assert live.image(task_id, headers={"Range": "bytes=0-9", "If-Range": '"old"'}).status_code == 200


def test_if_none_match_gets_304(live, sim):
    task_id, url = finished_image_url(sim)
    live.add_task(task_id, url)
    etag = live.image(task_id).headers["etag"]
    hits = sim.sim.stats()["image"]
    again = live.image(task_id, headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    assert live.image(task_id, headers={"If-None-Match": '"other"'}).status_code == 200
    assert sim.sim.stats()["image"] == hits  # neither needed the upstream


def test_two_concurrent_first_requests_leave_one_complete_file(live, fake):
    live.add_task("1700000000000001", fake.url + "/gated.png")
    results: list[httpx.Response] = []

    def get():
        results.append(live.image("1700000000000001"))

    threads = [threading.Thread(target=get) for _ in range(2)]
    for t in threads:
        t.start()
    wait_until(lambda: fake.hits.count("/gated.png") == 2, message="both requests reached the upstream")
    fake.release.set()
    for t in threads:
        t.join(10)
    assert [r.status_code for r in results] == [200, 200]
    assert all(r.content == fake.body for r in results)
    files = wait_until(lambda: (f := cache_files(live.settings)) and not any(".tmp" in p for p in f) and f)
    assert len(files) == 1 and files[0].endswith(".png") and "1700000000000001" not in files[0]
    task = Task.get(Task.mj_id == "1700000000000001")
    cached = ImageCache(live.settings.images.cache_dir).find(ImageSource.from_task(task))
    assert cached.path.read_bytes() == fake.body


# -- access -------------------------------------------------------------------------------------------


def test_access_rules(live, sim):
    task_id, url = finished_image_url(sim)
    mine = live.add_task(task_id, url, owner="alice")
    other_id, other_url = finished_image_url(sim)
    theirs = live.add_task(other_id, other_url, owner="bob")
    live.add_task("1700000000000009", "", owner="alice", status="IN_PROGRESS")
    secret = crypto.server_secret(live.settings)
    unknown = live.image("1799999999999999", sig=images.sign_image(secret, "1799999999999999"))
    assert unknown.status_code == 404  # unknown id, validly signed (a legacy link)

    assert live.image(task_id).status_code == 200
    assert live.image(task_id, sig=images.sign_image(secret, task_id)).status_code == 200  # a legacy link
    assert live.image(task_id, sig=None).status_code == 401
    for answer in (live.image(task_id, sig="nonsense"),
                   live.image(task_id, sig=images.sign_image(secret, other_id)),  # another id's sig
                   live.image(task_id, row=mine.id, sig=images.sign_task_image(secret, theirs.id, other_id)),
                   live.image(task_id, row=theirs.id, sig=images.sign_task_image(secret, theirs.id, other_id)),
                   live.image(task_id, sig=None, who="bob"),  # another user's token
                   live.image(task_id, row=mine.id, sig=None, who="bob"),
                   live.image("1799999999999999", sig=None, who="bob")):
        assert (answer.status_code, answer.content) == (unknown.status_code, unknown.content)
    assert live.image(other_id, sig=images.sign_image(secret, other_id)).status_code == 200
    assert live.image(task_id, sig=None, who="alice").status_code == 200  # the owner
    assert live.image(task_id, sig=None, who="admin").status_code == 200
    assert live.image(task_id, sig=None, headers={"Authorization": "Bearer mjk-unknown"}).status_code == 401
    assert live.image("1799999999999999", sig=None, who="admin").status_code == 404
    assert live.image("1700000000000009").status_code == 404  # no image yet
    assert live.image("../../etc/passwd", sig=None, who="admin").status_code == 404
    accounts.set_user("alice", enabled=False)
    denied = live.image(task_id, sig=None, who="alice")
    assert denied.status_code == 403 and denied.json() == {"success": False, "message": "This user is disabled."}


def test_sign_false_makes_images_public(tmp_path, sim):
    server, live = make_live(tmp_path, images__sign=False)
    try:
        task_id, url = finished_image_url(sim)
        live.add_task(task_id, url)
        assert live.image(task_id, sig=None).status_code == 200
        assert live.image("1799999999999999", sig=None).status_code == 404
    finally:
        live.http.close()
        server.stop()


# -- upstream failures --------------------------------------------------------------------------------


@pytest.mark.parametrize("path, words", [
    ("/html", "text/html instead of an image"),
    ("/error", "HTTP 500"),
    ("/big", "larger than the limit"),
    ("/unsized-big", "larger than the limit"),
    ("/slow", "within 0.5 s"),
])
def test_upstream_failures_are_502_json_and_cache_nothing(tmp_path, fake, path, words):
    server, live = make_live(tmp_path, images__max_bytes=300_000, images__timeout=0.5)
    try:
        live.add_task("1700000000000002", fake.url + path)
        answer = live.image("1700000000000002")
        assert answer.status_code == 502, answer.text
        assert answer.headers["content-type"] == "application/json"
        assert words in answer.json()["message"]
        assert cache_files(live.settings) == []
    finally:
        live.http.close()
        server.stop()


def test_unreachable_upstream_is_502(live):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    live.add_task("1700000000000003", f"http://127.0.0.1:{port}/x.png")
    answer = live.image("1700000000000003")
    assert answer.status_code == 502 and "Cannot reach the upstream" in answer.json()["message"]


def test_a_body_without_length_is_checked_then_served_with_one(live, fake):
    live.add_task("1700000000000004", fake.url + "/unsized")
    answer = live.image("1700000000000004")
    assert answer.status_code == 200 and answer.content == fake.body
    assert answer.headers["content-length"] == str(len(fake.body))
    assert len(cache_files(live.settings)) == 1  # spooled and renamed before the answer began


def test_an_upstream_breaking_off_aborts_the_response_and_caches_nothing(live, fake):
    live.add_task("1700000000000005", fake.url + "/truncated")
    with pytest.raises(httpx.RemoteProtocolError):
        live.image("1700000000000005")
    assert cache_files(live.settings) == []


# -- forward = false, URLs in listings ---------------------------------------------------------------


def test_listings_show_forwarded_urls_or_upstream_ones_when_forward_is_off(tmp_path, cli):
    settings = make_settings(tmp_path)
    from mjctl.db import open_store

    open_store(settings)
    user, _ = accounts.create_user("carol")
    row = Task.create(user_id=user.id, channel_id=1, mj_id="1700000000000006", status="SUCCESS",
                      image_url="https://cdn.example/a.png?ex=1").id
    Task.create(user_id=user.id, channel_id=1, mj_id="1700000000000007", status="IN_PROGRESS", image_url="")

    listed = json.loads(cli("tasks", "list", "--json").stdout)["items"]
    urls = {item["mj_id"]: item["image_url"] for item in listed}
    assert urls["1700000000000007"] == ""
    base, _, sig = urls["1700000000000006"].partition("&sig=")
    assert base == f"http://127.0.0.1:8080/mj/image/1700000000000006?t={row}"
    assert images.verify_task_image(b"test-secret", row, "1700000000000006", sig)
    assert not images.verify_image(b"test-secret", "1700000000000006", sig)  # bound to the row, not the id

    off = json.loads(cli("tasks", "list", "--json", env={"MJCTL_IMAGES_FORWARD": "false"}).stdout)["items"]
    assert {i["mj_id"]: i["image_url"] for i in off}["1700000000000006"] == "https://cdn.example/a.png?ex=1"
    public = json.loads(cli("tasks", "list", "--json", env={"MJCTL_SERVER_PUBLIC_URL": "https://mj.example/"}).stdout)
    assert {i["mj_id"]: i["image_url"] for i in public["items"]}["1700000000000006"].startswith(
        f"https://mj.example/mj/image/1700000000000006?t={row}&sig=")
    assert images.image_url_for(make_settings(tmp_path, images__forward=False)) is None


# -- prefetching and the CLI --------------------------------------------------------------------------


def test_prefetch_hook_caches_a_finished_image_without_blocking(tmp_path, sim, fake):
    settings = make_settings(tmp_path, images__timeout=5.0)
    task_id, url = finished_image_url(sim)
    prefetcher = ImagePrefetcher(settings, workers=1, queue_size=1)
    try:
        hook = prefetch_hook(settings, prefetcher)
        hook(Task(id=41, mj_id=task_id, image_url=url, status="SUCCESS"))
        assert prefetcher.wait_idle(10)
        cached = ImageCache(settings.images.cache_dir).find(ImageSource(task_id, url, True, task_id=41))
        assert cached is not None and cached.path.read_bytes() == httpx.get(url).content
        hook(Task(mj_id="x", image_url=url, status="IN_PROGRESS"))  # not finished: ignored

        # The worker is held up by a gated download; further submissions fill the queue and are dropped.
        began = time.monotonic()
        results = [prefetcher.submit(ImageSource(f"17000000000001{i:02d}", fake.url + "/gated.png", True))
                   for i in range(4)]
        assert time.monotonic() - began < 0.5
        assert results.count(False) >= 2 and prefetcher.counts["dropped"] >= 2
        fake.release.set()
        assert prefetcher.wait_idle(10)
    finally:
        prefetcher.stop()
    assert prefetch_hook(make_settings(tmp_path, images__forward=False)).prefetcher is None


def test_prefetcher_looks_tasks_up_by_id(tmp_path, sim, store):
    task_id, url = finished_image_url(sim)
    user, _ = accounts.create_user("dave")
    task = Task.create(user_id=user.id, channel_id=1, mj_id=task_id, status="SUCCESS", image_url=url, unfinished=0)
    prefetcher = ImagePrefetcher(store)
    try:
        assert prefetcher.submit(task.id)
        assert prefetcher.wait_idle(10)
        assert prefetcher.counts["fetched"] == 1
        assert prefetcher.submit(task_id) and prefetcher.wait_idle(10)
        assert prefetcher.counts["cached"] == 1
    finally:
        prefetcher.stop()


def test_cli_stats_prune_and_tasks_image(tmp_path, sim, cli):
    settings = make_settings(tmp_path)
    from mjctl.db import open_store

    open_store(settings)
    user, _ = accounts.create_user("erin")
    task_id, url = finished_image_url(sim)
    Task.create(user_id=user.id, channel_id=1, mj_id=task_id, status="SUCCESS", image_url=url, unfinished=0)
    direct = httpx.get(url).content

    saved = cli("tasks", "image", task_id, "-o", str(tmp_path / "out.png"), "--json")
    assert saved.exit_code == 0, saved.output
    assert json.loads(saved.stdout)["from_cache"] is False
    assert (tmp_path / "out.png").read_bytes() == direct
    again = json.loads(cli("tasks", "image", task_id, "-o", str(tmp_path / "again.png"), "--json").stdout)
    assert again["from_cache"] is True and (tmp_path / "again.png").read_bytes() == direct
    assert cli("tasks", "image", "1799999999999999").exit_code == 1

    stats = json.loads(cli("images", "stats", "--json").stdout)
    assert stats["files"] == 1 and stats["bytes"] == len(direct)
    kept = json.loads(cli("images", "prune", "--older-than", "1d", "--json").stdout)
    assert kept["removed"] == 0 and kept["kept"] == 1
    cache = ImageCache(settings.images.cache_dir)
    old = time.time() - 3 * 86400
    source = ImageSource.from_task(Task.get(Task.mj_id == task_id))
    os.utime(cache.find(source).path, (old, old))
    stale_temp, stale_path = cache.temp_file()
    stale_temp.close()
    os.utime(stale_path, (old, old))
    (cache.directory / "keep-me.txt").write_text("not ours")
    pruned = json.loads(cli("images", "prune", "--older-than", "2d", "--json").stdout)
    assert pruned["removed"] == 1 and pruned["removed_bytes"] == len(direct) and pruned["temp_removed"] == 1
    assert cache.find(source) is None and (cache.directory / "keep-me.txt").exists()
    assert json.loads(cli("images", "stats", "--json").stdout)["files"] == 0
    assert cli("images", "prune", "--older-than", "soon").exit_code == 2
    text = cli("images", "stats")
    assert text.exit_code == 0 and "images" in text.stdout


def test_forwarder_open_from_python(tmp_path, sim):
    """The core API the server and CLI share: a stream with type, length and validator."""
    settings = make_settings(tmp_path)
    task_id, url = finished_image_url(sim)
    with ImageForwarder(settings) as forwarder:
        stream = forwarder.open(ImageSource(task_id, url, final=False))
        try:
            body = b"".join(stream)
        finally:
            stream.close()
        assert stream.content_type == "image/png" and stream.length == len(body) and not stream.cached
        assert forwarder.store.find(ImageSource(task_id, url, final=True)) is None  # a preview is never cached
        assert images.etag_matches(f'W/{stream.etag}, "x"', stream.etag)
