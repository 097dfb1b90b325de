"""The Simulator: settings, faults, statistics and the Bottle app serving the upstream API (docs/upstream.md)."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import fields
from random import Random
from typing import Any

import bottle

from mjctl.protocol import ACCEPTED_CODES, SUBMIT_KINDS, SWAP_FACE_PATH
from mjctl.sim.engine import PREFIX_MODES, Engine, Reply, SimSettings, envelope
from mjctl.sim.push import Pusher

#: Named faults, each injected at a rate (0..1). Besides real upstreams' faults, two that attack a client's timeouts:
#: ``hang`` holds the request hang_seconds before answering; ``trickle`` sends the answer (API or image)
#: one byte every trickle_seconds, with its full Content-Length, so no single read ever times out.
#: ``no_account`` answers a submission with code 3, "no account instance available".
FAULTS = (
    "stuck", "late_fail", "drop_ids", "error_5xx", "slow", "unauthorized", "rate_limit",
    "progress_backwards", "amnesia", "push_duplicate", "push_out_of_order", "hang", "trickle", "no_account",
)
FLAVORS = ("java", "csharp")
ENDPOINTS = (*SUBMIT_KINDS, "swap-face", "cancel", "fetch", "list-by-condition", "list", "image-seed", "image",
             "unknown")
CHUNK = 256 * 1024


class Simulator:
    """A simulated midjourney-proxy upstream; ``sim.app`` is its WSGI (Bottle) application.

    Control endpoints beside the API: ``GET /_sim/stats``, ``GET|POST /_sim/faults`` (fault rates and
    settings), ``POST /_sim/restart`` (forget every task), ``POST /_sim/reset-stats``, and
    ``POST /_sim/push {"url": …, "task": {…}}``, which sends one push as anyone holding a leaked notify link
    could (:meth:`push_as`)."""

    def __init__(
        self,
        secret: str | None = "sim-secret",
        *,
        step_seconds: float = 1.0,
        fail_rate: float = 0.0,
        accounts: int = 1,
        concurrency: int = 3,
        queue_size: int = 10,
        image_ttl: float = 86400.0,
        image_bytes: int | None = None,
        flavor: str = "java",
        seed: int | None = None,
        faults: dict[str, float] | None = None,
        public_url: str | None = None,
        slow_seconds: float = 2.0,
        notify_hook: str | None = None,
        banned_words: list[str] | tuple[str, ...] = ("bannedword",),
    ):
        if flavor not in FLAVORS:
            raise ValueError(f"flavor must be one of {', '.join(FLAVORS)}")
        if accounts < 1 or concurrency < 1 or queue_size < 0 or step_seconds <= 0:
            raise ValueError("accounts and concurrency must be >= 1, queue_size >= 0 and step_seconds > 0")
        self.secret = secret
        self.settings = SimSettings(
            flavor=flavor, step_seconds=step_seconds, fail_rate=fail_rate, queue_size=queue_size,
            image_ttl=image_ttl, image_bytes=image_bytes, slow_seconds=slow_seconds,
            banned_words=list(banned_words), notify_hook=notify_hook, public_url=public_url,
        )
        self.update(dict(faults or {}))
        self.engine = Engine(self.settings, accounts=accounts, concurrency=concurrency, rng=Random(seed))
        self._stats_lock = threading.Lock()
        self._stats: Counter[str] = Counter()
        self._by_prefix: Counter[str] = Counter()
        self._by_status: Counter[str] = Counter()
        self._pushes: Counter[str] = Counter()
        self._faults_hit: Counter[str] = Counter()
        self.pusher = Pusher(self.engine, self._count_push)
        self._stopping = threading.Event()  # ends the waits of 'hang' and 'trickle' when the simulator stops
        self.app = self._build_app()

    # -- control ---------------------------------------------------------------------------------------

    @property
    def faults(self) -> dict[str, float]:
        return self.settings.faults

    def update(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Merge fault rates and settings (step_seconds, fail_rate, flavor, ...); returns the new state.

        Raises ValueError for an unknown key or a bad value, changing nothing.
        """
        faults = dict(self.settings.faults)
        settings: dict[str, Any] = {}
        reshape: dict[str, int] = {}
        known = {f.name for f in fields(SimSettings)} - {"faults"}
        for key, value in changes.items():
            if key == "faults" and isinstance(value, dict):
                for name, rate in value.items():
                    faults[name] = _rate(name, rate)
            elif key in FAULTS:
                faults[key] = _rate(key, value)
            elif key in ("accounts", "concurrency"):
                if not isinstance(value, int) or value < 1:
                    raise ValueError(f"{key} must be an integer >= 1")
                reshape[key] = value
            elif key in known:
                settings[key] = _setting(key, value)
            else:
                raise ValueError(f"unknown fault or setting: {key}")
        for name in faults:
            if name not in FAULTS:
                raise ValueError(f"unknown fault: {name}")
        self.settings.faults = faults
        for key, value in settings.items():
            setattr(self.settings, key, value)
        if reshape:
            self.engine.reshape(**reshape)
        return self.describe()

    def describe(self) -> dict[str, Any]:
        state = {f.name: getattr(self.settings, f.name) for f in fields(SimSettings)}
        state["faults"] = {name: self.settings.faults.get(name, 0.0) for name in FAULTS}
        return state

    def restart(self) -> None:
        """Forget every task, as an in-memory upstream does when restarted (settings and stats stay)."""
        self.engine.forget_all()
        with self._stats_lock:
            self._stats["restarts"] += 1

    def reset_stats(self) -> None:
        with self._stats_lock:
            for counter in (self._stats, self._by_prefix, self._by_status, self._pushes, self._faults_hit):
                counter.clear()

    def stats(self) -> dict[str, Any]:
        """Request counts per endpoint (flat keys such as ``"list-by-condition"``) plus totals."""
        with self._stats_lock:
            out: dict[str, Any] = {name: self._stats[name] for name in ENDPOINTS}
            out["total"] = sum(self._stats[name] for name in ENDPOINTS)
            out["restarts"] = self._stats["restarts"]
            out["by_prefix"] = {p or "/mj": self._by_prefix[p] for p in PREFIX_MODES}
            out["by_status"] = dict(self._by_status)
            out["faults_injected"] = dict(self._faults_hit)
            out["pushes"] = {k: self._pushes[k] for k in ("push_sent", "push_failed", "push_duplicated",
                                                           "push_out_of_order")}
        with self.engine.lock:
            out["tasks"] = len(self.engine.tasks)
        return out

    def push_as(self, url: str, task: dict[str, Any]) -> dict[str, Any]:
        """POST task to url once, as a notifyHook push, and say how it was answered: ``{"status": …,
        "body": …}``. For tests playing an attacker who holds a leaked notify link (``POST /_sim/push
        {"url", "task"}``); the simulator's own pushes are the pusher's."""
        import httpx

        try:
            response = httpx.post(url, json=task, timeout=httpx.Timeout(10.0, connect=2.0))
        except httpx.HTTPError as exc:
            return {"status": None, "body": str(exc)}
        try:
            body: Any = response.json()
        except ValueError:
            body = response.text
        return {"status": response.status_code, "body": body}

    def stop(self) -> None:
        """Stop the background push threads and cut short any hanging or trickling answer (the app
        itself keeps answering)."""
        self._stopping.set()
        self.pusher.stop()

    def _count_push(self, key: str) -> None:
        with self._stats_lock:
            self._pushes[key] += 1

    # -- web -------------------------------------------------------------------------------------------

    def _build_app(self) -> bottle.Bottle:
        app = bottle.Bottle(catchall=True)
        app.default_error_handler = self._error_page
        methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
        app.route("/", methods, self._dispatch)
        app.route("/<path:path>", methods, self._dispatch)
        return app

    def _error_page(self, error: bottle.HTTPError) -> str:
        bottle.response.content_type = "application/json"
        return json.dumps({"code": 9, "description": f"HTTP {error.status_code}", "result": None,
                           "properties": {}})

    def _dispatch(self, path: str = "") -> bottle.HTTPResponse:
        request = bottle.request
        path = "/" + path
        method = request.method
        if path.startswith("/_sim/"):
            return _render(self._control(path, method))
        if path.startswith("/attachments/"):
            return self._serve_image(path)
        prefix = ""
        for candidate in PREFIX_MODES:
            if candidate and path.startswith(candidate + "/mj/"):
                prefix, path = candidate, path[len(candidate):]
                break
        route = _route(path, method)
        endpoint = route[0] if route else "unknown"
        with self._stats_lock:
            self._stats[endpoint] += 1
            if path.startswith("/mj/"):
                self._by_prefix[prefix] += 1
        reply = self._answer(route, path, prefix, request)
        with self._stats_lock:
            self._by_status[str(reply.status)] += 1
        return self._delivered(_render(reply))

    def _delivered(self, response: bottle.HTTPResponse) -> bottle.HTTPResponse:
        """The response as the 'hang' and 'trickle' faults deliver it (unchanged when neither strikes)."""
        if self._injected("hang"):
            self._stopping.wait(self.settings.hang_seconds)
        if not self._injected("trickle"):
            return response
        body = response.body
        if not isinstance(body, (bytes, str)):
            body = b"".join(c.encode() if isinstance(c, str) else c for c in body)
        data = body.encode() if isinstance(body, str) else body
        response.set_header("Content-Length", str(len(data)))
        pause, stopping = self.settings.trickle_seconds, self._stopping

        def dribble():
            for i in range(len(data)):
                if i and stopping.wait(pause):
                    return  # stopping: the short body tells the client the answer broke off
                yield data[i:i + 1]

        response.body = dribble()
        return response

    def _injected(self, name: str) -> bool:
        if self.engine.fault(name):
            with self._stats_lock:
                self._faults_hit[name] += 1
            return True
        return False

    def _answer(self, route: tuple[str, str] | None, path: str, prefix: str, request: bottle.LocalRequest) -> Reply:
        if route is None:
            if _route(path, "GET" if request.method == "POST" else "POST") is not None:
                return Reply(405, {"code": 4, "description": "Method Not Allowed", "result": None, "properties": {}})
            return Reply(404, {"code": 3, "description": f"No route for {path}", "result": None, "properties": {}})
        if self._injected("amnesia"):
            self.engine.forget_all()
        if self._injected("slow"):
            time.sleep(self.settings.slow_seconds)
        if self._injected("unauthorized"):
            return Reply(401, None, "empty")
        if not self._authorized(request):
            if self.settings.flavor == "csharp":
                return Reply(401, "Unauthorized: invalid mj-api-secret", "text")
            return Reply(401, None, "empty")
        if self._injected("rate_limit"):
            return Reply(429, None, "empty")
        if self._injected("error_5xx"):
            status = self.engine.rng.choice((500, 502, 503))
            return Reply(status, {"timestamp": int(time.time() * 1000), "status": status,
                                  "error": {500: "Internal Server Error", 502: "Bad Gateway",
                                            503: "Service Unavailable"}[status], "path": path})
        endpoint, task_id = route
        base_url = self.settings.public_url or f"{request.urlparts.scheme}://{request.urlparts.netloc}"
        if endpoint == "fetch":
            return self.engine.fetch(task_id, base_url)
        if endpoint == "list":
            return self.engine.list_tasks(base_url)
        if endpoint == "image-seed":
            return self._hostile(self.engine.image_seed(task_id), task_id)
        if endpoint == "cancel":
            return self.engine.cancel(task_id)
        body = _json_body(request, self.settings.flavor)
        if isinstance(body, Reply):
            return body
        if endpoint == "list-by-condition":
            return self.engine.list_by_condition(body, base_url)
        if endpoint == "swap-face":
            reply = self.engine.swap_face(body, base_url, prefix)
        else:
            reply = self.engine.submit(endpoint, body, base_url, prefix)
        if reply.status == 200 and isinstance(reply.body, dict) and isinstance(reply.body.get("result"), str):
            task = self.engine.tasks.get(reply.body["result"])
            if task is not None and task.notify_hook:
                self.pusher.ensure_running()
            return self._hostile(reply, reply.body["result"], submitted=True)
        return reply

    def _hostile(self, reply: Reply, task_id: str, *, submitted: bool = False) -> Reply:
        """An envelope as the hostile-upstream switches change it: the task's notifyHook echoed in its
        properties (at the top and one object down, as wrapping gateways do), a chosen result."""
        if not isinstance(reply.body, dict):
            return reply
        settings = self.settings
        if settings.echo_hook:
            task = self.engine.tasks.get(task_id)
            hook = (task.notify_hook if task is not None else None) or settings.notify_hook
            if hook:
                properties = reply.body.setdefault("properties", {})
                properties["notifyHook"] = hook
                properties["upstream"] = {"notifyHook": hook, "via": [{"notifyHook": hook}]}
        if submitted and settings.submit_result is not None and reply.body.get("code") in ACCEPTED_CODES:
            reply.body["result"] = settings.submit_result
        return reply

    def _authorized(self, request: bottle.LocalRequest) -> bool:
        if self.secret is None:
            return True
        if request.headers.get("mj-api-secret") == self.secret:
            return True
        if self.settings.flavor == "csharp":
            token = request.headers.get("Authorization", "")
            return token.removeprefix("Bearer ").strip() == self.secret
        return False

    def _serve_image(self, path: str) -> bottle.HTTPResponse:
        with self._stats_lock:
            self._stats["image"] += 1
        if self.settings.redirect_to:
            return bottle.HTTPResponse(b"", 302, {"Location": self.settings.redirect_to, "Content-Length": "0"})
        parts = path.split("/")  # "", "attachments", id, name
        query = bottle.request.query
        result: Reply | bytes
        if len(parts) != 4:
            result = Reply(404, {"message": "Unknown attachment", "code": 0})
        else:
            result = self.engine.image(parts[2], parts[3], query.get("ex", ""), query.get("hm", ""))
        if isinstance(result, Reply):
            with self._stats_lock:
                self._by_status[str(result.status)] += 1
            return _render(result)
        with self._stats_lock:
            self._by_status["200"] += 1
        data = result
        kind = "video/mp4" if parts[3].endswith(".mp4") else "image/png"
        headers = {"Content-Type": kind, "Content-Length": str(len(data)), "Cache-Control": "public"}
        if bottle.request.method == "HEAD":
            return bottle.HTTPResponse(b"", 200, headers)
        if self.settings.faults.get("hang") or self.settings.faults.get("trickle"):
            return self._delivered(bottle.HTTPResponse(data, 200, headers))
        return bottle.HTTPResponse(_chunks(data), 200, headers)

    def _control(self, path: str, method: str) -> Reply:
        if path == "/_sim/stats" and method == "GET":
            return Reply(200, self.stats())
        if path == "/_sim/faults" and method == "GET":
            return Reply(200, self.describe())
        if path == "/_sim/faults" and method == "POST":
            try:
                changes = json.loads(bottle.request.body.read() or b"{}")
                if not isinstance(changes, dict):
                    raise ValueError("the body must be a JSON object")
                return Reply(200, self.update(changes))
            except ValueError as exc:
                return Reply(400, {"error": str(exc)})
        if path == "/_sim/restart" and method == "POST":
            self.restart()
            return Reply(200, {"ok": True})
        if path == "/_sim/reset-stats" and method == "POST":
            self.reset_stats()
            return Reply(200, {"ok": True})
        if path == "/_sim/push" and method == "POST":
            try:
                order = json.loads(bottle.request.body.read() or b"{}")
                if not isinstance(order, dict) or not isinstance(order.get("url"), str) \
                        or not isinstance(order.get("task"), dict):
                    raise ValueError('the body must be {"url": "...", "task": {...}}')
            except ValueError as exc:
                return Reply(400, {"error": str(exc)})
            return Reply(200, self.push_as(order["url"], order["task"]))
        return Reply(404, {"error": f"No control endpoint {method} {path}"})


