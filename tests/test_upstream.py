"""The midjourney-proxy client: every answer shape (docs/upstream.md) becomes a typed outcome."""

from __future__ import annotations

import json

import httpx
import pytest

from mjctl.sim import run_simulator_in_thread
from mjctl.upstream import (
    SubmitResult,
    UpstreamClient,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamUnauthorized,
    UpstreamUnavailable,
    task_is_finished,
)
from tests.helpers import wait_until

SECRET = "s3cr3t-value"




def mock_client(handler) -> UpstreamClient:
    return UpstreamClient("http://upstream.test", SECRET, transport=httpx.MockTransport(handler))


def answer(status: int, body=None, *, text: str | None = None, headers=None):
    def handler(request: httpx.Request) -> httpx.Response:
        if text is not None:
            return httpx.Response(status, text=text, headers=headers)
        if body is None:
            return httpx.Response(status, headers=headers)
        return httpx.Response(status, json=body, headers=headers)

    return handler


# -- envelopes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [1, 21, 22])
def test_accepted_codes(code):
    body = {"code": code, "description": "ok", "result": "1730000000000123", "properties": {"numberOfQueues": 2}}
    result = mock_client(answer(200, body)).submit("imagine", {"prompt": "cat"})
    assert result == SubmitResult(code, "ok", "1730000000000123", {"numberOfQueues": 2}, 200)
    assert result.accepted and result.task_id == "1730000000000123"


@pytest.mark.parametrize(
    ("status", "code"), [(200, 3), (404, 3), (200, 4), (400, 4), (200, 9), (200, 23), (200, 24)]
)
def test_rejections_are_results_not_errors(status, code):
    body = {"code": code, "description": "no", "result": None, "properties": None}
    result = mock_client(answer(status, body)).submit("action", {"taskId": "1", "customId": "x"})
    assert not result.accepted
    assert (result.code, result.http_status, result.result, result.properties) == (code, status, None, {})


def test_submit_sends_secret_json_and_prefix():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.update(path=request.url.path, secret=request.headers.get("mj-api-secret"),
                    body=json.loads(request.content))
        return httpx.Response(200, json={"code": 1, "description": "", "result": 17, "properties": {}})

    result = mock_client(handler).submit("imagine", {"prompt": "cat"}, prefix="/mj-relax")
    assert seen == {"path": "/mj-relax/mj/submit/imagine", "secret": SECRET, "body": {"prompt": "cat"}}
    assert result.task_id == "17"
    with pytest.raises(ValueError):
        mock_client(handler).submit("paint", {})
    with pytest.raises(ValueError):
        mock_client(handler).submit("imagine", {}, prefix="/mj-slow")


def test_requests_go_under_the_base_urls_path_and_the_parsed_urls_kept_stay_few():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers.get("content-type"), request.content))
        if request.method == "POST":
            return httpx.Response(200, text="[]")  # not a SubmitResult: the error names the whole URL once
        return httpx.Response(200, json={"id": request.url.path.split("/")[-2], "status": "SUBMITTED"})

    from mjctl.upstream import MAX_CACHED_URLS

    client = UpstreamClient("http://upstream.test/proxy/", SECRET, transport=httpx.MockTransport(handler))
    for n in range(MAX_CACHED_URLS * 2):
        assert client.fetch(f"17300000000{n:05d}")["id"] == f"17300000000{n:05d}"
    with pytest.raises(UpstreamProtocolError, match=r"^http://upstream.test/proxy/mj/submit/imagine answered"):
        client.submit("imagine", {"prompt": "猫"})
    assert seen[0] == ("http://upstream.test/proxy/mj/task/1730000000000000/fetch", None, b"")
    assert seen[-1][:2] == ("http://upstream.test/proxy/mj/submit/imagine", "application/json")
    assert json.loads(seen[-1][2]) == {"prompt": "猫"}
    assert len(client._urls) <= MAX_CACHED_URLS


# -- errors -----------------------------------------------------------------------------------------------


