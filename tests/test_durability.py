"""Nothing lost: the core's records outlive the control plane's actor and the orchestrator's,
killed under load on the shared core (they restart; Ray keeps their names)."""

from __future__ import annotations

import asyncio
import time

import pytest
import pytest_asyncio
import ray

from llama_deploy_ray import (
    AsyncLlamaDeployClient,
    AsyncSessionClient,
    ControlPlaneConfig,
    TaskResult,
    TaskStatus,
    deploy_workflow,
)
from llama_deploy_ray._config import CONTROL_PLANE_ACTOR_NAME, ORCHESTRATOR_ACTOR_NAME

from .conftest import service
from .workflows import SleepWorkflow

SESSIONS = 20
TASKS_PER_SESSION = 6
SERVICE = "durable_log"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def deployed(control_plane_config: ControlPlaneConfig) -> ControlPlaneConfig:
    await deploy_workflow(
        SleepWorkflow(timeout=120), service(SERVICE, num_replicas=2), control_plane_config
    )
    return control_plane_config


async def _submit(sessions: list[AsyncSessionClient], tags: range) -> dict[str, list[str]]:
    """Each session's tasks with `tags`, submitted in order per session (sessions at once)."""

    async def one(session: AsyncSessionClient) -> list[str]:
        return [await session.run_nowait(SERVICE, seconds=0.3, tag=tag) for tag in tags]

    submitted = await asyncio.gather(*(one(s) for s in sessions))
    return {s.session_id: ids for s, ids in zip(sessions, submitted, strict=True)}


async def _final(session: AsyncSessionClient, task_id: str, deadline: float) -> TaskResult:
    while time.monotonic() < deadline:
        result = await session.get_task_result(task_id, wait_s=5)
        if result is not None:
            return result
    pytest.fail(f"task {task_id} of session {session.session_id} did not finish in time")


async def _kill_under_load(config: ControlPlaneConfig, actor_name: str) -> None:
    async with AsyncLlamaDeployClient(config, timeout=240) as client:
        services_before = {s.service_name for s in await client.list_services()}
        sessions = [await client.create_session() for _ in range(SESSIONS)]
        half = TASKS_PER_SESSION // 2
        first = await _submit(sessions, range(1, half + 1))
        await asyncio.sleep(0.5)  # some finished, some running, most queued
        recorded = {
            task_id: result
            for session in sessions
            for task_id in first[session.session_id]
            if (result := await session.get_task_result(task_id)) is not None
        }
        ray.kill(ray.get_actor(actor_name), no_restart=False)
        # the clients retry through the restart
        rest = await _submit(sessions, range(half + 1, TASKS_PER_SESSION + 1))

        assert {s.service_name for s in await client.list_services()} >= services_before
        deadline = time.monotonic() + 180
        for session in sessions:
            assert (await client.get_session(session.session_id)).session_id == session.session_id
            task_ids = first[session.session_id] + rest[session.session_id]
            for tag, task_id in enumerate(task_ids, start=1):
                result = await _final(session, task_id, deadline)
                assert result.status is TaskStatus.COMPLETED, result
                # the session's state went through every task once, in order
                assert result.result["log"] == list(range(1, tag + 1)), result
                if task_id in recorded:
                    assert result == recorded[task_id]
        assert recorded, "no task had finished before the kill: the test proved less"


@pytest.mark.timeout(420)
async def test_control_plane_killed_under_load_loses_nothing(deployed: ControlPlaneConfig) -> None:
    await _kill_under_load(deployed, CONTROL_PLANE_ACTOR_NAME)


@pytest.mark.timeout(420)
async def test_orchestrator_killed_under_load_loses_nothing(deployed: ControlPlaneConfig) -> None:
    await _kill_under_load(deployed, ORCHESTRATOR_ACTOR_NAME)
