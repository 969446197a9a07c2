"""Nothing lost: the core's records outlive the control plane's actor and the orchestrator's,
killed under load on the shared core (they restart; Ray keeps their names)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import pytest
import pytest_asyncio
import ray
from workflows.events import HumanResponseEvent

from llama_deploy_ray import (
    AsyncLlamaDeployClient,
    AsyncSessionClient,
    ControlPlaneConfig,
    LlamaDeployClient,
    TaskResult,
    TaskStatus,
    deploy_workflow,
)
from llama_deploy_ray._cluster.api import API_APP_NAME
from llama_deploy_ray._shared.config import CONTROL_PLANE_ACTOR_NAME, ORCHESTRATOR_ACTOR_NAME

from .conftest import service, wait_for
from .workflows import PidCounterWorkflow, PidHumanWorkflow, SleepWorkflow, StreamingWorkflow

SESSIONS = 20
TASKS_PER_SESSION = 6
SERVICE = "durable_log"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def deployed(control_plane_config: ControlPlaneConfig) -> ControlPlaneConfig:
    await asyncio.gather(
        deploy_workflow(
            SleepWorkflow(timeout=120), service(SERVICE, num_replicas=2), control_plane_config
        ),
        deploy_workflow(
            PidHumanWorkflow(), service("durable_human", input_hold_s=0.5), control_plane_config
        ),
        deploy_workflow(
            StreamingWorkflow(timeout=120), service("durable_stream"), control_plane_config
        ),
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


async def test_an_open_stream_reads_on_through_restarts(deployed: ControlPlaneConfig) -> None:
    async def restart_under_the_stream() -> None:
        await asyncio.sleep(1.5)
        ray.kill(ray.get_actor(CONTROL_PLANE_ACTOR_NAME), no_restart=False)
        await asyncio.sleep(2.0)
        for name in ray.util.list_named_actors(all_namespaces=True):
            if name["name"].startswith(f"SERVE_REPLICA::{API_APP_NAME}#"):
                ray.kill(ray.get_actor(name["name"], namespace=name["namespace"]))

    async with AsyncLlamaDeployClient(deployed, timeout=120) as client:
        session = await client.create_session()
        task_id = await session.run_nowait("durable_stream", n=12, pause=0.5)
        restarts = asyncio.create_task(restart_under_the_stream())
        events = [e async for e in session.get_task_result_stream(task_id)]
        await restarts
        result = await session.get_task_result(task_id, wait_s=60)
    # every event once, in order, though the control plane and the API restarted under it
    assert [e["step"] for e in events] == list(range(12))
    assert [e["__seq__"] for e in events] == list(range(1, 13))
    assert result is not None and result.result == "streamed"


def test_a_replica_killed_while_its_task_is_parked(deployed: ControlPlaneConfig) -> None:
    with LlamaDeployClient(deployed) as client:
        session = client.create_session()
        task_id = session.run_nowait("durable_human")
        asked = next(iter(session.get_task_result_stream(task_id)))
        wait_for(
            lambda: session.get_task(task_id).status is TaskStatus.WAITING,
            timeout_s=30,
            what="the task to be parked",
        )
        os.kill(int(asked["prefix"]), signal.SIGKILL)  # the replica that ran it
        session.send_event("durable_human", task_id, HumanResponseEvent(response="still here"))
        result = session.get_task_result(task_id, wait_s=120)
    assert result is not None and result.status is TaskStatus.COMPLETED, result
    assert result.result["response"] == "still here"
    assert result.result["pid"] != int(asked["prefix"])  # a new replica resumed the snapshot
    assert result.attempts == 1  # resumed, not run again


SOAK_SESSIONS = 100
SOAK_TASKS_PER_SESSION = 100
# by progress, not by the clock: on a slow machine a kill every few seconds would kill the
# replicas under the same few tasks more often than any max_retries allows
KILL_EVERY_TASKS = 1000


@pytest.mark.timeout(1200)
async def test_soak_ten_thousand_tasks_while_replicas_are_killed(
    deployed: ControlPlaneConfig,
) -> None:
    await deploy_workflow(PidCounterWorkflow(), service("soak", num_replicas=2), deployed)
    pids: dict[int, None] = {}  # replicas seen, newest last
    killed: list[int] = []
    completed = 0

    def kill_a_replica() -> None:
        alive = [p for p in pids if p not in killed]
        if alive:
            killed.append(alive[-1])
            with contextlib.suppress(ProcessLookupError):
                os.kill(alive[-1], signal.SIGKILL)

    async with AsyncLlamaDeployClient(deployed, timeout=600) as client:

        async def one_session() -> list[int]:
            nonlocal completed
            session = await client.create_session()
            counts = []
            for _ in range(SOAK_TASKS_PER_SESSION):
                result = await session.run("soak", seconds=0.01)
                pids[result["pid"]] = None
                counts.append(result["count"])
                completed += 1
                if completed % KILL_EVERY_TASKS == 0:
                    kill_a_replica()
            return counts

        start = time.monotonic()
        counts = await asyncio.gather(*(one_session() for _ in range(SOAK_SESSIONS)))
        elapsed = time.monotonic() - start
    # every session counted 1..N: no task lost, none applied twice
    assert all(c == list(range(1, SOAK_TASKS_PER_SESSION + 1)) for c in counts)
    assert len(killed) >= 3, f"only {len(killed)} replicas were killed: the soak proved less"
    total = SOAK_SESSIONS * SOAK_TASKS_PER_SESSION
    print(f"soak: {total} tasks in {elapsed:.0f} s ({total / elapsed:.0f}/s), {len(killed)} kills")