def assert_clean(exc: UpstreamError):
    assert SECRET not in str(exc) and SECRET not in exc.message


@pytest.mark.parametrize("handler", [answer(401), answer(401, text="Unauthorized"), answer(401, {"error": "no"})])
def test_401_in_any_shape_is_unauthorized(handler):
    with pytest.raises(UpstreamUnauthorized) as info:
        mock_client(handler).submit("imagine", {"prompt": "cat"})
    assert info.value.status == 401
    assert_clean(info.value)


@pytest.mark.parametrize(("header", "expected"), [({"Retry-After": "3"}, 3.0), (None, None)])
def test_429_is_rate_limited(header, expected):
    with pytest.raises(UpstreamRateLimited) as info:
        mock_client(answer(429, headers=header)).list_by_condition(["1"])
    assert info.value.retry_after == expected


@pytest.mark.parametrize("status", [500, 502, 503])
def test_5xx_is_unavailable(status):
    with pytest.raises(UpstreamUnavailable) as info:
        mock_client(answer(status, text="<html>bad gateway</html>")).fetch("1")
    assert info.value.status == status


@pytest.mark.parametrize("exc", [httpx.ConnectError, httpx.ReadTimeout, httpx.ConnectTimeout,
                                 httpx.RemoteProtocolError])
def test_transport_failures_are_unavailable_and_never_show_the_secret(exc):
    def handler(request):
        raise exc(f"failed while sending {SECRET}", request=request)

    with pytest.raises(UpstreamUnavailable) as info:
        mock_client(handler).submit("imagine", {"prompt": "x"})
    assert info.value.status is None
    assert_clean(info.value)


@pytest.mark.parametrize(
    "handler",
    [
        answer(200, text="{not json"),
        answer(200, {"success": False, "code": -1, "message": "The JSON value could not be converted."}),
        answer(200, ["not", "an", "envelope"]),
        answer(200, {"code": "oops", "description": "x"}),
        answer(404, text="<html>Not Found</html>"),
        answer(200),
    ],
)
def test_protocol_errors_on_submit(handler):
    with pytest.raises(UpstreamProtocolError) as info:
        mock_client(handler).submit("imagine", {"prompt": "cat"})
    assert_clean(info.value)


def test_csharp_error_object_message_is_kept():
    handler = answer(200, {"success": False, "code": -1, "message": "bad json here"})
    with pytest.raises(UpstreamProtocolError, match="bad json here"):
        mock_client(handler).submit("imagine", {"prompt": "cat"})


# -- fetch and lists --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "handler", [answer(200), answer(204), answer(404), answer(404, {"code": 3, "description": "not found"})]
)
def test_fetch_unknown_is_none(handler):
    assert mock_client(handler).fetch("1730000000000123") is None


def test_fetch_returns_the_camelcase_task_untouched():
    task = {"id": "1730000000000123", "status": "IN_PROGRESS", "progress": "31%", "submitTime": 1730000000000}
    assert mock_client(answer(200, task)).fetch("1730000000000123") == task
    with pytest.raises(UpstreamProtocolError):
        mock_client(answer(200, [task])).fetch("1")
    with pytest.raises(ValueError):
        mock_client(answer(200, task)).fetch("../etc")


def test_list_by_condition_sends_ids_and_tolerates_empty_answers():
    seen = {}

    def handler(request):
        seen["body"] = json.loads(request.content)
        return httpx.Response(200, json=[{"id": "2"}, {"id": "1"}])

    assert mock_client(handler).list_by_condition(["1", "2", "3"]) == [{"id": "2"}, {"id": "1"}]
    assert seen["body"] == {"ids": ["1", "2", "3"]}
    assert mock_client(answer(200)).list_by_condition(["1"]) == []
    assert mock_client(answer(200, None)).list_tasks() == []
    for bad in (answer(200, {"ids": []}), answer(200, [1, 2]), answer(400, {"code": 4, "description": "x"})):
        with pytest.raises(UpstreamProtocolError):
            mock_client(bad).list_by_condition(["1"])


