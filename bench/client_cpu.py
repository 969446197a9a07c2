"""The clients' own cost: CPU per run in the caller's process, ours against a plain httpx call.

A stub server (a subprocess on loopback, no Ray) answers every request at once with the same
`TaskResult`, so what is measured is the client side alone: building the request, httpx, and
reading the answer. Against it, one call after another, in turns:

- a plain httpx post of the same body to the same route, with the connection pools our async
  client uses (the floor: what the benchmark's bare-Serve client does);
- `AsyncLlamaDeployClient`'s `session.run`;
- a plain `httpx.Client` post and `LlamaDeployClient`'s `session.run` (the sync client).

Usage:

    python bench/client_cpu.py            # about half a minute

It prints microseconds of CPU per run, each the best of three turns, and the ratio to the
plain call; it reports figures and never fails on one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

SESSION_ID = "s" * 22
TURNS = 3


def answer() -> bytes:
    from llama_deploy_ray._shared.types import TaskResult, TaskStatus

    now = time.time()
    body = TaskResult(
        task_id="c947ba3076e641608a3561825357b2a4",
        session_id=SESSION_ID,
        service_name="hello",
        status=TaskStatus.COMPLETED,
        result="hello_world_result",
        attempts=1,
        created_at=now,
        finished_at=now,
    ).model_dump_json()
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        len(body),
        body.encode(),
    )


async def serve(port: int) -> None:
    response = answer()

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        await reader.readexactly(int(line.split(b":")[1]))
                writer.write(response)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    server = await asyncio.start_server(connection, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def cpu_us_per_call(call: Callable[[], Any], calls: int) -> float:
    start = time.process_time()
    for _ in range(calls):
        call()
    return (time.process_time() - start) / calls * 1e6


async def async_cpu_us_per_call(call: Callable[[], Awaitable[Any]], calls: int) -> float:
    start = time.process_time()
    for _ in range(calls):
        await call()
    return (time.process_time() - start) / calls * 1e6


async def measure(port: int, calls: int) -> dict[str, float]:
    import httpx

    from llama_deploy_ray import AsyncLlamaDeployClient, ControlPlaneConfig, LlamaDeployClient
    from llama_deploy_ray._client.clients import AsyncSessionClient, PooledTransport, SessionClient
    from llama_deploy_ray._shared.config import workflow_route

    config = ControlPlaneConfig(port=port)
    kwargs = {"arg1": "hello_world"}
    route = f"{config.url}{workflow_route('hello')}/sessions/{SESSION_ID}/run"
    body = {"input": json.dumps(kwargs)}
    best: dict[str, float] = {}
    async with (
        httpx.AsyncClient(transport=PooledTransport(), timeout=300) as http,
        AsyncLlamaDeployClient(config, timeout=300) as client,
    ):
        with httpx.Client(timeout=300) as sync_http, LlamaDeployClient(config, 300) as sync:
            session = AsyncSessionClient(client, SESSION_ID)
            sync_session = SessionClient(sync, SESSION_ID)
            async_runs = {
                "httpx AsyncClient post": lambda: http.post(route, json=body),
                "AsyncLlamaDeployClient run": lambda: session.run("hello", **kwargs),
            }
            sync_runs = {
                "httpx Client post": lambda: sync_http.post(route, json=body),
                "LlamaDeployClient run": lambda: sync_session.run("hello", **kwargs),
            }
            for _ in range(TURNS):
                for name, run in async_runs.items():
                    await async_cpu_us_per_call(run, calls // 10)  # warm up
                    figure = await async_cpu_us_per_call(run, calls)
                    best[name] = min(figure, best.get(name, figure))
                for name, run in sync_runs.items():
                    cpu_us_per_call(run, calls // 10)
                    figure = cpu_us_per_call(run, calls)
                    best[name] = min(figure, best.get(name, figure))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000, help="calls per turn")
    parser.add_argument("--port", type=int, default=8999)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.port))
        return
    server = subprocess.Popen([sys.executable, __file__, "--serve", "--port", str(args.port)])
    try:
        time.sleep(1.0)  # it listens within milliseconds of starting
        best = asyncio.run(measure(args.port, args.calls))
    finally:
        server.kill()
        server.wait()
    print("| client | CPU us per run | / plain httpx |\n|---|---|---|")
    for plain, ours in (
        ("httpx AsyncClient post", "AsyncLlamaDeployClient run"),
        ("httpx Client post", "LlamaDeployClient run"),
    ):
        print(f"| {plain} | {best[plain]:.0f} | |")
        print(f"| {ours} | {best[ours]:.0f} | x{best[ours] / best[plain]:.2f} |")


if __name__ == "__main__":
    main()
