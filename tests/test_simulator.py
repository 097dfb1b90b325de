"""The simulated midjourney-proxy: codes, flavours, lifecycle, images, pushes and faults (docs/upstream.md)."""

from __future__ import annotations

import json
import struct
import threading
import time
import zlib

import httpx
import pytest

from mjctl.httpserver import ServerThread
from mjctl.sim import Simulator, run_simulator_in_thread
from mjctl.sim.tasks import PERCENTAGES, phase_at
from tests.helpers import wait_until

SECRET = "sim-secret"
STEP = 0.02




class Api:
    """A thin httpx client for the simulator with the secret set."""

    def __init__(self, handle, secret: str | None = SECRET):
        self.handle = handle
        self.sim: Simulator = handle.sim
        headers = {"mj-api-secret": secret} if secret else {}
        self.http = httpx.Client(base_url=handle.url, headers=headers, timeout=10)

    def submit(self, kind: str, body: dict, prefix: str = "") -> httpx.Response:
        return self.http.post(f"{prefix}/mj/submit/{kind}", json=body)

    def imagine(self, prompt: str = "a cat", **extra) -> str:
        reply = self.submit("imagine", {"prompt": prompt, **extra}).json()
        assert reply["code"] in (1, 22), reply
        return reply["result"]

    def fetch(self, task_id: str) -> dict:
        return self.http.get(f"/mj/task/{task_id}/fetch").json()

    def finished(self, task_id: str, timeout: float = 5.0) -> dict:
        return wait_until(lambda: (t := self.fetch(task_id))["status"] in ("SUCCESS", "FAILURE") and t, timeout)


@pytest.fixture
def make_api():
    handles = []

    def make(**opts) -> Api:
        opts.setdefault("step_seconds", STEP)
        opts.setdefault("seed", 1)
        handle = run_simulator_in_thread(**opts)
        handles.append(handle)
        return Api(handle, opts.get("secret", SECRET))

    yield make
    for handle in handles:
        handle.stop()


@pytest.fixture
def api(make_api) -> Api:
    return make_api()


