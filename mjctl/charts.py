"""Charts of the task statistics, drawn as SVG by the server from :func:`mjctl.stats.compute_stats`'s answer.

One function, :func:`render`, turns the statistics of one grouping into one chart:

- ``tasks``: tasks per day as stacked bars, success / failure / cancel / unfinished from the bottom up;
- ``success_rate``: the success rate per day as a line, the whole period's rate as a dashed rule;
- ``run_time`` and ``queue_time``: the 50th and 95th percentiles per day as two lines (solid and dashed);
- ``quota``: quota spent (charged minus refunded) per day as bars;
- ``users`` and ``channels`` (administrators): the first :data:`TOP` by tasks and the first by quota spent,
  as horizontal bars with their names; each bar's group carries its figures as data attributes (name, tasks,
  quota spent, success rate), so a page can list them as a table without asking for every user's
  statistics.

The document is built with xml.etree, which escapes every text and attribute value, and every name from the
store first goes through :func:`mjctl.textsafe.visible` (controls, bidi overrides and lone surrogates shown
as escapes), so no name can end the document early, add markup or reorder a label. The SVG is an image with
a name (``role="img"``, ``aria-labelledby`` its ``<title>`` and ``<desc>``, which carry the totals); colour is
never the only cue: the status series differ in pattern as well (solid, hatched, dotted, hollow), the
percentile lines in dash, and every series is named in a legend. The colours are the web page's palette,
each at least 3:1 against white for shapes and 4.5:1 for text. Presentation attributes only, no ``style``
attribute, so the page's Content-Security-Policy (``style-src 'self'``) allows the SVG inline.

Day keys are UTC (as in mjctl.stats). Ids inside a chart start with ``mjc-<chart>-``, so the charts of one
page never share an id.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mjctl.errors import UsageError
from mjctl.textsafe import visible

SVG_NS = "http://www.w3.org/2000/svg"
MEDIA_TYPE = "image/svg+xml; charset=utf-8"
TOP = 10  # users or channels per ranking
DEFAULT_WIDTH = 640
MIN_WIDTH, MAX_WIDTH = 240, 2400
HEIGHT = 260  # the time charts
#: Steps of a duration axis: seconds, then minutes, then hours.
DURATION_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
NAME_CHARS = 22  # a longer name is cut (with "…") on the chart; its <title> keeps it whole

# The web page's palette (mjctl/server/static/app.css).
TEXT = "#1d2330"
MUTED = "#596270"
GRID = "#e3e6eb"
AXIS = "#7b8490"
OK = "#237032"
FAIL = "#c92a2a"
RUN = "#1864ab"
WARN = "#9c4100"
ACCENT = "#3b5bdb"
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Noto Sans', sans-serif"


@dataclass(frozen=True)
class Chart:
    group_by: str
    title: str
    admin: bool = False


CHARTS = {
    "tasks": Chart("day", "Tasks per day by status"),
    "success_rate": Chart("day", "Success rate per day"),
    "run_time": Chart("day", "Run time per day, 50th and 95th percentile"),
    "queue_time": Chart("day", "Queue time per day, 50th and 95th percentile"),
    "quota": Chart("day", "Quota spent per day"),
    "users": Chart("user", "Top users", admin=True),
    "channels": Chart("channel", "Top channels", admin=True),
}

#: The status series of the tasks chart, bottom to top: (field, label, colour, pattern).
STATUSES = (("success", "Success", OK, "solid"), ("failure", "Failure", FAIL, "hatch"),
            ("cancel", "Cancel", MUTED, "dots"), ("unfinished", "Unfinished", RUN, "hollow"))

_XML_INVALID = re.compile("[\ufffe\uffff]")


def check_chart(chart: str | None, *, admin: bool) -> str:
    """chart validated (lower-cased); UsageError naming the choices otherwise."""
    value = (chart or "").strip().lower()
    if value not in CHARTS:
        shown = "nothing" if not chart else repr(chart[:40])
        raise UsageError(f"chart must be one of {', '.join(CHARTS)}, not {shown}.")
    if CHARTS[value].admin and not admin:
        raise UsageError(f"chart={value} is for administrators; a user's statistics cover only their own tasks.")
    return value


def check_charts(names: str | None, *, admin: bool) -> list[str]:
    """A comma-separated list of charts validated as check_chart does, each at most once, at least one."""
    parts = [part for part in (names or "").split(",") if part.strip()]
    if not parts:
        raise UsageError(f"charts must name at least one of {', '.join(CHARTS)}.")
    checked = [check_chart(part, admin=admin) for part in parts]
    if len(set(checked)) != len(checked):
        raise UsageError("charts names a chart twice.")
    return checked


def check_width(width: int | None) -> int:
    if width is None:
        return DEFAULT_WIDTH
    if not MIN_WIDTH <= width <= MAX_WIDTH:
        raise UsageError(f"The parameter width must be a whole number from {MIN_WIDTH} to {MAX_WIDTH}, not {width}.")
    return width


def render(chart: str, data: dict[str, Any], *, width: int = DEFAULT_WIDTH) -> str:
    """The SVG document of one chart (see the module doc) of ``data``, compute_stats's answer for the
    chart's grouping (``CHARTS[chart].group_by``)."""
    draw = {"tasks": _tasks, "success_rate": _success_rate, "run_time": _durations("run"),
            "queue_time": _durations("queue"), "quota": _quota, "users": _top, "channels": _top}[chart]
    svg = draw(_Canvas(chart, width), data)
    return ET.tostring(svg, encoding="unicode")