def _route(path: str, method: str) -> tuple[str, str] | None:
    """(endpoint, task id) for an API path such as ``/mj/task/<id>/fetch``, or None."""
    parts = path.strip("/").split("/")
    if len(parts) == 3 and parts[:2] == ["mj", "submit"] and parts[2] in SUBMIT_KINDS and method == "POST":
        return parts[2], ""
    if len(parts) == 3 and parts[:2] == ["mj", "task"]:
        if parts[2] == "list-by-condition" and method == "POST":
            return "list-by-condition", ""
        if parts[2] == "list" and method in ("GET", "HEAD"):
            return "list", ""
    if len(parts) == 4 and parts[:2] == ["mj", "task"] and parts[3] in ("fetch", "image-seed"):
        if method in ("GET", "HEAD"):
            return parts[3], parts[2]
    if len(parts) == 4 and parts[:2] == ["mj", "task"] and parts[3] == "cancel" and method == "POST":
        return "cancel", parts[2]
    if path.rstrip("/") == SWAP_FACE_PATH and method == "POST":
        return "swap-face", ""
    return None


def _json_body(request: bottle.LocalRequest, flavor: str) -> dict[str, Any] | Reply:
    raw = request.body.read()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        if flavor == "csharp":
            return Reply(200, {"success": False, "code": -1, "message": "The JSON value could not be converted."})
        return Reply(400, envelope(4, "Required request body is missing or is not valid JSON"))
    if not isinstance(body, dict):
        return Reply(200, envelope(4, "请求体必须是JSON对象"))
    return body


