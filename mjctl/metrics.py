"""Prometheus metrics (``GET /metrics``), with the official client library.

Two kinds, chosen by where the truth lives:

- **What the store knows is read from the store at scrape time**: tasks submitted, finished and
  unfinished, refunds, quota charged and refunded, and when each channel was last polled. Every process
  that writes tasks (server workers, the in-server poller, a `mjctl poll` from cron, other hosts) writes
  them to the database, so a count kept in any one process would miss the others' work, and one kept in
  several would need summing across hosts. Read from the tables, every worker answers the same numbers,
  they equal the store by construction (submitted = task rows, refunds = refund ledger entries, through
  task.quota_refunded, which a trigger keeps from the ledger) and they never reset on a restart. The cost is
  one aggregate over the task table per scrape (GROUP BY channel, action, status and mode), paid only when
  Prometheus asks: on a million tasks ~0.3 s on PostgreSQL and 1–2 s on SQLite, which sorts every row to
  group them (measured on a busy 2-CPU machine); such a store is best scraped every 30 s or more.
- **What happens inside a process is counted in that process**: upstream request durations, poll cycle
  durations, HTTP requests and their durations, image cache hits and misses. `mjctl serve` runs several
  processes (its workers and, in the parent, the poller), so it points ``PROMETHEUS_MULTIPROC_DIR`` at a
  fresh folder for the run before any of them starts (:func:`use_run_directory`); prometheus_client's
  multiprocess mode then keeps each process's values in memory-mapped files there, and a scrape reaching
  any worker sums all of them. The folder is removed when `serve` ends: those counters start again at
  zero with the next run, which Prometheus's rate() reads as the reset it is.

The core calls the ``observe_*`` functions (a dictionary lookup and a lock each); a process keeps what they
report once it has called :func:`prepare`, as `mjctl serve`'s app and looping poller do when they start.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Upstream call durations: a submit is usually under a second, a slow list may take the whole timeout.
UPSTREAM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0)
POLL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

_OPERATIONS = (
    (re.compile(r"/mj/submit/"), "submit"),
    (re.compile(r"/mj/task/list-by-condition$"), "list_by_condition"),
    (re.compile(r"/mj/task/list$"), "list"),
    (re.compile(r"/image-seed$"), "image_seed"),
    (re.compile(r"/fetch$"), "fetch"),
)

_lock = threading.Lock()
_local: dict[str, Any] = {}


def prepare() -> None:
    """Make this process's metrics, importing prometheus_client (after PROMETHEUS_MULTIPROC_DIR is known).
    A server's app and a looping poller call it as they start, so that no request or cycle pays for it;
    until a process has, what it observes is not kept: a one-shot command has nobody to report to, and
    `mjctl poll` from cron does not load the library at all."""
    with _lock:
        if not _local:
            from prometheus_client import CollectorRegistry, Counter, Histogram

            registry = CollectorRegistry(auto_describe=True)
            _local.update(
                upstream=Histogram("mjctl_upstream_request_seconds", "Upstream requests, by outcome.",
                                   ["channel", "operation", "outcome"], buckets=UPSTREAM_BUCKETS, registry=registry),
                poll=Histogram("mjctl_poll_cycle_seconds", "Poll cycles of this server's looping poller.",
                               buckets=POLL_BUCKETS, registry=registry),
                http_total=Counter("mjctl_http_requests_total", "HTTP answers, by route pattern and status.",
                                   ["route", "status"], registry=registry),
                http_seconds=Histogram("mjctl_http_request_seconds", "Time to the start of an answer, by route.",
                                       ["route"], buckets=HTTP_BUCKETS, registry=registry),
                image_cache=Counter("mjctl_image_cache_total", "Cacheable image requests: hit or miss.",
                                    ["result"], registry=registry),
                registry=registry,
            )


# -- what the core reports -----------------------------------------------------------------------------


def operation_of(path: str) -> str:
    """The upstream operation a request path is (a bounded label set, never the path itself)."""
    for pattern, name in _OPERATIONS:
        if pattern.search(path):
            return name
    return "other"


@contextlib.contextmanager
def upstream_timer(channel: str, path: str) -> Iterator[None]:
    """Time one upstream exchange; its outcome is ok or the kind of failure it raised."""
    histogram = _local.get("upstream")
    if histogram is None:
        yield
        return
    began = time.perf_counter()
    outcome = "ok"
    try:
        yield
    except BaseException as exc:
        outcome = _outcome(exc)
        raise
    finally:
        histogram.labels(channel or "-", operation_of(path), outcome).observe(time.perf_counter() - began)


def _outcome(exc: BaseException) -> str:
    name = type(exc).__name__
    if name == "UpstreamUnavailable":
        status = getattr(exc, "status", None)
        return "http_5xx" if status else ("timeout" if "timed out" in str(exc) else "unreachable")
    return {"UpstreamUnauthorized": "unauthorized", "UpstreamRateLimited": "rate_limited",
            "UpstreamProtocolError": "protocol_error"}.get(name, "error")


def observe_poll_cycle(summary: Any) -> None:
    """A looping poller's cycle (its summary's duration)."""
    if "poll" in _local:
        _local["poll"].observe(float(getattr(summary, "duration", 0.0) or 0.0))


def observe_request(route: str, status: str, seconds: float) -> None:
    """One HTTP answer: route is the matched pattern (never the raw path), status its code."""
    if "http_total" in _local:
        _local["http_total"].labels(route, status).inc()
        _local["http_seconds"].labels(route).observe(seconds)


def observe_image_cache(hit: bool) -> None:
    if "image_cache" in _local:
        _local["image_cache"].labels("hit" if hit else "miss").inc()


# -- one run of `mjctl serve` -----------------------------------------------------------------------------


def use_run_directory() -> str:
    """Point this process and the processes it starts at a fresh multiprocess folder; returns it. Must run
    before any metric is made (prometheus_client picks its value store when a metric is created)."""
    path = tempfile.mkdtemp(prefix="mjctl-metrics-")
    os.environ[MULTIPROC_ENV] = path
    return path


def remove_run_directory(path: str) -> None:
    if os.environ.get(MULTIPROC_ENV) == path:
        del os.environ[MULTIPROC_ENV]
    shutil.rmtree(path, ignore_errors=True)


# -- a scrape -------------------------------------------------------------------------------------------


def render() -> bytes:
    """The text exposition of every metric: this run's process metrics (all processes' in multiprocess
    mode) and the store's. Needs a database connection."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        prepare()  # this process's metrics, so an unused kind still shows (at zero)
        multiprocess.MultiProcessCollector(registry)
    else:
        prepare()
        registry.register(_Forward(_local["registry"]))
    registry.register(StoreCollector())
    return generate_latest(registry)


