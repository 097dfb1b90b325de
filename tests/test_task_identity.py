"""A task is (channel, upstream id): users whose tasks got the same upstream id each see only their own task
and image — through the relay, the API, image links, the image cache and the CLI — and other users' ids
answer exactly like unknown ones. The store keeps (channel_id, mj_id) unique, and the migration that makes
it so keeps every row. Against real parts: simulators as upstreams, a real server, real databases."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import httpx
import peewee
import pytest

from mjctl import accounts, channels, crypto, images
from mjctl.models import Task
from tests.books import assert_books
from tests.helpers import wait_until
from tests.relay_helpers import SIM_SECRET

SHARED = "1700000000000777"  # the id both upstreams hand out
UNKNOWN = "1799999999999999"


# -- helpers ------------------------------------------------------------------------------------------


@pytest.fixture
def two_channels(relay_env):
    """relay_env plus a second simulator as a second channel (tried after the first)."""
    from mjctl.sim import run_simulator_in_thread

    second = run_simulator_in_thread(secret=SIM_SECRET, step_seconds=0.02, queue_size=1000)
    channel = channels.add_channel(relay_env.settings, "sim-b", second.url, SIM_SECRET, priority=-1)
    yield relay_env, second, channel
    second.stop()


def hand_out(sim_handle, *ids: str) -> None:
    """Have a simulator give these ids to its next submissions, through its control endpoint."""
    answer = httpx.post(f"{sim_handle.url}/_sim/faults", json={"next_ids": list(ids)}, timeout=10)
    assert answer.status_code == 200 and answer.json()["next_ids"] == list(ids)


def finished_on_sim(sim_handle, prompt: str) -> tuple[str, str]:
    """An imagine run to SUCCESS on a simulator directly: (its id, its upstream image URL)."""
    headers = {"mj-api-secret": SIM_SECRET}
    submitted = httpx.post(f"{sim_handle.url}/mj/submit/imagine", json={"prompt": prompt}, headers=headers)
    task_id = submitted.json()["result"]

    def done():
        task = httpx.get(f"{sim_handle.url}/mj/task/{task_id}/fetch", headers=headers).json()
        return task if task["status"] == "SUCCESS" else None

    return task_id, wait_until(done, message="the simulated task finishes")["imageUrl"]


def local_path(url: str) -> str:
    """A forwarded image URL's path and query, to ask of the test server whatever public_url says."""
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}" if parts.query else parts.path


def get(env, path: str, token: str | None = None, **params) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with env.client(None) as client:
        return client.get(path, params=params or None, headers=headers)


def task_link(settings, task: Task) -> str:
    return local_path(images.image_url_for(settings)(task))


def legacy_link(settings, mj_id: str) -> str:
    """An image link as earlier versions made them: signed over the upstream id alone."""
    return f"/mj/image/{mj_id}?sig={images.sign_image(crypto.server_secret(settings), mj_id)}"


def same_answer(a: httpx.Response, b: httpx.Response) -> bool:
    return (a.status_code, a.headers.get("content-type"), a.content) == (
        b.status_code, b.headers.get("content-type"), b.content)


def run_migration(version: int) -> None:
    """One migration, as migrate() applies it (in its write transaction), whatever came after it."""
    from mjctl.db import MIGRATIONS, database, write_tx

    (fn,) = [fn for v, _name, fn in MIGRATIONS if v == version]
    with write_tx():
        fn(database.obj)


def drop_identity_index() -> None:
    """Take the store back to before migration 6: no unique (channel_id, mj_id)."""
    from playhouse.migrate import SchemaMigrator, migrate

    from mjctl.db import TASK_IDENTITY_INDEX, database

    migrate(SchemaMigrator.from_database(database.obj).drop_index("task", TASK_IDENTITY_INDEX))
    assert TASK_IDENTITY_INDEX not in {i.name for i in database.get_indexes("task")}


def identity_index():
    from mjctl.db import TASK_IDENTITY_INDEX, database

    return {i.name: i for i in database.get_indexes("task")}.get(TASK_IDENTITY_INDEX)


# -- two channels, one id -----------------------------------------------------------------------------


