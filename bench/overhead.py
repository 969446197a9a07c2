"""Per-task overhead of llama-deploy-ray against bare Ray Serve, on the seed's hello-world
workflow, in one run on one local Ray:

- p50/p99 latency of sequential `session.run` through the sync HTTP client, and the same
  workflow behind a bare Serve deployment called over HTTP (the floor);
- tasks/s with N concurrent sessions through the async client, and the floor's req/s with N
  concurrent HTTP clients.

    python bench/overhead.py                 # Serve's default settings
    python bench/overhead.py --fast          # HAProxy ingress + throughput-optimized Serve

It starts its own local Ray (stop any other first: `ray stop`) and prints a table with ratios;
`--json PATH` also writes the figures. A benchmark reports, it never fails on a number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import httpx


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="HAProxy + throughput-optimized")
    parser.add_argument("--sequential", type=int, default=300, help="runs for the latency")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--per-session", type=int, default=20, help="runs per session")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--json", help="write the figures here")
    return parser.parse_args()


def latency_ms(run: Callable[[], object], n: int) -> dict[str, float]:
    for _ in range(max(5, n // 10)):
        run()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        run()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return {
        "p50_ms": statistics.median(samples),
        "p99_ms": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
    }


async def throughput(
    make_worker: Callable[[], Awaitable[Callable[[], Awaitable[object]]]],
    concurrency: int,
    per_worker: int,
) -> float:
    workers = [await make_worker() for _ in range(concurrency)]

    async def loop(run: Callable[[], Awaitable[object]]) -> None:
        for _ in range(per_worker):
            await run()

    await asyncio.gather(*(w() for w in workers[: min(4, concurrency)]))  # warm up
    start = time.perf_counter()
    await asyncio.gather(*(loop(w) for w in workers))
    return concurrency * per_worker / (time.perf_counter() - start)


def main() -> None:
    args = parse_args()
    if args.fast:
        # read when Ray and Serve start, so set before importing them
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    os.environ["CONTROL_PLANE_PORT"] = str(args.port)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

    import ray
    from ray import serve
    from starlette.requests import Request
    from workloads import HelloWorkflow

    from llama_deploy_ray import (
        AsyncLlamaDeployClient,
        ControlPlaneConfig,
        LlamaDeployClient,
        WorkflowServiceConfig,
        deploy_core,
        deploy_workflow,
    )

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100)
    class BareWorkflow:
        def __init__(self) -> None:
            self._workflow = HelloWorkflow()

        async def __call__(self, request: Request) -> str:
            kwargs = await request.json()
            return await self._workflow.run(**kwargs)

    config = ControlPlaneConfig()
    ray.init(include_dashboard=False, namespace=config.namespace, logging_level="ERROR")

    async def deploy() -> None:
        await deploy_core(config, blocking=False)
        await deploy_workflow(
            HelloWorkflow(),
            WorkflowServiceConfig(service_name="hello", ray_actor_options={"num_cpus": 0}),
            config,
        )

    asyncio.run(deploy())
    serve.run(BareWorkflow.bind(), name="floor", route_prefix="/floor")
    floor_url = f"{config.url}/floor"
    body = {"arg1": "hello_world"}

    figures: dict[str, dict[str, float]] = {}
    with httpx.Client() as http:
        figures["serve_http"] = latency_ms(
            lambda: http.post(floor_url, json=body).raise_for_status(), args.sequential
        )
    with LlamaDeployClient(config) as client:
        session = client.create_session()
        figures["llama_deploy_ray"] = latency_ms(
            lambda: session.run("hello", arg1="hello_world"), args.sequential
        )

    async def concurrent() -> None:
        limits = httpx.Limits(max_connections=None)
        async with httpx.AsyncClient(limits=limits, timeout=60) as http:

            async def floor_worker() -> Callable[[], Awaitable[object]]:
                return lambda: http.post(floor_url, json=body)

            figures["serve_http"]["tasks_per_s"] = await throughput(
                floor_worker, args.concurrency, args.per_session
            )
        async with AsyncLlamaDeployClient(config) as client:

            async def session_worker() -> Callable[[], Awaitable[object]]:
                session = await client.create_session()
                return lambda: session.run("hello", arg1="hello_world")

            figures["llama_deploy_ray"]["tasks_per_s"] = await throughput(
                session_worker, args.concurrency, args.per_session
            )

    asyncio.run(concurrent())
    ray.shutdown()

    floor, ours = figures["serve_http"], figures["llama_deploy_ray"]
    mode = "HAProxy + throughput-optimized" if args.fast else "Serve defaults"
    print(f"hello-world workflow, {mode}, {args.concurrency} concurrent sessions")
    print(f"{'':22}{'p50 ms':>10}{'p99 ms':>10}{'tasks/s':>10}")
    for name, row in figures.items():
        print(f"{name:22}{row['p50_ms']:10.1f}{row['p99_ms']:10.1f}{row['tasks_per_s']:10.1f}")
    ratios = [ours[k] / floor[k] for k in ("p50_ms", "p99_ms", "tasks_per_s")]
    print(f"{'ratio (ours/floor)':22}" + "".join(f"{r:10.2f}" for r in ratios))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"mode": mode, "concurrency": args.concurrency, **figures}, out, indent=2)


if __name__ == "__main__":
    main()
