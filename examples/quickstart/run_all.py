"""The quickstart in one process: core, workflow and client on a local Ray.

python examples/quickstart/run_all.py
"""

import asyncio

from llama_index.core.workflow import StartEvent, StopEvent, Workflow, step

from llama_deploy_ray import (
    AsyncLlamaDeployClient,
    ControlPlaneConfig,
    SimpleMessageQueueConfig,
    WorkflowServiceConfig,
    deploy_core,
    deploy_workflow,
)


class MyWorkflow(Workflow):
    @step()
    async def run_step(self, ev: StartEvent) -> StopEvent:
        arg1 = str(ev.get("arg1", ""))
        return StopEvent(result=arg1 + "_result")


async def main() -> None:
    # blocking=False: return once the core is up instead of serving forever
    await deploy_core(ControlPlaneConfig(), SimpleMessageQueueConfig(), blocking=False)
    await deploy_workflow(
        MyWorkflow(),
        WorkflowServiceConfig(service_name="my_workflow"),
        ControlPlaneConfig(),
    )
    async with AsyncLlamaDeployClient(ControlPlaneConfig()) as client:
        session = await client.create_session()
        result = await session.run("my_workflow", arg1="hello_world")
    print(result)  # hello_world_result


if __name__ == "__main__":
    asyncio.run(main())
