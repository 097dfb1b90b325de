"""The operator's console endpoints: GET /api/mj/stats (statistics), GET /api/mj/stats/chart (a chart of
them, SVG drawn by mjctl.charts), GET /api/mj/stats/charts (several charts from one computation per
grouping), GET /api/mj/export (every matching task as CSV or JSON lines, streamed) and GET /metrics
(Prometheus).

Statistics and export take the listing's filters (mjctl.server.api.read_listing) and scope: a user sees
their own tasks, an administrator all tasks, narrowed by ``channel_id`` and ``user_id``.
"""

from __future__ import annotations

import time

import bottle

from mjctl import charts, export, metrics, stats
from mjctl.server.api import MAX_WORD_LEN, query_int, query_text, read_listing
from mjctl.server.app import AppContext, ok
from mjctl.server.auth import authenticate_request, require_admin
from mjctl.server.openapi import error_responses, json_response, query_param
from mjctl.tasks import MAX_FILTER_LEN, TaskFilter

STATS_FAILED = "Failed to compute the statistics"
#: A chart is an image made of escaped text: nothing in it may run or load, even opened on its own.
CHART_HEADERS = {"Content-Type": charts.MEDIA_TYPE, "Cache-Control": "no-store",
                 "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
                 "X-Content-Type-Options": "nosniff"}
MAX_CHARTS_LEN = 200  # the charts parameter: every chart's name, comma-separated, fits with room to spare
EXPORT_FAILED = "Failed to export the tasks"
METRICS_FAILED = "Failed to read the metrics"


def read_scope() -> tuple[TaskFilter, bool]:
    """The caller's filter and whether it sees every task (admin): the listing's parameters (channel_id and
    user_id for administrators); a user's filter is fixed to their own tasks, last."""
    user = authenticate_request(bottle.request)
    admin = user.is_admin
    filters, _page, _size = read_listing(admin=admin)
    if not admin:
        filters.user_id = user.id
    return filters, admin


def read_width() -> int:
    """The width a chart is laid out for (the chart routes' ``width``), validated."""
    return charts.check_width(query_int(bottle.request.query, "width", minimum=0,
                                        meaning="a whole number of pixels"))


def install(app: bottle.Bottle, ctx: AppContext) -> None:
    # Long reads stay out of the SQLite gate (mjctl.server.app.StorePlugin), which the listings share.
    @app.get("/api/mj/stats", db_error=STATS_FAILED, sqlite_gate=False)
    def task_stats():
        filters, admin = read_scope()
        group_by = stats.check_group(query_text(bottle.request.query, "group_by", max_len=MAX_WORD_LEN), admin=admin)
        return ok(stats.compute_stats(filters, group_by))

    @app.get("/api/mj/stats/chart", db_error=STATS_FAILED, sqlite_gate=False)
    def task_chart():
        filters, admin = read_scope()
        chart = charts.check_chart(query_text(bottle.request.query, "chart", max_len=MAX_WORD_LEN), admin=admin)
        width = read_width()
        data = stats.compute_stats(filters, charts.CHARTS[chart].group_by)
        return bottle.HTTPResponse(charts.render(chart, data, width=width), status=200, headers=CHART_HEADERS)

    @app.get("/api/mj/stats/charts", db_error=STATS_FAILED, sqlite_gate=False)
    def task_charts():
        filters, admin = read_scope()
        names = charts.check_charts(query_text(bottle.request.query, "charts", max_len=MAX_CHARTS_LEN), admin=admin)
        width = read_width()
        # One computation per grouping, however many charts draw it (the day charts share one).
        computed = {group_by: stats.compute_stats(filters, group_by)
                    for group_by in dict.fromkeys(charts.CHARTS[name].group_by for name in names)}
        return ok({"stats": computed,
                   "charts": {name: charts.render(name, computed[charts.CHARTS[name].group_by], width=width)
                              for name in names}})

    @app.get("/api/mj/export", db_error=EXPORT_FAILED)
    def task_export():
        filters, admin = read_scope()
        fmt = export.check_format(query_text(bottle.request.query, "format", max_len=MAX_WORD_LEN))
        bottle.response.content_type = export.MEDIA_TYPES[fmt]
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        bottle.response.set_header("Content-Disposition", f'attachment; filename="mjctl-tasks-{stamp}.{fmt}"')
        bottle.response.set_header("Cache-Control", "no-store")
        return export.encode(export.iter_batches(filters, admin=admin, image_url=ctx.image_url), fmt, admin=admin)

    @app.get("/metrics", db_error=METRICS_FAILED, sqlite_gate=False)
    def prometheus_metrics():
        if not ctx.settings.metrics.public:
            require_admin(authenticate_request(bottle.request))
        return bottle.HTTPResponse(metrics.render(), status=200,
                                   headers={"Content-Type": metrics.CONTENT_TYPE, "Cache-Control": "no-store"})

    _document(ctx)


