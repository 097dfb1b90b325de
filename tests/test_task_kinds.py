"""Every task kind the relay carries beyond imagine and its buttons: video, edits, uploads, face swap and
cancel; follow-ups that need a finished parent; "no account" answers; code 21 for a finished task.

All through real sockets: mjctl's server in front of the simulator (C# flavoured where the route is the
C# upstream's own), and each checks the books (ledger = balances = task quotas) and what the user sees.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.books import assert_books, balance
from tests.helpers import closed_port_url, wait_until
from tests.relay_helpers import SIM_SECRET, start_relay

PNG = "data:image/png;base64,iVBORw0KGgo="


@pytest.fixture
def csharp_env(store):
    env = start_relay(store, flavor="csharp")
    yield env
    env.server.stop()
    env.sim.stop()


@pytest.fixture
def java_env(store):
    env = start_relay(store, flavor="java")
    yield env
    env.server.stop()
    env.sim.stop()


def rows(mj_id: str | None = None) -> list:
    from mjctl.models import Task

    query = Task.select().order_by(Task.id)
    return list(query.where(Task.mj_id == mj_id) if mj_id else query)


def local(mj_id: str):
    (task,) = rows(mj_id)
    return task


def settled(env, mj_id: str) -> object:
    """Wait until the upstream has finished the task, poll once, and return mjctl's row."""
    from mjctl.poller import poll_once

    def upstream_done():
        with httpx.Client(base_url=env.sim.url, headers={"mj-api-secret": SIM_SECRET}) as c:
            task = c.get(f"/mj/task/{mj_id}/fetch").json()
        return task["status"] in ("SUCCESS", "FAILURE", "CANCEL")

    wait_until(upstream_done, message=f"upstream task {mj_id} finishes")
    poll_once(env.settings)
    return local(mj_id)


def imagine(env, prompt: str = "a grid", user: str = "alice") -> str:
    answer = env.submit("imagine", {"prompt": prompt}, user=user).json()
    assert answer["code"] == 1, answer
    return answer["result"]


def set_prices(env, **prices: int) -> None:
    """Change [prices] of the running server (it reads the settings object at each request)."""
    from mjctl.config import Prices

    env.settings.prices = Prices({**env.settings.prices, **prices})


def ledger_entries(kind: str) -> list:
    from mjctl.models import Ledger

    return list(Ledger.select().where(Ledger.kind == kind).order_by(Ledger.id))


# --- video -------------------------------------------------------------------------------------------

def test_a_video_of_a_finished_grid_is_a_task_priced_as_video_with_its_links(csharp_env):
    env = csharp_env
    parent = imagine(env)
    settled(env, parent)
    answer = env.submit("video", {"taskId": parent, "index": 2, "motion": "high", "prompt": "it moves"}).json()
    assert answer["code"] == 1, answer
    video = local(answer["result"])
    assert (video.action, video.quota, video.channel_id) == ("VIDEO", 1000, env.channel.id)
    assert balance("alice") == 10_000 - 1000 - 1000
    done = settled(env, answer["result"])
    assert done.status == "SUCCESS" and done.video_url.split("?")[0].endswith(".mp4")
    with env.client() as c:
        shown = c.get(f"/mj/task/{answer['result']}/fetch").json()
    assert shown["action"] == "VIDEO" and shown["videoUrl"] and shown["videoUrls"][0]["url"]
    assert_books()