def png_info(data: bytes) -> tuple[int, int, bytes]:
    """Width, height and pixel rows of a PNG, checking signature, CRCs, IHDR, IDAT and IEND."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, kinds, idat, width, height = 8, [], b"", 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body)
        kinds.append(kind)
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    rows = zlib.decompress(idat)
    assert len(rows) == (width * 3 + 1) * height
    return width, height, rows


# -- lifecycle --------------------------------------------------------------------------------------------


def test_imagine_runs_to_success_with_buttons_and_a_png(api):
    task_id = api.imagine("a red fox", state="order-7", notifyHook="http://127.0.0.1:9/hook")
    assert len(task_id) == 16 and task_id.isdigit()
    first = api.fetch(task_id)
    assert first["status"] in ("SUBMITTED", "IN_PROGRESS") and first["state"] == "order-7"
    task = api.finished(task_id)
    assert task["status"] == "SUCCESS" and task["progress"] == "100%" and task["failReason"] is None
    assert task["submitTime"] <= task["startTime"] < task["finishTime"]
    assert abs(task["submitTime"] / 1000 - time.time()) < 60  # milliseconds
    props = task["properties"]
    assert props["finalPrompt"].startswith("a red fox") and props["notifyHook"] == "http://127.0.0.1:9/hook"
    assert props["discordInstanceId"]
    labels = [b["label"] or b["emoji"] for b in task["buttons"]]
    assert labels == ["U1", "U2", "U3", "U4", "🔄", "V1", "V2", "V3", "V4"]
    custom = [b["customId"] for b in task["buttons"]]
    assert custom[0].startswith("MJ::JOB::upsample::1::") and custom[5].startswith("MJ::JOB::variation::1::")
    assert custom[4].startswith("MJ::JOB::reroll::0::") and custom[4].endswith("::SOLO")
    assert all(b["type"] == 2 for b in task["buttons"])

    assert task["imageUrl"].startswith(api.handle.url + f"/attachments/{task_id}/")
    image = httpx.get(task["imageUrl"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert int(image.headers["content-length"]) == len(image.content)
    png_info(image.content)

    other = api.finished(api.imagine("a blue fox"))
    assert httpx.get(other["imageUrl"]).content != image.content


def test_progress_follows_the_documented_steps(api):
    task_id = api.imagine()
    task = api.sim.engine.tasks[task_id]
    seen = [phase_at(task, task.start_at + (k + 0.5) * task.step) for k in range(9)]
    assert [p.status for p in seen] == ["SUBMITTED"] + ["IN_PROGRESS"] * 6 + ["SUCCESS"] * 2
    assert [p.progress for p in seen[:8]] == ["0%", *PERCENTAGES, "100%"]
    assert phase_at(task, task.start_at - 1).status == "NOT_START"


def test_upscale_finishes_in_one_step_without_percentages(api):
    parent = api.finished(api.imagine())
    reply = api.submit("action", {"taskId": parent["id"], "customId": parent["buttons"][1]["customId"]}).json()
    assert reply["code"] == 1
    upscale = api.sim.engine.tasks[reply["result"]]
    progresses = {phase_at(upscale, upscale.start_at + (k + 0.5) * upscale.step).progress for k in range(3)}
    assert progresses == {"0%", "100%"}
    done = api.finished(reply["result"])
    assert done["action"] == "UPSCALE" and done["status"] == "SUCCESS"
    assert any("Outpaint" in b["customId"] for b in done["buttons"])


def test_ids_are_unique(api):
    ids = [api.submit("shorten", {"prompt": f"p{i}"}).json()["result"] for i in range(13)]
    assert len(set(ids)) == 13


# -- codes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flavor", "full_code"), [("java", 23), ("csharp", 9)])
def test_queue_codes_1_22_and_full(make_api, flavor, full_code):
    api = make_api(step_seconds=5.0, flavor=flavor, concurrency=3, queue_size=10)
    replies = [api.submit("imagine", {"prompt": f"p{i}"}).json() for i in range(14)]
    assert [r["code"] for r in replies] == [1] * 3 + [22] * 10 + [full_code]
    assert [r["properties"]["numberOfQueues"] for r in replies[3:13]] == list(range(1, 11))
    assert replies[13]["result"] is None and "队列已满" in replies[13]["description"]
    assert api.fetch(replies[3]["result"])["status"] == "NOT_START"
    assert api.fetch(replies[3]["result"])["progress"] is None


def test_more_accounts_more_slots(make_api):
    api = make_api(step_seconds=5.0, accounts=2, concurrency=1, queue_size=0)
    codes = [api.submit("imagine", {"prompt": f"p{i}"}).json()["code"] for i in range(3)]
    assert codes == [1, 1, 23]


def test_modal_code_21_then_modal_submit(api):
    grid = api.finished(api.imagine())
    up = api.submit("action", {"taskId": grid["id"], "customId": grid["buttons"][0]["customId"]}).json()
    upscaled = api.finished(up["result"])
    zoom = next(b["customId"] for b in upscaled["buttons"] if "CustomZoom" in b["customId"])
    reply = api.submit("action", {"taskId": upscaled["id"], "customId": zoom}).json()
    assert reply["code"] == 21 and reply["result"]
    assert api.fetch(reply["result"])["status"] == "MODAL"
    assert api.submit("modal", {"taskId": grid["id"]}).json()["code"] == 4  # not a modal task
    modal = api.submit("modal", {"taskId": reply["result"], "prompt": "wider --zoom 2"}).json()
    assert modal == {**modal, "code": 1, "result": reply["result"]}
    done = api.finished(reply["result"])
    assert done["action"] == "ZOOM" and done["prompt"] == "wider --zoom 2"


def test_banned_prompt_code_24(api):
    reply = api.submit("imagine", {"prompt": "a BannedWord cat"}).json()
    assert reply["code"] == 24 and reply["result"] is None
    assert reply["properties"] == {"promptEn": "a BannedWord cat", "bannedWord": "bannedword"}


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("imagine", {}),
        ("imagine", {"prompt": "   "}),
        ("change", {"taskId": "PARENT", "action": "UPSCALE", "index": 5}),
        ("change", {"taskId": "PARENT", "action": "ZOOM", "index": 1}),
        ("simple-change", {"content": "PARENT U9"}),
        ("blend", {"base64Array": ["data:image/png;base64,AAAA"]}),
        ("blend", {"base64Array": ["data:image/png;base64,AAAA"] * 2, "dimensions": "HUGE"}),
        ("describe", {}),
        ("action", {"taskId": "PARENT"}),
        ("action", {"taskId": "PARENT", "customId": "MJ::NOPE"}),
    ],
)
def test_validation_errors_code_4(api, kind, body):
    parent = api.finished(api.imagine())
    body = json.loads(json.dumps(body).replace("PARENT", parent["id"]))
    response = api.submit(kind, body)
    assert response.status_code == 200
    assert response.json()["code"] == 4 and response.json()["result"] is None


def test_change_simple_change_blend_describe_accepted(api):
    parent = api.finished(api.imagine())
    assert api.submit("change", {"taskId": parent["id"], "action": "VARIATION", "index": 2}).json()["code"] == 1
    assert api.submit("simple-change", {"content": f"{parent['id']} U2"}).json()["code"] == 1
    blend = api.submit("blend", {"base64Array": ["data:image/png;base64,AAAA"] * 2, "dimensions": "PORTRAIT"})
    describe = api.submit("describe", {"base64": "data:image/png;base64,AAAA"})
    assert blend.json()["code"] in (1, 22) and describe.json()["code"] in (1, 22)
    described = api.finished(describe.json()["result"])
    assert described["action"] == "DESCRIBE" and "1️⃣" in described["promptEn"]


@pytest.mark.parametrize(("flavor", "status"), [("java", 200), ("csharp", 404)])
def test_unknown_parent_code_3(make_api, flavor, status):
    api = make_api(flavor=flavor)
    response = api.submit("action", {"taskId": "1730000000000999", "customId": "MJ::JOB::upsample::1::x"})
    assert response.status_code == status and response.json()["code"] == 3
    assert api.http.get("/mj/task/1730000000000999/image-seed").json()["code"] == 3


# -- flavours ---------------------------------------------------------------------------------------------


def test_java_shapes(api):
    bad = api.http.post("/mj/submit/imagine", content=b"{nope", headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and bad.json()["code"] == 4
    unknown = api.http.get("/mj/task/1730000000000999/fetch")
    assert unknown.status_code == 200 and unknown.content == b""
    denied = httpx.get(api.handle.url + "/mj/task/list")
    assert denied.status_code == 401 and denied.content == b""
    assert httpx.get(api.handle.url + "/mj/task/list", headers={"Authorization": SECRET}).status_code == 401


def test_csharp_shapes(make_api):
    api = make_api(flavor="csharp")
    bad = api.http.post("/mj/submit/imagine", content=b"{nope", headers={"Content-Type": "application/json"})
    assert bad.status_code == 200 and bad.json()["success"] is False and bad.json()["code"] == -1
    assert bad.json()["message"]
    assert api.http.get("/mj/task/1730000000000999/fetch").status_code == 204
    denied = httpx.get(api.handle.url + "/mj/task/list")
    assert denied.status_code == 401 and denied.text and denied.headers["content-type"].startswith("text/plain")
    bare = httpx.get(api.handle.url + "/mj/task/list", headers={"Authorization": SECRET})
    assert bare.status_code == 200
    task = api.fetch(api.imagine())
    assert {"botType", "mode", "instanceId"} <= task.keys()


def test_no_secret_means_no_auth(make_api):
    api = make_api(secret=None)
    assert httpx.get(api.handle.url + "/mj/task/list").status_code == 200


# -- queries ----------------------------------------------------------------------------------------------


def test_list_by_condition_known_only_and_not_in_request_order(api):
    ids = [api.imagine(f"p{i}") for i in range(4)]
    answer = api.http.post("/mj/task/list-by-condition", json={"ids": ids + ["1730000000000999"]}).json()
    assert sorted(t["id"] for t in answer) == sorted(ids)
    assert [t["id"] for t in answer] != ids
    assert api.http.post("/mj/task/list-by-condition", json={}).json() == []


def test_list_returns_the_latest_100_and_image_seed(make_api):
    api = make_api(concurrency=200, queue_size=0, step_seconds=5.0)
    ids = [api.imagine(f"p{i}") for i in range(105)]
    listed = api.http.get("/mj/task/list").json()
    assert len(listed) == 100 and {t["id"] for t in listed} == set(ids[5:])
    assert api.http.get(f"/mj/task/{ids[0]}/image-seed").json()["code"] == 4  # not finished yet


def test_image_seed(api):
    task_id = api.finished(api.imagine())["id"]
    seed = api.http.get(f"/mj/task/{task_id}/image-seed").json()
    assert seed["code"] == 1 and seed["result"].isdigit()


def test_speed_prefixes_are_served_and_counted(api):
    for prefix in ("/mj-fast", "/mj-relax", "/mj-turbo"):
        assert api.submit("imagine", {"prompt": "x"}, prefix=prefix).json()["code"] == 1
    api.http.get("/mj-relax/mj/task/list")
    stats = api.sim.stats()
    assert stats["by_prefix"] == {"/mj": 0, "/mj-fast": 1, "/mj-relax": 2, "/mj-turbo": 1}
    assert stats["imagine"] == 3 and stats["list"] == 1 and stats["total"] == 4


def test_unknown_path_and_method_are_json(api):
    missing = api.http.get("/nowhere")
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/json"
    assert api.http.get("/mj/submit/imagine").status_code == 405
    assert api.http.get("/mj/task/list").headers["content-type"] == "application/json"


# -- images -----------------------------------------------------------------------------------------------


def test_image_link_expires_and_checks_its_signature(make_api):
    api = make_api(image_ttl=0.3)
    task = api.finished(api.imagine())
    url = task["imageUrl"]
    tampered = url.replace("hm=", "hm=0")
    assert httpx.get(tampered).status_code == 403
    wait_until(lambda: httpx.get(url).status_code == 403, timeout=5)
    assert httpx.get(url).json()["message"]


def test_large_image_and_public_url(make_api):
    api = make_api(image_bytes=2_000_000, public_url="http://cdn.example.test/")
    task = api.finished(api.imagine())
    assert task["imageUrl"].startswith("http://cdn.example.test/attachments/")
    local = api.handle.url + task["imageUrl"].removeprefix("http://cdn.example.test")
    with httpx.stream("GET", local) as response:
        assert int(response.headers["content-length"]) == pytest.approx(2_000_000, rel=0.01)
        data = b"".join(response.iter_bytes())
    width, height, _ = png_info(data)
    assert width * height > 600_000


# -- pushes -----------------------------------------------------------------------------------------------


class Receiver:
    """A tiny real HTTP server collecting notifyHook bodies."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        self.server = ServerThread(self.app, threads=4)

    def app(self, environ, start_response):
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = json.loads(environ["wsgi.input"].read(length))
        with self.lock:
            self.bodies.append(body)
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b"{}"]

    def for_task(self, task_id: str) -> list[dict]:
        with self.lock:
            return [b for b in self.bodies if b["id"] == task_id]


