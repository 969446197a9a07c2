"""Drive llama_deploy 0.2.4, the seed's own system, with the same calls as the harness uses
for llama-deploy-ray. Runs inside the virtual environment `bench/run.py` makes for it:

    python seed_system.py serve PORT           # core + the hello-world workflow, until killed
    python seed_system.py measure PORT N C K   # N sequential runs; C sessions x K runs
"""

import asyncio
import json
import statistics
import sys
import time


def serve(port: int) -> None:
    from llama_deploy import (
        ControlPlaneConfig,
        SimpleMessageQueueConfig,
        WorkflowServiceConfig,
        deploy_core,
        deploy_workflow,
    )
    from llama_index.core.workflow import StartEvent, StopEvent, Workflow, step

    class HelloWorkflow(Workflow):
        @step()
        async def run_step(self, ev: StartEvent) -> StopEvent:
            return StopEvent(result=str(ev.get("arg1", "")) + "_result")

    control_plane = ControlPlaneConfig(port=port)
    queue = SimpleMessageQueueConfig(port=port + 1)

    async def main() -> None:
        core = asyncio.create_task(deploy_core(control_plane, queue))
        await asyncio.sleep(3)
        service = WorkflowServiceConfig(host="127.0.0.1", port=port + 2, service_name="hello")
        await asyncio.gather(core, deploy_workflow(HelloWorkflow(), service, control_plane))

    asyncio.run(main())


def measure(port: int, sequential: int, concurrency: int, per_session: int) -> None:
    from llama_deploy import AsyncLlamaDeployClient, ControlPlaneConfig, LlamaDeployClient

    config = ControlPlaneConfig(port=port)
    session = LlamaDeployClient(config, timeout=120).create_session()
    for _ in range(3):
        session.run("hello", arg1="hello_world")
    samples = []
    for _ in range(sequential):
        start = time.perf_counter()
        session.run("hello", arg1="hello_world")
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()

    async def concurrent() -> float:
        client = AsyncLlamaDeployClient(config, timeout=300)
        sessions = [await client.create_session() for _ in range(concurrency)]

        async def loop(s) -> None:
            for _ in range(per_session):
                await s.run("hello", arg1="hello_world")

        start = time.perf_counter()
        await asyncio.gather(*(loop(s) for s in sessions))
        return concurrency * per_session / (time.perf_counter() - start)

    figures = {
        "p50_ms": statistics.median(samples),
        "p99_ms": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
        "tasks_per_s": asyncio.run(concurrent()),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        measure(*(int(a) for a in sys.argv[2:6]))
