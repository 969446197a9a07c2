"""What an operator sees: the core's metrics in the Prometheus text Ray's nodes export, the
shipped Grafana dashboard charting exactly those, and each task's log lines, tagged with the
task, found by `llama-deploy-ray logs TASK`."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import ray
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from workflows import Context, Workflow, step
from workflows.events import Event, StartEvent, StopEvent

from llama_deploy_ray import (
    AsyncLlamaDeployClient,
    ControlPlaneConfig,
    ServiceLoggingConfig,
    TaskStatus,
    deploy_workflow,
)
from llama_deploy_ray._cluster.metrics import METRICS

from .conftest import ROOT, service, wait_for
from .terminal import Cli

DASHBOARD = ROOT / "examples" / "monitoring" / "grafana-dashboard.json"
SERVICES = {"observed-text": "TEXT", "observed-json": "JSON"}


class Progress(Event):
    word: str


class Observed(Workflow):
    @step
    async def work(self, ctx: Context, ev: StartEvent) -> StopEvent:
        logging.getLogger("ray.serve").info("working on %s", ev.get("word"))
        print(f"printed while working on {ev.get('word')}")
        ctx.write_event_to_stream(Progress(word=ev.get("word")))
        if ev.get("fail"):
            raise ValueError("asked to fail")
        return StopEvent(result=ev.get("word"))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def ran(control_plane_config: ControlPlaneConfig) -> dict[str, list[tuple[str, str, str]]]:
    """On each service, three tasks that complete and one that fails, each streaming one
    event: (task id, session id, word) by service."""
    ran: dict[str, list[tuple[str, str, str]]] = {}
    async with AsyncLlamaDeployClient(control_plane_config) as client:
        for name, encoding in SERVICES.items():
            await deploy_workflow(
                Observed(timeout=30),
                service(name, logging_config=ServiceLoggingConfig(encoding=encoding)),
                control_plane_config,
            )
            session = await client.create_session()
            ran[name] = []
            for i, fail in enumerate((False, False, False, True)):
                word = f"{name}-word-{i}"
                task_id = await session.run_nowait(name, word=word, fail=fail)
                async for _ in session.get_task_result_stream(task_id):
                    pass
                result = await session.get_task(task_id, wait_s=30)
                assert result.status is (TaskStatus.FAILED if fail else TaskStatus.COMPLETED)
                ran[name].append((task_id, session.session_id, word))
    return ran


def test_each_line_a_task_logged_carries_it_and_logs_finds_them(
    ran: dict[str, list[tuple[str, str, str]]], cli: Cli
) -> None:
    for name, encoding in SERVICES.items():
        for task_id, session_id, word in ran[name]:
            lines = wait_for(
                functools.partial(_two_lines, cli, task_id),
                timeout_s=30,
                what=f"{task_id}'s log lines",
            )
            messages = []
            for line in lines:
                if encoding == "JSON":
                    record = json.loads(line)
                    fields = {k: record[k] for k in record if k.startswith("llama_")}
                    messages.append(record["message"])
                else:
                    fields = dict(re.findall(r"(llama_\w+)=(\S+)", line))
                    messages.append(line)
                assert fields == {
                    "llama_task_id": task_id,
                    "llama_session_id": session_id,
                    "llama_service": name,
                }, line
            # the step's own log line and its print, and no other task's
            assert any(f"working on {word}" in m for m in messages), lines
            assert any(f"printed while working on {word}" in m for m in messages), lines


def _two_lines(cli: Cli, task_id: str) -> list[str] | None:
    found = cli("--json", "logs", task_id, status=None)
    if found.returncode:
        assert f"no replica's log names task {task_id}" in found.stderr, found.stderr
        return None
    lines = [line["line"] for line in json.loads(found.stdout)]
    return lines if len(lines) >= 2 else None


def test_logs_of_an_unknown_task_exit_1_saying_so(cli: Cli) -> None:
    done = cli("logs", "no-such-task", status=1)
    # Ray's own warnings may come first on a busy machine
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors[0].startswith("error: no replica's log names task no-such-task"), done.stderr


@pytest.mark.timeout(120)
async def test_prometheus_text_counts_every_task_once(
    ran: dict[str, list[tuple[str, str, str]]], control_plane_config: ControlPlaneConfig
) -> None:
    expected = {
        ("tasks_started_total", ()): 4,
        ("tasks_finished_total", (("status", "completed"),)): 3,
        ("tasks_finished_total", (("status", "failed"),)): 1,
        ("task_latency_seconds_count", ()): 4,
        ("task_queue_wait_seconds_count", ()): 4,
        ("events_streamed_total", ()): 4,
    }

    def counted() -> list[Sample] | None:
        samples = _scrape()
        for name in SERVICES:
            for (metric, labels), value in expected.items():
                if _sum(samples, metric, service=name, **dict(labels)) < value:
                    return None
        return samples

    samples = wait_for(counted, timeout_s=90, what="the tasks in the Prometheus text", every_s=2)
    for name in SERVICES:
        for (metric, labels), value in expected.items():
            assert _sum(samples, metric, service=name, **dict(labels)) == value, (name, metric)
        # a latency falls in the buckets up to its bound: the slowest of 4 is in the last
        assert _sum(samples, "task_latency_seconds_bucket", service=name, le="+Inf") == 4
    for method in ("create_session", "begin_tasks", "finish_tasks"):
        assert _sum(samples, "control_plane_calls_total", method=method) > 0, method
    # a task more is a store write more (earlier shards' series, gone with a restart, stay in
    # the text a while: only a change is compared)
    commits, rows = _sum(samples, "store_commits_total"), _sum(samples, "store_rows_written_total")
    async with AsyncLlamaDeployClient(control_plane_config) as client:
        await (await client.create_session()).run("observed-text", word="one more")
    wait_for(
        lambda: _sum(_scrape(), "store_commits_total") > commits,
        timeout_s=60,
        what="the store's commits to grow",
        every_s=2,
    )
    assert _sum(_scrape(), "store_rows_written_total") > rows
    # a session's runs one after another: the replica starts each after the first ahead of its
    # begin, from the state the one before left; so do the API's runs of new tasks, which the
    # orchestrator sends to a replica of their service
    async with AsyncLlamaDeployClient(control_plane_config) as client:
        session = await client.create_session()
        for word in ("one", "two", "three"):
            await session.run("observed-json", word=word)
    api_run = f"{control_plane_config.url}/sessions/{session.session_id}/run"
    async with httpx.AsyncClient(timeout=30) as http:
        for word in ("four", "five"):
            body = {"input": json.dumps({"word": word}), "agent_id": "observed-json"}
            answer = await http.post(api_run, json=body)
            assert answer.json()["status"] == "completed", answer.text
    wait_for(
        lambda: (
            _sum(_scrape(), "runs_ahead_total", service="observed-json", outcome="started") >= 4
        ),
        timeout_s=60,
        what="the runs started ahead of their begin",
        every_s=2,
    )
    # every shard reports its gauge: nothing is left unfinished here
    assert {s.labels["shard"] for s in _samples(samples, "tasks_unfinished")} == {"0", "1"}
    assert _sum(samples, "tasks_unfinished", service="observed-text") == 0


def test_the_grafana_dashboard_charts_every_metric_and_only_those() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    charted = set()
    for panel in panels:
        for target in panel["targets"]:
            for name in re.findall(r"ray_(llama_deploy_ray_\w+)", target["expr"]):
                charted.add(re.sub(r"_(bucket|sum|count)$", "", name))
    assert charted == set(METRICS)


async def test_only_records_made_in_a_tasks_context_are_tagged() -> None:
    """Records from the steps a run starts carry its task; what else the process logs does
    not."""
    from llama_deploy_ray._cluster.task_logging import (
        TASK_LOG_FIELDS,
        install_task_logging,
        task_logged,
    )

    install_task_logging("JSON")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("test_observability")
    logger.addHandler(Keep())
    logger.propagate = False

    async def step_of_a_run() -> None:
        logger.warning("in a step")

    with task_logged("t1", "s1", "svc"):
        running = asyncio.get_running_loop().create_task(step_of_a_run())
    logger.warning("outside")
    await running
    tagged = {r.getMessage(): {f: getattr(r, f, None) for f in TASK_LOG_FIELDS} for r in records}
    assert tagged == {
        "in a step": {"llama_task_id": "t1", "llama_session_id": "s1", "llama_service": "svc"},
        "outside": dict.fromkeys(TASK_LOG_FIELDS),
    }


@pytest.fixture(scope="module")
def cli(control_plane_config: ControlPlaneConfig, core_env: dict[str, str]) -> Cli:
    return Cli(Path.cwd(), core_env)


def _scrape() -> list[Sample]:
    samples: list[Sample] = []
    for node in ray.nodes():
        if node["Alive"]:
            url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
                samples += family.samples
    return samples


def _samples(samples: list[Sample], metric: str, **labels: str) -> list[Sample]:
    name = f"ray_llama_deploy_ray_{metric}"
    return [
        s
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def _sum(samples: list[Sample], metric: str, **labels: str) -> float:
    return sum(s.value for s in _samples(samples, metric, **labels))
