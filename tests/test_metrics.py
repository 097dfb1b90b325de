"""GET /metrics: the store's counters equal the store after a faulty simulated run, process metrics are
summed over `mjctl serve`'s worker processes, routes are patterns, and the endpoint needs an admin."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import free_port, wait_until
from tests.relay_helpers import start_relay


def samples(text: str) -> dict[str, list]:
    """metric sample name -> [(labels, value)]"""
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def total(found: dict, name: str, **labels) -> float:
    return sum(v for lab, v in found.get(name, []) if all(lab.get(k) == w for k, w in labels.items()))


@pytest.fixture
def faulty_run(store):
    from mjctl import accounts

    env = start_relay(store, fail_rate=0.25, faults={"error_5xx": 0.15, "late_fail": 0.2, "drop_ids": 0.1})
    _, admin = accounts.create_user("ops", role="admin")
    env.tokens["ops"] = admin
    yield env
    env.server.stop()
    env.sim.stop()


def test_store_counters_agree_with_the_store_after_a_faulty_simulated_run(faulty_run):
    from mjctl.models import Ledger, Task
    from mjctl.poller import poll_once, start_background

    env = faulty_run
    from mjctl import metrics

    before = samples(metrics.render().decode())  # process metrics outlive a test: compare differences
    for i in range(24):
        speed = "/mj-fast" if i % 3 else ""
        env.submit("imagine", {"prompt": f"fox {i}"}, user="alice" if i % 2 else "bob", prefix=speed)
    assert Task.select().count() > 0
    env.settings.poller = dataclasses.replace(env.settings.poller, interval=0.2)
    stop = threading.Event()
    poller = start_background(env.settings, stop)
    try:
        wait_until(lambda: not Task.select().where(Task.unfinished == 1).exists(), timeout=8, message="tasks finish")
    except AssertionError:
        pass  # stuck and forgotten tasks: the timeout below fails them
    finally:
        stop.set()
        poller.join(10)
    poll_once(env.settings, now=time.time() + 10 * env.settings.poller.task_timeout)  # time the rest out
    with env.client("ops") as client:
        client.get("/api/mj/self")
        client.get(f"/mj/task/{Task.select().first().mj_id}/fetch")
        client.get("/no/such/path")
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    found = samples(response.text)

    tasks = list(Task.select())
    refunds = list(Ledger.select().where(Ledger.kind == "refund"))
    charges = list(Ledger.select().where(Ledger.kind == "charge"))
    assert refunds, "the run must have refunded something for the check to mean anything"
    assert total(found, "mjctl_tasks_submitted_total") == len(tasks)
    fast = sum(t.mode == "FAST" for t in tasks)
    assert 0 < fast < len(tasks)
    assert total(found, "mjctl_tasks_submitted_total", channel="sim", mode="FAST") == fast
    assert total(found, "mjctl_tasks_submitted_total", channel="sim", mode="") == len(tasks) - fast
    assert total(found, "mjctl_refunds_total") == len(refunds)
    assert total(found, "mjctl_quota_refunded_total") == sum(r.amount for r in refunds)
    assert total(found, "mjctl_quota_charged_total") == -sum(c.amount for c in charges)
    for status in ("SUCCESS", "FAILURE", "CANCEL"):
        assert total(found, "mjctl_tasks_finished_total", status=status) == sum(t.status == status for t in tasks)
    assert total(found, "mjctl_unfinished_tasks", channel="sim") == sum(t.unfinished for t in tasks) == 0
    assert total(found, "mjctl_poll_cycle_seconds_count") > total(before, "mjctl_poll_cycle_seconds_count")
    assert total(found, "mjctl_channel_last_poll_timestamp_seconds", channel="sim") > 0
    def grew(name: str, **labels) -> float:
        return total(found, name, **labels) - total(before, name, **labels)

    assert grew("mjctl_upstream_request_seconds_count", channel="sim", operation="submit") >= len(tasks)
    assert grew("mjctl_upstream_request_seconds_count", channel="sim", operation="list_by_condition") > 0
    assert grew("mjctl_upstream_request_seconds_count", channel="sim", outcome="ok") > 0

    routes = {lab["route"] for lab, _ in found["mjctl_http_requests_total"]}
    assert not [r for r in routes if any(t.mj_id in r for t in tasks) or "no/such" in r], routes
    assert grew("mjctl_http_requests_total", route="/mj/submit/<kind>") == 8
    assert grew("mjctl_http_requests_total", route="/mj-fast/mj/submit/<kind>") == 16
    assert grew("mjctl_http_requests_total", route="/mj/task/<mj_id>/fetch") == 1
    assert grew("mjctl_http_requests_total", route="(unmatched)", status="404") == 1


def test_metrics_need_an_admin_token_unless_public(store):
    from mjctl import accounts
    from mjctl.server import create_app

    _, user = accounts.create_user("alice")
    _, admin = accounts.create_user("ops", role="admin")
    app = create_app(store)
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://mjctl") as client:
        assert client.get("/metrics").status_code == 401
        refused = client.get("/metrics", headers={"Authorization": f"Bearer {user}"})
        assert refused.status_code == 403 and refused.json()["success"] is False
        assert client.get("/metrics", headers={"Authorization": f"Bearer {admin}"}).status_code == 200
    store.metrics = dataclasses.replace(store.metrics, public=True)
    with httpx.Client(transport=httpx.WSGITransport(app=create_app(store)), base_url="http://mjctl") as client:
        public = client.get("/metrics")
    assert public.status_code == 200 and "mjctl_refunds_total 0.0" in public.text


def test_image_cache_results_are_counted(store):
    from mjctl import metrics

    before = samples(metrics.render().decode())
    metrics.observe_image_cache(True)
    metrics.observe_image_cache(False)
    metrics.observe_image_cache(False)
    after = samples(metrics.render().decode())
    assert total(after, "mjctl_image_cache_total", result="hit") - total(before, "mjctl_image_cache_total",
                                                                         result="hit") == 1
    assert total(after, "mjctl_image_cache_total", result="miss") - total(before, "mjctl_image_cache_total",
                                                                          result="miss") == 2


@pytest.mark.slow
def test_serve_workers_sum_their_metrics_and_the_run_folder_goes_away(tmp_path):
    """Two worker processes answer requests; every scrape, whichever worker answers it, counts them all."""
    port = free_port()
    env = {**os.environ, "MJCTL_DATABASE_URL": f"sqlite:///{tmp_path}/serve.db", "MJCTL_SERVER_SECRET": "t",
           "MJCTL_METRICS_PUBLIC": "true", "TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mjctl", "serve", "--port", str(port), "--workers", "2",
                             "--threads", "2", "--no-poll"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            try:
                return httpx.get(url + "/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None

        wait_until(up, timeout=30, message="server up")
        assert proc.poll() is None
        assert list(tmp_path.glob("mjctl-metrics-*")), "serve makes its run folder"
        for _ in range(30):  # a new connection each: the kernel spreads them over the workers
            assert httpx.get(url + "/api/mj/self").status_code == 401
        seen = set()
        for _ in range(8):
            found = samples(httpx.get(url + "/metrics").text)
            seen.add(total(found, "mjctl_http_requests_total", route="/api/mj/self", status="401"))
        assert seen == {30.0}
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert not list(tmp_path.glob("mjctl-metrics-*")), "the run folder is removed when serve ends"
