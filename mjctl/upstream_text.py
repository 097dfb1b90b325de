"""What an upstream writes is data: typed, bounded and scrubbed here before mjctl stores or relays it.

A channel's upstream is a separate deployment that may be broken or hostile. Whatever it answers ends up
in the store, in the relay's answers to users, in the web page and on terminals, so every field passes one
of the cleaners below first:

- **ids** (the ``result`` of a submit answer, the ``id`` of a task report) must be strings (a JSON integer
  counts as its decimal digits) of at most :data:`MAX_ID_CHARS` characters from :data:`ID_RE`'s set —
  letters, digits and ``_ . : -``: nothing a path, a query, a log line or a terminal reads specially. Anything else is
  :class:`UpstreamTextError`: the submit answer is a protocol error (nothing charged) and the report is
  ignored as malformed.
- **status** must be one of :data:`STATUSES` (case-insensitive); another value makes the report malformed
  (ignored whole: a status mjctl does not know cannot be ranked, and guessing could finish or refund a
  task wrongly). What a task keeps from its submission (``action``, ``prompt``, ``state``, ``submitTime``)
  is not read from a report, and not cleaned.
- **texts** (``description``, ``failReason``, ``promptEn``, property values, button labels) are cut to
  their cap, with ``…`` marking the cut; numbers become their text, other non-strings are dropped; NUL and
  unpaired surrogates (which some databases refuse to store) are replaced.
- **URLs** longer than :data:`MAX_URL_CHARS` are dropped rather than cut: a cut link would only fail later.
- **secrets**: every channel secret this process has handed to an upstream client, and the server secret
  when known, is replaced by ``***`` wherever it appears — before the cut, so a cut cannot leave half of
  one. Secrets shorter than :data:`MIN_SECRET_CHARS` are not scrubbed: replacing every "ab" in every text
  would mangle the data without protecting anything a two-letter secret could still guard.

This module has no I/O and no dependencies beyond the standard library; it is called once where a submit
answer is parsed (``mjctl.upstream``) and once where a task report becomes row values (``mjctl.reports``).
"""

from __future__ import annotations

import re
import threading
from typing import Any

from mjctl.protocol import STATUSES

__all__ = [
    "ID_RE", "MAX_ID_CHARS", "MAX_TEXT_CHARS", "MAX_PROMPT_CHARS", "MAX_URL_CHARS", "STATUSES",
    "UpstreamTextError", "clean_properties", "clean_report", "clean_text", "clean_url", "remember_secret",
    "scrub", "task_id",
]

MAX_ID_CHARS = 64  # Task.mj_id
#: The characters of an upstream's task id: ids go into URL paths (fetch, image links) and log lines.
ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
MAX_TEXT_CHARS = 2048  # description, failReason, a property value, a button label
MAX_PROMPT_CHARS = 8192  # prompt and promptEn: the relay accepts prompts of 8000 characters, echoed back
MAX_URL_CHARS = 2048
MAX_PROGRESS_CHARS = 32
MAX_BUTTONS = 32
MAX_CUSTOM_ID_CHARS = 256  # what a submission's customId may be, so a button can be pressed again
MAX_VIDEO_URLS = 16
#: Properties: how deep, how many entries per object or list, and all their text together.
MAX_PROPERTY_DEPTH = 4
MAX_PROPERTY_ENTRIES = 64
MAX_PROPERTY_KEY_CHARS = 64
MAX_PROPERTIES_CHARS = 32 * 1024
MAX_TIME_MS = 32_503_680_000_000  # year 3000 in epoch milliseconds: larger is not a time, and overflows
MIN_SECRET_CHARS = 6
CUT = "…"
MASK = "***"
#: Property keys never kept from an upstream, at any depth: the upstream echoes the hook mjctl gave it.
DROPPED_KEYS = frozenset({"notifyHook"})


class UpstreamTextError(ValueError):
    """A value the upstream protocol does not allow where it stands (an id that is not an id)."""


# -- secrets -----------------------------------------------------------------------------------------

_secrets: tuple[str, ...] = ()
_secrets_lock = threading.Lock()