# -- formatting ------------------------------------------------------------------------------------------


def clean(text: object) -> str:
    """Text from the store made safe to draw: controls and bidi overrides shown as escapes, and the two
    characters XML cannot hold replaced."""
    return _XML_INVALID.sub("\ufffd", visible(str(text)))


def short(text: str, limit: int = NAME_CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def number(value: float) -> str:
    return f"{round(value):,}"


def rate_text(rate: float) -> str:
    """A success rate (a fraction with at most four decimals, as the statistics give it) as a percentage
    with one decimal, halves rounded up: 0.8125 is "81.3". The page, the charts and the CLI all show
    rates this way, so one rate never reads 81.2% in one place and 81.3% in another: formatting the float
    (``f"{x:.1f}"`` rounds an exact half to even, ``toFixed`` up, and 0.0105 * 100 is just under 1.05)
    would let them disagree. Counting in whole basis points first makes the rule exact."""
    basis_points = round(rate * 10000)
    tenths = (basis_points + 5) // 10
    return f"{tenths // 10}.{tenths % 10}"


def percent(rate: float | None) -> str:
    return "—" if rate is None else f"{rate_text(rate)}%"


def seconds(value: float | None) -> str:
    if value is None:
        return "—"
    total = round(value)  # as the web page shows a duration
    h, m, s = total // 3600, total % 3600 // 60, total % 60
    if h:
        return f"{h}h {m:02d}m"
    if m:
        return f"{m}m {s:02d}s"
    return f"{s}s"


def spent(group: dict[str, Any]) -> int:
    return int(group["quota_charged"]) - int(group["quota_refunded"])


def axis_scale(high: float, *, integer: bool = False, steps: tuple[float, ...] | None = None) -> tuple[float, float]:
    """(top, step) of a value axis from 0 with at most 4 steps above 0 that reaches ``high``: the step the
    first of ``steps`` (default 1, 2, 2.5, 5 × 10^k; whole numbers only for an integer axis) that is at
    least high / 4."""
    if high <= 0:
        return (4.0, 1.0) if integer else (1.0, 0.25)
    if steps is None:
        power = 10 ** math.floor(math.log10(high / 4))
        steps = tuple(m * power * scale for scale in (1, 10) for m in (1, 2, 2.5, 5))
    for step in steps:
        if integer and (step < 1 or step != int(step)):
            continue
        if step * 4 >= high - 1e-9:
            return step * math.ceil(high / step - 1e-9), step
    step = steps[-1]
    return step * math.ceil(high / step), step


# -- drawing ---------------------------------------------------------------------------------------------


class _Canvas:
    """One SVG document being drawn: its root, its ids and its plot area."""

    def __init__(self, chart: str, width: int):
        self.chart = chart
        self.width = width
        self.prefix = f"mjc-{chart}"
        self.root = ET.Element("svg", {"xmlns": SVG_NS, "width": str(width), "role": "img",
                                       "aria-labelledby": f"{self.prefix}-title {self.prefix}-desc",
                                       "font-family": FONT, "font-size": "12", "fill": TEXT,
                                       "data-chart": chart})
        self.title = ET.SubElement(self.root, "title", id=f"{self.prefix}-title")
        self.desc = ET.SubElement(self.root, "desc", id=f"{self.prefix}-desc")
        self.defs: ET.Element | None = None

    def finish(self, height: float, title: str, desc: str) -> ET.Element:
        self.root.set("height", str(round(height)))
        self.root.set("viewBox", f"0 0 {self.width} {round(height)}")
        self.title.text = title
        self.desc.text = desc
        return self.root

    def pattern(self, name: str, colour: str) -> str:
        """The fill of a status series: its colour, or a pattern of it (created once)."""
        if name == "solid":
            return colour
        if name == "hollow":
            return "#fff"
        pattern_id = f"{self.prefix}-{name}"
        if self.defs is None:
            self.defs = ET.Element("defs")
            self.root.insert(2, self.defs)
        if self.defs.find(f"pattern[@id='{pattern_id}']") is None:
            pattern = ET.SubElement(self.defs, "pattern", id=pattern_id, width="6", height="6",
                                    patternUnits="userSpaceOnUse")
            ET.SubElement(pattern, "rect", width="6", height="6", fill=colour)
            if name == "hatch":
                pattern.set("patternTransform", "rotate(45)")
                ET.SubElement(pattern, "rect", width="2", height="6", fill="#fff")
            else:  # dots
                ET.SubElement(pattern, "circle", cx="3", cy="3", r="1.3", fill="#fff")
        return f"url(#{pattern_id})"


def _f(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


def _text(parent: ET.Element, x: float, y: float, text: str, **attrs: str) -> ET.Element:
    node = ET.SubElement(parent, "text", {"x": _f(x), "y": _f(y), **attrs})
    node.text = text
    return node


def _tooltip(parent: ET.Element, text: str) -> None:
    ET.SubElement(parent, "title").text = text


def _legend(canvas: _Canvas, items: list[tuple[str, Callable[[ET.Element, float, float], None]]], top: float) -> float:
    """Swatches with labels, flowing onto more rows as the width needs; returns the y below them."""
    group = ET.SubElement(canvas.root, "g", {"data-part": "legend"})
    x, y = 8.0, top
    for label, swatch in items:
        item_width = 20 + 7 * len(label) + 14
        if x > 8 and x + item_width > canvas.width - 8:
            x, y = 8.0, y + 18
        swatch(group, x, y)
        _text(group, x + 18, y + 10, label)
        x += item_width
    return y + 22


def _box_swatch(canvas: _Canvas, colour: str, pattern: str) -> Callable[[ET.Element, float, float], None]:
    def draw(group: ET.Element, x: float, y: float) -> None:
        attrs = {"x": _f(x), "y": _f(y), "width": "12", "height": "12", "fill": canvas.pattern(pattern, colour)}
        if pattern == "hollow":
            attrs.update(stroke=colour, **{"stroke-width": "1.5"})
        ET.SubElement(group, "rect", attrs)
    return draw


def _line_swatch(colour: str, dash: str | None) -> Callable[[ET.Element, float, float], None]:
    def draw(group: ET.Element, x: float, y: float) -> None:
        attrs = {"x1": _f(x), "x2": _f(x + 14), "y1": _f(y + 6), "y2": _f(y + 6), "stroke": colour,
                 "stroke-width": "2.5"}
        if dash:
            attrs["stroke-dasharray"] = dash
        ET.SubElement(group, "line", attrs)
    return draw


@dataclass
class _Plot:
    """The plot area of a time chart: one slot per day, a value axis from 0 to top."""

    left: float
    top_y: float
    width: float
    height: float
    slots: int
    top: float

    @property
    def step(self) -> float:
        return self.width / max(self.slots, 1)

    def x(self, index: int) -> float:
        return self.left + self.step * (index + 0.5)

    def y(self, value: float) -> float:
        return self.top_y + self.height - self.height * (value / self.top if self.top else 0)

    def h(self, value: float) -> float:
        return self.height * value / self.top if self.top else 0


def _time_plot(canvas: _Canvas, groups: list[dict[str, Any]], top_y: float, scale: tuple[float, float],
               tick: Callable[[float], str]) -> _Plot:
    """Grid, value axis and day labels for a time chart; the plot area for its series."""
    top, step = scale
    ticks = [step * i for i in range(round(top / step) + 1)]
    left = 8 + 7 * max(len(tick(value)) for value in ticks) + 6
    plot = _Plot(left, top_y, canvas.width - left - 10, HEIGHT - top_y - 30, len(groups), top)
    axis = ET.SubElement(canvas.root, "g", {"data-part": "axes", "fill": MUTED, "font-size": "11"})
    for value in ticks:
        y = plot.y(value)
        ET.SubElement(axis, "line", {"x1": _f(left), "x2": _f(left + plot.width), "y1": _f(y), "y2": _f(y),
                                     "stroke": AXIS if value == 0 else GRID, "stroke-width": "1"})
        _text(axis, left - 6, y + 4, tick(value), **{"text-anchor": "end"})
    every = max(1, math.ceil(44 / plot.step))  # a day label at least 44 px from the next
    for index, group in enumerate(groups):
        if (len(groups) - 1 - index) % every == 0:  # the last day always has its label
            _text(axis, plot.x(index), plot.top_y + plot.height + 16, str(group["key"])[5:],
                  **{"text-anchor": "middle"})
    return plot


def _period(groups: list[dict[str, Any]]) -> str:
    if not groups:
        return "no days"
    first, last = str(groups[0]["key"]), str(groups[-1]["key"])
    return first if first == last else f"{first} to {last}"


def _empty_note(canvas: _Canvas, plot: _Plot, text: str) -> None:
    _text(canvas.root, plot.left + plot.width / 2, plot.top_y + plot.height / 2, text,
          **{"text-anchor": "middle", "fill": MUTED, "data-part": "note"})


def _tasks(canvas: _Canvas, data: dict[str, Any]) -> ET.Element:
    groups, totals = data["groups"], data["totals"]
    items = [(f"{label} {number(totals[name])}", _box_swatch(canvas, colour, pattern))
             for name, label, colour, pattern in STATUSES]
    top_y = _legend(canvas, items, 8) + 8
    plot = _time_plot(canvas, groups, top_y, axis_scale(max([g["tasks"] for g in groups] + [0]), integer=True),
                      number)
    bars = ET.SubElement(canvas.root, "g", {"data-part": "bars"})
    width = max(1.0, plot.step * 0.7)
    for index, group in enumerate(groups):
        day = ET.SubElement(bars, "g", {"data-key": str(group["key"]), "data-tasks": str(group["tasks"])})
        base = plot.y(0)
        for name, label, colour, pattern in STATUSES:
            count = group[name]
            if not count:
                continue
            height = plot.h(count)
            attrs = {"x": _f(plot.x(index) - width / 2), "y": _f(base - height), "width": _f(width),
                     "height": _f(height), "fill": canvas.pattern(pattern, colour), "data-status": name,
                     "data-count": str(count)}
            if pattern == "hollow":
                attrs.update(stroke=colour, **{"stroke-width": "1.5"})
            elif len(groups) <= 60:
                attrs.update(stroke="#fff", **{"stroke-width": "0.75"})  # a seam between touching segments
            rect = ET.SubElement(day, "rect", attrs)
            _tooltip(rect, f"{group['key']}: {number(count)} {label.lower()}")
            base -= height
        if group["tasks"] and plot.step >= 26:  # room for the day's total above its bar
            _text(day, plot.x(index), base - 4, number(group["tasks"]),
                  **{"text-anchor": "middle", "font-size": "11"})
    if not totals["tasks"]:
        _empty_note(canvas, plot, "No tasks in this period.")
    parts = ", ".join(f"{number(totals[name])} {label.lower()}" for name, label, _c, _p in STATUSES)
    return canvas.finish(HEIGHT, f"{CHARTS['tasks'].title}, {_period(groups)}",
                         f"{number(totals['tasks'])} tasks: {parts}.")


def _series(canvas: _Canvas, plot: _Plot, groups: list[dict[str, Any]], field: str, colour: str,
            dash: str | None, marker: str, label: str, show: Callable[[float | None], str]) -> None:
    """A line through the days that have a value (a gap where one has none), a marker on each."""
    group = ET.SubElement(canvas.root, "g", {"data-part": "series", "data-field": field})
    run: list[str] = []

    def flush() -> None:
        if len(run) > 1:
            attrs = {"points": " ".join(run), "fill": "none", "stroke": colour, "stroke-width": "2.5",
                     "stroke-linejoin": "round"}
            if dash:
                attrs["stroke-dasharray"] = dash
            ET.SubElement(group, "polyline", attrs)
        run.clear()

    for index, day in enumerate(groups):
        value = day[field]
        if value is None:
            flush()
            continue
        x, y = plot.x(index), plot.y(value)
        run.append(f"{_f(x)},{_f(y)}")
        if marker == "circle":
            node = ET.SubElement(group, "circle", {"cx": _f(x), "cy": _f(y), "r": "3.5", "fill": colour,
                                                   "data-key": str(day["key"]), "data-value": str(value)})
        else:
            node = ET.SubElement(group, "rect", {"x": _f(x - 3.5), "y": _f(y - 3.5), "width": "7", "height": "7",
                                                 "fill": colour, "data-key": str(day["key"]),
                                                 "data-value": str(value)})
        _tooltip(node, f"{day['key']}: {label} {show(value)}")
    flush()


def _success_rate(canvas: _Canvas, data: dict[str, Any]) -> ET.Element:
    groups, totals = data["groups"], data["totals"]
    items = [("Success rate per day", _line_swatch(OK, None)),
             (f"Whole period {percent(totals['success_rate'])}", _line_swatch(MUTED, "6 4"))]
    top_y = _legend(canvas, items, 8) + 8
    plot = _time_plot(canvas, groups, top_y, (1.0, 0.25), lambda v: f"{v * 100:.0f}%")
    if totals["success_rate"] is not None:
        y = plot.y(totals["success_rate"])
        ET.SubElement(canvas.root, "line", {"x1": _f(plot.left), "x2": _f(plot.left + plot.width), "y1": _f(y),
                                            "y2": _f(y), "stroke": MUTED, "stroke-width": "1.5",
                                            "stroke-dasharray": "6 4", "data-part": "overall"})
    _series(canvas, plot, groups, "success_rate", OK, None, "circle", "success rate", percent)
    if totals["success_rate"] is None:
        _empty_note(canvas, plot, "No finished tasks in this period.")
    finished = totals["success"] + totals["failure"] + totals["cancel"]
    desc = (f"Success rate {percent(totals['success_rate'])} over the period: {number(totals['success'])} of "
            f"{number(finished)} finished tasks succeeded.")
    return canvas.finish(HEIGHT, f"{CHARTS['success_rate'].title}, {_period(groups)}", desc)


def _durations(kind: str) -> Callable[[_Canvas, dict[str, Any]], ET.Element]:
    chart = f"{kind}_time"

    def draw(canvas: _Canvas, data: dict[str, Any]) -> ET.Element:
        groups, totals = data["groups"], data["totals"]
        p50, p95 = f"{kind}_seconds_p50", f"{kind}_seconds_p95"
        items = [(f"50th percentile (whole period {seconds(totals[p50])})", _line_swatch(RUN, None)),
                 (f"95th percentile (whole period {seconds(totals[p95])})", _line_swatch(WARN, "6 4"))]
        top_y = _legend(canvas, items, 8) + 8
        values = [g[name] for g in groups for name in (p50, p95) if g[name] is not None]
        scale = axis_scale(max(values) if values else 60, steps=DURATION_STEPS)
        plot = _time_plot(canvas, groups, top_y, scale, _tick_seconds)
        _series(canvas, plot, groups, p50, RUN, None, "circle", "50th percentile", seconds)
        _series(canvas, plot, groups, p95, WARN, "6 4", "square", "95th percentile", seconds)
        if not values:
            _empty_note(canvas, plot, "Too few finished tasks a day for percentiles.")
        noun = "Run" if kind == "run" else "Queue"
        desc = (f"{noun} time over the period: 50th percentile {seconds(totals[p50])}, "
                f"95th percentile {seconds(totals[p95])}.")
        return canvas.finish(HEIGHT, f"{CHARTS[chart].title}, {_period(groups)}", desc)

    return draw


def _tick_seconds(value: float) -> str:
    if value and value % 3600 == 0:
        return f"{value / 3600:g}h"
    if value and value % 60 == 0:
        return f"{value / 60:g}m"
    return f"{value:g}s"


def _quota(canvas: _Canvas, data: dict[str, Any]) -> ET.Element:
    groups, totals = data["groups"], data["totals"]
    total = spent(totals)
    items = [(f"Quota spent {number(total)}", _box_swatch(canvas, ACCENT, "solid"))]
    top_y = _legend(canvas, items, 8) + 8
    values = [max(0, spent(g)) for g in groups]
    plot = _time_plot(canvas, groups, top_y, axis_scale(max(values + [0]), integer=True), number)
    bars = ET.SubElement(canvas.root, "g", {"data-part": "bars"})
    width = max(1.0, plot.step * 0.7)
    for index, (group, value) in enumerate(zip(groups, values, strict=True)):
        if not value:
            continue
        rect = ET.SubElement(bars, "rect", {"x": _f(plot.x(index) - width / 2), "y": _f(plot.y(value)),
                                            "width": _f(width), "height": _f(plot.h(value)), "fill": ACCENT,
                                            "data-key": str(group["key"]), "data-count": str(value)})
        _tooltip(rect, f"{group['key']}: {number(value)} spent")
    if not any(values):
        _empty_note(canvas, plot, "No quota spent in this period.")
    desc = (f"Quota spent over the period: {number(total)} (charged {number(totals['quota_charged'])}, "
            f"refunded {number(totals['quota_refunded'])}).")
    return canvas.finish(HEIGHT, f"{CHARTS['quota'].title}, {_period(groups)}", desc)


def top_groups(data: dict[str, Any], by: str) -> list[dict[str, Any]]:
    """The first TOP groups by tasks or by quota spent (ties by key), none with nothing to show."""
    measure = (lambda g: g["tasks"]) if by == "tasks" else spent
    ranked = sorted((g for g in data["groups"] if measure(g) > 0), key=lambda g: (-measure(g), str(g["key"])))
    return ranked[:TOP]


def display_name(group: dict[str, Any]) -> str:
    """A user's or channel's name as drawn: cleaned; "#id" for one that no longer exists."""
    name = group.get("name")
    return clean(name) if name else f"#{group['key']}"


def _top(canvas: _Canvas, data: dict[str, Any]) -> ET.Element:
    noun = "users" if canvas.chart == "users" else "channels"
    row, y = 22, 8.0
    label_width = min(7 * NAME_CHARS, canvas.width * 0.4)
    descs = []
    for by, heading, colour in (("tasks", f"Top {noun} by tasks", RUN), ("quota", f"Top {noun} by quota spent",
                                                                           ACCENT)):
        ranked = top_groups(data, by)
        panel = ET.SubElement(canvas.root, "g", {"data-part": "ranking", "data-by": by})
        _text(panel, 8, y + 14, heading, **{"font-weight": "600"})
        y += 24
        if not ranked:
            _text(panel, 8, y + 14, "Nothing in this period.", fill=MUTED)
            y += row + 8
            descs.append(f"{heading}: none.")
            continue
        measure = (lambda g: g["tasks"]) if by == "tasks" else spent
        high = max(measure(g) for g in ranked)
        value_room = 7 * len(number(high)) + 12
        bar_room = max(20.0, canvas.width - 8 - label_width - 8 - value_room)
        for group in ranked:
            name = display_name(group)
            value = measure(group)
            rate = group["success_rate"]
            item = ET.SubElement(panel, "g", {  # the row's figures, for a table beside the chart
                "data-key": str(group["key"]), "data-value": str(value), "data-name": name,
                "data-tasks": str(group["tasks"]), "data-spent": str(spent(group)),
                "data-rate": "" if rate is None else str(rate)})
            _tooltip(item, f"{name} (#{group['key']}): {number(group['tasks'])} tasks, "
                           f"{number(spent(group))} quota spent")
            _text(item, 8, y + 14, short(name))
            length = max(1.0, bar_room * value / high)
            ET.SubElement(item, "rect", {"x": _f(8 + label_width + 8), "y": _f(y + 3), "width": _f(length),
                                         "height": str(row - 8), "fill": colour})
            _text(item, 8 + label_width + 8 + length + 6, y + 14, number(value))
            y += row
        y += 10
        descs.append(f"{heading}: " + ", ".join(f"{display_name(g)} {number(measure(g))}" for g in ranked) + ".")
    return canvas.finish(y, f"{CHARTS[canvas.chart].title}", " ".join(descs))