@pytest.fixture
def receiver():
    rec = Receiver()
    rec.server.start()
    yield rec
    rec.server.stop()


def test_pushes_follow_the_task(make_api, receiver):
    # The pusher samples the task a few times a step: with 20 ms steps a busy machine can delay a sample past
    # a whole step (the SUBMITTED push then never exists); 200 ms steps leave it 50 ms samples to spare.
    api = make_api(step_seconds=0.2)
    task_id = api.imagine(notifyHook=receiver.server.url + "/hook")
    wait_until(lambda: any(b["status"] == "SUCCESS" for b in receiver.for_task(task_id)))
    pushes = receiver.for_task(task_id)
    assert pushes[0]["status"] == "SUBMITTED" and pushes[0]["progress"] == "0%"
    assert pushes[-1]["status"] == "SUCCESS" and pushes[-1]["buttons"]
    assert len(pushes) == len({(p["status"], p["progress"]) for p in pushes})  # no duplicates
    # The simulator counts a push once the receiver has answered it: the last count may trail its arrival.
    wait_until(lambda: api.sim.stats()["pushes"]["push_sent"] == len(pushes),
               message=f"push_sent reaches the {len(pushes)} pushes received")


def test_default_hook_and_failed_pushes_are_counted(make_api):
    api = make_api(notify_hook="http://127.0.0.1:9/unreachable")
    api.finished(api.imagine())
    wait_until(lambda: api.sim.stats()["pushes"]["push_failed"] >= 2)
    assert api.sim.stats()["pushes"]["push_sent"] == 0