class _Forward:
    """Another registry's metrics, as one collector."""

    def __init__(self, registry: Any):
        self.registry = registry

    def collect(self):
        return self.registry.collect()


def store_totals() -> dict[str, Any]:
    """The store's counts, as /metrics shows them: one aggregate over the task table, channel names,
    the poll claims' times."""
    from peewee import Case, fn

    from mjctl.models import FINISHED_STATUSES, Channel, PollClaim, Task

    names = dict(Channel.select(Channel.id, Channel.name).tuples())
    rows = (Task.select(Task.channel_id, Task.action, Task.status, Task.mode, fn.COUNT(Task.id), fn.SUM(Task.quota),
                        fn.SUM(Task.quota_refunded), fn.SUM(Case(None, [(Task.quota_refunded > 0, 1)], 0)))
            .group_by(Task.channel_id, Task.action, Task.status, Task.mode).tuples())
    out: dict[str, Any] = {"submitted": {}, "finished": {}, "unfinished": {}, "refunds": 0, "quota_charged": 0,
                           "quota_refunded": 0, "polled_at": {}}
    for channel_id, action, status, mode, count, quota, refunded, refunds in rows:
        channel = names.get(channel_id, str(channel_id))
        count, quota, refunded, refunds = int(count), int(quota or 0), int(refunded or 0), int(refunds or 0)
        submitted = (action, channel, mode or "")
        out["submitted"][submitted] = out["submitted"].get(submitted, 0) + count
        bucket = "finished" if status in FINISHED_STATUSES else "unfinished"
        label = (status, channel) if bucket == "finished" else channel
        out[bucket][label] = out[bucket].get(label, 0) + count
        out["refunds"] += refunds
        out["quota_charged"] += quota + refunded
        out["quota_refunded"] += refunded
    for name in names.values():
        out["unfinished"].setdefault(name, 0)
    for channel_id, polled_at in PollClaim.select(PollClaim.channel_id, PollClaim.polled_at).tuples():
        if polled_at and channel_id in names:
            out["polled_at"][names[channel_id]] = float(polled_at)
    return out


class StoreCollector:
    """The store-backed metrics, read at each scrape (see the module doc)."""

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        totals = store_totals()
        submitted = CounterMetricFamily("mjctl_tasks_submitted", "Tasks recorded (every task row), by action, "
                                        "channel and speed (FAST, RELAX, TURBO; empty when none was named).",
                                        labels=["action", "channel", "mode"])
        for (action, channel, mode), n in sorted(totals["submitted"].items()):
            submitted.add_metric([action, channel, mode], n)
        finished = CounterMetricFamily("mjctl_tasks_finished", "Tasks that reached SUCCESS, FAILURE or CANCEL.",
                                       labels=["status", "channel"])
        for (status, channel), n in sorted(totals["finished"].items()):
            finished.add_metric([status, channel], n)
        unfinished = GaugeMetricFamily("mjctl_unfinished_tasks", "Tasks not yet finished, by channel.",
                                       labels=["channel"])
        for channel, n in sorted(totals["unfinished"].items()):
            unfinished.add_metric([channel], n)
        polled = GaugeMetricFamily("mjctl_channel_last_poll_timestamp_seconds",
                                   "When a poller last took the channel's claim (any poller, any host).",
                                   labels=["channel"])
        for channel, at in sorted(totals["polled_at"].items()):
            polled.add_metric([channel], at)
        yield submitted
        yield finished
        yield unfinished
        yield polled
        yield CounterMetricFamily("mjctl_refunds", "Refunds made (refund ledger entries of tasks).",
                                  value=totals["refunds"])
        yield CounterMetricFamily("mjctl_quota_charged", "Quota charged for tasks.", value=totals["quota_charged"])
        yield CounterMetricFamily("mjctl_quota_refunded", "Quota refunded for failed tasks.",
                                  value=totals["quota_refunded"])
