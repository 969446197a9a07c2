"""Several Ray nodes (real raylets, on this machine): replicas spread over worker nodes, the core
on the head node, and a worker node lost under load without losing a task. A Ray of its own,
so the shared core is stopped first."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster

from llama_deploy_ray import (
    AsyncLlamaDeployClient,
    ControlPlaneConfig,
    RayActorOptions,
    TaskStatus,
    WorkflowServiceConfig,
    deploy_core,
    deploy_workflow,
)
from llama_deploy_ray._shared.config import CONTROL_PLANE_ACTOR_NAME, ORCHESTRATOR_ACTOR_NAME

from .conftest import _free_port, stop_shared_core, wait_for
from .workflows import NodeLogWorkflow

pytestmark = pytest.mark.own_ray

# each worker node takes one replica of the service: placement is deterministic
SLOT = "replica_slot"
SESSIONS = 20
TASKS_PER_SESSION = 5


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[tuple[Cluster, ControlPlaneConfig, list[Any]]]:
    stop_shared_core()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1, resources={SLOT: 1}) for _ in range(3)]
    cluster.wait_for_nodes()
    config = ControlPlaneConfig(
        port=_free_port(),
        ray_address=cluster.address,
        proxy_location="HeadOnly",
        state_store=str(tmp_path_factory.mktemp("store") / "state.sqlite3"),
    )
    asyncio.run(deploy_core(config, blocking=False))
    service = WorkflowServiceConfig(
        service_name="spread",
        num_replicas=2,
        ray_actor_options=RayActorOptions(num_cpus=0, resources={SLOT: 1}),
    )
    asyncio.run(deploy_workflow(NodeLogWorkflow(timeout=120), service, config))
    yield cluster, config, workers
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


def _node_of(actor_name: str) -> str:
    actor_id = ray.get_actor(actor_name)._actor_id.hex()
    return ray._private.state.state.actor_table(actor_id)["Address"]["NodeID"]


async def _run_sessions(config: ControlPlaneConfig, tasks: int) -> list[list[dict]]:
    async with AsyncLlamaDeployClient(config, timeout=300) as client:

        async def one() -> list[dict]:
            session = await client.create_session()
            ids = [await session.run_nowait("spread", seconds=1, tag=t) for t in range(tasks)]
            results = []
            for task_id in ids:
                result = await session.get_task_result(task_id, wait_s=240)
                assert result is not None and result.status is TaskStatus.COMPLETED, result
                results.append(result.result)
            return results

        return await asyncio.gather(*(one() for _ in range(SESSIONS)))


@pytest.mark.timeout(600)
def test_replicas_on_worker_nodes_and_the_core_on_the_head(cluster) -> None:
    _, config, _ = cluster
    head = ray.get_runtime_context().get_node_id()  # the driver runs on the head here
    assert _node_of(CONTROL_PLANE_ACTOR_NAME) == head
    assert _node_of(ORCHESTRATOR_ACTOR_NAME) == head
    results = asyncio.run(_run_sessions(config, 2))
    nodes = {r["node"] for session in results for r in session}
    assert len(nodes) == 2 and head not in nodes  # one replica on each of two worker nodes


@pytest.mark.timeout(900)
def test_a_worker_node_lost_under_load_loses_no_task(cluster) -> None:
    ray_cluster, config, workers = cluster

    async def scenario() -> tuple[list[list[dict]], float]:
        # the nodes that hold a replica now (the spare one holds none)
        serving = {r["node"] for session in await _run_sessions(config, 1) for r in session}
        lost = next(w for w in workers if w.node_id in serving)
        running = asyncio.ensure_future(_run_sessions(config, TASKS_PER_SESSION))
        await asyncio.sleep(3)  # tasks run on both replicas
        start = time.monotonic()
        await asyncio.to_thread(ray_cluster.remove_node, lost, False)  # no graceful exit
        results = await running
        return results, time.monotonic() - start

    results, recovered_s = asyncio.run(scenario())
    for session in results:
        # every task ran once, in order, with its session's state: the log reads 0..N-1
        assert [r["log"] for r in session] == [list(range(i + 1)) for i in range(TASKS_PER_SESSION)]
    print(f"a worker node lost under load: every task finished {recovered_s:.0f} s after")
    # the service still answers, its second replica on the spare node
    wait_for(
        lambda: serve.status().applications["spread"].status.value == "RUNNING",
        timeout_s=120,
        what="the service to run its two replicas again",
    )
    assert asyncio.run(_run_sessions(config, 1))
