"""Deploy one of the two workflows, so that each can come from its own process:

python deploy_one.py inner
python deploy_one.py outer
"""

import asyncio
import sys

from nested_workflows import inner, outer

from llama_deploy_ray import ControlPlaneConfig, WorkflowServiceConfig, deploy_workflow

PORTS = {"inner": 8003, "outer": 8002}


async def main(name: str) -> None:
    await deploy_workflow(
        {"inner": inner, "outer": outer}[name],
        WorkflowServiceConfig(host="127.0.0.1", port=PORTS[name], service_name=name),
        ControlPlaneConfig(),
    )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
