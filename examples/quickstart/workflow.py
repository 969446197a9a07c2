"""Terminal 2: deploy a workflow as a service (a Ray Serve application)."""

from llama_index.core.workflow import StartEvent, StopEvent, Workflow, step

from llama_deploy_ray import (
    ControlPlaneConfig,
    WorkflowServiceConfig,
    deploy_workflow,
)


# create a dummy workflow
class MyWorkflow(Workflow):
    @step()
    async def run_step(self, ev: StartEvent) -> StopEvent:
        # Your workflow logic here
        arg1 = str(ev.get("arg1", ""))
        result = arg1 + "_result"
        return StopEvent(result=result)


async def main():
    await deploy_workflow(
        workflow=MyWorkflow(),
        workflow_config=WorkflowServiceConfig(
            host="127.0.0.1", port=8002, service_name="my_workflow"
        ),
        control_plane_config=ControlPlaneConfig(),
    )


if __name__ == "__main__":
    import asyncio

    asyncio.run(main())
