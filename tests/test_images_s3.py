"""The S3 result store ([images] store = "s3://…"): the backend, serving from the bucket (ranges, ETags,
redirects), its faults, prefetch retries, `mjctl images stats|prune|migrate`, and two hosts sharing one
bucket — against moto's S3 server in a process of its own, the simulator and real mjctl servers."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid

import httpx
import pytest

from mjctl import crypto, images
from mjctl.images import ImageCache, ImagePrefetcher, ImageSource, result_store
from mjctl.images.common import ImageTruncated
from mjctl.images.store import ByteRange, RangeNotSatisfiable, row_key
from mjctl.models import Task
from tests.helpers import closed_port_url, make_settings, wait_until
from tests.relay_helpers import start_relay
from tests.s3_helpers import CREDENTIALS, MotoServer, s3_overrides
from tests.test_images import cache_files, finished_image_url, make_live

pytest.importorskip("boto3", reason="the S3 store needs boto3 (pip install -e '.[s3]')")

SLACK = 1.5  # seconds a fault may take beyond the store's own timeouts on a loaded 2-CPU machine


@pytest.fixture(autouse=True)
def aws_environment(monkeypatch):
    """Credentials in the standard variables, and nothing from this machine's AWS files or metadata service."""
    for name in ("AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("MJCTL_IMAGES_ALLOW_HOSTS", "127.0.0.1")  # the simulator's images are on loopback


@pytest.fixture(scope="module")
def moto():
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def bucket(moto) -> str:
    name = f"img-{uuid.uuid4().hex[:12]}"
    moto.create_bucket(name)
    return name


@pytest.fixture(scope="module")
def sim():
    from mjctl.sim import run_simulator_in_thread

    handle = run_simulator_in_thread(step_seconds=0.01, seed=11, secret="sim-secret", image_bytes=300_000)
    yield handle
    handle.stop()


class expired_links:
    """Within the block the simulator answers every image link 403, as Discord does after a day."""

    def __init__(self, sim):
        self.sim = sim

    def __enter__(self):
        self.sim.sim.update({"image_ttl": 0})

    def __exit__(self, *exc):
        self.sim.sim.update({"image_ttl": 86400.0})


def write_image(store, source: ImageSource, data: bytes, content_type: str = "image/png") -> None:
    temp, path = store.temp_file()
    with temp:
        temp.write(data)
    store.put_file(path, source, content_type)
    path.unlink(missing_ok=True)


def mjctl_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("mjctl")]


# -- the backend -----------------------------------------------------------------------------------------


def test_the_bucket_keeps_each_image_whole_under_its_task_row(tmp_path, moto, bucket):
    settings = make_settings(tmp_path, **s3_overrides(moto.url, bucket))
    store = result_store(settings)
    data = os.urandom(300_000)
    source = ImageSource("1700000000000001", "http://img.example/a.png", True, task_id=7)
    same_id_other_row = ImageSource("1700000000000001", "http://img.example/b.png", True, task_id=8)
    assert store.kind == "s3" and store.find(source) is None and store.open_image(source) is None

    write_image(store, source, data)
    name = row_key(source)
    assert moto.keys(bucket) == {f"mjctl/{name[:2]}/{name}": data}  # one object, named by the row
    assert store.find(same_id_other_row) is None and store.find(source.mj_id) is None
    found = store.find(source)
    assert (found.content_type, found.size) == ("image/png", len(data))
    assert cache_files(settings) == []  # the download was spooled locally and removed

    whole = store.open_image(source)
    assert b"".join(whole.chunks) == data and not whole.partial
    middle = store.open_image(source, ByteRange(10, 19))
    assert b"".join(middle.chunks) == data[10:20] and (middle.start, middle.end, middle.size) == (10, 19, len(data))
    tail = store.open_image(source, ByteRange(None, 5))
    assert b"".join(tail.chunks) == data[-5:]
    with pytest.raises(RangeNotSatisfiable) as past:
        store.open_image(source, ByteRange(len(data), None))
    assert past.value.size == len(data)

    link = store.presign(source, 60)
    assert httpx.get(link).content == data and store.presign(same_id_other_row, 60) is None

    # Objects that are not images mjctl wrote are neither counted nor pruned.
    moto.client().put_object(Bucket=bucket, Key="mjctl/notes.txt", Body=b"keep")
    moto.client().put_object(Bucket=bucket, Key="elsewhere/ab/" + "a" * 40, Body=b"keep")
    stats = store.stats()
    assert (stats["store"], stats["files"], stats["bytes"]) == (f"s3://{bucket}/mjctl", 1, len(data))
    assert store.prune(3600)["kept"] == 1
    pruned = store.prune(60, now=time.time() + 3600)
    assert (pruned["removed"], pruned["removed_bytes"], pruned["kept"]) == (1, len(data), 0)
    assert set(moto.keys(bucket)) == {"mjctl/notes.txt", "elsewhere/ab/" + "a" * 40}


