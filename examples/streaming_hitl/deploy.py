"""Deploy the guessing workflow as the service "guess"."""

import asyncio

from guess_workflow import GuessWorkflow

from llama_deploy_ray import ControlPlaneConfig, WorkflowServiceConfig, deploy_workflow


async def main() -> None:
    await deploy_workflow(
        GuessWorkflow(),
        # a task waiting for input holds its replica slot for input_hold_s, then is parked
        # (snapshotted, slot freed) until the answer arrives
        WorkflowServiceConfig(service_name="guess", input_hold_s=10),
        ControlPlaneConfig(),
    )


if __name__ == "__main__":
    asyncio.run(main())