def _document(ctx: AppContext) -> None:
    api = ctx.openapi
    number = {"type": ["number", "null"]}
    summary_props = {name: {"type": "integer", "minimum": 0} for name in stats.COUNTS}
    summary_props["success_rate"] = {"type": ["number", "null"],
                                     "description": "success / (success + failure + cancel); null when none finished."}
    for name in ("queue_seconds_p50", "queue_seconds_p95", "run_seconds_p50", "run_seconds_p95"):
        summary_props[name] = {**number, "description": "Seconds; null when unknown (too few durations)."}
    summary_props["quota_charged"]["description"] = "Quota charged for these tasks (refunded or not)."
    summary = api.schema("StatsSummary", {"type": "object", "required": list(stats.FIELDS),
                                          "properties": summary_props})
    group = {"allOf": [summary, {"type": "object", "required": ["key"], "properties": {
        "key": {"type": ["string", "integer"],
                "description": "The day (YYYY-MM-DD, UTC), hour (YYYY-MM-DDTHH:00Z), action, status, mode (FAST, "
                               "RELAX, TURBO, or \"\" when none was named), channel id or user id."},
        "start": {"type": "integer", "description": "Day and hour groups: the bucket's first second (epoch)."},
        "name": {"type": ["string", "null"], "description": "Channel and user groups: the name."}}}]}
    api.schema("Stats", {
        "type": "object", "required": ["success", "message", "data"],
        "properties": {"success": {"const": True}, "message": {"type": "string"}, "data": {
            "type": "object", "required": ["totals", "groups", "group_by", "percentiles"],
            "properties": {
                "totals": summary,
                "groups": {"type": "array", "items": group},
                "group_by": {"type": ["string", "null"]},
                "percentiles": {"enum": ["exact", "sampled"],
                                "description": f"sampled: from about {stats.SAMPLE_LIMIT} tasks, when more match."},
            }}},
    })
    stamp = {"type": "integer", "minimum": 0}
    filters = [
        query_param("mj_id", {"type": "string", "maxLength": MAX_FILTER_LEN}, "Exact task id."),
        query_param("start_timestamp", stamp, "submit_time >= this (epoch seconds; >= 100000000000 is milliseconds)."),
        query_param("end_timestamp", stamp, "submit_time <= this (epoch seconds; >= 100000000000 is milliseconds)."),
        query_param("status", {"type": "string", "maxLength": MAX_WORD_LEN}, "Exact status, e.g. SUCCESS."),
        query_param("action", {"type": "string", "maxLength": MAX_WORD_LEN}, "Exact action, e.g. IMAGINE."),
        query_param("channel_id", {"type": "integer", "minimum": 0}, "Exact channel id (administrators)."),
        query_param("user_id", {"type": "integer", "minimum": 0}, "Exact user id (administrators)."),
    ]
    api.operation("/api/mj/stats", "get", tags=["console"],
                  summary="Statistics of the caller's tasks (an administrator's: all tasks).",
                  description="The same filters as the task list, so totals.tasks equals the list's total.",
                  parameters=filters + [query_param("group_by", {"enum": list(stats.GROUPS)},
                                                    "day, hour, action, status, mode; channel and user for "
                                                    "administrators.")],
                  responses={200: json_response("Stats", "Totals and groups."),
                             **error_responses(400, 401, 403, 500, e500=f"The store failed: \"{STATS_FAILED}\".")})
    kinds = "; ".join(f"{name}: {chart.title.lower()}" + (" (administrators)" if chart.admin else "")
                      for name, chart in charts.CHARTS.items())
    api.operation("/api/mj/stats/chart", "get", tags=["console"],
                  summary="A chart of the statistics, as an SVG image with a text alternative.",
                  description="The statistics of the same filters and scope as GET /api/mj/stats, drawn by the "
                              f"server: {kinds}. Day charts are UTC days, every day of the period shown. The "
                              "image names itself (role img, named by its title and desc elements, which carry "
                              "the totals); names from the store are drawn as escaped text.",
                  parameters=filters + [
                      query_param("chart", {"enum": list(charts.CHARTS)}, "Which chart.", required=True),
                      query_param("width", {"type": "integer", "minimum": charts.MIN_WIDTH,
                                            "maximum": charts.MAX_WIDTH, "default": charts.DEFAULT_WIDTH},
                                  "The width to lay the chart out for, in pixels.")],
                  responses={200: {"description": "The chart.",
                                   "content": {"image/svg+xml": {"schema": {"type": "string"}}}},
                             **error_responses(400, 401, 403, 500, e500=f"The store failed: \"{STATS_FAILED}\".")})
    api.schema("StatsCharts", {
        "type": "object", "required": ["success", "message", "data"],
        "properties": {"success": {"const": True}, "message": {"type": "string"}, "data": {
            "type": "object", "required": ["stats", "charts"],
            "properties": {
                "stats": {"type": "object", "description": "The statistics each grouping the charts draw was "
                                                           "computed as (keys: day, user, channel), shaped as "
                                                           "GET /api/mj/stats's data.",
                          "additionalProperties": {"type": "object"}},
                "charts": {"type": "object", "description": "Each chart asked for: its SVG document.",
                           "additionalProperties": {"type": "string"}}}}},
    })
    api.operation("/api/mj/stats/charts", "get", tags=["console"],
                  summary="Several charts at once, with the statistics they draw, as JSON.",
                  description="As GET /api/mj/stats/chart for each name in charts, but the statistics of each "
                              "grouping are computed once for all the charts that draw it (the day charts share "
                              "one), and returned beside the SVG documents. What the web page's Statistics view "
                              "loads.",
                  parameters=filters + [
                      query_param("charts", {"type": "string", "maxLength": MAX_CHARTS_LEN},
                                  f"Chart names, comma-separated ({', '.join(charts.CHARTS)}); each at most once.",
                                  required=True),
                      query_param("width", {"type": "integer", "minimum": charts.MIN_WIDTH,
                                            "maximum": charts.MAX_WIDTH, "default": charts.DEFAULT_WIDTH},
                                  "The width to lay every chart out for, in pixels.")],
                  responses={200: json_response("StatsCharts", "The statistics and the charts."),
                             **error_responses(400, 401, 403, 500, e500=f"The store failed: \"{STATS_FAILED}\".")})
    columns = ", ".join(export.fields(admin=True))
    api.operation("/api/mj/export", "get", tags=["console"],
                  summary="Every matching task, newest first, streamed as CSV or JSON lines.",
                  description=f"Fields: {columns} (user_id and the rest after quota only for administrators).",
                  parameters=filters + [query_param("format", {"enum": list(export.FORMATS), "default": "csv"},
                                                    "csv (with a header row) or jsonl (one item per line).")],
                  responses={200: {"description": "The tasks.",
                                   "content": {"text/csv": {"schema": {"type": "string"}},
                                               "application/x-ndjson": {"schema": {"type": "string"}}}},
                             **error_responses(400, 401, 403, 500, e500=f"The store failed: \"{EXPORT_FAILED}\".")})
    api.operation("/metrics", "get", tags=["console"],
                  summary="Prometheus metrics (an admin token unless [metrics] public = true).",
                  responses={200: {"description": "The Prometheus text format.",
                                   "content": {"text/plain": {"schema": {"type": "string"}}}},
                             **error_responses(401, 403, 500)})