def test_a_video_is_served_through_mjctls_own_links_after_the_upstreams_expire(csharp_env):
    from urllib.parse import urlsplit

    from mjctl.poller import drain_prefetch
    from mjctl.sim.mp4 import clip

    env = csharp_env
    env.sim.sim.update({"video_bytes": 300_000})
    parent = imagine(env)
    settled(env, parent)
    answer = env.submit("video", {"taskId": parent, "index": 1, "motion": "low"}).json()
    settled(env, answer["result"])  # the poller sees SUCCESS and keeps the image and the video
    assert drain_prefetch(env.settings, 10)
    env.sim.sim.update({"image_ttl": 0})  # every upstream link has expired now
    with env.client() as c:
        item = next(i for i in c.get("/api/mj/self").json()["data"]["items"] if i["mj_id"] == answer["result"])
        shown = c.get(f"/mj/task/{answer['result']}/fetch").json()
    assert "/mj/video/" in item["video_url"] and json.loads(item["video_urls"]) == [item["video_url"]]
    assert shown["videoUrl"] == item["video_url"] and shown["videoUrls"] == [{"url": item["video_url"]}]
    link = urlsplit(item["video_url"])
    with httpx.Client(base_url=env.url) as anyone:  # the signed link alone opens it, no token
        whole = anyone.get(f"{link.path}?{link.query}")
        assert whole.status_code == 200 and whole.headers["content-type"] == "video/mp4"
        assert len(whole.content) == 300_000 and whole.content.startswith(clip())
        assert whole.headers["accept-ranges"] == "bytes"
        part = anyone.get(f"{link.path}?{link.query}", headers={"Range": "bytes=1000-1999"})
        assert part.status_code == 206 and part.content == whole.content[1000:2000]
        forged = anyone.get(f"{link.path}?{link.query.replace('i=0', 'i=1')}")
        assert forged.status_code == 404
        image_sig = urlsplit(item["image_url"]).query.split("sig=")[1]
        assert anyone.get(f"{link.path}?t={link.query.split('t=')[1].split('&')[0]}&i=0&sig={image_sig}"
                          ).status_code == 404  # an image link's signature never opens a video


def test_a_video_from_an_image_link_needs_no_earlier_task(csharp_env):
    env = csharp_env
    answer = env.submit("video", {"imageUrl": "https://example.com/cat.png", "motion": "low"}).json()
    assert answer["code"] == 1, answer
    assert local(answer["result"]).action == "VIDEO" and balance("alice") == 9000


def test_a_follow_up_of_an_unfinished_task_is_refused_before_anything_is_reserved(csharp_env):
    env = csharp_env
    env.sim.sim.update({"step_seconds": 30})  # the parent stays SUBMITTED/IN_PROGRESS
    parent = imagine(env)
    before_rows, before_balance = len(rows()), balance("alice")
    for kind, body in (("video", {"taskId": parent, "motion": "low"}),
                       ("change", {"taskId": parent, "action": "UPSCALE", "index": 1}),
                       ("simple-change", {"content": f"{parent} V1"})):
        response = env.submit(kind, body)
        assert response.status_code == 409, (kind, response.text)
        assert response.json()["code"] == 4 and "SUCCESS" in response.json()["description"]
    assert len(rows()) == before_rows and balance("alice") == before_balance
    assert env.sim.sim.stats()["video"] == 0 and env.sim.sim.stats()["change"] == 0
    from mjctl.models import PendingSubmission, Reservation

    assert Reservation.select().count() == 0 and PendingSubmission.select().count() == 0


def test_a_follow_up_of_another_users_task_reads_as_missing(csharp_env):
    env = csharp_env
    parent = imagine(env, user="bob")
    settled(env, parent)
    response = env.submit("video", {"taskId": parent, "motion": "low"}, user="alice")
    assert response.status_code == 404 and response.json()["code"] == 3
    assert balance("alice") == 10_000


def test_a_java_upstream_without_the_video_route_charges_nothing_and_says_so(java_env):
    env = java_env
    response = env.submit("video", {"imageUrl": "https://example.com/cat.png"})
    assert response.status_code == 502 and "video" in response.json()["description"]
    assert rows() == [] and balance("alice") == 10_000
    assert_books()


# --- edits, face swap ----------------------------------------------------------------------------------