def remember_secret(secret: str | bytes | None) -> None:
    """Scrub secret from upstream text from now on (channel secrets as clients are made, the server secret)."""
    if isinstance(secret, bytes):
        try:
            secret = secret.decode("utf-8")
        except UnicodeDecodeError:
            return
    if not secret or len(secret) < MIN_SECRET_CHARS:
        return
    global _secrets
    with _secrets_lock:
        if secret not in _secrets:
            # Longest first: a secret containing another is replaced whole.
            _secrets = tuple(sorted((*_secrets, secret), key=len, reverse=True))


def scrub(text: str, extra: tuple[str, ...] = ()) -> str:
    """text with every known secret (and each of extra) replaced by ``***``."""
    for secret in (*extra, *_secrets) if extra else _secrets:
        if secret and secret in text:
            text = text.replace(secret, MASK)
    return text


def _longest_secret() -> int:
    return len(_secrets[0]) if _secrets else 0


# -- scalars -------------------------------------------------------------------------------------------


def task_id(value: Any) -> str:
    """value as a task id, or UpstreamTextError. A JSON integer is taken as its decimal digits."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise UpstreamTextError(f"a task id must be a string, not {type(value).__name__}")
    if not ID_RE.fullmatch(value):
        raise UpstreamTextError(f"{_show(value)} is not a task id (1 to {MAX_ID_CHARS} of A-Z a-z 0-9 _ . : -)")
    return value


def clean_text(value: Any, limit: int = MAX_TEXT_CHARS) -> str | None:
    """value as stored text: scrubbed, at most limit characters; numbers become text; None for anything
    else (null, objects, lists, booleans), which callers treat as absent."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        text = str(value)
    else:
        return None
    if len(text) > limit:
        # Scrub a window long enough to hold any secret that starts inside the kept part, then cut.
        text = scrub(text[:limit + _longest_secret()])
        if len(text) > limit:
            text = text[:limit - len(CUT)] + CUT
    elif _secrets:
        text = scrub(text)
    # PostgreSQL refuses NUL, and no database can encode an unpaired surrogate.
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def clean_url(value: Any) -> str | None:
    """A URL as stored: a string of at most MAX_URL_CHARS (longer ones are dropped, not cut), scrubbed."""
    if not isinstance(value, str) or len(value) > MAX_URL_CHARS:
        return None
    return clean_text(value, MAX_URL_CHARS)


def clean_time(value: Any) -> int | float | None:
    """An epoch time (milliseconds or seconds) within reason, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) <= 16:
            return int(value.strip())
        return None
    if value != value or not 0 <= value <= MAX_TIME_MS:  # NaN, negative, absurd
        return None
    return value


def _show(value: str) -> str:
    short = value if len(value) <= 40 else value[:37] + "..."
    return repr(short)


# -- structures ----------------------------------------------------------------------------------------


class _Budget:
    __slots__ = ("left",)

    def __init__(self, chars: int):
        self.left = chars


def clean_properties(value: Any) -> dict[str, Any]:
    """An upstream's properties map, bounded (depth, entries, text) and without notifyHook at any depth."""
    if not isinstance(value, dict):
        return {}
    cleaned = _clean_value(value, 0, _Budget(MAX_PROPERTIES_CHARS))
    return cleaned if isinstance(cleaned, dict) else {}


_DROP = object()


def _clean_value(value: Any, depth: int, budget: _Budget) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value if value == value and abs(value) < 1e18 else _DROP  # no NaN, nothing a column cannot hold
    if isinstance(value, str):
        if budget.left <= 0:
            return _DROP
        text = clean_text(value, min(MAX_PROMPT_CHARS, max(budget.left, len(CUT) + 1))) or ""
        budget.left -= len(text)
        return text
    if depth >= MAX_PROPERTY_DEPTH:
        return _DROP
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if len(out) >= MAX_PROPERTY_ENTRIES or budget.left <= 0:
                break
            if not isinstance(key, str) or key in DROPPED_KEYS or len(key) > MAX_PROPERTY_KEY_CHARS:
                continue
            item = _clean_value(item, depth + 1, budget)
            if item is not _DROP:
                budget.left -= len(key)
                out[clean_text(key, MAX_PROPERTY_KEY_CHARS) or "?"] = item
        return out
    if isinstance(value, list):
        items = []
        for item in value[:MAX_PROPERTY_ENTRIES]:
            item = _clean_value(item, depth + 1, budget)
            if item is not _DROP:
                items.append(item)
        return items
    return _DROP