def test_duplicate_and_out_of_order_pushes(make_api, receiver):
    api = make_api(faults={"push_duplicate": 1.0, "push_out_of_order": 1.0})
    task_id = api.imagine(notifyHook=receiver.server.url)
    api.finished(task_id)
    wait_until(lambda: api.sim.stats()["pushes"]["push_sent"] >= 5
               and any(b["status"] == "SUCCESS" for b in receiver.for_task(task_id)))
    wait_until(lambda: receiver.for_task(task_id)[-1]["status"] != "SUCCESS")  # older one came after
    pushes = receiver.for_task(task_id)
    keys = [(p["status"], p["progress"]) for p in pushes]
    assert len(keys) > len(set(keys))
    order = ["0%", *PERCENTAGES, "100%"]
    ranks = [order.index(p["progress"]) for p in pushes]
    assert any(later < earlier for earlier, later in zip(ranks, ranks[1:]))
    stats = api.sim.stats()["pushes"]
    assert stats["push_duplicated"] >= 1 and stats["push_out_of_order"] >= 1


def test_stop_ends_the_push_threads(make_api, receiver):
    api = make_api()
    api.imagine(notifyHook=receiver.server.url)
    wait_until(lambda: receiver.bodies)
    api.sim.stop()
    assert not any(t.name.startswith("sim-push") and t.is_alive() for t in threading.enumerate())