def test_edits_and_face_swap_are_tasks_with_their_own_price_keys(csharp_env):
    env = csharp_env
    set_prices(env, EDITS=700, SWAP_FACE=300)
    edits = env.submit("edits", {"prompt": "make it blue", "image": PNG}).json()
    with env.client() as c:
        swap = c.post("/mj/insight-face/swap", json={"sourceBase64": PNG, "targetBase64": PNG}).json()
    assert edits["code"] == 1 and swap["code"] == 1, (edits, swap)
    assert (local(edits["result"]).action, local(edits["result"]).quota) == ("EDITS", 700)
    assert (local(swap["result"]).action, local(swap["result"]).quota) == ("SWAP_FACE", 300)
    assert settled(env, swap["result"]).status == "SUCCESS"
    assert settled(env, edits["result"]).image_url
    assert balance("alice") == 10_000 - 700 - 300
    assert_books()


def test_a_face_swap_the_upstream_rejects_is_a_free_failure(csharp_env):
    env = csharp_env
    with env.client() as c:
        answer = c.post("/mj-relax/mj/insight-face/swap", json={"sourceBase64": "not a data url",
                                                               "targetBase64": PNG}).json()
    assert answer["code"] == 4
    (task,) = rows()
    assert (task.status, task.quota, task.action) == ("FAILURE", 0, "SWAP_FACE")
    assert balance("alice") == 10_000 and env.sim.sim.stats()["by_prefix"]["/mj-relax"] == 1


# --- uploads -------------------------------------------------------------------------------------------

def test_an_upload_is_answered_with_links_and_makes_no_task_and_no_charge(csharp_env):
    env = csharp_env
    response = env.submit("upload-discord-images", {"base64Array": [PNG, PNG]})
    assert response.status_code == 200
    answer = response.json()
    assert answer["code"] == 1 and len(answer["result"]) == 2
    assert all(link.startswith(env.sim.url + "/attachments/") for link in answer["result"])
    assert rows() == [] and balance("alice") == 10_000 and ledger_entries("charge") == []


def test_a_priced_upload_is_charged_once_without_a_task_and_a_refused_one_costs_nothing(csharp_env):
    env = csharp_env
    set_prices(env, UPLOAD=250)
    assert env.submit("upload-discord-images", {"base64Array": [PNG]}).json()["code"] == 1
    refused = env.submit("upload-discord-images", {"base64Array": ["plain text"]}).json()
    assert refused["code"] == 4 and refused["result"] is None
    (entry,) = ledger_entries("charge")
    assert (entry.amount, entry.task_id) == (-250, None) and "UPLOAD" in entry.reason
    assert balance("alice") == 9750 and rows() == []
    from mjctl.models import PendingSubmission, Reservation

    assert Reservation.select().count() == 0 and PendingSubmission.select().count() == 0
    assert_books()


def test_an_upload_that_does_not_fit_the_balance_is_refused_unsent(csharp_env):
    env = csharp_env
    set_prices(env, UPLOAD=20_000)
    response = env.submit("upload-discord-images", {"base64Array": [PNG]})
    assert response.status_code == 403 and response.json()["code"] == 4
    assert env.sim.sim.stats()["upload-discord-images"] == 0 and balance("alice") == 10_000


# --- cancel --------------------------------------------------------------------------------------------

def test_cancel_stops_the_callers_task_and_refunds_it_exactly_once(csharp_env):
    env = csharp_env
    env.sim.sim.update({"step_seconds": 30})
    mj_id = imagine(env)
    assert balance("alice") == 9000
    with env.client("bob") as c:
        assert c.post(f"/mj/task/{mj_id}/cancel").status_code == 404  # not bob's
    with env.client() as c:
        response = c.post(f"/mj/task/{mj_id}/cancel")
        assert response.status_code == 200 and response.json()["code"] == 1, response.text
        assert local(mj_id).status == "CANCEL" and balance("alice") == 10_000
        again = c.post(f"/mj/task/{mj_id}/cancel")
        assert again.status_code == 409 and again.json()["code"] == 4
    from mjctl.poller import poll_once

    poll_once(env.settings)  # the upstream now reports CANCEL too: nothing more to refund
    assert local(mj_id).status == "CANCEL" and balance("alice") == 10_000
    assert len(ledger_entries("refund")) == 1
    assert_books()


