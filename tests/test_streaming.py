"""A task's events, streamed as they happen, to several readers, as NDJSON or SSE, on a real local
Ray."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import pytest_asyncio

from llama_deploy_ray import (
    AsyncLlamaDeployClient,
    ControlPlaneConfig,
    LlamaDeployClient,
    TaskDefinition,
    TaskNotFoundError,
    TaskStatus,
    deploy_workflow,
)

from .conftest import service
from .workflows import (
    StreamingWorkflow,
)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def deployed(control_plane_config: ControlPlaneConfig) -> ControlPlaneConfig:
    await deploy_workflow(StreamingWorkflow(), service("streaming"), control_plane_config)
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


def test_run_nowait_answers_at_once_with_the_stream(client, deployed) -> None:
    # the replica that runs the task carries its stream on the response that started it
    session = client.create_session()
    task = TaskDefinition(input=json.dumps({"pause": 0.3}), agent_id="streaming")
    url = f"{deployed.url}/workflows/streaming/sessions/{session.session_id}/run-nowait"
    with httpx.stream("POST", url, json=task.model_dump(), timeout=30) as response:
        assert response.status_code == 200  # the task is recorded, and not final yet
        assert not session.get_task(task.task_id).status.is_final
        lines = [json.loads(line) for line in response.iter_lines() if line.strip()]
    assert [(e["__seq__"], e["step"]) for e in lines[:-1]] == [(1, 0), (2, 1), (3, 2)]
    assert lines[-1] == {"__type__": "StreamEnd"}  # the log closed: nothing follows
    assert session.get_task_result(task.task_id).result == "streamed"


async def test_started_tasks_stream_in_full_kept_or_not(aclient: AsyncLlamaDeployClient) -> None:
    # the client keeps the responses of the last 16 tasks it started; the others, and a
    # stream read again, come from the control plane
    session = await aclient.create_session()
    task_ids = [await session.run_nowait("streaming", pause=0.05) for _ in range(20)]
    for task_id in task_ids:
        assert [e["step"] async for e in session.get_task_result_stream(task_id)] == [0, 1, 2]
    assert [e["step"] async for e in session.get_task_result_stream(task_ids[-1])] == [0, 1, 2]


def test_a_started_task_outlives_its_client(deployed) -> None:
    with LlamaDeployClient(deployed) as client:
        session_id = client.create_session().session_id
        task_id = client.get_session(session_id).run_nowait("streaming", pause=0.3)
    # closed with the client: the response that carried the stream, not the task
    with LlamaDeployClient(deployed) as client:
        result = client.get_session(session_id).get_task(task_id, wait_s=30)
    assert result.status is TaskStatus.COMPLETED, result.error


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