def test_a_stored_image_is_read_on_a_presigned_link_and_anything_else_is_asked_of_the_client(tmp_path, moto, bucket):
    """Serving reads the object with one plain GET on a presigned link (botocore's per-call work is the
    hot path's biggest cost); a missing object, a range past the end and a truncated read still mean what
    they mean through the client."""
    store = result_store(make_settings(tmp_path, **s3_overrides(moto.url, bucket)))
    data = os.urandom(3 * 1024 * 1024 + 17)  # several chunks
    source = ImageSource("1700000000000002", "http://img.example/c.png", True, task_id=9)
    write_image(store, source, data)
    calls: list[str] = []
    store.client().meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))

    whole = store.open_image(source)
    assert b"".join(whole.chunks) == data and calls == []
    part = store.open_image(source, ByteRange(5, 1024 * 1024 + 5))
    assert b"".join(part.chunks) == data[5:1024 * 1024 + 6] and calls == []

    missing = ImageSource("1700000000000003", "http://img.example/d.png", True, task_id=10)
    assert store.open_image(missing) is None and calls == ["GetObject"]
    with pytest.raises(RangeNotSatisfiable):
        store.open_image(source, ByteRange(len(data) + 1, None))

    # A read that breaks off part-way ends in ImageTruncated, never as if the image were complete.
    cut = store.open_image(source)
    first = next(cut.chunks)
    cut.close()
    with pytest.raises(ImageTruncated):
        for _ in cut.chunks:
            pass
    assert len(first) < len(data)


# -- serving ---------------------------------------------------------------------------------------------


def test_an_image_is_written_to_the_bucket_and_served_from_it_after_the_link_expired(tmp_path, moto, bucket, sim):
    server, live = make_live(tmp_path, **s3_overrides(moto.url, bucket))
    try:
        task_id, url = finished_image_url(sim)
        live.add_task(task_id, url)
        direct = httpx.get(url).content
        first = live.image(task_id)
        assert first.status_code == 200 and first.content == direct and first.headers["x-cache"] == "MISS"
        # Uploaded once the last byte went out: one object, and no image file in the local folder.
        wait_until(lambda: len(moto.keys(bucket)) == 1, message="the image reaches the bucket")
        assert list(moto.keys(bucket).values()) == [direct] and cache_files(live.settings) == []

        with expired_links(sim):
            assert httpx.get(url).status_code == 403
            again = live.image(task_id)
            assert again.status_code == 200 and again.content == direct and again.headers["x-cache"] == "HIT"
            assert again.headers["accept-ranges"] == "bytes" and again.headers["etag"] == first.headers["etag"]
            assert live.image(task_id, headers={"If-None-Match": first.headers["etag"]}).status_code == 304

            part = live.image(task_id, headers={"Range": "bytes=100-199"})
            assert part.status_code == 206 and part.content == direct[100:200]
            assert part.headers["content-range"] == f"bytes 100-199/{len(direct)}"
            assert part.headers["content-length"] == "100"
            beyond = live.image(task_id, headers={"Range": f"bytes={len(direct)}-"})
            assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(direct)}"
            assert beyond.json()["success"] is False
            stale = live.image(task_id, headers={"Range": "bytes=0-9", "If-Range": '"another"'})
            assert stale.status_code == 200 and stale.content == direct
    finally:
        live.http.close()
        server.stop()