def clean_buttons(value: Any) -> list[dict[str, Any]] | None:
    """The buttons of a task: dicts of their known fields only, texts bounded; None when not a list."""
    if not isinstance(value, list):
        return None
    buttons = []
    for button in value[:MAX_BUTTONS]:
        if not isinstance(button, dict):
            continue
        cleaned: dict[str, Any] = {}
        custom_id = clean_text(button.get("customId"), MAX_CUSTOM_ID_CHARS)
        if custom_id is not None and len(custom_id) <= MAX_CUSTOM_ID_CHARS and not custom_id.endswith(CUT):
            cleaned["customId"] = custom_id
        for key, limit in (("emoji", 64), ("label", 256)):
            text = clean_text(button.get(key), limit)
            if text is not None:
                cleaned[key] = text
        for key in ("type", "style"):
            number = button.get(key)
            if isinstance(number, int) and not isinstance(number, bool) and 0 <= number < 1000:
                cleaned[key] = number
        if cleaned:
            buttons.append(cleaned)
    return buttons


def _video_urls(value: Any) -> list[Any] | None:
    if value is None:
        return None
    entries = value if isinstance(value, list) else [value]
    out: list[Any] = []
    for entry in entries[:MAX_VIDEO_URLS]:
        if isinstance(entry, dict):
            url = clean_url(entry.get("url"))
            if url:
                item = {"url": url}
                thumbnail = clean_url(entry.get("thumbnail"))
                if thumbnail:
                    item["thumbnail"] = thumbnail
                out.append(item)
        else:
            url = clean_url(entry)
            if url:
                out.append(url)
    return out


#: The report fields mjctl reads (what :func:`mjctl.reports.compute_changes` works out changes from), by kind.
#: Not ``prompt``, ``state``, ``submitTime`` or ``action``: a task keeps what its submission gave them, and
#: what an upstream echoes back is never read, so it is not cleaned either.
_TEXT_FIELDS = (("description", MAX_TEXT_CHARS), ("failReason", MAX_TEXT_CHARS), ("promptEn", MAX_PROMPT_CHARS))
_URL_FIELDS = ("imageUrl", "videoUrl")
_TIME_FIELDS = ("startTime", "finishTime")
#: The text and URL fields in the order clean_report adds them, with their caps (a URL over its cap is
#: dropped rather than cut, so only :func:`_clean_fields` handles one).
_PLAIN_FIELDS = (*_TEXT_FIELDS, *((key, MAX_URL_CHARS) for key in _URL_FIELDS))


def clean_report(report: Any) -> dict[str, Any]:
    """A task report (a list-by-condition item, a fetch answer, a push body) as mjctl may apply it: only the
    fields mjctl reads, each typed, bounded and scrubbed. Raises UpstreamTextError when the report cannot
    be applied at all: not an object, no valid id, a status outside the protocol.

    Most reports are already clean: every text within its cap, no NUL, no unpaired surrogate, no secret.
    :func:`_clean_plain` takes those with a walk that checks each field's type and size and one check of
    all their text together; a report with anything else in it is cleaned field by field
    (:func:`_clean_fields`), and both give the same result for any report the first one takes. The poller
    cleans every report of every answer that its memo does not hold, so the common case (an id of letters
    and digits, a status already upper-case) is taken without a pattern match or a new string."""
    if not isinstance(report, dict):
        raise UpstreamTextError("a task report must be an object")
    mj_id = report.get("id")
    if not (type(mj_id) is str and len(mj_id) <= MAX_ID_CHARS and mj_id.isalnum() and mj_id.isascii()):
        mj_id = task_id(mj_id)
    out: dict[str, Any] = {"id": mj_id}
    status = report.get("status")
    if status is not None and status != "":
        upper = (status if status in STATUSES else status.upper()) if type(status) is str else None
        if upper not in STATUSES:
            raise UpstreamTextError(f"status {_show(str(status))} is not one of the protocol's")
        out["status"] = upper
    if _clean_plain(report, out):
        return out
    return _clean_fields(report, {key: out[key] for key in _HEAD if key in out})