# -- faults -----------------------------------------------------------------------------------------------


def test_fail_rate_and_late_fail(make_api):
    api = make_api(fail_rate=1.0)
    failed = api.finished(api.imagine())
    assert failed["status"] == "FAILURE" and failed["progress"] == "" and failed["failReason"]
    assert failed["imageUrl"] is None and failed["buttons"] == []
    api.sim.update({"fail_rate": 0.0, "late_fail": 1.0})
    task_id = api.imagine()
    task = api.sim.engine.tasks[task_id]
    assert phase_at(task, task.start_at + 6.5 * task.step).progress == "93%"
    late = api.finished(task_id)
    assert late["status"] == "FAILURE" and late["failReason"] == "任务超时"


def test_stuck_tasks_never_finish(make_api):
    api = make_api(faults={"stuck": 1.0})
    task = api.sim.engine.tasks[api.imagine()]
    assert phase_at(task, time.time() + 10_000).status in ("SUBMITTED", "IN_PROGRESS")


def test_progress_goes_backwards_once(make_api):
    api = make_api(faults={"progress_backwards": 1.0})
    task = api.sim.engine.tasks[api.imagine()]
    values = [phase_at(task, task.start_at + (k + 0.5) * task.step).progress for k in range(1, 7)]
    numbers = [int(v.rstrip("%")) for v in values]
    assert sum(1 for a, b in zip(numbers, numbers[1:]) if b < a) == 1


def test_drop_ids(api):
    task_id = api.imagine()
    api.sim.update({"drop_ids": 1.0})
    assert api.http.post("/mj/task/list-by-condition", json={"ids": [task_id]}).json() == []
    assert api.fetch(task_id)["id"] == task_id  # fetch still knows it


def test_amnesia_and_restart(api):
    task_id = api.imagine()
    api.sim.update({"amnesia": 1.0})
    assert api.http.get(f"/mj/task/{task_id}/fetch").content == b""
    api.sim.update({"amnesia": 0.0})
    other = api.imagine()
    assert httpx.post(api.handle.url + "/_sim/restart").json() == {"ok": True}
    assert api.http.get(f"/mj/task/{other}/fetch").content == b""
    assert api.sim.stats()["restarts"] == 1


@pytest.mark.parametrize(
    ("fault", "statuses"), [("error_5xx", {500, 502, 503}), ("rate_limit", {429}), ("unauthorized", {401})]
)
def test_request_faults(make_api, fault, statuses):
    api = make_api(faults={fault: 1.0})
    response = api.http.get("/mj/task/list")
    assert response.status_code in statuses
    if fault != "error_5xx":
        assert response.content == b""
    assert api.sim.stats()["faults_injected"][fault] == 1


def test_slow_answers(make_api):
    api = make_api(faults={"slow": 1.0}, slow_seconds=0.2)
    started = time.monotonic()
    assert api.http.get("/mj/task/list").status_code == 200
    assert time.monotonic() - started >= 0.2


def test_control_endpoints(api):
    base = api.handle.url
    api.imagine()
    stats = httpx.get(base + "/_sim/stats").json()
    assert stats["imagine"] == 1 and stats["tasks"] == 1
    merged = httpx.post(base + "/_sim/faults", json={"drop_ids": 0.5, "step_seconds": 0.5}).json()
    assert merged["faults"]["drop_ids"] == 0.5 and merged["step_seconds"] == 0.5
    assert api.sim.faults["drop_ids"] == 0.5
    assert httpx.get(base + "/_sim/faults").json()["faults"]["drop_ids"] == 0.5
    assert httpx.post(base + "/_sim/faults", json={"bogus": 1}).status_code == 400
    assert httpx.post(base + "/_sim/faults", json={"stuck": 2}).status_code == 400
    assert httpx.post(base + "/_sim/reset-stats").json() == {"ok": True}
    assert httpx.get(base + "/_sim/stats").json()["total"] == 0
    assert httpx.get(base + "/_sim/nothing").status_code == 404


def test_constructor_rejects_bad_options():
    with pytest.raises(ValueError):
        Simulator(flavor="go")
    with pytest.raises(ValueError):
        Simulator(faults={"meteor": 0.1})
    with pytest.raises(ValueError):
        Simulator(step_seconds=0)