def test_a_cancel_the_upstream_reports_is_refunded_like_a_failure(csharp_env):
    env = csharp_env
    env.sim.sim.update({"step_seconds": 30})
    mj_id = imagine(env)
    with httpx.Client(base_url=env.sim.url, headers={"mj-api-secret": SIM_SECRET}) as c:
        assert c.post(f"/mj/task/{mj_id}/cancel", json={}).json()["code"] == 1  # cancelled upstream, not via mjctl
    from mjctl.poller import poll_once

    poll_once(env.settings)
    poll_once(env.settings)
    assert local(mj_id).status == "CANCEL" and balance("alice") == 10_000
    assert len(ledger_entries("refund")) == 1
    assert_books()


def test_an_upstream_that_cannot_cancel_says_so_and_nothing_changes(java_env):
    env = java_env
    env.sim.sim.update({"step_seconds": 30})
    mj_id = imagine(env)
    with env.client() as c:
        response = c.post(f"/mj/task/{mj_id}/cancel")
    assert response.status_code == 501 and response.json()["code"] == 4
    assert "cannot cancel" in response.json()["description"]
    assert local(mj_id).status in ("SUBMITTED", "NOT_START") and balance("alice") == 9000


# --- channels without an account, and tasks that exist already ---------------------------------------

@pytest.fixture
def two_channels(store):
    """The relay with its channel "sim" and a second simulator as channel "spare", tried after it."""
    from mjctl import channels
    from mjctl.sim import run_simulator_in_thread

    env = start_relay(store, flavor="java")
    spare = run_simulator_in_thread(secret=SIM_SECRET, step_seconds=0.02)
    channels.add_channel(env.settings, "spare", spare.url, SIM_SECRET, priority=-1)
    yield env, spare
    env.server.stop()
    env.sim.stop()
    spare.stop()


def channel(name: str):
    from mjctl import channels

    return channels.get_channel(name)


def test_no_account_cools_the_channel_down_and_new_tasks_go_to_the_next(two_channels):
    env, spare = two_channels
    env.sim.sim.update({"step_seconds": 30})
    running = imagine(env, "before the trouble")  # on "sim", which then runs out of accounts
    env.sim.sim.update({"no_account": 1.0})
    answer = env.submit("imagine", {"prompt": "a fox"}).json()
    assert answer["code"] == 1, answer
    assert local(answer["result"]).channel_id == channel("spare").id
    assert channel("sim").health_reason.startswith("no account available")
    from mjctl import channels

    assert channels.channel_dict(channel("sim"))["health"].startswith("cooling down until")
    assert channels.channel_dict(channel("spare"))["health"] == "ok"
    # While it cools down, new tasks go to the spare first: the sick channel is not even asked.
    assert env.submit("imagine", {"prompt": "a hare"}).json()["code"] == 1
    assert env.sim.sim.stats()["imagine"] == 2 and spare.sim.stats()["imagine"] == 2
    assert balance("alice") == 10_000 - 3000
    # The poller still follows the tasks the sick channel runs.
    from mjctl.poller import poll_once

    asked = env.sim.sim.stats()["list-by-condition"]
    poll_once(env.settings)
    assert env.sim.sim.stats()["list-by-condition"] == asked + 1 and local(running).unfinished == 1
    # `channels enable` ends the cool-down.
    channels.set_enabled("sim", True)
    assert channels.channel_dict(channel("sim"))["health"] == "ok"
    assert env.submit("imagine", {"prompt": "an owl"}).json()["code"] == 1
    assert env.sim.sim.stats()["imagine"] == 3


