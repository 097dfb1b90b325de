"""midjourney-proxy's Chinese messages in English, for people who read mjctl's output.

The upstreams answer submissions with a Chinese ``description`` ("提交成功", "排队中，前面还有6个任务") and fail
tasks with a Chinese ``failReason`` ("任务超时"). mjctl stores and relays them exactly as sent; front ends
show them through :func:`to_english`, and offer the original alongside (the CLI's ``--raw``). A message
this table does not know is returned unchanged.
"""

from __future__ import annotations

import re

#: Whole messages, as the Java and C# upstreams send them.
EXACT: dict[str, str] = {
    "成功": "Success.",
    "提交成功": "Submitted.",
    "任务超时": "Task timed out.",
    "队列已满": "The queue is full.",
    "队列已满，请稍后尝试": "The queue is full; try again later.",
    "无可用账号": "No account is available.",
    "无可用的账号实例": "No account is available.",
    "已存在": "Already exists.",
    "任务已存在": "The task already exists.",
    "窗口等待": "Waiting for the modal step.",
    "可能包含敏感词": "The prompt may contain banned words.",
    "提交失败，系统异常": "Submission failed: the upstream had an internal error.",
    "参数错误": "Invalid parameters.",
    "任务不存在": "The task does not exist.",
    "任务状态错误": "The task is in the wrong state for this.",
    "关联任务不存在或已失效": "The related task does not exist or has expired.",
    "关联任务状态错误": "The related task is in the wrong state for this.",
    "关联任务不允许执行变化": "The related task does not allow this change.",
    "请求体必须是JSON对象": "The request body must be a JSON object.",
}

#: Messages with a number or a name in them: (pattern, English with {0}, {1} … for the groups).
PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^排队中，前面还有\s*(\d+)\s*个任务$"), "In the queue, {0} task(s) ahead."),
    (re.compile(r"^执行超时\s*(\d+)\s*分钟$"), "Timed out after {0} minute(s) of work."),
    (re.compile(r"^不支持的操作[:：]\s*(.+)$"), "Unsupported operation: {0}."),
    (re.compile(r"^([A-Za-z0-9_]+)不能为空$"), "{0} must not be empty."),
    (re.compile(r"^([A-Za-z0-9_]+)或([A-Za-z0-9_]+)不能为空$"), "{0} or {1} must not be empty."),
    (re.compile(r"^([A-Za-z0-9_]+)参数错误$"), "Invalid {0}."),
    (re.compile(r"^([A-Za-z0-9_]+)格式错误$"), "Malformed {0}."),
)


def to_english(text: str) -> str:
    """text in English when it is a known upstream message (surrounding spaces ignored), else text as is."""
    key = text.strip() if isinstance(text, str) else text
    if not key:
        return text
    known = EXACT.get(key)
    if known is not None:
        return known
    for pattern, english in PATTERNS:
        match = pattern.match(key)
        if match:
            return english.format(*match.groups())
    return text
