"""Deploy both workflows from one script, as in the seed. `await inner.run(...)` in the outer
workflow then runs as a child task on the "inner" service."""

import asyncio

from nested_workflows import inner, outer

from llama_deploy_ray import (
    ControlPlaneConfig,
    WorkflowServiceConfig,
    deploy_workflow,
)


async def main():
    inner_task = asyncio.create_task(
        deploy_workflow(
            inner,
            WorkflowServiceConfig(host="127.0.0.1", port=8003, service_name="inner"),
            ControlPlaneConfig(),
        )
    )

    outer_task = asyncio.create_task(
        deploy_workflow(
            outer,
            WorkflowServiceConfig(host="127.0.0.1", port=8002, service_name="outer"),
            ControlPlaneConfig(),
        )
    )

    await asyncio.gather(inner_task, outer_task)


if __name__ == "__main__":
    asyncio.run(main())
