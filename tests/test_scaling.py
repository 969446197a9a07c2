"""Scaling on the shared core: Serve autoscaling follows a burst and comes back, a downscale
waits for runs longer than Serve's default drain, the HTTP API runs on two replicas, and a
service's status says what runs."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio
from ray import serve

from llama_deploy_ray import (
    AsyncLlamaDeployClient,
    AutoscalingConfig,
    ControlPlaneConfig,
    LlamaDeployClient,
    ServiceNotFoundError,
    TaskStatus,
    deploy_workflow,
)
from llama_deploy_ray._cluster.api import API_APP_NAME

from .conftest import service, wait_for
from .workflows import SleepWorkflow

# longer than Serve's default graceful shutdown (20 s): a replica stopped under it with the
# default drain would kill it
LONG_RUN_S = 25.0


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def deployed(control_plane_config: ControlPlaneConfig) -> ControlPlaneConfig:
    autoscaling = AutoscalingConfig(
        min_replicas=1,
        max_replicas=3,
        target_ongoing_requests=2,
        upscale_delay_s=0,
        downscale_delay_s=2,
        look_back_period_s=12,  # Serve wants it above its 10 s metrics interval
    )
    await asyncio.gather(
        deploy_workflow(
            SleepWorkflow(timeout=60),
            service("autoscaled", autoscaling=autoscaling, max_ongoing_requests=4),
            control_plane_config,
        ),
        deploy_workflow(
            SleepWorkflow(timeout=60), service("drained", num_replicas=2), control_plane_config
        ),
        deploy_workflow(SleepWorkflow(timeout=60), service("watched"), control_plane_config),
    )
    return control_plane_config


def running_replicas(client: LlamaDeployClient, service_name: str) -> int:
    return client.get_service_status(service_name).replicas.get("RUNNING", 0)


@pytest.mark.timeout(300)
async def test_autoscaling_follows_a_burst_and_comes_back(deployed: ControlPlaneConfig) -> None:
    peak = 0
    with LlamaDeployClient(deployed) as watcher:
        assert running_replicas(watcher, "autoscaled") == 1
        async with AsyncLlamaDeployClient(deployed, timeout=240) as client:

            async def one(tag: int) -> dict:
                session = await client.create_session()
                return await session.run("autoscaled", seconds=2, tag=tag)

            burst = asyncio.gather(*(one(tag) for tag in range(60)))
            while not burst.done():
                peak = max(peak, await asyncio.to_thread(running_replicas, watcher, "autoscaled"))
                await asyncio.sleep(0.5)
            results = await burst
        assert sorted(r["log"][0] for r in results) == list(range(60))
        assert peak > 1, "the burst never took the service above one replica"
        wait_for(
            lambda: running_replicas(watcher, "autoscaled") == 1,
            timeout_s=120,
            what="the service to scale back to one replica",
        )


@pytest.mark.timeout(300)
async def test_a_downscale_waits_for_runs_longer_than_serves_default_drain(
    deployed: ControlPlaneConfig,
) -> None:
    async with AsyncLlamaDeployClient(deployed, timeout=240) as client:
        sessions = [await client.create_session() for _ in range(6)]
        task_ids = [
            await s.run_nowait("drained", seconds=LONG_RUN_S, tag=i) for i, s in enumerate(sessions)
        ]
        for session, task_id in zip(sessions, task_ids, strict=True):
            while (await session.get_task(task_id)).status is not TaskStatus.RUNNING:
                await asyncio.sleep(0.2)
        # one replica fewer: Serve stops one of the two while it runs its tasks
        await deploy_workflow(
            SleepWorkflow(timeout=60), service("drained", num_replicas=1), deployed
        )
        results = [
            await s.get_task_result(t, wait_s=120) for s, t in zip(sessions, task_ids, strict=True)
        ]
    assert all(r is not None and r.status is TaskStatus.COMPLETED for r in results), results
    assert all(r.attempts == 1 for r in results if r is not None)  # each ran once, to its end
    replicas = {r.result["replica"] for r in results if r is not None}
    assert len(replicas) == 2, "the runs all went to one replica: no run was drained"
    with LlamaDeployClient(deployed) as watcher:
        assert running_replicas(watcher, "drained") == 1


def test_the_http_api_runs_on_two_replicas(deployed: ControlPlaneConfig) -> None:
    # the shared core sets CONTROL_PLANE_API_REPLICAS=2: every test goes through both
    api = serve.status().applications[API_APP_NAME]
    states = {str(s): n for d in api.deployments.values() for s, n in d.replica_states.items()}
    assert states.get("RUNNING") == 2, states


async def test_a_service_status_says_what_runs(deployed: ControlPlaneConfig) -> None:
    async with AsyncLlamaDeployClient(deployed) as client:
        session = await client.create_session()
        first = await session.run_nowait("watched", seconds=3)
        second = await session.run_nowait("watched", seconds=0)  # waits its turn behind it
        while (await session.get_task(first)).status is not TaskStatus.RUNNING:
            await asyncio.sleep(0.1)
        status = await client.get_service_status("watched")
        assert status.status == "RUNNING" and status.replicas == {"RUNNING": 1}
        assert status.tasks == {"pending": 1, "running": 1, "waiting": 0}
        await session.get_task_result(second, wait_s=60)
        assert (await client.get_service_status("watched")).tasks == {
            "pending": 0,
            "running": 0,
            "waiting": 0,
        }
        with pytest.raises(ServiceNotFoundError):
            await client.get_service_status("nope")
