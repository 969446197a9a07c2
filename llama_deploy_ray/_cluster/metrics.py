"""What the core reports to Ray's metrics, so it shows wherever Ray's metrics go: each node's
Prometheus endpoint (`ray start --metrics-export-port`), the Ray dashboard, Grafana
(`examples/monitoring/grafana-dashboard.json` charts every metric here).

The control plane reports them: it records every task exactly once (a replica that dies and a
task run again count once), so its counts are the cluster's. Counts are added up in a dict and
handed to Ray once a second (`flush`), not per call: Ray's own recording costs microseconds a
call, and a control plane makes several per task. Ray prefixes each name with `ray_` and tags
each series with the reporting process (`WorkerId`), so a Prometheus query sums over shards:

    sum by (service) (rate(ray_llama_deploy_ray_tasks_finished_total{status="failed"}[5m]))
"""

from __future__ import annotations

import collections
import functools
import inspect
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from ray.util.metrics import Counter, Gauge, Histogram

PREFIX = "llama_deploy_ray_"
# seconds: from a hello-world run's milliseconds to an agent's minutes
LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300]

# every metric, by the name Ray exports it under (without Ray's `ray_` prefix), with its kind
METRICS: dict[str, str] = {
    f"{PREFIX}tasks_started_total": "counter",
    f"{PREFIX}tasks_finished_total": "counter",
    f"{PREFIX}task_latency_seconds": "histogram",
    f"{PREFIX}task_queue_wait_seconds": "histogram",
    f"{PREFIX}tasks_unfinished": "gauge",
    f"{PREFIX}runs_ahead_total": "counter",
    f"{PREFIX}events_streamed_total": "counter",
    f"{PREFIX}control_plane_calls_total": "counter",
    f"{PREFIX}store_commits_total": "counter",
    f"{PREFIX}store_rows_written_total": "counter",
}


class ControlPlaneMetrics:
    """One control-plane shard's metrics; every series carries its `shard`."""

    def __init__(self, shard: int) -> None:
        def counter(name: str, description: str, *tags: str) -> Counter:
            return Counter(PREFIX + name, description=description, tag_keys=("shard", *tags))

        def histogram(name: str, description: str) -> Histogram:
            return Histogram(
                PREFIX + name,
                description=description,
                boundaries=LATENCY_BOUNDARIES,
                tag_keys=("shard", "service"),
            )

        self._started = counter(
            "tasks_started_total", "Tasks that started running, by service.", "service"
        )
        self._finished = counter(
            "tasks_finished_total",
            "Tasks that ended, by service and status (completed, failed, cancelled).",
            "service",
            "status",
        )
        self._latency = histogram(
            "task_latency_seconds", "Seconds from a task's creation to its end, by service."
        )
        self._queue_wait = histogram(
            "task_queue_wait_seconds",
            "Seconds a task waited for its turn (its session's earlier tasks on the service) "
            "before it started, by service.",
        )
        self._unfinished = Gauge(
            PREFIX + "tasks_unfinished",
            description="Tasks not yet ended, by service and status (pending: waiting for "
            "their turn; running; waiting: for human input).",
            tag_keys=("shard", "service", "status"),
        )
        self._ahead = counter(
            "runs_ahead_total",
            "Runs a replica started ahead of their begin, from the session state it held, by "
            "service and outcome (started: that was the latest; run_again: it was not, and "
            "the run started again from the latest).",
            "service",
            "outcome",
        )
        self._events = counter(
            "events_streamed_total", "Events the workflows wrote to their streams.", "service"
        )
        self._calls = counter(
            "control_plane_calls_total", "Calls the control plane answered, by method.", "method"
        )
        self._commits = counter("store_commits_total", "Transactions the state store committed.")
        self._rows = counter("store_rows_written_total", "Records the state store wrote.")
        shard_tag = {"shard": str(shard)}
        for metric in (
            self._started,
            self._finished,
            self._latency,
            self._queue_wait,
            self._unfinished,
            self._ahead,
            self._events,
            self._calls,
            self._commits,
            self._rows,
        ):
            metric.set_default_tags(shard_tag)
        self._reported: set[tuple[str, str]] = set()  # the gauge's series last set
        # counts not yet handed to Ray, by counter and tags
        self._counts: collections.Counter[tuple[Counter, tuple[tuple[str, str], ...]]] = (
            collections.Counter()
        )

    def task_started(self, service: str, queue_wait_s: float) -> None:
        self._counts[self._started, (("service", service),)] += 1
        self._queue_wait.observe(queue_wait_s, tags={"service": service})

    def task_finished(self, service: str, status: str, latency_s: float) -> None:
        self._counts[self._finished, (("service", service), ("status", status))] += 1
        self._latency.observe(latency_s, tags={"service": service})

    def run_ahead(self, service: str, started: bool) -> None:
        outcome = "started" if started else "run_again"
        self._counts[self._ahead, (("service", service), ("outcome", outcome))] += 1

    def events_streamed(self, service: str, count: int) -> None:
        self._counts[self._events, (("service", service),)] += count

    def call(self, method: str) -> None:
        self._counts[self._calls, (("method", method),)] += 1

    def store_commit(self, rows: int) -> None:
        self._counts[self._commits, ()] += 1
        self._counts[self._rows, ()] += rows

    def flush(self) -> None:
        """Hand Ray the counts added since the last flush."""
        counts, self._counts = self._counts, collections.Counter()
        for (counter, tags), count in counts.items():
            if count:
                counter.inc(count, tags=dict(tags))

    def unfinished(self, counts: dict[tuple[str, str], int]) -> None:
        """Set the gauge to `counts`, by (service, status); series no longer there drop to
        zero rather than keep their last value."""
        for service, status in self._reported - counts.keys():
            self._unfinished.set(0, tags={"service": service, "status": status})
        for (service, status), count in counts.items():
            self._unfinished.set(count, tags={"service": service, "status": status})
        self._reported = set(counts)


Actor = TypeVar("Actor")


def count_calls(cls: type[Actor]) -> type[Actor]:
    """Count each call of the actor class's public coroutine methods in its `_metrics`."""
    for name, method in list(vars(cls).items()):
        if not name.startswith("_") and inspect.iscoroutinefunction(method):
            setattr(cls, name, _counted(name, method))
    return cls


def _counted(
    name: str, method: Callable[..., Coroutine[Any, Any, Any]]
) -> Callable[..., Coroutine[Any, Any, Any]]:
    @functools.wraps(method)
    async def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        self._metrics.call(name)
        return await method(self, *args, **kwargs)

    return counted
