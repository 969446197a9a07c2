"""Overload on a real local Ray: thousands queued leave short calls fast, a full queue answers 503
and the clients retry."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest_asyncio

from llama_deploy_ray import (
    AsyncLlamaDeployClient,
    ControlPlaneConfig,
    TaskDefinition,
    TaskStatus,
    deploy_workflow,
)

from .conftest import run_url, service
from .workflows import (
    SleepWorkflow,
)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def deployed(control_plane_config: ControlPlaneConfig) -> ControlPlaneConfig:
    config = control_plane_config
    await asyncio.gather(
        deploy_workflow(SleepWorkflow(timeout=120), service("o_sleep"), config),
        deploy_workflow(
            SleepWorkflow(timeout=60),
            service("tight", max_ongoing_requests=1, max_queued_requests=1),
            config,
        ),
    )
    return config


# overload


async def test_thousands_queued_and_hundreds_waiting_leave_short_calls_fast(
    aclient: AsyncLlamaDeployClient,
) -> None:
    session = await aclient.create_session()
    blocker = await session.run_nowait("o_sleep", seconds=300, tag="blocker")
    gate = asyncio.Semaphore(100)

    async def submit(i: int) -> str:
        async with gate:
            return await session.run_nowait("o_sleep", seconds=0)

    queued = await asyncio.gather(*(submit(i) for i in range(2000)))
    # 2,000 tasks wait for their turn on the control plane; 500 clients wait for results
    polls = [asyncio.ensure_future(session.get_task(t, wait_s=120)) for t in queued[:500]]
    await asyncio.sleep(2)
    for _ in range(3):
        start = time.monotonic()
        await aclient.list_services()
        # a starved call would wait behind the 2-minute polls; a busy 2-core machine (the
        # whole suite at once) takes a second or more for what takes milliseconds alone
        assert time.monotonic() - start < 5.0
    assert not any(poll.done() for poll in polls)

    await session.cancel_task(blocker)
    finished = await asyncio.wait_for(asyncio.gather(*polls), timeout=240)
    assert {r.status for r in finished} == {TaskStatus.COMPLETED}
    # the session runs its tasks in the order they were created, which 100 concurrent
    # submissions do not keep: wait for the last one created
    created_last = (await session.get_tasks())[-1].task_id
    last = await session.get_task_result(created_last, wait_s=240)
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
