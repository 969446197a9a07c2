"""Streaming, human in the loop, nested workflows and cancellation, on a real local Ray."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import pytest_asyncio
from llama_index.core.workflow import HumanResponseEvent

from llama_deploy_ray import (
    AsyncLlamaDeployClient,
    ControlPlaneConfig,
    InvalidRequestError,
    LlamaDeployClient,
    TaskCancelledError,
    TaskFailedError,
    TaskNotFoundError,
    TaskResult,
    TaskStateError,
    TaskStatus,
    add_workflows,
    deploy_workflow,
)

from .conftest import service, wait_for
from .workflows import (
    HelperOuterWorkflow,
    HumanWorkflow,
    InnerWorkflow,
    LocalInnerWorkflow,
    OuterWorkflow,
    SleepWorkflow,
    StreamingWorkflow,
)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def deployed(control_plane_config: ControlPlaneConfig) -> ControlPlaneConfig:
    outer = OuterWorkflow(timeout=60)
    add_workflows(outer, child=LocalInnerWorkflow())
    helper_outer = HelperOuterWorkflow()
    add_workflows(helper_outer, helper=LocalInnerWorkflow())
    await asyncio.gather(
        deploy_workflow(StreamingWorkflow(), service("streaming"), control_plane_config),
        deploy_workflow(
            HumanWorkflow(timeout=3), service("human", input_hold_s=0.5), control_plane_config
        ),
        deploy_workflow(HumanWorkflow(), service("human_x2", num_replicas=2), control_plane_config),
        deploy_workflow(InnerWorkflow(timeout=60), service("child"), control_plane_config),
        deploy_workflow(outer, service("parent"), control_plane_config),
        deploy_workflow(helper_outer, service("helper_outer"), control_plane_config),
        deploy_workflow(
            SleepWorkflow(timeout=60),
            service("one_slot", max_ongoing_requests=1),
            control_plane_config,
        ),
        deploy_workflow(
            HumanWorkflow(timeout=60),
            service("human_one_slot", max_ongoing_requests=1, input_hold_s=0.5),
            control_plane_config,
        ),
    )
    return control_plane_config


# streaming


def test_events_arrive_as_they_happen(client: LlamaDeployClient) -> None:
    session = client.create_session()
    task_id = session.run_nowait("streaming", pause=0.7)
    arrivals, events = [], []
    for event in session.get_task_result_stream(task_id):
        arrivals.append(time.monotonic())
        events.append(event)
    assert [e["step"] for e in events] == [0, 1, 2]
    assert [e["__type__"] for e in events] == ["Progress"] * 3
    assert [e["__seq__"] for e in events] == [1, 2, 3]
    assert arrivals[-1] - arrivals[0] > 1.0  # the first came well before the last
    assert session.get_task_result(task_id).status is TaskStatus.COMPLETED


async def test_two_readers_at_once_and_a_second_reading(aclient: AsyncLlamaDeployClient) -> None:
    session = await aclient.create_session()
    task_id = await session.run_nowait("streaming", pause=0.2)

    async def read(after: int = 0) -> list[int]:
        return [e["step"] async for e in session.get_task_result_stream(task_id, after=after)]

    first, second = await asyncio.gather(read(), read())
    assert first == second == [0, 1, 2]
    assert await read() == [0, 1, 2]  # read again after the task ended
    assert await read(after=2) == [2]  # resumed after sequence number 2


def test_stream_of_an_unknown_task_is_a_404(client, deployed) -> None:
    session = client.create_session()
    with pytest.raises(TaskNotFoundError):
        list(session.get_task_result_stream("no-such-task"))
    url = f"{deployed.url}/sessions/{session.session_id}/tasks/no-such-task/events"
    assert httpx.get(url).status_code == 404


def test_stream_as_server_sent_events(client, deployed) -> None:
    session = client.create_session()
    task_id = session.run_nowait("streaming", pause=0.1)
    url = f"{deployed.url}/sessions/{session.session_id}/tasks/{task_id}/events"
    headers = {"Accept": "text/event-stream", "Last-Event-ID": "1"}
    with httpx.stream("GET", url, headers=headers, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        frames = [f for f in response.read().decode().split("\n\n") if f.startswith("id:")]
    assert [f.splitlines()[0] for f in frames] == ["id: 2", "id: 3"]
    assert json.loads(frames[0].splitlines()[2].removeprefix("data: "))["step"] == 1


# human in the loop


def answer_when_asked(session, service_name: str, task_id: str, response: str) -> list[dict]:
    seen = []
    for event in session.get_task_result_stream(task_id):
        seen.append(event)
        if event["__type__"] == "InputRequiredEvent":
            session.send_event(service_name, task_id, HumanResponseEvent(response=response))
    return seen


def test_human_in_the_loop(client: LlamaDeployClient) -> None:
    session = client.create_session()
    task_id = session.run_nowait("human_x2")
    seen = answer_when_asked(session, "human_x2", task_id, "42")
    assert seen[0]["prefix"] == "Enter a number: "
    assert session.get_task_result(task_id, wait_s=30).result == "42"


def test_answer_sent_before_the_workflow_waits(client: LlamaDeployClient) -> None:
    session = client.create_session()
    task_id = session.run_nowait("human_x2")
    session.send_event("human_x2", task_id, HumanResponseEvent(response="early"))
    assert session.get_task_result(task_id, wait_s=30).result == "early"


async def test_human_in_the_loop_on_two_replicas(aclient: AsyncLlamaDeployClient) -> None:
    sessions = [await aclient.create_session() for _ in range(8)]
    task_ids = [await s.run_nowait("human_x2") for s in sessions]
    for i, (session, task_id) in enumerate(zip(sessions, task_ids, strict=True)):
        async for event in session.get_task_result_stream(task_id):
            if event["__type__"] == "InputRequiredEvent":
                await session.send_event("human_x2", task_id, HumanResponseEvent(response=str(i)))
    results = [
        (await s.get_task_result(t, wait_s=30)).result
        for s, t in zip(sessions, task_ids, strict=True)
    ]
    assert results == [str(i) for i in range(8)]


def test_a_waiting_task_is_parked_and_outlives_its_timeout(client: LlamaDeployClient) -> None:
    # "human" has timeout=3 and input_hold_s=0.5: it is parked long before 3 s, and waiting
    # parked does not count against the timeout
    session = client.create_session()
    task_id = session.run_nowait("human")
    wait_for(
        lambda: session.get_task(task_id).status is TaskStatus.WAITING,
        timeout_s=20,
        what="the task to be parked",
    )
    time.sleep(4)
    session.send_event("human", task_id, HumanResponseEvent(response="late"))
    result = session.get_task_result(task_id, wait_s=30)
    assert result.status is TaskStatus.COMPLETED, result.error
    assert result.result == "late"


def test_run_waits_through_human_input(client: LlamaDeployClient, deployed) -> None:
    session = client.create_session()

    def answer_later() -> None:
        with LlamaDeployClient(deployed) as other:
            task = other.get_session(session.session_id)
            current = wait_for(task.get_current_task, timeout_s=20, what="the run's task")
            answer_when_asked(task, "human", current.task_id, "7")

    with ThreadPoolExecutor(1) as helper:
        answered = helper.submit(answer_later)
        assert session.run("human") == "7"
        answered.result(timeout=30)


def test_a_parked_run_holds_no_replica_slot(client: LlamaDeployClient, deployed) -> None:
    waiting = client.create_session()
    with ThreadPoolExecutor(1) as helper:
        run = helper.submit(waiting.run, "human_one_slot")
        task = wait_for(
            lambda: (t := waiting.get_current_task()) and t.status is TaskStatus.WAITING and t,
            timeout_s=20,
            what="the run to be parked",
        )
        # the service's only slot is free again: another task runs while the first one waits
        other = client.create_session()
        other_id = other.run_nowait("human_one_slot")
        answer_when_asked(other, "human_one_slot", other_id, "second")
        assert other.get_task_result(other_id, wait_s=30).result == "second"
        waiting.send_event("human_one_slot", task.task_id, HumanResponseEvent(response="first"))
        assert run.result(timeout=30) == "first"


def test_bad_events_are_refused(client: LlamaDeployClient) -> None:
    session = client.create_session()
    task_id = session.run_nowait("human_x2")
    with pytest.raises(InvalidRequestError, match="accepts no event of type 'Progress'"):
        from .workflows import Progress

        session.send_event("human_x2", task_id, Progress(step=1))
    with pytest.raises(InvalidRequestError, match="runs on service 'human_x2'"):
        session.send_event("human", task_id, HumanResponseEvent(response="x"))
    session.send_event("human_x2", task_id, HumanResponseEvent(response="done"))
    session.get_task_result(task_id, wait_s=30)
    with pytest.raises(TaskStateError):
        session.send_event("human_x2", task_id, HumanResponseEvent(response="again"))


# nested workflows


def test_nested_workflow_runs_on_the_deployed_service(client: LlamaDeployClient) -> None:
    session = client.create_session()
    assert session.run("parent", arg1="hello_world") == "hello_world_result_result"
    parent, child = sorted(session.get_tasks(), key=lambda t: t.created_at)
    assert parent.service_name == "parent" and child.service_name == "child"
    assert child.parent_task_id == parent.task_id
    assert child.status is TaskStatus.COMPLETED


def test_nested_workflow_falls_back_to_the_local_instance(client: LlamaDeployClient) -> None:
    # no service is named "helper": the instance given to add_workflows runs in the replica
    session = client.create_session()
    assert session.run("helper_outer", arg1="x") == "x_local_result"
    assert [t.service_name for t in session.get_tasks()] == ["helper_outer"]


def test_child_events_reach_the_parent_stream(client: LlamaDeployClient) -> None:
    session = client.create_session()
    task_id = session.run_nowait("parent", arg1="a")
    assert [e["step"] for e in session.get_task_result_stream(task_id)] == [100]


def test_a_failing_child_fails_the_parent(client: LlamaDeployClient) -> None:
    with pytest.raises(TaskFailedError, match=r"arg1 is required"):
        client.create_session().run("child")


# cancellation


def test_cancel_a_running_task_frees_its_slot(client: LlamaDeployClient) -> None:
    session = client.create_session()
    task_id = session.run_nowait("one_slot", seconds=60)
    wait_for(
        lambda: session.get_task(task_id).status is TaskStatus.RUNNING,
        timeout_s=20,
        what="the task to run",
    )
    assert session.cancel_task(task_id).status is TaskStatus.CANCELLED
    # the only slot of "one_slot" is free again: another session's task runs at once
    start = time.monotonic()
    assert client.create_session().run("one_slot", seconds=0)["log"] == [None]
    assert time.monotonic() - start < 10
    with pytest.raises(TaskStateError):
        session.cancel_task(task_id)


def test_cancel_a_queued_task(client: LlamaDeployClient) -> None:
    session = client.create_session()
    first = session.run_nowait("one_slot", seconds=1, tag="a")
    second = session.run_nowait("one_slot", seconds=0, tag="b")
    assert session.cancel_task(second).status is TaskStatus.CANCELLED
    assert session.get_task_result(first, wait_s=30).result["log"] == ["a"]
    assert session.get_task_result(second).status is TaskStatus.CANCELLED


async def test_cancel_reaches_children(aclient: AsyncLlamaDeployClient) -> None:
    session = await aclient.create_session()
    task_id = await session.run_nowait("parent", arg1="x", seconds=60)
    for _ in range(200):  # bounded: 20 s for the child to run
        tasks = await session.get_tasks()
        if len(tasks) == 2 and tasks[1].status is TaskStatus.RUNNING:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the child task never ran")
    result = await session.cancel_task(task_id)
    assert result.status is TaskStatus.CANCELLED
    assert [t.status for t in await session.get_tasks()] == [TaskStatus.CANCELLED] * 2


def test_run_raises_when_its_task_is_cancelled(client, deployed) -> None:
    session = client.create_session()

    def cancel_once_running() -> TaskResult:
        with LlamaDeployClient(deployed) as other:
            watched = other.get_session(session.session_id)
            current = wait_for(
                lambda: (t := watched.get_current_task()) and t.status is TaskStatus.RUNNING and t,
                timeout_s=30,
                what="the run's task to be running",
            )
            return watched.cancel_task(current.task_id)

    with ThreadPoolExecutor(1) as helper:
        cancelled = helper.submit(cancel_once_running)
        with pytest.raises(TaskCancelledError):
            session.run("one_slot", seconds=30)
        assert cancelled.result(timeout=30).status is TaskStatus.CANCELLED
