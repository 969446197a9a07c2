"""Run the workflow from code inside the Ray cluster (here Ray tasks), without HTTP: each
call is one Serve hop to a replica, as a bare `DeploymentHandle` call. Deploy it first
(workflow.py)."""

import asyncio

import ray

from llama_deploy_ray import ClusterSession, ControlPlaneConfig


@ray.remote(num_cpus=0)
def greet(names: list[str]) -> list[str]:
    async def run() -> list[str]:
        session = await ClusterSession.create(ControlPlaneConfig())
        return [await session.run("my_workflow", arg1=name) for name in names]

    return asyncio.run(run())


if __name__ == "__main__":
    ray.init(address="auto", namespace=ControlPlaneConfig().namespace)
    batches = [["ada", "grace"], ["alan"], ["barbara", "edsger"]]
    for results in ray.get([greet.remote(batch) for batch in batches], timeout=120):
        print(*results)
    # prints 'ada_result grace_result', 'alan_result', 'barbara_result edsger_result'
