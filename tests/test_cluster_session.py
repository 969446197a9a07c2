"""`ClusterSession` on a real local Ray: workflows run from inside the cluster (this test
process is a Ray driver of the shared core's cluster, and a Ray actor is another process),
recorded in the session as a client's runs are, behind the session's earlier task when there
is one, through input waits, with the clients' errors."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import pytest_asyncio
import ray
from workflows.events import HumanResponseEvent

from llama_deploy_ray import (
    AsyncLlamaDeployClient,
    ClusterSession,
    ControlPlaneConfig,
    ControlPlaneUnavailableError,
    InvalidRequestError,
    ServiceNotFoundError,
    SessionNotFoundError,
    TaskFailedError,
    TaskStatus,
    deploy_workflow,
)

from .conftest import service
from .workflows import EchoWorkflow, FailingWorkflow, HumanWorkflow, SleepWorkflow


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def deployed(control_plane_config: ControlPlaneConfig) -> ControlPlaneConfig:
    await asyncio.gather(
        deploy_workflow(EchoWorkflow(), service("cs_echo"), control_plane_config),
        deploy_workflow(FailingWorkflow(), service("cs_failing"), control_plane_config),
        deploy_workflow(SleepWorkflow(timeout=60), service("cs_sleep"), control_plane_config),
        deploy_workflow(
            HumanWorkflow(timeout=60), service("cs_human", input_hold_s=0.5), control_plane_config
        ),
    )
    return control_plane_config


async def test_a_run_is_recorded_in_the_session_as_a_clients(
    deployed: ControlPlaneConfig, aclient: AsyncLlamaDeployClient
) -> None:
    session = await ClusterSession.create(deployed)
    assert await session.run("cs_echo", arg1="hello_world") == "hello_world_result"
    again = await ClusterSession.get(session.session_id, deployed)
    assert await again.run("cs_echo", arg1="again") == "again_result"
    tasks = await (await aclient.get_session(session.session_id)).get_tasks()
    assert [(t.service_name, t.status, t.result) for t in tasks] == [
        ("cs_echo", TaskStatus.COMPLETED, "hello_world_result"),
        ("cs_echo", TaskStatus.COMPLETED, "again_result"),
    ]


def test_a_ray_actor_runs_workflows(deployed: ControlPlaneConfig) -> None:
    @ray.remote(num_cpus=0)
    class Caller:
        async def run(self, config: ControlPlaneConfig, n: int) -> list[Any]:
            session = await ClusterSession.create(config)
            return await asyncio.gather(*(session.run("cs_echo", arg1=str(i)) for i in range(n)))

    assert ray.get(Caller.remote().run.remote(deployed, 5), timeout=120) == [
        f"{i}_result" for i in range(5)
    ]


async def test_a_run_behind_the_sessions_earlier_task_waits_its_turn(
    deployed: ControlPlaneConfig, aclient: AsyncLlamaDeployClient
) -> None:
    session = await ClusterSession.create(deployed)
    clients = await aclient.get_session(session.session_id)
    earlier = await clients.run_nowait("cs_sleep", seconds=2, tag="first")
    second = await session.run("cs_sleep", tag="second")
    assert second["log"] == ["first", "second"]  # the session's state, in its order
    first = await clients.get_task(earlier)
    assert first.status is TaskStatus.COMPLETED
    assert second["start"] >= first.result["end"]


async def test_a_run_that_waits_for_input_returns_once_it_gets_it(
    deployed: ControlPlaneConfig, aclient: AsyncLlamaDeployClient
) -> None:
    session = await ClusterSession.create(deployed)
    run = asyncio.create_task(session.run("cs_human"))
    clients = await aclient.get_session(session.session_id)
    for _ in range(100):
        task = await clients.get_current_task()
        if task is not None and task.status is TaskStatus.WAITING:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the task never waited for input")
    assert not run.done()  # past the replica's hold: the run waits on the control plane
    await asyncio.sleep(1)
    assert not run.done()
    await clients.send_event("cs_human", task.task_id, HumanResponseEvent(response="42"))
    assert await asyncio.wait_for(run, 60) == "42"


async def test_bad_runs_get_the_clients_errors(deployed: ControlPlaneConfig) -> None:
    session = await ClusterSession.create(deployed)
    with pytest.raises(TaskFailedError, match="arg1 was 'x', which is not allowed"):
        await session.run("cs_failing", arg1="x")
    with pytest.raises(ServiceNotFoundError, match="no_such_service"):
        await session.run("no_such_service")
    with pytest.raises(InvalidRequestError, match="not JSON-serializable"):
        await session.run("cs_echo", arg1=object())
    with pytest.raises(SessionNotFoundError):
        await ClusterSession.get("no-such-session", deployed)


async def test_outside_a_ray_cluster_it_says_to_connect(monkeypatch) -> None:
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(ControlPlaneUnavailableError, match=r"ray\.init\(address=\.\.\.\)"):
        await ClusterSession.create()