def test_redirect_hands_out_a_presigned_link_to_a_stored_image(tmp_path, moto, bucket, sim):
    server, live = make_live(tmp_path, **s3_overrides(moto.url, bucket, images__redirect=True,
                                                      images__redirect_seconds=60))
    try:
        task_id, url = finished_image_url(sim)
        live.add_task(task_id, url)
        direct = httpx.get(url).content
        first = live.image(task_id)  # not in the bucket yet: proxied from the upstream, and written
        assert first.status_code == 200 and first.content == direct
        wait_until(lambda: len(moto.keys(bucket)) == 1, message="the image reaches the bucket")
        moved = live.image(task_id)
        assert moved.status_code == 302 and moved.headers["cache-control"] == "no-store"
        link = moved.headers["location"]
        assert link.startswith(f"{moto.url}/{bucket}/mjctl/") and "X-Amz-Expires=60" in link
        with expired_links(sim):
            assert httpx.get(link).content == direct
    finally:
        live.http.close()
        server.stop()


# -- faults ----------------------------------------------------------------------------------------------


class SilentStore:
    """A store that accepts connections and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)  # never accepted: the kernel completes the handshakes, nobody reads
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def stop(self):
        self.sock.close()


@pytest.fixture
def fault(request, moto):
    """(endpoint, bucket, words the 502 says) of a store that cannot be used, and how."""
    kind = request.param
    if kind == "stopped":
        yield closed_port_url(), "img-stopped", "cannot connect"
    elif kind == "slow":
        silent = SilentStore()
        yield silent.url, "img-slow", "no answer"
        silent.stop()
    elif kind == "no_bucket":
        yield moto.url, f"img-missing-{uuid.uuid4().hex[:8]}", "does not exist"
    else:  # bad credentials: a server checking them (after the one request that creates the bucket)
        strict = MotoServer(auth_after=1)
        strict.create_bucket("img-strict")
        yield strict.url, "img-strict", "access refused"
        strict.stop()


@pytest.mark.parametrize("fault", ["stopped", "slow", "no_bucket", "bad_credentials"], indirect=True)
def test_a_store_that_cannot_be_used_costs_one_log_line_and_a_quick_502(tmp_path, sim, caplog, fault):
    endpoint, bucket, words = fault
    server, live = make_live(tmp_path, **s3_overrides(endpoint, bucket))
    try:
        fresh_id, fresh_url = finished_image_url(sim)
        live.add_task(fresh_id, fresh_url)
        old_id, old_url = finished_image_url(sim)
        live.add_task(old_id, old_url)
        caplog.set_level(logging.INFO)

        # The upstream's link still works: the image is served from it, not kept.
        caplog.clear()
        served = live.image(fresh_id)
        assert served.status_code == 200 and served.content == httpx.get(fresh_url).content
        wait_until(lambda: mjctl_warnings(caplog), message="the store's fault is logged")
        assert len(mjctl_warnings(caplog)) == 1 and words in mjctl_warnings(caplog)[0]

        with expired_links(sim):
            time.sleep(0.05)
            caplog.clear()
            began = time.monotonic()
            answer = live.image(old_id)
            took = time.monotonic() - began
            assert answer.status_code == 502 and answer.headers["content-type"] == "application/json"
            message = answer.json()["message"]
            assert answer.json()["success"] is False and "403" in message and words in message, message
            assert took < 1.0 + SLACK  # one attempt of at most the 1 s timeouts, or none while the store is down
            assert len(mjctl_warnings(caplog)) == 1
        assert not any(r.exc_info for r in caplog.records)
    finally:
        live.http.close()
        server.stop()


def test_a_full_spool_disk_serves_the_image_unkept_and_the_prefetch_tries_again(tmp_path, moto, bucket, sim,
                                                                                monkeypatch, caplog):
    full = tmp_path / "full.part"

    def temp_file(self):  # a real ENOSPC on the first write: the spool file is /dev/full
        full.unlink(missing_ok=True)
        full.symlink_to("/dev/full")
        return open(full, "wb", buffering=0), full

    server, live = make_live(tmp_path, **s3_overrides(moto.url, bucket))
    prefetcher = ImagePrefetcher(live.settings, workers=1, retry_delays=(0.2,) * 50)
    caplog.set_level(logging.INFO)
    try:
        task_id, url = finished_image_url(sim)
        task = live.add_task(task_id, url)
        with monkeypatch.context() as patched:
            patched.setattr(ImageCache, "temp_file", temp_file)
            served = live.image(task_id)
            assert served.status_code == 200 and served.content == httpx.get(url).content
            wait_until(lambda: mjctl_warnings(caplog), message="the full disk is logged")
            assert len(mjctl_warnings(caplog)) == 1 and "No space" in mjctl_warnings(caplog)[0]
            assert moto.keys(bucket) == {}

            prefetcher.submit(ImageSource.from_task(task))
            wait_until(lambda: prefetcher.counts["retried"] >= 1, message="the prefetch is tried again later")
        wait_until(lambda: prefetcher.counts["fetched"] == 1, message="stored once the disk has room")
        assert list(moto.keys(bucket).values()) == [served.content]
    finally:
        prefetcher.stop()
        live.http.close()
        server.stop()


def test_prefetch_retries_while_the_store_is_down_without_blocking(tmp_path, sim, caplog):
    down = MotoServer()
    port = down.port
    down.stop()
    settings = make_settings(tmp_path, **s3_overrides(f"http://127.0.0.1:{port}", "img-retry"))
    task_id, url = finished_image_url(sim)
    direct = httpx.get(url).content
    prefetcher = ImagePrefetcher(settings, workers=1, retry_delays=(0.2,) * 50)
    prefetcher._forwarder.store.down_seconds = 0.1
    caplog.set_level(logging.INFO)
    back = None
    try:
        began = time.monotonic()
        assert prefetcher.submit(ImageSource(task_id, url, True, task_id=1))
        assert time.monotonic() - began < 0.1
        wait_until(lambda: prefetcher.counts["retried"] >= 2, message="the prefetch is retried")
        assert prefetcher.retries_waiting() == 1
        assert any("cannot connect" in m and "trying again in 0.2 s" in m for m in mjctl_warnings(caplog))

        back = MotoServer(port)  # the store comes back where it was
        back.create_bucket("img-retry")
        wait_until(lambda: prefetcher.counts["fetched"] == 1, message="the image is stored once the store is back")
        assert list(back.keys("img-retry").values()) == [direct] and prefetcher.retries_waiting() == 0
    finally:
        prefetcher.stop()
        if back is not None:
            back.stop()


# -- the command line ------------------------------------------------------------------------------------


def test_migrate_copies_the_local_folder_into_the_bucket_and_resumes(tmp_path, moto, bucket, cli):
    local = ImageCache(make_settings(tmp_path).images.cache_dir)
    sources = [ImageSource(f"17000000000000{i:02d}", f"http://img.example/{i}.png", True, task_id=i)
               for i in range(1, 5)]
    blobs = {row_key(s): os.urandom(1000 + i) for i, s in enumerate(sources)}
    for source in sources[:3]:
        write_image(local, source, blobs[row_key(source)])
    # A file an early version cached under the bare upstream id of the one task that has it.
    from mjctl import accounts
    from mjctl.db import open_store

    open_store(make_settings(tmp_path))
    user, _ = accounts.create_user("erin")
    legacy_task = Task.create(user_id=user.id, channel_id=1, mj_id="1700000000000099", status="SUCCESS",
                              image_url="http://img.example/99.png", unfinished=0)
    legacy_name = local.legacy_key("1700000000000099")
    legacy = local.directory / legacy_name[:2] / f"{legacy_name}.png"
    legacy.parent.mkdir(parents=True, exist_ok=True)
    legacy.write_bytes(b"an early version's file")
    blobs[row_key(ImageSource.from_task(legacy_task))] = b"an early version's file"
    env = {"MJCTL_IMAGES_S3_ENDPOINT_URL": moto.url, "MJCTL_IMAGES_S3_REGION": "us-east-1"}
    to = f"s3://{bucket}/migrated"

    first = cli("images", "migrate", "--to", to, "--json", env=env)
    assert first.exit_code == 0, first.output
    assert {k: json.loads(first.stdout)[k] for k in ("total", "copied", "skipped", "claimed")} == {
        "total": 4, "copied": 4, "skipped": 0, "claimed": 1}

    # Interrupted half-way, say: one object never arrived, and a fourth image was cached since.
    name = row_key(sources[0])
    moto.client().delete_object(Bucket=bucket, Key=f"migrated/{name[:2]}/{name}")
    write_image(local, sources[3], blobs[row_key(sources[3])])
    again = cli("images", "migrate", "--to", to, env=env)
    assert again.exit_code == 0, again.output
    assert "Copied 2 image(s)" in again.stderr and "3 were there already" in again.stderr
    assert moto.keys(bucket) == {f"migrated/{n[:2]}/{n}": data for n, data in blobs.items()}
    assert len(cache_files(make_settings(tmp_path))) == 5  # the local files stay

    s3_env = {**env, "MJCTL_IMAGES_STORE": to}
    stats = json.loads(cli("images", "stats", "--json", env=s3_env).stdout)
    assert (stats["files"], stats["bytes"]) == (5, sum(len(b) for b in blobs.values()))
    pruned = json.loads(cli("images", "prune", "--older-than", "1d", "--json", env=s3_env).stdout)
    assert (pruned["store"], pruned["removed"], pruned["kept"]) == (to, 0, 5)
    assert "s3://" in cli("images", "stats", env=s3_env).stdout

    bad = cli("images", "migrate", "--to", "ftp://elsewhere", env=env)
    assert bad.exit_code == 2 and "s3://BUCKET/PREFIX" in bad.stderr
    unreachable = cli("images", "migrate", "--to", to, env={**env, "MJCTL_IMAGES_S3_ENDPOINT_URL": closed_port_url(),
                                                           "MJCTL_IMAGES_S3_CONNECT_TIMEOUT": "0.5"})
    assert unreachable.exit_code == 1 and "cannot connect" in unreachable.stderr
    assert "Traceback" not in unreachable.output


def test_config_shows_s3_credentials_redacted_and_refuses_a_bad_store(cli):
    shown = cli("config", "show", "--json", env={"MJCTL_IMAGES_S3_SECRET_ACCESS_KEY": "very-secret",
                                                 "MJCTL_IMAGES_S3_ACCESS_KEY_ID": "AKIDEXAMPLE"})
    assert shown.exit_code == 0 and "very-secret" not in shown.stdout and "AKIDEXAMPLE" not in shown.stdout
    bad = cli("config", "show", env={"MJCTL_IMAGES_STORE": "s3://No_Such Bucket"})
    assert bad.exit_code == 2 and "[images] store" in bad.stderr and "Traceback" not in bad.output
    endpoint = cli("config", "show", env={"MJCTL_IMAGES_S3_ENDPOINT_URL": "minio.internal:9000"})
    assert endpoint.exit_code == 2 and "[images] s3_endpoint_url" in endpoint.stderr


# -- two hosts -------------------------------------------------------------------------------------------


def test_two_hosts_serve_an_image_one_host_prefetched_after_the_link_expired(tmp_path, moto, bucket):
    """Two servers with their own local folders, one database, one bucket; the poller runs beside the first."""
    from mjctl.db import open_store
    from mjctl.httpserver import ServerThread
    from mjctl.poller import drain_prefetch, poll_once
    from mjctl.server import make_bridge
    shared = s3_overrides(moto.url, bucket)
    host_a = make_settings(tmp_path, images__cache_dir=str(tmp_path / "a-images"), **shared)
    host_b = make_settings(tmp_path, images__cache_dir=str(tmp_path / "b-images"), **shared)
    open_store(host_a)
    relay = start_relay(host_a)
    server_b = ServerThread(make_bridge(host_b)).start()
    try:
        submitted = relay.submit("imagine", {"prompt": "a heron at dawn"})
        assert submitted.status_code == 200 and submitted.json()["code"] == 1, submitted.text

        def finished():
            poll_once(host_a)
            return Task.get().status == "SUCCESS"

        wait_until(finished, message="the poller sees the task succeed")
        assert drain_prefetch(host_a)
        task = Task.get()
        original = httpx.get(task.image_url).content
        assert len(moto.keys(bucket)) == 1

        link = images.image_url_for(host_a)(task)
        path = link[link.index("/mj/image/"):]
        with expired_links(relay.sim):
            assert httpx.get(task.image_url).status_code == 403
            answers = [httpx.get(base + path, timeout=10) for base in (relay.url, server_b.url)]
        assert [a.status_code for a in answers] == [200, 200]
        assert answers[0].content == answers[1].content == original
        assert [a.headers["x-cache"] for a in answers] == ["HIT", "HIT"]
        assert cache_files(host_a) == [] and cache_files(host_b) == []  # neither host keeps a copy
        assert images.verify_task_image(crypto.server_secret(host_b), task.id, task.mj_id,
                                        link.rpartition("sig=")[2])
    finally:
        server_b.stop()
        relay.server.stop()
        relay.sim.stop()
        from mjctl.images import stop_shared_prefetchers

        stop_shared_prefetchers()