def test_a_channel_refusing_its_secret_cools_down_and_the_next_takes_the_task(two_channels):
    env, spare = two_channels
    env.sim.sim.secret = "rotated-upstream-secret"
    answer = env.submit("imagine", {"prompt": "a fox"}).json()
    assert answer["code"] == 1 and local(answer["result"]).channel_id == channel("spare").id
    assert "refused" in channel("sim").health_reason
    assert balance("alice") == 9000


def test_transport_failures_in_a_row_cool_a_channel_down(two_channels):
    from mjctl import channels
    from mjctl.models import Channel

    env, spare = two_channels
    Channel.update(base_url=closed_port_url()).where(Channel.name == "sim").execute()
    for n in range(channels.FAILURES_BEFORE_COOLDOWN):
        assert env.submit("imagine", {"prompt": f"fox {n}"}).json()["code"] == 1
        assert channels.cooling_down(channel("sim")) == (n == channels.FAILURES_BEFORE_COOLDOWN - 1)
    assert "failures in a row" in channel("sim").health_reason
    assert spare.sim.stats()["imagine"] == channels.FAILURES_BEFORE_COOLDOWN


def test_no_account_on_the_only_channel_is_a_free_failure(java_env):
    env = java_env
    env.sim.sim.update({"no_account": 1.0})
    answer = env.submit("imagine", {"prompt": "a fox"}).json()
    assert answer["code"] == 3
    (task,) = rows()
    assert (task.status, task.quota) == ("FAILURE", 0) and balance("alice") == 10_000


def test_pressing_a_finished_button_again_names_the_existing_task_and_charges_nothing(java_env):
    env = java_env
    parent = imagine(env)
    grid = settled(env, parent)
    custom_id = next(b["customId"] for b in grid.buttons_list() if "upsample::1" in b["customId"])
    first = env.submit("action", {"taskId": parent, "customId": custom_id}).json()
    settled(env, first["result"])
    spent = balance("alice")
    again = env.submit("action", {"taskId": parent, "customId": custom_id}).json()
    assert again["code"] == 1 and again["result"] == first["result"]
    assert len(rows(first["result"])) == 1 and balance("alice") == spent
    assert_books()


def test_code_21_for_a_finished_task_records_it_finished_with_its_image(java_env):
    """Another gateway's task, finished, that this upstream names for a new submission: recorded SUCCESS
    at once with the image the answer carries, and charged as the action it is."""
    env = java_env
    parent = imagine(env)
    grid = settled(env, parent)
    custom_id = next(b["customId"] for b in grid.buttons_list() if "upsample::2" in b["customId"])
    first = env.submit("action", {"taskId": parent, "customId": custom_id}).json()
    settled(env, first["result"])
    from mjctl.models import Task

    # As if another gateway had submitted it: mjctl has no task with that id any more.
    Task.update(mj_id="elsewhere").where(Task.mj_id == first["result"]).execute()
    again = env.submit("action", {"taskId": parent, "customId": custom_id}).json()
    assert again["code"] == 1 and again["result"] == first["result"]
    task = local(first["result"])
    assert (task.status, task.progress, task.unfinished, task.quota) == ("SUCCESS", "100%", 0, 500)
    assert task.image_url.startswith(env.sim.url) and task.finish_time
    with env.client() as c:
        image = c.get(f"/mj/task/{first['result']}/fetch").json()["imageUrl"]
    assert "/mj/image/" in image  # handed out as mjctl's own link, like any finished task's


def test_channels_list_shows_health_and_enable_ends_a_cool_down(cli):
    assert cli("channels", "add", "up1", "--base-url", "http://127.0.0.1:9", "--secret", "s").exit_code == 0
    from mjctl.models import Channel

    Channel.update(cooldown_until=4_102_444_800.0, health_reason="no account available: 无可用的账号实例").execute()
    listed = cli("channels", "list")
    assert listed.exit_code == 0 and "cooling down until 2100" in listed.output.replace("\n", " ")
    row = cli("channels", "list", "--json")
    assert '"health": "cooling down until 2100' in row.output
    assert cli("channels", "enable", "up1").exit_code == 0
    assert '"health": "ok"' in cli("channels", "list", "--json").output


