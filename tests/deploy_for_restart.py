"""Deploys the restart test's services into the core at CONTROL_PLANE_* from a process of its
own, as a user's deploy script does: `python -m tests.deploy_for_restart`."""

import asyncio

from llama_deploy_ray import (
    ControlPlaneConfig,
    RayActorOptions,
    WorkflowServiceConfig,
    deploy_workflow,
)
from tests.workflows import CounterWorkflow, SleepWorkflow


def service(name: str) -> WorkflowServiceConfig:
    return WorkflowServiceConfig(service_name=name, ray_actor_options=RayActorOptions(num_cpus=0))


async def main() -> None:
    config = ControlPlaneConfig()
    await deploy_workflow(CounterWorkflow(), service("restart_counter"), config)
    await deploy_workflow(SleepWorkflow(timeout=120), service("restart_sleep"), config)


if __name__ == "__main__":
    asyncio.run(main())