def _render(reply: Reply) -> bottle.HTTPResponse:
    if reply.kind == "empty":
        return bottle.HTTPResponse(b"", reply.status, {"Content-Length": "0"})
    if reply.kind == "text":
        return bottle.HTTPResponse(str(reply.body), reply.status, {"Content-Type": "text/plain; charset=utf-8"})
    data = json.dumps(reply.body, ensure_ascii=False).encode()
    return bottle.HTTPResponse(data, reply.status, {"Content-Type": "application/json"})


def _chunks(data: bytes):
    view = memoryview(data)
    for start in range(0, len(view), CHUNK):
        yield bytes(view[start : start + CHUNK])


def _rate(name: str, value: Any) -> float:
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"fault {name} needs a rate between 0 and 1") from None
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"fault {name} needs a rate between 0 and 1")
    return rate


def _setting(key: str, value: Any) -> Any:
    if key == "flavor":
        if value not in FLAVORS:
            raise ValueError(f"flavor must be one of {', '.join(FLAVORS)}")
        return value
    if key in ("notify_hook", "public_url", "image_url", "redirect_to", "fail_reason"):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{key} must be a string or null")
        return value or None
    if key == "echo_hook":
        if not isinstance(value, bool):
            raise ValueError("echo_hook must be true or false")
        return value
    if key == "submit_result":
        return value  # any JSON value: the point is to send what a task id must not be
    if key == "description_chars":
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError("description_chars must be a non-negative integer")
        return value
    if key == "banned_words":
        if not isinstance(value, list) or not all(isinstance(w, str) for w in value):
            raise ValueError("banned_words must be a list of strings")
        return value
    if key == "next_ids":
        if not isinstance(value, list) or not all(isinstance(i, str) and 0 < len(i) <= 64 for i in value):
            raise ValueError("next_ids must be a list of ids (strings of 1 to 64 characters)")
        return list(value)
    if key in ("queue_size", "image_bytes", "video_bytes"):
        if value is None and key in ("image_bytes", "video_bytes"):
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{key} must be a non-negative integer")
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number") from None
    if number < 0 or (key == "step_seconds" and number <= 0) or (key == "fail_rate" and number > 1):
        raise ValueError(f"{key} is out of range")
    return number


class SimulatorHandle:
    """A simulator served on a free port: ``.url``, ``.sim``, ``.stop()``; a context manager."""

    def __init__(self, sim: Simulator, server: Any):
        self.sim = sim
        self.server = server
        self.url: str = server.url

    def stop(self) -> None:
        self.sim.stop()
        self.server.stop()

    def __enter__(self) -> SimulatorHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def run_simulator_in_thread(*, host: str = "127.0.0.1", port: int = 0, threads: int = 16,
                            **opts: Any) -> SimulatorHandle:
    """Build a Simulator from ``opts`` and serve it from a background thread (port 0 = a free one)."""
    from mjctl.httpserver import ServerThread

    sim = Simulator(**opts)
    server = ServerThread(sim.app, host=host, port=port, threads=threads).start()
    return SimulatorHandle(sim, server)