def test_tasks_image_video_saves_the_mp4(csharp_env, tmp_path):
    from typer.testing import CliRunner

    from mjctl.cli import app
    from mjctl.sim.mp4 import clip

    env = csharp_env
    answer = env.submit("video", {"imageUrl": "https://example.com/cat.png"}).json()
    settled(env, answer["result"])
    target = tmp_path / "clip.mp4"
    environ = {"MJCTL_DATABASE_URL": env.settings.database_url(), "MJCTL_SERVER_SECRET": "test-secret",
               "MJCTL_IMAGES_ALLOW_HOSTS": "127.0.0.1"}
    result = CliRunner().invoke(app, ["tasks", "image", answer["result"], "--video", "-o", str(target)], env=environ)
    assert result.exit_code == 0, result.output
    assert target.read_bytes().startswith(clip())
    missing = CliRunner().invoke(app, ["tasks", "image", answer["result"], "--video", "--index", "3"], env=environ)
    assert missing.exit_code == 1 and "has no video 3" in missing.output


# --- modes -----------------------------------------------------------------------------------------------

def test_a_mode_is_stored_priced_from_its_own_table_and_inherited_by_follow_ups(csharp_env):
    env = csharp_env
    set_prices(env, **{"relax.IMAGINE": 400, "turbo.IMAGINE": 2500})
    with env.client() as c:
        relax = c.post("/mj-relax/mj/submit/imagine", json={"prompt": "slow fox"}).json()
        turbo = c.post("/mj/submit/imagine", json={"prompt": "fast fox", "accountFilter": {"modes": ["TURBO"]}}).json()
        plain = c.post("/mj/submit/imagine", json={"prompt": "a fox"}).json()
    assert (local(relax["result"]).mode, local(relax["result"]).quota) == ("RELAX", 400)
    assert (local(turbo["result"]).mode, local(turbo["result"]).quota) == ("TURBO", 2500)
    assert (local(plain["result"]).mode, local(plain["result"]).quota) == ("", 1000)
    # The upstream was asked in the form it understands: the prefix, or the caller's own accountFilter.
    assert env.sim.sim.stats()["by_prefix"]["/mj-relax"] == 1
    with httpx.Client(base_url=env.sim.url, headers={"mj-api-secret": SIM_SECRET}) as c:
        assert c.get(f"/mj/task/{relax['result']}/fetch").json()["mode"] == "RELAX"
        assert c.get(f"/mj/task/{turbo['result']}/fetch").json()["mode"] == "TURBO"

    # A follow-up without a prefix keeps its parent's: RELAX, priced from [prices] (no relax UPSCALE price).
    settled(env, relax["result"])
    upscale = env.submit("change", {"taskId": relax["result"], "action": "UPSCALE", "index": 1}).json()
    assert (local(upscale["result"]).mode, local(upscale["result"]).quota) == ("RELAX", 500)
    assert env.sim.sim.stats()["by_prefix"]["/mj-relax"] == 2
    assert balance("alice") == 10_000 - 400 - 2500 - 1000 - 500
    assert_books()

    with env.client("alice") as c:  # users see exactly the document's fields
        assert "mode" not in c.get("/api/mj/self").json()["data"]["items"][0]
    from mjctl import accounts

    _, admin = accounts.create_user("root", role="admin")
    with httpx.Client(base_url=env.url, headers={"Authorization": f"Bearer {admin}"}) as c:
        items = c.get("/api/mj/", params={"mode": "relax"}).json()["data"]["items"]
        assert sorted(i["mj_id"] for i in items) == sorted([relax["result"], upscale["result"]])
        assert {i["mode"] for i in items} == {"RELAX"}
        bad = c.get("/api/mj/", params={"mode": "slow"})
        assert bad.status_code == 400 and "FAST, RELAX, TURBO" in bad.json()["message"]