def test_image_seed_is_a_submit_result():
    result = mock_client(answer(200, {"code": 1, "description": "成功", "result": "123456"})).image_seed("1")
    assert result.code == 1 and result.result == "123456"


def test_task_is_finished_reads_status_only():
    assert task_is_finished({"status": "SUCCESS", "progress": "100%"})
    assert task_is_finished({"status": "FAILURE", "progress": "100%"})
    assert task_is_finished({"status": "CANCEL"})
    assert not task_is_finished({"status": "IN_PROGRESS", "progress": "100%"})
    assert not task_is_finished({"status": None})
    assert not task_is_finished({})


# -- probe ------------------------------------------------------------------------------------------------


def test_probe_outcomes():
    ok = mock_client(answer(200, [])).probe()
    assert (ok.reachable, ok.authorized) == (True, True) and ok.rtt_ms >= 0
    denied = mock_client(answer(401)).probe()
    assert (denied.reachable, denied.authorized) == (True, False)
    broken = mock_client(answer(502)).probe()
    assert (broken.reachable, broken.authorized) == (True, None)
    weird = mock_client(answer(200, text="<html>")).probe()
    assert (weird.reachable, weird.authorized) == (True, None)

    def refuse(request):
        raise httpx.ConnectError("refused", request=request)

    down = mock_client(refuse).probe()
    assert (down.reachable, down.authorized) == (False, None)
    assert SECRET not in down.message


# -- against the simulator --------------------------------------------------------------------------------


@pytest.mark.parametrize("flavor", ["java", "csharp"])
def test_client_against_the_simulator(flavor):
    with run_simulator_in_thread(secret=SECRET, step_seconds=0.01, flavor=flavor, seed=7) as sim:
        with UpstreamClient(sim.url, SECRET) as client:
            assert client.probe().authorized is True
            submitted = client.submit("imagine", {"prompt": "a lighthouse", "state": "abc"}, prefix="/mj-fast")
            assert submitted.accepted and submitted.code == 1
            task = wait_until(lambda: (t := client.fetch(submitted.task_id)) and task_is_finished(t) and t)
            assert task["status"] == "SUCCESS" and task["state"] == "abc"
            assert client.fetch("1234567890123456") is None
            assert [t["id"] for t in client.list_by_condition([submitted.task_id, "nope"])] == [submitted.task_id]
            assert client.list_tasks()[0]["id"] == submitted.task_id
            assert client.image_seed(submitted.task_id).result
            unknown = client.submit("action", {"taskId": "1", "customId": "MJ::JOB::upsample::1::x"})
            assert unknown.code == 3 and unknown.http_status == (404 if flavor == "csharp" else 200)
            assert client.submit("imagine", {"prompt": "a bannedword here"}).code == 24
        with UpstreamClient(sim.url, "wrong") as wrong:
            with pytest.raises(UpstreamUnauthorized):
                wrong.fetch(submitted.task_id)
            assert wrong.probe().authorized is False


def test_client_maps_simulator_faults():
    with run_simulator_in_thread(secret=SECRET, step_seconds=0.01) as sim, UpstreamClient(sim.url, SECRET) as client:
        sim.sim.update({"rate_limit": 1.0})
        with pytest.raises(UpstreamRateLimited):
            client.list_tasks()
        sim.sim.update({"rate_limit": 0.0, "error_5xx": 1.0})
        with pytest.raises(UpstreamUnavailable):
            client.list_tasks()
        sim.sim.update({"error_5xx": 0.0, "unauthorized": 1.0})
        with pytest.raises(UpstreamUnauthorized):
            client.list_tasks()
    with run_simulator_in_thread(secret=SECRET, faults={"slow": 1.0}, slow_seconds=1.0) as sim:
        with UpstreamClient(sim.url, SECRET, timeout=0.2) as client:
            with pytest.raises(UpstreamUnavailable, match="timed out"):
                client.list_tasks()
