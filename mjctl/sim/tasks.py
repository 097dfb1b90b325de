"""Simulated tasks: their fixed fate, the lazily computed lifecycle, buttons and the camelCase JSON.

A task's whole future is decided when it is created (start time, number of steps, failure, stuck point,
one backwards progress report); its state at any moment is computed from the elapsed time, so tests with
a tiny ``step`` are fast and deterministic and no background thread is needed to move tasks along.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from mjctl.protocol import FINISHED_STATUSES

PERCENTAGES = ("15%", "31%", "46%", "62%", "78%", "93%")
# Actions that finish after about one step, without percentages.
QUICK_ACTIONS = frozenset({"UPSCALE", "UPSCALE_HD", "DESCRIBE", "SHORTEN", "SWAP_FACE"})
# Actions whose result is a 2x2 grid, answered with U1-U4, reroll and V1-V4 buttons.
GRID_ACTIONS = frozenset({"IMAGINE", "VARIATION", "REROLL", "BLEND", "ZOOM", "PAN", "INPAINT", "EDITS"})


@dataclass
class Account:
    """One Discord account: ``concurrency`` slots running at once and a bounded waiting line."""

    instance_id: str
    slot_free_at: list[float]
    queued_starts: list[float] = field(default_factory=list)

    def waiting(self, now: float) -> int:
        self.queued_starts = [t for t in self.queued_starts if t > now]
        return len(self.queued_starts)

    def earliest_start(self, now: float) -> float:
        return max(now, min(self.slot_free_at))

    def take_slot(self, now: float, duration: float) -> float:
        index = min(range(len(self.slot_free_at)), key=self.slot_free_at.__getitem__)
        start = max(now, self.slot_free_at[index])
        self.slot_free_at[index] = start + duration
        if start > now:
            self.queued_starts.append(start)
        return start


@dataclass
class SimTask:
    id: str
    action: str
    prompt: str
    description: str
    submit_time: float
    step: float
    account: Account
    base_url: str
    message_hash: str
    image_name: str
    state: Any = None
    notify_hook: str | None = None
    mode: str = "FAST"
    bot_type: str = "MID_JOURNEY"
    custom_id: str | None = None
    parent_id: str | None = None
    final_prompt: str = ""
    start_at: float | None = None  # None while parked in MODAL
    modal: bool = False
    fail_step: int | None = None  # step at which the task fails, counted like `steps`
    fail_reason: str = ""
    stuck_at: int | None = None
    backwards_at: int | None = None
    seed: str = ""
    cancelled_at: float | None = None  # when a cancel request stopped it (C# upstreams)
    extra: dict[str, Any] = field(default_factory=dict)
    # push bookkeeping (owned by the pusher, guarded by the engine's lock)
    pushed_key: tuple[str, Any] | None = None
    pushed_snapshot: dict[str, Any] | None = None
    push_done: bool = False

    @property
    def in_progress_steps(self) -> int:
        return 0 if self.action in QUICK_ACTIONS else len(PERCENTAGES)

    @property
    def duration(self) -> float:
        """Time the task occupies an account slot once started."""
        return (self.in_progress_steps + 1) * self.step


@dataclass(frozen=True)
class Phase:
    status: str
    progress: str | None
    start_time: float | None
    finish_time: float | None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_STATUSES


def phase_at(task: SimTask, now: float) -> Phase:
    """Where ``task`` is at ``now``: step 0 is SUBMITTED, 1..n IN_PROGRESS, n+1 the end; CANCEL from the
    moment a cancel request stopped it."""
    if task.cancelled_at is not None and now >= task.cancelled_at:
        started = task.start_at if task.start_at is not None and task.start_at <= task.cancelled_at else None
        return Phase("CANCEL", "", started, task.cancelled_at)
    if task.start_at is None:
        return Phase("MODAL", None, None, None)
    if now < task.start_at:
        return Phase("NOT_START", None, None, None)
    n = task.in_progress_steps
    k = int(math.floor((now - task.start_at) / task.step))
    if task.stuck_at is not None:
        k = min(k, task.stuck_at)
    if task.fail_step is not None and k >= task.fail_step:
        return Phase("FAILURE", "", task.start_at, task.start_at + task.fail_step * task.step)
    if k == 0:
        return Phase("SUBMITTED", "0%", task.start_at, None)
    if k <= n:
        shown = k - 3 if task.backwards_at == k and k >= 3 else k - 1
        return Phase("IN_PROGRESS", PERCENTAGES[shown], task.start_at, None)
    return Phase("SUCCESS", "100%", task.start_at, task.start_at + (n + 1) * task.step)


def _button(custom_id: str, label: str = "", emoji: str = "", style: int = 2) -> dict[str, Any]:
    return {"customId": custom_id, "emoji": emoji, "label": label, "type": 2, "style": style}


def buttons_for(task: SimTask) -> list[dict[str, Any]]:
    h = task.message_hash
    if task.action in GRID_ACTIONS:
        ups = [_button(f"MJ::JOB::upsample::{i}::{h}", f"U{i}") for i in range(1, 5)]
        reroll = [_button(f"MJ::JOB::reroll::0::{h}::SOLO", "", "🔄")]
        variations = [_button(f"MJ::JOB::variation::{i}::{h}", f"V{i}") for i in range(1, 5)]
        return ups + reroll + variations
    if task.action in ("UPSCALE", "UPSCALE_HD"):
        return [
            _button(f"MJ::JOB::upsample_v6_2x_subtle::1::{h}::SOLO", "Upscale (Subtle)", "⬆️"),
            _button(f"MJ::JOB::high_variation::1::{h}::SOLO", "Vary (Strong)", "🪄"),
            _button(f"MJ::JOB::low_variation::1::{h}::SOLO", "Vary (Subtle)", "🪄"),
            _button(f"MJ::Inpaint::1::{h}::SOLO", "Vary (Region)", "🖌️"),
            _button(f"MJ::Outpaint::50::1::{h}::SOLO", "Zoom Out 2x", "🔍"),
            _button(f"MJ::Outpaint::75::1::{h}::SOLO", "Zoom Out 1.5x", "🔍"),
            _button(f"MJ::CustomZoom::{h}", "Custom Zoom", "🔍"),
            _button(f"MJ::JOB::pan_left::1::{h}::SOLO", "", "⬅️"),
            _button(f"MJ::JOB::pan_right::1::{h}::SOLO", "", "➡️"),
            _button(f"MJ::JOB::pan_up::1::{h}::SOLO", "", "⬆️"),
            _button(f"MJ::JOB::pan_down::1::{h}::SOLO", "", "⬇️"),
        ]
    return []


_JOB = re.compile(r"^MJ::JOB::([a-z0-9_]+)::(\d+)::[0-9a-fA-F-]+(::SOLO)?$")


def parse_custom_id(custom_id: str) -> tuple[str, int, bool] | None:
    """(action, index, opens_modal) for a button's customId, or None when it is not one we know."""
    if custom_id.startswith("MJ::CustomZoom::"):
        return "ZOOM", 1, True
    if custom_id.startswith("MJ::Inpaint::"):
        return "INPAINT", 1, True
    if custom_id.startswith("MJ::Outpaint::"):
        return "ZOOM", 1, False
    match = _JOB.match(custom_id)
    if match is None:
        return None
    kind, index = match.group(1), int(match.group(2))
    if kind == "upsample" and 1 <= index <= 4:
        return "UPSCALE", index, False
    if kind.startswith("upsample_"):
        return "UPSCALE", index, False
    if kind in ("variation", "high_variation", "low_variation") and 1 <= index <= 4:
        return "VARIATION", index, False
    if kind == "reroll":
        return "REROLL", 0, False
    if kind.startswith("pan_"):
        return "PAN", index, False
    return None