def test_mode_prices_come_from_mode_tables_in_the_file_and_the_environment(tmp_path):
    from mjctl.config import load_settings

    conf = tmp_path / "mjctl.toml"
    conf.write_text("[prices]\nIMAGINE = 900\n\n[prices.relax]\nIMAGINE = 300\nupscale = 100\n")
    settings = load_settings(conf, environ={"MJCTL_PRICES_TURBO_IMAGINE": "2000"})
    assert settings.price("IMAGINE") == 900 and settings.price("imagine", "RELAX") == 300
    assert settings.price("UPSCALE", "relax") == 100 and settings.price("UPSCALE", "TURBO") == 500
    assert settings.price("IMAGINE", "TURBO") == 2000 and settings.price("VARIATION", "RELAX") == 1000
    assert settings.sources[("prices", "relax.IMAGINE")].startswith("file")


def test_tasks_list_filters_by_mode_and_shows_it(cli):
    assert cli("users", "add", "alice").exit_code == 0
    from mjctl import accounts
    from mjctl.models import Task

    alice = accounts.get_user("alice").id
    Task.create(user_id=alice, channel_id=0, mj_id="1700000000000001", mode="RELAX", status="SUCCESS", submit_time=1)
    Task.create(user_id=alice, channel_id=0, mj_id="1700000000000002", mode="", status="SUCCESS", submit_time=2)
    listed = cli("tasks", "list", "--mode", "relax", "--json")
    assert listed.exit_code == 0, listed.output
    (item,) = json.loads(listed.output)["items"]
    assert (item["mj_id"], item["mode"]) == ("1700000000000001", "RELAX")
    assert "IMAGINE/relax" in cli("tasks", "list", "--mode", "RELAX", env={"COLUMNS": "150"}).output
    wrong = cli("tasks", "list", "--mode", "slow")
    assert wrong.exit_code == 2 and "fast, relax, turbo" in wrong.output
    assert '"mode": "RELAX"' in cli("tasks", "show", "1700000000000001", "--json").output


def test_a_client_of_the_public_api_runs_video_and_face_swap_end_to_end_over_sockets(csharp_env):
    """Only what a midjourney-proxy client knows, over real sockets both ways: submit, fetch until
    finished, download the results through the links it is given."""
    from mjctl.poller import poll_once
    from mjctl.sim.mp4 import clip

    env = csharp_env
    env.push_here()  # [server] public_url: the links handed out (and the notify hooks) name this server
    with env.socket_client() as client:
        def finished(mj_id: str) -> dict:
            def done():
                poll_once(env.settings)  # mjctl's poller, as `mjctl serve` runs it
                task = client.get(f"/mj/task/{mj_id}/fetch").json()
                return task if task["status"] in ("SUCCESS", "FAILURE", "CANCEL") else None
            return wait_until(done, message=f"task {mj_id} finishes")

        grid = client.post("/mj/submit/imagine", json={"prompt": "a fox in the snow"}).json()
        assert grid["code"] == 1 and finished(grid["result"])["status"] == "SUCCESS"
        video = client.post("/mj/submit/video", json={"taskId": grid["result"], "index": 1, "motion": "low"}).json()
        swap = client.post("/mj/insight-face/swap", json={"sourceBase64": PNG, "targetBase64": PNG}).json()
        assert video["code"] == 1 and swap["code"] == 1, (video, swap)
        shown = finished(video["result"])
        assert shown["status"] == "SUCCESS" and shown["action"] == "VIDEO"
        got = client.get(shown["videoUrl"])
        assert got.status_code == 200 and got.content.startswith(clip())
        faces = finished(swap["result"])
        assert faces["status"] == "SUCCESS" and faces["action"] == "SWAP_FACE"
        assert client.get(faces["imageUrl"]).headers["content-type"] == "image/png"
    assert balance("alice") == 10_000 - 3000
    assert_books()
