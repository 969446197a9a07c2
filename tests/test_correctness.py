"""Bad input, retries, overload and bounded memory, on a real local Ray: every task ends, every
call returns, nothing runs twice."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import ray

from llama_deploy_ray import (
    AsyncLlamaDeployClient,
    ControlPlaneConfig,
    InvalidRequestError,
    LlamaDeployClient,
    RequestTimeoutError,
    TaskDefinition,
    TaskFailedError,
    TaskResult,
    TaskStatus,
    deploy_workflow,
)
from llama_deploy_ray._config import DRIVER_SILENCE_S, workflow_route
from llama_deploy_ray._control_plane import ControlPlane

from .conftest import MAX_EVENTS_PER_TASK, service, wait_for
from .workflows import (
    BlockingWorkflow,
    EchoWorkflow,
    HumanWorkflow,
    ManyEventsWorkflow,
    SleepWorkflow,
    TypedHumanWorkflow,
    TypedStartWorkflow,
    UnrestorableWorkflow,
)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def deployed(control_plane_config: ControlPlaneConfig) -> ControlPlaneConfig:
    config = control_plane_config
    await asyncio.gather(
        deploy_workflow(EchoWorkflow(), service("c_echo"), config),
        deploy_workflow(TypedStartWorkflow(), service("typed"), config),
        deploy_workflow(UnrestorableWorkflow(), service("unrestorable"), config),
        deploy_workflow(BlockingWorkflow(timeout=120), service("blocking"), config),
        deploy_workflow(ManyEventsWorkflow(), service("many_events"), config),
        deploy_workflow(HumanWorkflow(timeout=60), service("c_human"), config),
        deploy_workflow(TypedHumanWorkflow(timeout=60), service("typed_human"), config),
        deploy_workflow(SleepWorkflow(timeout=120), service("c_sleep"), config),
        deploy_workflow(
            SleepWorkflow(timeout=60),
            service("tight", max_ongoing_requests=1, max_queued_requests=1),
            config,
        ),
    )
    return config


def run_url(config: ControlPlaneConfig, service_name: str, session_id: str) -> str:
    return f"{config.url}{workflow_route(service_name)}/sessions/{session_id}/run"


# a task that cannot start fails, and its session goes on


def test_run_kwargs_the_workflow_refuses_fail_the_task_and_the_session_goes_on(
    client: LlamaDeployClient,
) -> None:
    session = client.create_session()
    for kwargs, named in (({"start_event": "x"}, "start_event"), ({"ctx": "x"}, "ctx")):
        with pytest.raises(TaskFailedError, match="could not start the task") as info:
            session.run("c_echo", **kwargs)
        assert named in str(info.value)
    with pytest.raises(TaskFailedError, match="Greeting"):  # its required field is missing
        session.run("typed")
    # every later task of the session runs, on the same services
    assert session.run("typed", name="ada") == "hello ada"
    assert session.run("c_echo", arg1="next") == "next_result"
    statuses = [t.status for t in session.get_tasks()]
    assert statuses == [TaskStatus.FAILED] * 3 + [TaskStatus.COMPLETED] * 2


def test_a_state_that_cannot_be_restored_fails_its_tasks_clearly(
    client: LlamaDeployClient,
) -> None:
    session = client.create_session()
    assert session.run("unrestorable") == "kept"
    for _ in range(2):  # each later task ends, with the cause
        with pytest.raises(TaskFailedError, match="could not start the task") as info:
            session.run("unrestorable")
        assert "refuses to be restored" in str(info.value)  # the cause
    assert session.run("c_echo", arg1="other") == "other_result"  # its other services go on


# every call returns


async def test_the_client_timeout_bounds_a_whole_run(deployed: ControlPlaneConfig) -> None:
    with LlamaDeployClient(deployed, timeout=2) as client:
        for service_name, kwargs in (("c_sleep", {"seconds": 6}), ("c_human", {})):
            session = client.create_session()
            start = time.monotonic()
            with pytest.raises(RequestTimeoutError, match="client's timeout"):
                session.run(service_name, **kwargs)
            assert time.monotonic() - start < 4.5
            for task in session.get_tasks():  # what was asked goes on: stop it
                session.cancel_task(task.task_id)
    async with AsyncLlamaDeployClient(deployed, timeout=2) as aclient:
        session = await aclient.create_session()
        start = time.monotonic()
        with pytest.raises(TimeoutError):  # a RequestTimeoutError is also a TimeoutError
            await session.run("c_sleep", seconds=6)
        assert time.monotonic() - start < 4.5


def test_an_event_that_does_not_fit_is_refused_when_sent(
    client: LlamaDeployClient, deployed: ControlPlaneConfig
) -> None:
    session = client.create_session()
    task_id = session.run_nowait("typed_human")
    url = f"{deployed.url}/sessions/{session.session_id}/tasks/{task_id}/events"

    def send(event: dict) -> httpx.Response:
        return httpx.post(url, json={"service_name": "typed_human", "event": event}, timeout=30)

    for wrong in ({"number": "not a number"}, {}):
        refused = send({"__type__": "Answer", **wrong})
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"] == "InvalidRequestError"
        assert "Answer" in refused.json()["message"]
    unknown = send({"__type__": "NoSuchEvent", "number": 1})
    assert unknown.status_code == 422 and "NoSuchEvent" in unknown.json()["message"]
    assert send({"__type__": "Answer", "number": 21}).is_success
    result = session.get_task_result(task_id, wait_s=30)
    assert result is not None and result.result == 42  # the refused ones never reached it


def test_a_step_that_blocks_its_replica_is_not_run_twice(
    client: LlamaDeployClient, tmp_path: Path
) -> None:
    # the replica's event loop is blocked for longer than a silent driver is given: its
    # heartbeat, beaten from a thread, keeps its task from being adopted and run again
    log = tmp_path / "runs.log"
    session = client.create_session()
    assert session.run("blocking", seconds=DRIVER_SILENCE_S + 5, log=str(log)) == "done"
    assert log.read_text().count("ran") == 1
    (task,) = session.get_tasks()
    assert task.attempts == 1


async def test_a_retried_request_runs_its_task_once(
    client: LlamaDeployClient, deployed: ControlPlaneConfig
) -> None:
    session = client.create_session()
    task = TaskDefinition(input=json.dumps({"seconds": 0.5, "tag": "once"}), agent_id="c_sleep")
    url = run_url(deployed, "c_sleep", session.session_id)

    def send(body: TaskDefinition) -> httpx.Response:
        return httpx.post(url, content=body.model_dump_json(), timeout=30)

    answers = await asyncio.gather(*(asyncio.to_thread(send, task) for _ in range(3)))
    assert all(a.is_success for a in answers)
    assert {TaskResult.model_validate_json(a.content).task_id for a in answers} == {task.task_id}
    final = session.get_task_result(task.task_id, wait_s=30)
    assert final is not None and final.result["log"] == ["once"]
    # the same task sent again, by either route, is still that one task
    assert send(task).is_success
    assert session.create_task(task) == task.task_id
    assert [t.task_id for t in session.get_tasks()] == [task.task_id]
    # another task under the same id is refused
    other = task.model_copy(update={"input": json.dumps({"tag": "other"})})
    assert send(other).status_code == 422
    with pytest.raises(InvalidRequestError, match="already exists"):
        session.create_task(other)


# overload


async def test_thousands_queued_and_hundreds_waiting_leave_short_calls_fast(
    aclient: AsyncLlamaDeployClient,
) -> None:
    session = await aclient.create_session()
    blocker = await session.run_nowait("c_sleep", seconds=300, tag="blocker")
    gate = asyncio.Semaphore(100)

    async def submit(i: int) -> str:
        async with gate:
            return await session.run_nowait("c_sleep", seconds=0)

    queued = await asyncio.gather(*(submit(i) for i in range(2000)))
    # 2,000 tasks wait for their turn on the control plane; 500 clients wait for results
    polls = [asyncio.ensure_future(session.get_task(t, wait_s=120)) for t in queued[:500]]
    await asyncio.sleep(2)
    for _ in range(3):
        start = time.monotonic()
        await aclient.list_services()
        assert time.monotonic() - start < 1.0
    assert not any(poll.done() for poll in polls)

    await session.cancel_task(blocker)
    finished = await asyncio.wait_for(asyncio.gather(*polls), timeout=240)
    assert {r.status for r in finished} == {TaskStatus.COMPLETED}
    last = await session.get_task_result(queued[-1], wait_s=240)
    assert last is not None and last.status is TaskStatus.COMPLETED
    tasks = await session.get_tasks()  # 2,001 of them: three pages
    assert len(tasks) == 2001
    assert {t.status for t in tasks[1:]} == {TaskStatus.COMPLETED}


async def test_a_full_queue_is_answered_503_and_the_clients_retry(
    aclient: AsyncLlamaDeployClient, deployed: ControlPlaneConfig
) -> None:
    # "tight" runs one task at a time and queues one more; the rest are refused
    sessions = [await aclient.create_session() for _ in range(6)]

    def send(session_id: str) -> httpx.Response:
        body = TaskDefinition(input=json.dumps({"seconds": 1.0})).model_dump_json()
        return httpx.post(run_url(deployed, "tight", session_id), content=body, timeout=30)

    answers = await asyncio.gather(*(asyncio.to_thread(send, s.session_id) for s in sessions))
    refused = [a for a in answers if a.status_code == 503]
    assert refused and {a.status_code for a in answers} <= {200, 503}
    assert all(a.headers["retry-after"] == "1" for a in refused)

    results = await asyncio.gather(
        *(s.run("tight", seconds=0.5, tag=i) for i, s in enumerate(sessions))
    )
    assert [r["log"][-1] for r in results] == list(range(6))


# bounded memory


def test_a_stream_past_its_cap_drops_its_oldest_events_with_a_marker(
    client: LlamaDeployClient,
) -> None:
    extra = 100
    session = client.create_session()
    task_id = session.run_nowait("many_events", n=MAX_EVENTS_PER_TASK + extra)
    assert session.get_task_result(task_id, wait_s=30) is not None
    events = list(session.get_task_result_stream(task_id))
    marker, kept = events[0], events[1:]
    assert (marker["__type__"], marker["dropped"], marker["__seq__"]) == (
        "EventsDropped",
        extra,
        extra,
    )
    assert [e["step"] for e in kept] == list(range(extra, MAX_EVENTS_PER_TASK + extra))
    assert kept[-1]["__seq__"] == MAX_EVENTS_PER_TASK + extra
    resumed = list(session.get_task_result_stream(task_id, after=kept[9]["__seq__"]))
    assert resumed == kept[10:]


def test_listings_come_a_page_at_a_time(
    client: LlamaDeployClient, deployed: ControlPlaneConfig
) -> None:
    for _ in range(3):
        client.create_session()
    page = httpx.get(f"{deployed.url}/sessions", params={"limit": 2}, timeout=30)
    assert page.is_success and len(page.json()) == 2
    next_page = httpx.get(f"{deployed.url}/sessions", params={"offset": 2, "limit": 2}, timeout=30)
    assert {s["session_id"] for s in page.json()}.isdisjoint(
        s["session_id"] for s in next_page.json()
    )
    too_many = httpx.get(f"{deployed.url}/sessions", params={"limit": 100_000}, timeout=30)
    assert too_many.status_code == 422


@pytest.mark.timeout(600)
def test_a_hundred_thousand_sessions_are_forgotten_on_time(control_plane_config) -> None:
    # a control plane of its own, so that its memory is this test's alone; creating 100,000
    # sessions takes about a minute here, so they are kept 120 s
    actor = (
        ray.remote(ControlPlane)
        .options(num_cpus=0)
        .remote(task_retention_s=1.0, session_retention_s=120.0, state_secret=b"s" * 32)
    )
    ray.get(actor.ready.remote())

    def create(count: int) -> None:
        for _ in range(count // 10_000):
            ray.get([actor.create_session.remote() for _ in range(10_000)])

    def sizes() -> dict[str, int]:
        return ray.get(actor.sizes.remote())

    create(10_000)  # Ray's own per-call memory settles first
    baseline = sizes()
    create(100_000)
    full = sizes()
    assert full["sessions"] >= 100_000
    grown = full["rss_bytes"] - baseline["rss_bytes"]
    assert grown > 50_000_000  # they took memory
    # no task ends meanwhile: only the retention timer can forget them
    after = wait_for(
        lambda: (s := sizes())["sessions"] == 0 and s,
        timeout_s=300,
        what="the idle sessions to be dropped",
    )
    assert after["rss_bytes"] - baseline["rss_bytes"] < 0.2 * grown, (baseline, full, after)
    ray.kill(actor)
