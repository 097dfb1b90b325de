"""clean_report's two ways through a report: the quick walk for reports already clean, and the field by field
cleaning for anything else. Whatever a report holds, both give the same result, and hostile values never
pass the quick walk as they came."""

from __future__ import annotations

import pytest

from mjctl import upstream_text
from mjctl.upstream_text import CUT, MASK, MAX_PROPERTIES_CHARS, MAX_TEXT_CHARS, MAX_URL_CHARS

SECRET = "channel-secret-4711"


@pytest.fixture(autouse=True)
def known_secret(monkeypatch):
    monkeypatch.setattr(upstream_text, "_secrets", ())
    upstream_text.remember_secret(SECRET)


def _plain_report(**fields) -> dict:
    report = {"id": "1730000000123", "action": "IMAGINE", "status": "IN_PROGRESS", "progress": "46%",
              "prompt": "a cat", "promptEn": "a cat", "description": "Submit success", "state": None,
              "submitTime": 1730000000000, "startTime": 1730000001000, "finishTime": None, "imageUrl": None,
              "failReason": None, "buttons": [],
              "properties": {"finalPrompt": "a cat --v 6.1", "notifyHook": "http://mjctl/notify/1/x",
                             "discordInstanceId": "1300000000000000001", "flags": 0, "ratio": 1.5, "nsfw": False}}
    report.update(fields)
    return report


def _field_by_field(report: dict) -> dict:
    """The cleaning that takes nothing as already clean."""
    head = {"id": upstream_text.task_id(report.get("id"))}
    if report.get("status"):
        head["status"] = report["status"].upper()
    return upstream_text._clean_fields(report, head)


@pytest.fixture
def quick_only(monkeypatch):
    """clean_report with the field by field cleaning taken away: only reports the quick walk takes pass."""
    def refuse(report, out):
        raise AssertionError("cleaned field by field")

    monkeypatch.setattr(upstream_text, "_clean_fields", refuse)


def test_a_clean_report_takes_the_quick_walk_and_loses_only_what_is_never_kept(quick_only):
    cleaned = upstream_text.clean_report(_plain_report())
    assert cleaned["properties"] == {"finalPrompt": "a cat --v 6.1", "discordInstanceId": "1300000000000000001",
                                     "flags": 0, "ratio": 1.5, "nsfw": False}
    assert (cleaned["status"], cleaned["progress"], cleaned["description"], cleaned["buttons"]) == (
        "IN_PROGRESS", "46%", "Submit success", [])
    assert cleaned["startTime"] == 1730000001000
    # What a task keeps from its submission is not read from a report; a time given as null is left out.
    assert not {"action", "prompt", "state", "submitTime", "finishTime"} & cleaned.keys()
    chinese = upstream_text.clean_report(_plain_report(description="提交成功", failReason="任务超时"))
    assert (chinese["description"], chinese["failReason"]) == ("提交成功", "任务超时")