_HEAD = ("id", "status")


def _clean_plain(report: dict, out: dict[str, Any]) -> bool:
    """The rest of a report whose texts need no change, added to out; False when any value is not like that
    (a text over its cap, a number where a text goes, a long URL, nested properties, buttons…) or when all
    its texts together hold a NUL, an unpaired surrogate or a known secret. Each text is then exactly what
    :func:`clean_text` would make of it: within its cap, scrubbing, NUL and surrogate repair change nothing.
    The texts are checked as one string: a secret inside any of them is inside their concatenation too."""
    texts: list[str] = []
    get = report.get
    value = get("progress")
    if value is not None:
        if type(value) is not str or len(value) > MAX_PROGRESS_CHARS:
            return False
        out["progress"] = value
        texts.append(value)
    for key, limit in _PLAIN_FIELDS:
        value = get(key)
        if value is None:
            continue
        if type(value) is not str or len(value) > limit:
            return False
        out[key] = value
        texts.append(value)
    if get("videoUrls") is not None:
        return False
    for key in _TIME_FIELDS:
        value = get(key)
        if value is not None:
            out[key] = value if type(value) is int and 0 <= value <= MAX_TIME_MS else clean_time(value)
    value = get("buttons")
    if value is not None:
        if type(value) is not list:
            if isinstance(value, list):
                return False
        elif value:
            return False
        else:
            out["buttons"] = []
    value = get("properties")
    if isinstance(value, dict):
        properties = _plain_properties(value, texts)
        if properties is None:
            return False
        out["properties"] = properties
    joined = "".join(texts)
    if "\x00" in joined:
        return False
    if not joined.isascii():
        try:
            joined.encode("utf-8")
        except UnicodeEncodeError:
            return False
    for secret in _secrets:
        if secret in joined:
            return False
    return True


def _plain_properties(value: dict, texts: list[str]) -> dict[str, Any] | None:
    """A flat properties map that :func:`clean_properties` would keep as it is, but for notifyHook; its
    keys and texts are added to texts. None for anything else: nested values, too many entries, texts
    over their caps or over the budget, numbers a column cannot hold, empty keys."""
    if type(value) is not dict or len(value) > MAX_PROPERTY_ENTRIES:
        return None
    out = value.copy()
    for key in DROPPED_KEYS:
        out.pop(key, None)
    used = 0
    for key, item in out.items():
        if type(key) is not str or not 0 < len(key) <= MAX_PROPERTY_KEY_CHARS:
            return None
        used += len(key)
        kind = type(item)
        if kind is str:
            if len(item) > MAX_PROMPT_CHARS:
                return None
            used += len(item)
            texts.append(item)
        elif kind is int or kind is float:
            if not (item == item and abs(item) < 1e18):
                return None
        elif item is not None and kind is not bool:
            return None
    texts.extend(out)
    return out if used < MAX_PROPERTIES_CHARS else None


def _clean_fields(report: dict, out: dict[str, Any]) -> dict[str, Any]:
    """The rest of a report, field by field, added to out."""
    progress = report.get("progress")
    if progress is not None:
        text = clean_text(progress, MAX_PROGRESS_CHARS)
        if text is not None:
            out["progress"] = text
    for key, limit in _TEXT_FIELDS:
        if key in report:
            text = clean_text(report[key], limit)
            if text is not None:
                out[key] = text
    for key in _URL_FIELDS:
        if key in report:
            url = clean_url(report[key])
            if url is not None:
                out[key] = url
    if "videoUrls" in report:
        urls = _video_urls(report["videoUrls"])
        if urls is not None:
            out["videoUrls"] = urls
    for key in _TIME_FIELDS:
        if report.get(key) is not None:
            out[key] = clean_time(report[key])
    if "buttons" in report:
        buttons = clean_buttons(report["buttons"])
        if buttons is not None:
            out["buttons"] = buttons
    if isinstance(report.get("properties"), dict):
        out["properties"] = clean_properties(report["properties"])
    return out