def test_two_users_with_one_upstream_id_on_two_channels_each_see_their_own(two_channels, cli):
    from mjctl import poller

    env, sim_b, channel_b = two_channels
    _, admin = accounts.create_user("root", role="admin")
    hand_out(env.sim, SHARED)
    hand_out(sim_b, SHARED)

    alice_answer = env.submit("imagine", {"prompt": "a red fox"}, user="alice").json()
    channels.set_enabled(env.channel.id, False)  # bob's submission goes to the second channel
    bob_answer = env.submit("imagine", {"prompt": "a blue whale"}, user="bob").json()
    channels.set_enabled(env.channel.id, True)
    assert alice_answer["code"] == bob_answer["code"] == 1 and alice_answer["result"] == bob_answer["result"] == SHARED

    def both_done():
        poller.poll_once(env.settings)
        rows = list(Task.select().where(Task.mj_id == SHARED).order_by(Task.id))
        return rows if len(rows) == 2 and all(r.status == "SUCCESS" for r in rows) else None

    alice_task, bob_task = wait_until(both_done, timeout=20, message="both tasks succeed")
    assert (alice_task.channel_id, bob_task.channel_id) == (env.channel.id, channel_b.id)
    poller.drain_prefetch(env.settings)
    served = {"alice": httpx.get(alice_task.image_url).content, "bob": httpx.get(bob_task.image_url).content}
    assert served["alice"] != served["bob"]  # the simulators drew different images for the same id
    tokens = env.tokens
    mine = {"alice": alice_task, "bob": bob_task}
    prompts = {"alice": "a red fox", "bob": "a blue whale"}
    seeds = {"alice": env.sim.sim.engine.tasks[SHARED].seed, "bob": sim_b.sim.engine.tasks[SHARED].seed}
    unknown = get(env, f"/mj/image/{UNKNOWN}", tokens["alice"])
    assert unknown.status_code == 404
    cache_states: dict[str, list[str]] = {"alice": [], "bob": []}

    for user in ("alice", "bob"):
        other = "bob" if user == "alice" else "alice"
        with env.client(user) as c:
            fetched = c.get(f"/mj/task/{SHARED}/fetch").json()
            assert fetched["prompt"] == prompts[user] and fetched["status"] == "SUCCESS"
            listed = c.post("/mj/task/list-by-condition", json={"ids": [SHARED]}).json()
            assert [t["prompt"] for t in listed] == [prompts[user]]
            own = c.get("/api/mj/self", params={"mj_id": SHARED}).json()["data"]
            assert own["total"] == 1 and own["items"][0]["id"] == mine[user].id
            seed = c.get(f"/mj/task/{SHARED}/image-seed").json()
            assert seed["code"] == 1 and seed["result"] == seeds[user]  # asked of the user's own channel
        link = local_path(fetched["imageUrl"])
        assert f"t={mine[user].id}" in link and link == local_path(own["items"][0]["image_url"])
        for _ in range(2):  # by token, then by the signed link, each twice: cached or not, always their own
            for answer in (get(env, f"/mj/image/{SHARED}", tokens[user]), get(env, link)):
                assert answer.status_code == 200 and answer.content == served[user], user
                cache_states[user].append(answer.headers["x-cache"])
        # The other user's row, by token or by a signature made for another row, is an unknown id.
        theirs = mine[other]
        assert same_answer(get(env, f"/mj/image/{SHARED}", tokens[user], t=str(theirs.id)), unknown)
        sig = dict(p.split("=", 1) for p in urlsplit(link).query.split("&"))["sig"]
        assert same_answer(get(env, f"/mj/image/{SHARED}", t=str(theirs.id), sig=sig), unknown)
    assert "HIT" in cache_states["alice"] and "HIT" in cache_states["bob"]

    # A link signed over the id alone cannot say whose task it was for: unknown, now that two tasks have it.
    assert same_answer(get(env, legacy_link(env.settings, SHARED)), unknown)
    # An admin's lookup lists both, and names both rows when asked for the image without one.
    everyone = get(env, "/api/mj/", admin, mj_id=SHARED).json()["data"]
    assert everyone["total"] == 2 and {i["id"] for i in everyone["items"]} == {alice_task.id, bob_task.id}
    ambiguous = get(env, f"/mj/image/{SHARED}", admin)
    assert ambiguous.status_code == 409 and str(alice_task.id) in ambiguous.json()["message"]
    assert get(env, f"/mj/image/{SHARED}", admin, t=str(bob_task.id)).content == served["bob"]

    # The cache holds one file per task, each that task's own image.
    from mjctl.images import ImageCache, ImageSource

    cache = ImageCache(env.settings.images.cache_dir)
    for user, task in mine.items():
        assert cache.find(ImageSource.from_task(task)).path.read_bytes() == served[user]
    assert cache.find(SHARED) is None  # nothing is keyed by the upstream id alone

    # The command line shows both tasks and asks which image is meant.
    shown = cli("tasks", "show", SHARED, "--json")
    assert shown.exit_code == 0, shown.output
    assert [d["id"] for d in json.loads(shown.stdout)] == [alice_task.id, bob_task.id]
    assert "2 tasks have the id" in cli("tasks", "show", SHARED).stderr
    refused = cli("tasks", "image", SHARED)
    assert refused.exit_code == 2 and "--row" in refused.stderr
    saved = cli("tasks", "image", SHARED, "--row", str(bob_task.id), "-o", "bob.png", "--json")
    assert saved.exit_code == 0, saved.output
    assert json.loads(saved.stdout)["from_cache"] is True and open("bob.png", "rb").read() == served["bob"]

    assert_books()
    assert accounts.get_user("alice").used_quota == accounts.get_user("bob").used_quota > 0


