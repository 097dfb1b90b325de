"""The simulated midjourney-proxy's state and its answers, free of any web framework.

Every public method returns a :class:`Reply` (status, body, kind) that the web layer only renders, so
the flavour differences (Java vs C#, docs/upstream.md) live here in one place.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from random import Random
from typing import Any

from mjctl.protocol import FINISHED_STATUSES, MODES, NO_ACCOUNT_CODE
from mjctl.protocol import PREFIX_MODES as PROTOCOL_PREFIX_MODES
from mjctl.sim.mp4 import make_mp4
from mjctl.sim.png import make_png
from mjctl.sim.tasks import (
    Account,
    SimTask,
    buttons_for,
    parse_custom_id,
    phase_at,
)

PREFIX_MODES = {"": "FAST", **PROTOCOL_PREFIX_MODES}
#: How much longer each step of a task takes in a mode than in FAST.
MODE_PACE = {"FAST": 1.0, "RELAX": 2.0, "TURBO": 0.5}
#: Only the C# midjourney-proxy has these routes; a Java one answers them 404.
CSHARP_ONLY = frozenset({"video", "edits", "upload-discord-images", "swap-face", "cancel"})
DIMENSIONS = ("PORTRAIT", "SQUARE", "LANDSCAPE")
FAIL_REASONS = ("[Invalid parameter] Invalid value", "Job failed: internal error", "执行超时 5 分钟")
IMAGE_CACHE_BYTES = 512 * 1024 * 1024


@dataclass
class SimSettings:
    """Everything that can change at run time (``Simulator.update``), shared by engine and web layer."""

    flavor: str = "java"
    step_seconds: float = 1.0
    fail_rate: float = 0.0
    queue_size: int = 10
    image_ttl: float = 86400.0
    image_bytes: int | None = None
    video_bytes: int | None = None  # the size of every video (padded); None: the small clip as it is
    slow_seconds: float = 2.0
    hang_seconds: float = 300.0  # how long the 'hang' fault holds a request before answering it
    trickle_seconds: float = 2.0  # the pause between the bytes of an answer under the 'trickle' fault
    banned_words: list[str] = field(default_factory=lambda: ["bannedword"])
    #: Ids the next submissions get, in order, each used once, instead of generated ones (set through
    #: ``POST /_sim/faults {"next_ids": [...]}``): two simulators, or one, can then hand out the same id, as
    #: real upstreams sometimes do. An id this simulator already has replaces that task.
    next_ids: list[str] = field(default_factory=list)
    notify_hook: str | None = None
    public_url: str | None = None
    faults: dict[str, float] = field(default_factory=dict)
    # Hostile-upstream switches, for tests of what a client trusts an upstream with; all off by default.
    image_url: str | None = None  # every finished task's imageUrl, instead of its signed /attachments/ link
    redirect_to: str | None = None  # every /attachments/ request is answered 302 to this Location
    description_chars: int = 0  # task descriptions are padded with "x" to this many characters
    fail_reason: str | None = None  # the failReason of every task that fails (fail_rate picks which)
    echo_hook: bool = False  # submit and image-seed answers echo the task's notifyHook in properties
    submit_result: Any = None  # accepted submit answers carry this JSON value as result, not the task id


@dataclass
class Reply:
    status: int
    body: Any = None
    kind: str = "json"  # json | empty | text


def envelope(code: int, description: str, result: str | None = None, **properties: Any) -> dict[str, Any]:
    return {"code": code, "description": description, "result": result, "properties": properties}


class Engine:
    def __init__(self, settings: SimSettings, *, accounts: int, concurrency: int, rng: Random):
        self.settings = settings
        self.rng = rng
        self.lock = threading.RLock()
        self._image_lock = threading.Lock()
        self._sign_key = secrets.token_bytes(16)
        self._accounts_count = accounts
        self._concurrency = concurrency
        self.tasks: dict[str, SimTask] = {}
        self.accounts: list[Account] = []
        self._images: OrderedDict[str, bytes] = OrderedDict()
        self.forget_all()

    # -- state -------------------------------------------------------------------------------------

    def forget_all(self) -> None:
        """Restart amnesia: every task, queue and cached image is gone."""
        with self.lock:
            self.tasks.clear()
            self._images.clear()
            self.accounts = [
                Account(f"{1_300_000_000_000_000_000 + i}", [0.0] * self._concurrency)
                for i in range(self._accounts_count)
            ]

    def reshape(self, accounts: int | None = None, concurrency: int | None = None) -> None:
        with self.lock:
            self._accounts_count = accounts or self._accounts_count
            self._concurrency = concurrency or self._concurrency
            self.accounts = [
                Account(f"{1_300_000_000_000_000_000 + i}", [0.0] * self._concurrency)
                for i in range(self._accounts_count)
            ]

    def fault(self, name: str) -> bool:
        rate = float(self.settings.faults.get(name, 0.0) or 0.0)
        return rate > 0 and self.rng.random() < rate

    def _new_id(self, now: float) -> str:
        if self.settings.next_ids:
            return self.settings.next_ids.pop(0)
        while True:
            task_id = f"{int(now * 1000)}{self.rng.randrange(1000):03d}"
            if task_id not in self.tasks:
                return task_id

    # -- rendering ---------------------------------------------------------------------------------

    def image_url(self, task: SimTask, base_url: str, finish_time: float, suffix: str = "png") -> str:
        """A Discord-style signed link to a finished task's image (or, with suffix "mp4", its video) that
        expires image_ttl seconds after the task finished."""
        if self.settings.image_url and suffix == "png":
            return self.settings.image_url
        expiry = math.ceil(finish_time + self.settings.image_ttl)
        ex = format(expiry, "x")
        base = (self.settings.public_url or base_url).rstrip("/")
        name = f"{task.image_name}.{suffix}"
        return (
            f"{base}/attachments/{task.id}/{name}"
            f"?ex={ex}&is={format(int(finish_time), 'x')}&hm={self._sign(task.id, name, ex)}&"
        )

    def _sign(self, task_id: str, name: str, ex: str) -> str:
        return hmac.new(self._sign_key, f"{task_id}/{name}/{ex}".encode(), hashlib.sha256).hexdigest()

    def task_json(self, task: SimTask, now: float, base_url: str | None = None) -> dict[str, Any]:
        phase = phase_at(task, now)

        def ms(t: float | None) -> int | None:
            return None if t is None else int(t * 1000)

        image_url = video_url = None
        if phase.status == "SUCCESS":
            image_url = self.image_url(task, base_url or task.base_url, phase.finish_time or now)
            if task.action == "VIDEO":
                video_url = self.image_url(task, base_url or task.base_url, phase.finish_time or now, "mp4")
        properties: dict[str, Any] = {
            "finalPrompt": task.final_prompt,
            "notifyHook": task.notify_hook,
            "discordInstanceId": task.account.instance_id,
            "messageHash": task.message_hash,
            "flags": 0,
        }
        if task.custom_id:
            properties["customId"] = task.custom_id
        data: dict[str, Any] = {
            "id": task.id,
            "action": task.action,
            "status": phase.status,
            "prompt": task.prompt,
            "promptEn": task.extra.get("promptEn", task.prompt),
            "description": task.description.ljust(self.settings.description_chars, "x"),
            "state": task.state,
            "submitTime": ms(task.submit_time),
            "startTime": ms(phase.start_time),
            "finishTime": ms(phase.finish_time),
            "imageUrl": image_url,
            "progress": phase.progress,
            "failReason": task.fail_reason if phase.status == "FAILURE" else None,
            "buttons": buttons_for(task) if phase.status == "SUCCESS" else [],
            "properties": properties,
        }
        if self.settings.flavor == "csharp":
            data.update(
                {
                    "mode": task.mode,
                    "botType": task.bot_type,
                    "customId": task.custom_id,
                    "instanceId": task.account.instance_id,
                    "parentId": task.parent_id,
                    "seed": task.seed if phase.status == "SUCCESS" else None,
                    "videoUrl": video_url,
                    "videoUrls": [{"url": video_url}] if video_url else None,
                    "imageUrls": [{"url": image_url}] if image_url else None,
                    "displays": {"submitTimeFormat": None, "finishTimeFormat": None},
                }
            )
        return data

    # -- submissions ---------------------------------------------------------------------------------

    def submit(self, kind: str, body: dict[str, Any], base_url: str, prefix: str = "") -> Reply:
        if kind in CSHARP_ONLY and self.settings.flavor != "csharp":
            return _no_route(f"/mj/submit/{kind}")
        if self.fault("no_account"):
            return Reply(200, envelope(NO_ACCOUNT_CODE, "无可用的账号实例"))
        handler = getattr(self, "_submit_" + kind.replace("-", "_"))
        with self.lock:
            return handler(body, base_url, self._mode(body, PREFIX_MODES.get(prefix, "FAST")))

    def _mode(self, body: dict[str, Any], prefix_mode: str) -> str:
        """The speed a submission asks for: the C# upstream's ``accountFilter.modes`` first, else the path
        prefix (FAST without either)."""
        account_filter = body.get("accountFilter")
        modes = account_filter.get("modes") if isinstance(account_filter, dict) else None
        if self.settings.flavor == "csharp" and isinstance(modes, list):
            for mode in modes:
                if isinstance(mode, str) and mode.upper() in MODES:
                    return mode.upper()
        return prefix_mode

    def _invalid(self, description: str) -> Reply:
        return Reply(200, envelope(4, description))

    def _not_found(self, description: str = "关联任务不存在或已失效") -> Reply:
        return Reply(404 if self.settings.flavor == "csharp" else 200, envelope(3, description))

    def _refuse_banned(self, prompt: str) -> Reply | None:
        """Code 24 for a prompt holding a banned word (with the word and the prompt), else None."""
        banned = self._banned(prompt)
        return Reply(200, envelope(24, "可能包含敏感词", None, promptEn=prompt, bannedWord=banned)) if banned else None

    def _banned(self, prompt: str) -> str | None:
        lowered = prompt.lower()
        return next((w for w in self.settings.banned_words if w and w.lower() in lowered), None)

    def _new_task(self, action: str, prompt: str, description: str, body: dict, base_url: str, mode: str,
                  now: float, account: Account | None = None) -> SimTask:
        task_id = self._new_id(now)
        slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:40] or "image"
        task = SimTask(
            id=task_id,
            action=action,
            prompt=prompt,
            description=description,
            submit_time=now,
            step=max(self.settings.step_seconds, 1e-4) * MODE_PACE.get(mode, 1.0),
            account=account or self.accounts[0],
            base_url=base_url,
            message_hash=str(uuid.UUID(int=self.rng.getrandbits(128), version=4)),
            image_name=f"sim_{slug}",
            state=body.get("state"),
            notify_hook=body.get("notifyHook") or self.settings.notify_hook,
            mode=mode,
            final_prompt=f"{prompt} --v 6.1" if prompt else "",
            seed=str(self.rng.randrange(10**9, 10**10)),
        )
        n = task.in_progress_steps
        if self.fault("stuck"):
            task.stuck_at = self.rng.randint(0, max(n, 1) - 1) if n else 0
        elif self.fault("late_fail"):
            task.fail_step, task.fail_reason = n + 1, "任务超时"
        elif self.settings.fail_rate > 0 and self.rng.random() < self.settings.fail_rate:
            task.fail_step = self.rng.randint(1, n + 1)
            task.fail_reason = self.settings.fail_reason or self.rng.choice(FAIL_REASONS)
        if n >= 3 and self.fault("progress_backwards"):
            task.backwards_at = self.rng.randint(3, n)
        return task

    def _schedule(self, task: SimTask, now: float, pinned: Account | None = None) -> Reply | None:
        """Give ``task`` a slot; None when every line is full (the caller answers 23/9)."""
        candidates = [pinned] if pinned is not None else self.accounts
        best: Account | None = None
        for account in candidates:
            start = account.earliest_start(now)
            if start > now and account.waiting(now) >= self.settings.queue_size:
                continue
            if best is None or start < best.earliest_start(now):
                best = account
        if best is None:
            return None
        waiting = best.waiting(now)
        task.account = best
        task.start_at = best.take_slot(now, task.duration)
        task.modal = False
        self.tasks[task.id] = task
        if task.start_at > now:
            return Reply(200, envelope(22, f"排队中，前面还有{waiting}个任务", task.id,
                                       numberOfQueues=waiting + 1, discordInstanceId=best.instance_id))
        return Reply(200, envelope(1, "提交成功", task.id, discordInstanceId=best.instance_id))

    def _queue_full(self) -> Reply:
        if self.settings.flavor == "csharp":
            return Reply(200, envelope(9, "队列已满"))
        return Reply(200, envelope(23, "队列已满，请稍后尝试"))

    def _accept(self, task: SimTask, now: float, pinned: Account | None = None) -> Reply:
        reply = self._schedule(task, now, pinned)
        return reply if reply is not None else self._queue_full()

    def _submit_imagine(self, body: dict, base_url: str, mode: str) -> Reply:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            return self._invalid("prompt不能为空")
        images = body.get("base64Array")
        if images is not None and (not isinstance(images, list) or len(images) > 5
                                   or not all(_is_data_url(x) for x in images)):
            return self._invalid("base64格式错误")
        if (refused := self._refuse_banned(prompt)) is not None:
            return refused
        now = time.time()
        task = self._new_task("IMAGINE", prompt, f"/imagine {prompt}", body, base_url, mode, now)
        return self._accept(task, now)

    def _submit_shorten(self, body: dict, base_url: str, mode: str) -> Reply:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            return self._invalid("prompt不能为空")
        if (refused := self._refuse_banned(prompt)) is not None:
            return refused
        now = time.time()
        task = self._new_task("SHORTEN", prompt, f"/shorten {prompt}", body, base_url, mode, now)
        task.extra["promptEn"] = " ".join(prompt.split()[:6])
        return self._accept(task, now)

    def _submit_describe(self, body: dict, base_url: str, mode: str) -> Reply:
        source = body.get("base64") or body.get("link")
        if not isinstance(source, str) or not source:
            return self._invalid("base64或link不能为空")
        if body.get("base64") and not _is_data_url(body["base64"]):
            return self._invalid("base64格式错误")
        now = time.time()
        task = self._new_task("DESCRIBE", "", "/describe", body, base_url, mode, now)
        task.extra["promptEn"] = "\n\n".join(f"{i}️⃣ a simulated picture, variant {i} --ar 1:1" for i in range(1, 5))
        return self._accept(task, now)

    def _submit_blend(self, body: dict, base_url: str, mode: str) -> Reply:
        images = body.get("base64Array")
        if not isinstance(images, list) or not 2 <= len(images) <= 5 or not all(_is_data_url(x) for x in images):
            return self._invalid("base64List参数错误")
        dimensions = body.get("dimensions", "SQUARE")
        if dimensions not in DIMENSIONS:
            return self._invalid("dimensions参数错误")
        now = time.time()
        task = self._new_task("BLEND", "", "/blend", body, base_url, mode, now)
        return self._accept(task, now)

    def _parent(self, task_id: Any) -> SimTask | Reply:
        if not isinstance(task_id, str) or not task_id:
            return self._invalid("taskId不能为空")
        parent = self.tasks.get(task_id)
        if parent is None:
            return self._not_found()
        if phase_at(parent, time.time()).status != "SUCCESS":
            return self._invalid("关联任务状态错误")
        return parent

    def _child(self, parent: SimTask, custom_id: str, body: dict, base_url: str, mode: str) -> Reply:
        parsed = parse_custom_id(custom_id)
        if parsed is None:
            return self._invalid("customId参数错误")
        action, index, opens_modal = parsed
        now = time.time()
        done = next((t for t in self.tasks.values() if t.parent_id == parent.id and t.custom_id == custom_id
                     and phase_at(t, now).status == "SUCCESS"), None)
        if done is not None and not opens_modal:
            # The same button pressed again on a finished result: the existing task, with its image.
            finish = phase_at(done, now).finish_time or now
            return Reply(200, envelope(21, "任务已存在", done.id, status="SUCCESS",
                                       imageUrl=self.image_url(done, base_url, finish),
                                       discordInstanceId=done.account.instance_id))
        label = {"UPSCALE": f"U{index}", "VARIATION": f"V{index}", "REROLL": "R"}.get(action, action.lower())
        task = self._new_task(action, parent.prompt, f"/up {parent.id} {label}", body, base_url, mode, now,
                              account=parent.account)
        task.custom_id, task.parent_id = custom_id, parent.id
        if opens_modal:
            task.modal = True
            self.tasks[task.id] = task
            return Reply(200, envelope(21, "窗口等待", task.id, discordInstanceId=parent.account.instance_id))
        return self._accept(task, now, pinned=parent.account)

    def _submit_action(self, body: dict, base_url: str, mode: str) -> Reply:
        custom_id = body.get("customId")
        if not isinstance(custom_id, str) or not custom_id:
            return self._invalid("customId不能为空")
        parent = self._parent(body.get("taskId"))
        if isinstance(parent, Reply):
            return parent
        return self._child(parent, custom_id, body, base_url, mode)

    def _submit_change(self, body: dict, base_url: str, mode: str) -> Reply:
        action, index = body.get("action"), body.get("index")
        if action not in ("UPSCALE", "VARIATION", "REROLL"):
            return self._invalid("action参数错误")
        if action != "REROLL" and (not isinstance(index, int) or isinstance(index, bool) or not 1 <= index <= 4):
            return self._invalid("index参数错误")
        parent = self._parent(body.get("taskId"))
        if isinstance(parent, Reply):
            return parent
        return self._child(parent, _change_custom_id(parent, action, index or 0), body, base_url, mode)

    def _submit_simple_change(self, body: dict, base_url: str, mode: str) -> Reply:
        content = body.get("content")
        match = re.fullmatch(r"\s*(\d+)\s+(?:([UV])([1-4])|(R))\s*", content) if isinstance(content, str) else None
        if match is None:
            return self._invalid("content参数错误")
        parent = self._parent(match.group(1))
        if isinstance(parent, Reply):
            return parent
        action = {"U": "UPSCALE", "V": "VARIATION"}.get(match.group(2) or "", "REROLL")
        index = int(match.group(3) or 0)
        return self._child(parent, _change_custom_id(parent, action, index), body, base_url, mode)

    def _submit_modal(self, body: dict, base_url: str, mode: str) -> Reply:
        task_id = body.get("taskId")
        if not isinstance(task_id, str) or not task_id:
            return self._invalid("taskId不能为空")
        task = self.tasks.get(task_id)
        if task is None:
            return self._not_found()
        if not task.modal:
            return self._invalid("任务状态错误")
        prompt = body.get("prompt")
        if isinstance(prompt, str) and prompt.strip():
            if (refused := self._refuse_banned(prompt)) is not None:
                return refused
            task.prompt, task.final_prompt = prompt, f"{prompt} --v 6.1"
        return self._accept(task, time.time(), pinned=task.account)

    def _submit_video(self, body: dict, base_url: str, mode: str) -> Reply:
        """Image to video: the image of a finished task (taskId, index 1-4 of a grid) or one given as
        imageUrl/base64, animated with motion "low" or "high"."""
        motion = body.get("motion", "low")
        if motion not in ("low", "high"):
            return self._invalid("motion参数错误")
        prompt = body["prompt"] if isinstance(body.get("prompt"), str) else ""
        now = time.time()
        if body.get("taskId") is not None:
            parent = self._parent(body.get("taskId"))
            if isinstance(parent, Reply):
                return parent
            index = body.get("index", 1)
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index <= 4:
                return self._invalid("index参数错误")
            task = self._new_task("VIDEO", prompt or parent.prompt, f"/video {parent.id} {index}", body, base_url,
                                  mode, now, account=parent.account)
            task.parent_id = parent.id
            return self._accept(task, now, pinned=parent.account)
        source = body.get("imageUrl") or body.get("base64")
        if not isinstance(source, str) or not source:
            return self._invalid("taskId或imageUrl不能为空")
        if body.get("base64") and not _is_data_url(body["base64"]):
            return self._invalid("base64格式错误")
        task = self._new_task("VIDEO", prompt, "/video", body, base_url, mode, now)
        return self._accept(task, now)

    def _submit_edits(self, body: dict, base_url: str, mode: str) -> Reply:
        """Edit an image (a data URL in ``image``, or ``imageUrl``) following a prompt, optionally inside
        a mask (``maskBase64``)."""
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            return self._invalid("prompt不能为空")
        source = body.get("image") or body.get("imageUrl")
        if not isinstance(source, str) or not source:
            return self._invalid("image不能为空")
        if body.get("image") and not _is_data_url(body["image"]):
            return self._invalid("base64格式错误")
        if (refused := self._refuse_banned(prompt)) is not None:
            return refused
        now = time.time()
        task = self._new_task("EDITS", prompt, f"/edits {prompt}", body, base_url, mode, now)
        return self._accept(task, now)

    def _submit_upload_discord_images(self, body: dict, base_url: str, mode: str) -> Reply:
        """Upload images to Discord: answered at once with their links, no task."""
        images = body.get("base64Array")
        if not isinstance(images, list) or not images or len(images) > 5:
            return self._invalid("base64 参数错误")
        if not all(_is_data_url(x) for x in images):
            return self._invalid("base64格式错误")
        base = (self.settings.public_url or base_url).rstrip("/")
        links = [f"{base}/attachments/uploads/{uuid.UUID(int=self.rng.getrandbits(128), version=4).hex}.png"
                 for _ in images]
        return Reply(200, {"code": 1, "description": "提交成功", "result": links, "properties": {}})

    def swap_face(self, body: dict[str, Any], base_url: str, prefix: str = "") -> Reply:
        """InsightFace: the face of sourceBase64 put on targetBase64 (both data URLs); a task to poll."""
        if self.settings.flavor != "csharp":
            return _no_route("/mj/insight-face/swap")
        if self.fault("no_account"):
            return Reply(200, envelope(NO_ACCOUNT_CODE, "无可用的账号实例"))
        for name in ("sourceBase64", "targetBase64"):
            if not _is_data_url(body.get(name)):
                return self._invalid(f"{name}参数错误")
        with self.lock:
            now = time.time()
            mode = self._mode(body, PREFIX_MODES.get(prefix, "FAST"))
            task = self._new_task("SWAP_FACE", "InsightFace", "/swap", body, base_url, mode, now)
            return self._accept(task, now)

    def cancel(self, task_id: str) -> Reply:
        """Stop an unfinished task (C# upstreams): it reports CANCEL from now on."""
        if self.settings.flavor != "csharp":
            return _no_route(f"/mj/task/{task_id}/cancel")
        with self.lock:
            task = self.tasks.get(task_id)
            if task is None:
                return self._not_found("任务不存在")
            now = time.time()
            if phase_at(task, now).finished:
                return self._invalid("任务状态错误")
            task.cancelled_at = now
            return Reply(200, envelope(1, "成功", task.id))

    # -- queries -------------------------------------------------------------------------------------

    def fetch(self, task_id: str, base_url: str) -> Reply:
        with self.lock:
            task = self.tasks.get(task_id)
            if task is None:
                return Reply(204, None, "empty") if self.settings.flavor == "csharp" else Reply(200, None, "empty")
            return Reply(200, self.task_json(task, time.time(), base_url))

    def list_by_condition(self, body: dict, base_url: str) -> Reply:
        ids = body.get("ids")
        if not isinstance(ids, list):
            return Reply(200, [])
        now = time.time()
        with self.lock:
            found = [self.tasks[i] for i in ids if isinstance(i, str) and i in self.tasks]
            kept = [t for t in found if not self.fault("drop_ids")]
            # Never the request's order: real upstreams answer in store order.
            kept.reverse()
            return Reply(200, [self.task_json(t, now, base_url) for t in kept])

    def list_tasks(self, base_url: str) -> Reply:
        now = time.time()
        with self.lock:
            latest = sorted(self.tasks.values(), key=lambda t: (t.submit_time, t.id), reverse=True)[:100]
            return Reply(200, [self.task_json(t, now, base_url) for t in latest])

    def image_seed(self, task_id: str) -> Reply:
        with self.lock:
            task = self.tasks.get(task_id)
            if task is None:
                return self._not_found("任务不存在")
            if phase_at(task, time.time()).status != "SUCCESS":
                return self._invalid("任务状态错误")
            return Reply(200, envelope(1, "成功", task.seed))

    # -- images --------------------------------------------------------------------------------------

    def image(self, task_id: str, name: str, ex: str, hm: str) -> Reply | bytes:
        """The PNG bytes of a finished task (the MP4 of a finished video task for ``<name>.mp4``), or a
        403/404 reply (Discord's expired-link answer)."""
        now = time.time()
        with self.lock:
            task = self.tasks.get(task_id)
            phase = phase_at(task, now) if task is not None else None
        names = () if task is None else (f"{task.image_name}.png",) + (
            (f"{task.image_name}.mp4",) if task.action == "VIDEO" else ())
        if task is None or phase is None or phase.status != "SUCCESS" or name not in names:
            return Reply(404, {"message": "Unknown attachment", "code": 0})
        try:
            expiry = int(ex, 16)
        except ValueError:
            expiry = -1
        good = hmac.compare_digest(hm, self._sign(task.id, name, ex))
        if not good or now > expiry or now > (phase.finish_time or now) + self.settings.image_ttl:
            return Reply(403, {"message": "This content is no longer available.", "code": 403})
        if name.endswith(".mp4"):
            return self._media_bytes(task, "mp4")
        return self._media_bytes(task, "png")

    def _media_bytes(self, task: SimTask, kind: str) -> bytes:
        """The task's PNG or MP4. It differs per task, even between two tasks (two simulators) with the
        same id: the key holds the task's random message hash too."""
        key = f"{task.id}/{task.message_hash}/{kind}"
        with self._image_lock:  # one generation at a time: a 50 MB image is built once, not per request
            data = self._images.get(key)
            if data is None:
                data = (make_mp4(key, self.settings.video_bytes) if kind == "mp4"
                        else make_png(key, self.settings.image_bytes))
                self._images[key] = data
                while sum(map(len, self._images.values())) > IMAGE_CACHE_BYTES and len(self._images) > 1:
                    self._images.popitem(last=False)
            else:
                self._images.move_to_end(key)
            return data

    # -- push support ----------------------------------------------------------------------------------

    def changed_snapshots(self) -> list[tuple[str, dict[str, Any], dict[str, Any] | None]]:
        """(hook, new snapshot, previous snapshot) for every hooked task whose status or progress changed."""
        now = time.time()
        out = []
        with self.lock:
            for task in self.tasks.values():
                if not task.notify_hook or task.push_done:
                    continue
                phase = phase_at(task, now)
                if phase.status in ("NOT_START", "MODAL"):
                    continue
                key = (phase.status, phase.progress)
                if key == task.pushed_key:
                    continue
                snapshot = self.task_json(task, now)
                out.append((task.notify_hook, snapshot, task.pushed_snapshot))
                task.pushed_key, task.pushed_snapshot = key, snapshot
                task.push_done = phase.status in FINISHED_STATUSES
        return out


def _no_route(path: str) -> Reply:
    """A Java (Spring) upstream's answer to a route it does not have."""
    return Reply(404, {"timestamp": int(time.time() * 1000), "status": 404, "error": "Not Found", "path": path})


def _is_data_url(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("data:") and ";base64," in value


def _change_custom_id(parent: SimTask, action: str, index: int) -> str:
    if action == "REROLL":
        return f"MJ::JOB::reroll::0::{parent.message_hash}::SOLO"
    kind = "upsample" if action == "UPSCALE" else "variation"
    return f"MJ::JOB::{kind}::{index}::{parent.message_hash}"