HOSTILE = {
    "a NUL": {"description": "before\x00after"},
    "an unpaired surrogate": {"promptEn": "half \ud800 a pair"},
    "the secret in a text": {"failReason": f"bad key {SECRET} refused"},
    "the secret in a URL": {"imageUrl": f"https://cdn.example/x.png?key={SECRET}"},
    "the secret in a property value": {"properties": {"hook": f"https://x/?s={SECRET}"}},
    "the secret in a property key": {"properties": {SECRET: "v"}},
    "the secret in the progress": {"progress": SECRET},
    "a text over its cap": {"description": "d" * (MAX_TEXT_CHARS + 1)},
    "the secret across a text's cap": {"description": "d" * (MAX_TEXT_CHARS - 5) + SECRET},
    "a URL over its cap": {"imageUrl": "https://cdn.example/" + "a" * MAX_URL_CHARS},
    "a progress over its cap": {"progress": "9" * 40},
    "a number for a text": {"description": 12345, "progress": 50},
    "an object for a text": {"description": {"text": "x"}, "promptEn": ["x"], "progress": True},
    "nested properties": {"properties": {"a": {"b": {"c": {"d": {"e": "deep"}}}}, "notifyHook": "x"}},
    "a nested notifyHook": {"properties": {"inner": {"notifyHook": "http://mjctl/notify/1/x"}}},
    "properties over their budget": {"properties": {f"k{i}": "v" * 4000 for i in range(12)}},
    "properties just within their budget": {"properties": {f"k{i}": "v" * (MAX_PROPERTIES_CHARS // 4 - 200)
                                                           for i in range(4)}},
    "too many properties": {"properties": {f"k{i}": i for i in range(100)}},
    "an empty property key": {"properties": {"": "v"}},
    "a long property key": {"properties": {"k" * 65: "v"}},
    "an absurd property number": {"properties": {"n": 10**20, "f": float("nan")}},
    "buttons": {"buttons": [{"customId": "MJ::JOB::upsample::1::abc", "label": "U1", "emoji": "🔄", "type": 2},
                            "junk", {"customId": "x" * 300}]},
    "buttons that are not a list": {"buttons": "U1"},
    "video URLs": {"videoUrls": [{"url": "https://cdn.example/v.mp4"}, "https://cdn.example/w.mp4"]},
    "absurd times": {"startTime": -5, "finishTime": 10**20, "submitTime": "1730000000000"},
    "control characters and bidi": {"description": "a\x1b[31mred\x07\u202eevil\u2066", "promptEn": "\r\n\t"},
}


@pytest.mark.parametrize("fields", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_values_get_the_field_by_field_cleaning(fields):
    report = _plain_report(**fields)
    assert upstream_text.clean_report(report) == _field_by_field(report)


#: Values the quick walk may take as they are: the field by field cleaning keeps them as they are too.
TAKEN_AS_THEY_ARE = {"buttons that are not a list", "absurd times", "control characters and bidi",
                     "properties just within their budget"}


@pytest.mark.parametrize("name", sorted(HOSTILE.keys() - TAKEN_AS_THEY_ARE))
def test_the_quick_walk_lets_no_hostile_value_through(name, quick_only):
    with pytest.raises(AssertionError, match="cleaned field by field"):
        upstream_text.clean_report(_plain_report(**HOSTILE[name]))


@pytest.mark.parametrize("name", sorted(TAKEN_AS_THEY_ARE))
def test_values_kept_as_they_are_may_take_the_quick_walk(name, quick_only):
    report = _plain_report(**HOSTILE[name])
    upstream_text.clean_report(report)


def test_what_the_cleaning_makes_of_hostile_values():
    clean = upstream_text.clean_report
    assert clean(_plain_report(description="before\x00after"))["description"] == "before\ufffdafter"
    assert clean(_plain_report(failReason=f"bad key {SECRET} refused"))["failReason"] == f"bad key {MASK} refused"
    assert clean(_plain_report(properties={SECRET: "v"}))["properties"] == {MASK: "v"}
    # Scrubbed before the cut: no part of the secret is left to read.
    assert clean(_plain_report(description="d" * (MAX_TEXT_CHARS - 5) + SECRET))["description"] == (
        "d" * (MAX_TEXT_CHARS - 5) + MASK)
    cut = clean(_plain_report(description="d" * (MAX_TEXT_CHARS + 1)))["description"]
    assert len(cut) == MAX_TEXT_CHARS and cut.endswith(CUT)
    assert "imageUrl" not in clean(_plain_report(imageUrl="https://cdn.example/" + "a" * MAX_URL_CHARS))
    assert clean(_plain_report(promptEn="half \ud800 a pair"))["promptEn"].encode("utf-8")
    # Control characters and bidi marks are data here: stored as sent, escaped wherever they are shown.
    assert clean(_plain_report(description="a\x1b[31m\u202e"))["description"] == "a\x1b[31m\u202e"
    with pytest.raises(upstream_text.UpstreamTextError):
        clean(_plain_report(id="../../etc/passwd"))
    with pytest.raises(upstream_text.UpstreamTextError):
        clean(_plain_report(status="DONE"))


@pytest.mark.parametrize("value", ["任务1", "１２３", "a/b", "", "x" * 65, "1 2", "1\n", True, None, 1.5, ["1"]],
                         ids=["CJK", "full-width digits", "slash", "empty", "too long", "space", "newline",
                              "boolean", "null", "fraction", "list"])
def test_a_report_whose_id_is_not_a_task_id_is_refused(value):
    with pytest.raises(upstream_text.UpstreamTextError):
        upstream_text.clean_report(_plain_report(id=value))


def test_ids_and_statuses_as_upstreams_send_them():
    clean = upstream_text.clean_report
    assert clean(_plain_report(id=1730000000123))["id"] == "1730000000123"
    assert clean(_plain_report(id="job-1.a:b_c"))["id"] == "job-1.a:b_c"
    assert clean(_plain_report(id="x" * 64))["id"] == "x" * 64
    assert clean(_plain_report(status="success"))["status"] == "SUCCESS"
    assert "status" not in clean(_plain_report(status=""))
    for status in ("DONE", "SUCCES", 3, ["SUCCESS"], {"s": 1}):
        with pytest.raises(upstream_text.UpstreamTextError, match="status"):
            clean(_plain_report(status=status))