# -- one channel, duplicates from before the upgrade ------------------------------------------------------


def test_duplicates_on_one_channel_from_before_the_upgrade(relay_env):
    """Two tasks of one channel sharing an id (possible before migration 6), with image files cached under
    bare ids by an earlier version: after the migration each user reaches their own image only, the renamed
    task under its new id, and the old files are used only where they cannot be someone else's."""
    from mjctl.images import ImageCache, ImageSource

    env = relay_env
    settings = env.settings
    users = {name: accounts.get_user(name).id for name in ("alice", "bob")}
    (_, fox_url), (_, whale_url) = finished_on_sim(env.sim, "a red fox"), finished_on_sim(env.sim, "a blue whale")
    lone_id, lone_url = finished_on_sim(env.sim, "a lone heron")
    served = {url: httpx.get(url).content for url in (fox_url, whale_url, lone_url)}
    assert len(set(served.values())) == 3

    drop_identity_index()
    common = dict(channel_id=env.channel.id, status="SUCCESS", unfinished=0, progress="100%")
    alice_task = Task.create(user_id=users["alice"], mj_id=SHARED, image_url=fox_url, **common)
    bob_task = Task.create(user_id=users["bob"], mj_id=SHARED, image_url=whale_url, **common)
    lone_task = Task.create(user_id=users["alice"], mj_id=lone_id, image_url=lone_url, **common)
    # Files an earlier version cached under the bare ids: one for the shared id (whose image is it?), and
    # the lone task's, whose upstream link may have expired since.
    cache = ImageCache(settings.images.cache_dir)
    for mj_id, data in ((SHARED, b"whose image is this?"), (lone_id, served[lone_url])):
        path = cache.directory / cache.legacy_key(mj_id)[:2] / f"{cache.legacy_key(mj_id)}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    run_migration(6)
    rows = {t.id: t for t in Task.select()}
    assert set(rows) == {alice_task.id, bob_task.id, lone_task.id}  # every row kept
    assert rows[alice_task.id].mj_id == SHARED and rows[bob_task.id].mj_id == f"{SHARED}~{bob_task.id}"
    assert identity_index().unique
    bob_id = rows[bob_task.id].mj_id

    unknown = get(env, f"/mj/image/{UNKNOWN}", env.tokens["alice"])
    alice_own = get(env, f"/mj/image/{SHARED}", env.tokens["alice"])
    assert alice_own.status_code == 200 and alice_own.content == served[fox_url]
    assert alice_own.headers["x-cache"] == "MISS"  # the shared id's old file is nobody's now
    assert same_answer(get(env, f"/mj/image/{SHARED}", env.tokens["bob"]), unknown)  # not bob's id any more
    bob_own = get(env, f"/mj/image/{bob_id}", env.tokens["bob"])
    assert bob_own.status_code == 200 and bob_own.content == served[whale_url]
    for task, url in ((rows[alice_task.id], fox_url), (rows[bob_task.id], whale_url)):
        assert get(env, task_link(settings, task)).content == served[url]
    # A link signed over the shared id alone was made for one of the two; which, nothing says.
    assert same_answer(get(env, legacy_link(settings, SHARED)), unknown)

    # The lone task's old link still works, and its old file is taken over rather than fetched again.
    hits = env.sim.sim.stats()["image"]
    old_link = get(env, legacy_link(settings, lone_id))
    assert old_link.status_code == 200 and old_link.content == served[lone_url]
    assert old_link.headers["x-cache"] == "HIT" and env.sim.sim.stats()["image"] == hits
    assert cache.find(lone_id) is None  # moved under the task's key
    assert cache.find(ImageSource.from_task(lone_task)).path.read_bytes() == served[lone_url]
    assert get(env, task_link(settings, lone_task)).headers["x-cache"] == "HIT"
    assert cache.find(SHARED) is not None  # left alone: it is nobody's to take
    assert_books()


# -- answers that say nothing -------------------------------------------------------------------------


