"""Ray's autoscaler starts the nodes a workflow's replicas need, with Ray's fake multi-node
provider (real raylets on this machine, started and stopped by Ray's own autoscaler, as Ray
tests it). A Ray of its own, so the shared core is stopped first."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
import ray
from ray import serve
from ray.cluster_utils import AutoscalingCluster

from llama_deploy_ray import (
    AsyncLlamaDeployClient,
    ControlPlaneConfig,
    RayActorOptions,
    TaskStatus,
    WorkflowServiceConfig,
    deploy_core,
    deploy_workflow,
)

from .conftest import _free_port, stop_shared_core
from .workflows import NodeLogWorkflow

pytestmark = pytest.mark.own_ray

# only the autoscaler's worker nodes have this resource: replicas that ask for it wait for them
SLOT = "worker_slot"
WORKER_TYPE = "slot_worker"


class FakeProviderCluster(AutoscalingCluster):
    """Ray's `AutoscalingCluster`, with the base config it reads from the fake provider's
    `example.yaml` written here: Ray's wheel does not ship that file."""

    def _generate_config(
        self,
        head_resources: dict[str, Any],
        worker_node_types: dict[str, Any],
        autoscaler_v2: bool = False,
        **config_kwargs: Any,
    ) -> dict[str, Any]:
        config: dict[str, Any] = {
            "cluster_name": "fake_multinode",
            "max_workers": 8,
            "provider": {
                "type": "fake_multinode",
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
            },
            "available_node_types": {
                **worker_node_types,
                "ray.head.default": {
                    "resources": head_resources,
                    "node_config": {},
                    "max_workers": 0,
                },
            },
            "head_node_type": "ray.head.default",
            "auth": {},
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": 1,
            "docker": {},
            "file_mounts": {},
            "cluster_synced_files": [],
            "file_mounts_sync_continuously": False,
            "rsync_exclude": [],
            "rsync_filter": [],
            **{
                commands: []
                for commands in (
                    "initialization_commands",
                    "setup_commands",
                    "head_setup_commands",
                    "worker_setup_commands",
                    "head_start_ray_commands",
                    "worker_start_ray_commands",
                )
            },
        }
        config.update(config_kwargs)
        return config


@pytest.fixture(scope="module")
def autoscaling(tmp_path_factory) -> Iterator[ControlPlaneConfig]:
    stop_shared_core()
    cluster = FakeProviderCluster(
        head_resources={"CPU": 1},
        worker_node_types={
            WORKER_TYPE: {
                "resources": {"CPU": 1, SLOT: 1},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 2,
            }
        },
    )
    cluster.start()
    try:
        config = ControlPlaneConfig(
            port=_free_port(),
            ray_address="auto",
            proxy_location="HeadOnly",
            state_store=str(tmp_path_factory.mktemp("store") / "state.sqlite3"),
        )
        asyncio.run(deploy_core(config, blocking=False))
        yield config
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def _slot_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(SLOT)}


async def _nodes_that_answer(config: ControlPlaneConfig, sessions: int) -> set[str]:
    async with AsyncLlamaDeployClient(config, timeout=120) as client:

        async def one() -> str:
            session = await client.create_session()
            result = await session.get_task_result(
                await session.run_nowait("needs_workers", seconds=1), wait_s=60
            )
            assert result is not None and result.status is TaskStatus.COMPLETED, result
            return str(result.result["node"])

        return set(await asyncio.gather(*(one() for _ in range(sessions))))


@pytest.mark.timeout(600)
def test_the_autoscaler_starts_the_nodes_replicas_ask_for(autoscaling) -> None:
    config = autoscaling
    assert _slot_nodes() == set()  # min_workers 0: nothing runs before it is needed
    service = WorkflowServiceConfig(
        service_name="needs_workers",
        num_replicas=2,
        ray_actor_options=RayActorOptions(num_cpus=0, resources={SLOT: 1}),
    )
    start = time.monotonic()
    asyncio.run(deploy_workflow(NodeLogWorkflow(timeout=60), service, config))
    took_s = time.monotonic() - start
    print(f"the autoscaler started 2 nodes and deploy_workflow returned in {took_s:.0f} s")
    # deploy_workflow returned once both replicas ran, each on a node the autoscaler started
    started = _slot_nodes()
    assert len(started) == 2
    assert serve.status().applications["needs_workers"].status.value == "RUNNING"
    assert asyncio.run(_nodes_that_answer(config, sessions=20)) == started
