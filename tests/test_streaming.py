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