def test_image_errors_tell_no_ids_apart_and_a_failing_store_is_a_503(relay_env):
    env = relay_env
    settings = env.settings
    _, url = finished_on_sim(env.sim, "a quiet pond")
    alice = accounts.get_user("alice").id
    task = Task.create(user_id=alice, channel_id=env.channel.id, mj_id="1700000000000555", image_url=url,
                       status="SUCCESS", unfinished=0)
    link = task_link(settings, task)
    secret = crypto.server_secret(settings)
    unknown = get(env, f"/mj/image/{UNKNOWN}", env.tokens["bob"])
    assert unknown.status_code == 404 and unknown.json()["success"] is False
    for answer in (
        get(env, f"/mj/image/{task.mj_id}", env.tokens["bob"]),  # someone else's task, by token
        get(env, f"/mj/image/{task.mj_id}", env.tokens["bob"], t=str(task.id)),
        get(env, f"/mj/image/{task.mj_id}", t=str(task.id), sig="forged"),
        get(env, f"/mj/image/{task.mj_id}", t=str(task.id + 1),  # signed for a row that is not this task
            sig=images.sign_task_image(secret, task.id + 1, task.mj_id)),
        get(env, f"/mj/image/{UNKNOWN}", t=str(task.id), sig=images.sign_task_image(secret, task.id, UNKNOWN)),
        get(env, f"/mj/image/{task.mj_id}", t="x1", sig="forged"),
        get(env, f"/mj/image/{task.mj_id}", sig=images.sign_image(secret, UNKNOWN)),  # another id's legacy sig
        get(env, f"/mj/image/{UNKNOWN}", sig=images.sign_image(secret, UNKNOWN)),
    ):
        assert same_answer(answer, unknown), answer.text
    assert get(env, link).status_code == 200
    assert get(env, f"/mj/image/{task.mj_id}", env.tokens["alice"]).status_code == 200

    # The store failing under the lookup is a 503 to retry, not a 500.
    from mjctl.db import database

    database.execute_sql("ALTER TABLE task RENAME TO task_away")
    try:
        failed = get(env, f"/mj/image/{task.mj_id}", env.tokens["alice"])
    finally:
        database.execute_sql("ALTER TABLE task_away RENAME TO task")
    assert failed.status_code == 503 and failed.headers["retry-after"] and failed.json()["success"] is False
    assert get(env, link).status_code == 200


# -- the migration, on every database -------------------------------------------------------------------


def test_migration_6_keeps_every_row_and_makes_channel_and_id_unique(any_store):
    from mjctl.db import database
    from mjctl.models import Meta_, TaskCount
    from mjctl.tasks import shared_id_marker, sole_task

    drop_identity_index()
    long_id = "9" * 64

    def add(channel: int, mj_id: str, user: int = 1) -> Task:
        return Task.create(user_id=user, channel_id=channel, mj_id=mj_id, status="SUCCESS", unfinished=0)

    first = add(1, SHARED, user=1)
    second = add(1, SHARED, user=2)
    third = add(1, SHARED, user=1)
    elsewhere = add(2, SHARED, user=2)  # another channel: not a duplicate
    long_first, long_second = add(1, long_id), add(1, long_id)
    lone = add(1, "1700000000000888")
    # A row already holding the name the migration would give `twice`: the next free one is taken instead.
    once, twice = add(3, "1700000000000999"), add(3, "1700000000000999")
    squatter = add(3, f"1700000000000999~{twice.id}")
    before = {t.id: (t.user_id, t.channel_id) for t in Task.select(Task.id, Task.user_id, Task.channel_id)}

    run_migration(6)
    after = {t.id: t for t in Task.select()}
    assert {i: (t.user_id, t.channel_id) for i, t in after.items()} == before  # every row, as it was
    ids = {i: t.mj_id for i, t in after.items()}
    assert ids[first.id] == ids[elsewhere.id] == SHARED
    assert ids[second.id] == f"{SHARED}~{second.id}" and ids[third.id] == f"{SHARED}~{third.id}"
    assert ids[long_first.id] == long_id
    assert ids[long_second.id] == long_id[:64 - len(f"~{long_second.id}")] + f"~{long_second.id}"
    assert len(ids[long_second.id]) == 64
    assert ids[once.id] == "1700000000000999" and ids[squatter.id] == f"1700000000000999~{twice.id}"
    assert ids[twice.id] == f"1700000000000999~{twice.id}.1"
    assert ids[lone.id] == "1700000000000888"
    pairs = [(t.channel_id, t.mj_id) for t in after.values()]
    assert len(pairs) == len(set(pairs))
    assert identity_index().unique and identity_index().columns == ["channel_id", "mj_id"]
    assert any(i.columns == ["mj_id"] and not i.unique for i in database.get_indexes("task"))  # for lookups
    assert TaskCount.get(TaskCount.channel_id == 0).n == len(before)
    # Ids that were shared on a channel are recorded: an old key naming one of them names no task.
    assert Meta_.get_or_none(Meta_.key == shared_id_marker(SHARED)) is not None
    assert sole_task("1700000000000999") is None and sole_task("1700000000000888").id == lone.id

    with pytest.raises(peewee.IntegrityError):
        with database.atomic():
            add(1, SHARED)
    add(4, SHARED)  # the same id on yet another channel is a task of its own

    run_migration(6)  # again: nothing left to rename, the index already there
    assert {t.id: t.mj_id for t in Task.select() if t.id in ids} == ids
