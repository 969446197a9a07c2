"""The benchmark harness: the same workloads, in one run on one machine, on

- the floor: each workflow in-process (`await wf.run()`), and behind a bare Ray Serve
  deployment called over HTTP and through a `DeploymentHandle`; and a second bare deployment
  over HTTP, identical to the first (`serve_http_again`): its ratio to the first shows how far
  apart two identical systems land in one run, the noise in every other ratio;
- llama-deploy-ray through its HTTP clients (sync for latency, async for throughput) and
  through its Python API inside the cluster (`ClusterSession`), and the way a nested
  workflow calls its child (the child service's handle, `run_if_first`);
- llama-deploy-ray's second HTTP API, LlamaIndex's workflow server API (`ours_ws_api`), with
  the same plain httpx client as bare Serve;
- llama_deploy 0.2.4, the seed's own system, installed here into its own virtual environment
  from PyPI and driven with the same client calls (hello-world only: it is that slow);
- `llama-agents-server` 0.8.0, LlamaIndex's own single-process server of that API, installed
  the same way and driven with the same httpx calls as `ours_ws_api` (hello-world, fast mode):
  it runs beside our Ray and takes its turns with the other systems, on its SQLite store when
  ours is on and on its in-memory store when ours is off (`agents_server`);

with Ray Serve's default settings and with its HAProxy ingress + throughput-optimized mode,
each in a fresh local Ray, with the control plane's state store on (SQLite, the default); then
hello-world once more in fast mode with the store off (`memory`), to show what the store costs.
Usage (stop any other local Ray first, `ray stop`):

    python bench/run.py            # everything, 40-70 minutes on 2 cores
    python bench/run.py --quick    # a smoke run: small sizes, no seed system

Beside tasks/s, each system's CPU cost: CPU milliseconds per task summed over every process of
the system under test (Ray's processes and workers, HAProxy; or the server), the load-generating
client excluded, over the runs at 50 sessions and more (the system busy, not idle). On a shared
machine it is steadier than wall time, and it is what a cluster bill pays. Tasks/s at each
level is over 200 runs (at least two per session).

Writes bench/results/latest.json and latest.png and prints the table. It reports figures; it
never fails on one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
SEED_VENV = BENCH / ".venv-llama-deploy-0.2.4"
AGENTS_SERVER_VENV = BENCH / ".venv-llama-agents-server-0.8.0"
FAST_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
MODES = {"default": {}, "fast": FAST_ENV}
NO_STORE = "fast_no_store"
CPU = "cpu_ms_per_task"
CPU_LEVEL = 50  # CPU per task is measured with this many sessions or more
# a level's turns per system: a turn lasts about a second, and this shared machine's bursts of
# load from elsewhere last as long (with two turns, one system's figure at one level was 0.63x
# and 1.01x bare Serve's in two runs an hour apart)
TURNS = 3


class Sizes:
    def __init__(self, quick: bool) -> None:
        self.sequential = 10 if quick else 100
        self.levels = [1, 8] if quick else [1, 8, 50, 64, 256]
        # runs at each concurrency level, at least two per session: a level's tasks/s is a
        # rate over many runs, not one run's latency (with one session, 2 runs were)
        self.runs_per_level = 16 if quick else 200
        self.memory_tasks = 200 if quick else 10_000
        self.seed_levels = [1, 8, 50]


# measuring


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    samples_ms = sorted(samples_ms)
    return {
        "p50_ms": statistics.median(samples_ms),
        "p99_ms": samples_ms[min(len(samples_ms) - 1, int(len(samples_ms) * 0.99))],
    }


async def latencies(runs: dict[str, Callable[[], Awaitable[Any]]], n: int) -> dict[str, Any]:
    """p50 and p99 of `n` sequential calls of each system's run. The systems take turns, one
    call each, so that a burst of load from elsewhere on the machine falls on all of them and
    their ratios stay fair."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(max(3, n // 10) + n):
        for name, run in runs.items():
            start = time.perf_counter()
            await run()
            if i >= max(3, n // 10):
                samples[name].append((time.perf_counter() - start) * 1000)
    return {name: percentiles(figures) for name, figures in samples.items()}


def system_cpu_s(root: int | None = None, apart: int | None = None) -> float:
    """CPU seconds used so far by the system under test: every process this one started, and
    theirs (a Ray started here with its workers and HAProxy), without this process, the
    client; or only the process `root` and its children (a server run beside the Ray);
    leaving out the process `apart` and its children (that server, when measuring the Ray)."""
    import psutil

    if root is None:
        processes = psutil.Process().children(recursive=True)
    else:
        processes = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    if apart is not None:
        left_out = {apart, *(p.pid for p in psutil.Process(apart).children(recursive=True))}
        processes = [p for p in processes if p.pid not in left_out]
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


async def throughput(
    makers: dict[str, Callable[[], Awaitable[Callable[[], Awaitable[Any]]]]],
    levels: list[int],
    runs_per_level: int,
    cpu_s: Callable[[str], float],
) -> dict[str, dict[str, float]]:
    """Tasks/s of each system with `level` sessions running at once, `runs_per_level` runs
    in all (at least two each). At each level the systems take `TURNS` turns, and each keeps
    its best figure: load from elsewhere on the machine only ever lowers a figure. Also each
    system's CPU per task (`cpu_ms_per_task`; not for `in_process`, which runs in the client)
    over its timed runs at `CPU_LEVEL` sessions and more (all levels, if none is that high):
    with fewer, the system is mostly idle, and the CPU it is charged is mostly Ray's own
    background work (GCS, raylet, dashboard), shared by every system, spread over few tasks.
    `cpu_s(system)` is the CPU seconds that system's processes have used so far."""
    figures: dict[str, dict[str, float]] = {name: {} for name in makers}
    used_s = dict.fromkeys(makers, 0.0)
    tasks = dict.fromkeys(makers, 0)
    cpu_level = CPU_LEVEL if max(levels) >= CPU_LEVEL else 0

    async def loop(run: Callable[[], Awaitable[Any]], rounds: int) -> None:
        for _ in range(rounds):
            await run()

    for level in levels:
        key = f"tasks_per_s@{level}"
        rounds = max(2, -(-runs_per_level // level))
        sessions = {name: [await make() for _ in range(level)] for name, make in makers.items()}
        for runs in sessions.values():
            await asyncio.gather(*(run() for run in runs))  # warm up: connections, replicas
        for _ in range(TURNS):
            for name, runs in sessions.items():
                start, cpu_start = time.perf_counter(), cpu_s(name)
                try:
                    await asyncio.gather(*(loop(run, rounds) for run in runs))
                except Exception as exc:  # say which system failed, and where
                    raise RuntimeError(f"{name} failed at {level} sessions: {exc!r}") from exc
                rate = level * rounds / (time.perf_counter() - start)
                if level >= cpu_level:
                    used_s[name] += cpu_s(name) - cpu_start
                    tasks[name] += level * rounds
                figures[name][key] = max(rate, figures[name].get(key, 0.0))
    for name in makers:
        if name != "in_process":
            figures[name]["cpu_ms_per_task"] = used_s[name] / tasks[name] * 1000
    return figures


def rss_mb(title: str) -> float:
    """Resident memory of the local process whose title starts with `title` (Ray names its
    workers `ray::<actor class>`)."""
    for pid in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
            if cmdline.startswith(title):
                status = Path(f"/proc/{pid}/status").read_text()
                return int(status.split("VmRSS:")[1].split()[0]) / 1024
        except (OSError, IndexError, ValueError):
            continue
    return float("nan")


async def succeeded(sending: Awaitable[httpx.Response]) -> httpx.Response:
    """A run over plain HTTP, counted only once answered with success: an error answered at
    once would otherwise pass for a fast run (the clients raise on their own)."""
    response = await sending
    response.raise_for_status()
    return response


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# one mode, in its own process and its own Ray


def measure_mode(
    sizes: Sizes, port: int, only: list[str] | None, agents_server: Path | None
) -> dict[str, Any]:
    """Every system on each workload in a fresh local Ray; with `agents_server` (the Python
    of its virtual environment), `llama-agents-server` beside it on hello-world."""
    sys.path.insert(0, str(BENCH))
    import httpx
    import ray
    from ray import serve
    from starlette.requests import Request
    from workloads import WORKLOADS

    # hello-world is always measured: the chart and the memory figure are drawn from it
    workloads = {n: cls for n, cls in WORKLOADS.items() if not only or n in {"hello", *only}}

    from llama_deploy_ray import (
        AsyncLlamaDeployClient,
        ClusterSession,
        ControlPlaneConfig,
        LlamaDeployClient,
        TaskDefinition,
        WorkflowServiceConfig,
        deploy_core,
        deploy_workflow,
    )
    from llama_deploy_ray._client.clients import PooledTransport
    from llama_deploy_ray._shared.config import CONTROL_PLANE_ACTOR_NAME

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
    class BareWorkflow:
        def __init__(self, name: str) -> None:
            self._workflow = WORKLOADS[name]()

        async def __call__(self, request: Request) -> Any:
            return await self._workflow.run(**await request.json())

        async def run(self, kwargs: dict[str, Any]) -> Any:
            return await self._workflow.run(**kwargs)

    # a short retention, so that the memory figure shows what it keeps bounded; a fresh store
    store = os.environ.get("BENCH_STATE_STORE") or str(Path(tempfile.mkdtemp()) / "state.sqlite3")
    config = ControlPlaneConfig(port=port, task_retention_s=10.0, state_store=store)
    ray.init(
        address="local",  # a Ray of its own, even if another runs on this machine
        include_dashboard=False,
        namespace=config.namespace,
        logging_level="ERROR",
        runtime_env={"env_vars": {"PYTHONPATH": str(BENCH)}},
    )

    async def deploy() -> None:
        await deploy_core(config, blocking=False)
        for name, cls in workloads.items():
            service = WorkflowServiceConfig(
                service_name=name, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000
            )
            await deploy_workflow(cls(), service, config)

    asyncio.run(deploy())
    for name in workloads:
        serve.run(BareWorkflow.bind(name), name=f"bare_{name}", route_prefix=f"/bare/{name}")
        # the same again, measured as one more system: how far apart two identical systems
        # land in one run is the noise every other ratio carries
        serve.run(
            BareWorkflow.bind(name), name=f"bare_again_{name}", route_prefix=f"/bare-again/{name}"
        )
    kwargs = {"arg1": "hello_world"}
    results: dict[str, Any] = {}
    theirs_url, theirs = f"http://127.0.0.1:{free_port()}", None
    if agents_server:
        try:
            theirs = start_agents_server(agents_server, store, theirs_url)
        except RuntimeError as exc:  # the others are measured all the same
            print(f"llama-agents-server was not measured: {exc}", file=sys.stderr)

    def cpu_s(system: str) -> float:
        if theirs is None:
            return system_cpu_s()
        if system == "agents_server":
            return system_cpu_s(root=theirs.pid)
        return system_cpu_s(apart=theirs.pid)

    async def run_all() -> None:
        control_plane = ray.get_actor(CONTROL_PLANE_ACTOR_NAME)
        # the same connection pools as our client, so that the load generator is no more the
        # limit for one than for the other
        async with (
            httpx.AsyncClient(transport=PooledTransport(), timeout=300) as http,
            AsyncLlamaDeployClient(config, timeout=300) as client,
        ):
            for name, cls in workloads.items():
                n = max(10, sizes.sequential // 3) if name == "wait100ms" else sizes.sequential
                local = cls()

                async def inproc_session(local=local) -> Callable[[], Awaitable[Any]]:
                    return lambda: local.run(**kwargs)

                url, handle = f"{config.url}/bare/{name}", serve.get_app_handle(f"bare_{name}")

                async def http_session(url=url) -> Callable[[], Awaitable[Any]]:
                    return lambda: succeeded(http.post(url, json=kwargs))

                async def handle_session(handle=handle) -> Callable[[], Awaitable[Any]]:
                    return lambda: handle.run.remote(kwargs)

                async def sync_session(name=name) -> Callable[[], Awaitable[Any]]:
                    client = LlamaDeployClient(config, timeout=300)
                    session = await asyncio.to_thread(client.create_session)
                    return lambda: asyncio.to_thread(session.run, name, **kwargs)

                async def client_session(name=name) -> Callable[[], Awaitable[Any]]:
                    session = await client.create_session()
                    return lambda: session.run(name, **kwargs)

                ws_url = f"{config.url}/workflows/{name}/run"

                async def ws_api_session(url=ws_url) -> Callable[[], Awaitable[Any]]:
                    return lambda: succeeded(http.post(url, json={"start_event": kwargs}))

                async def api_session(name=name) -> Callable[[], Awaitable[Any]]:
                    session = await ClusterSession.create(config)
                    return lambda: session.run(name, **kwargs)

                async def nested_session(name=name) -> Callable[[], Awaitable[Any]]:
                    session = await control_plane.create_session.remote()
                    services = serve.get_app_handle(name)

                    def run() -> Any:
                        task = TaskDefinition(
                            input=json.dumps(kwargs), agent_id=name, session_id=session.session_id
                        )
                        return services.run_if_first.remote(task)

                    return run

                async def agents_server_session() -> Callable[[], Awaitable[Any]]:
                    url = f"{theirs_url}/workflows/hello/run"
                    return lambda: succeeded(http.post(url, json={"start_event": kwargs}))

                sessions = {
                    "in_process": inproc_session,
                    "serve_http": http_session,
                    "serve_http_again": functools.partial(
                        http_session, f"{config.url}/bare-again/{name}"
                    ),
                    "serve_handle": handle_session,
                    "ours_sync_client": sync_session,
                    "ours_async_client": client_session,
                    "ours_ws_api": ws_api_session,
                    "ours_python_api": api_session,
                    "ours_nested_call": nested_session,
                }
                if theirs is not None and name == "hello":
                    sessions["agents_server"] = agents_server_session
                row = await latencies({s: await make() for s, make in sessions.items()}, n)
                # the sync client's throughput is the async client's
                makers = {s: make for s, make in sessions.items() if s != "ours_sync_client"}
                for system, figures in (
                    await throughput(makers, sizes.levels, sizes.runs_per_level, cpu_s)
                ).items():
                    row[system] |= figures
                results[name] = row

            if "stream3" in workloads:
                results["first_event_ms"] = await first_event(client, n)
            results["memory"] = await memory(client, control_plane)

    async def first_event(client: AsyncLlamaDeployClient, n: int) -> dict[str, float]:
        local = WORKLOADS["stream3"]()

        async def inproc() -> None:
            handler = local.run()
            async for _ in handler.stream_events():
                break
            await handler

        session = await client.create_session()
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            task_id = await session.run_nowait("stream3")
            stream = session.get_task_result_stream(task_id)
            await anext(stream)
            samples.append((time.perf_counter() - start) * 1000)
            async for _ in stream:  # to its end, untimed: the session's next task is then
                pass  # first in its line, as a client that waits for each task sees it
        return {
            "in_process": (await latencies({"in_process": inproc}, n))["in_process"]["p50_ms"],
            "ours": percentiles(samples)["p50_ms"],
        }

    async def memory(client: AsyncLlamaDeployClient, control_plane: Any) -> dict[str, Any]:
        sessions = [await client.create_session() for _ in range(64)]
        first = await control_plane.sizes.remote()
        points = []
        done = 0
        chunk = max(64, sizes.memory_tasks // 5)
        while done < sizes.memory_tasks:
            per = max(1, chunk // len(sessions))
            await asyncio.gather(*(_runs(s, per) for s in sessions))
            done += per * len(sessions)
            sizes_now = await control_plane.sizes.remote()
            points.append(
                {
                    "tasks_run": done,
                    "control_plane_mb": rss_mb("ray::ControlPlane"),
                    "replica_mb": rss_mb("ray::ServeReplica:hello"),
                    "tasks_held": sizes_now["tasks"],
                }
            )
        last = await control_plane.sizes.remote()
        return {
            "task_retention_s": config.task_retention_s,
            "points": points,
            "store_commits_per_task": (last["store_commits"] - first["store_commits"]) / done,
            "store_rows_per_task": (last["store_rows_written"] - first["store_rows_written"])
            / done,
        }

    async def _runs(session: Any, n: int) -> None:
        for _ in range(n):
            await session.run("hello", **kwargs)

    try:
        asyncio.run(run_all())
    finally:
        if theirs is not None:
            theirs.kill()
            theirs.wait()
    ray.shutdown()
    return results


# the seed's system


def ensure_seed_venv() -> Path:
    python = SEED_VENV / "bin" / "python"
    if not python.exists():
        print("installing llama_deploy 0.2.4 into", SEED_VENV, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(SEED_VENV)], check=True)
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                "llama-deploy==0.2.4",
                "llama-index-core>=0.11,<0.12",
            ],
            check=True,
        )
    return python


def wait_for_seed_service(port: int, server: subprocess.Popen[bytes], log: IO[bytes]) -> None:
    """Until the seed's control plane lists the hello-world service (its first start after
    the install compiles its imports: it can take a while)."""
    import httpx

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and server.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            if "hello" in httpx.get(f"http://127.0.0.1:{port}/services", timeout=5).text:
                return
        time.sleep(1)
    log.seek(0)
    tail = log.read().decode(errors="replace")[-3000:]
    raise RuntimeError(f"llama_deploy 0.2.4 did not come up on port {port}:\n{tail}")


def measure_seed(sizes: Sizes) -> dict[str, Any]:
    python, port = ensure_seed_venv(), free_port()
    script = str(BENCH / "seed_system.py")
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(
            [str(python), script, "serve", str(port)], stdout=log, stderr=subprocess.STDOUT
        )
        try:
            wait_for_seed_service(port, server, log)
            figures: dict[str, float] = {}
            for level in sizes.seed_levels:
                out = subprocess.run(
                    [
                        str(python),
                        script,
                        "measure",
                        str(port),
                        str(min(sizes.sequential, 30)),
                        str(level),
                        "2",
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=1800,
                )
                level_figures = json.loads(out.stdout.strip().splitlines()[-1])
                figures.setdefault("p50_ms", level_figures["p50_ms"])
                figures.setdefault("p99_ms", level_figures["p99_ms"])
                figures[f"tasks_per_s@{level}"] = level_figures["tasks_per_s"]
            return figures
        finally:
            server.kill()
            server.wait()


# LlamaIndex's own server of the workflow server API


def ensure_agents_server_venv() -> Path:
    python = AGENTS_SERVER_VENV / "bin" / "python"
    if not python.exists():
        print("installing llama-agents-server 0.8.0 into", AGENTS_SERVER_VENV, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(AGENTS_SERVER_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "llama-agents-server==0.8.0"], check=True
        )
    return python


def start_agents_server(python: Path, store: str, url: str) -> subprocess.Popen[bytes]:
    """hello-world on `llama-agents-server` at `url`, on its SQLite store if `store` (ours)
    is durable, else on its in-memory one; once it answers."""
    import httpx

    here = Path(tempfile.mkdtemp())
    where = "memory" if store == "memory" else str(here / "hello.sqlite3")
    with open(here / "server.log", "wb") as log:
        server = subprocess.Popen(
            [str(python), str(BENCH / "agents_server.py"), url.rsplit(":", 1)[1], where],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and server.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=5).is_success:
                return server
        time.sleep(0.5)
    server.kill()
    tail = (here / "server.log").read_text(errors="replace")[-3000:]
    raise RuntimeError(f"llama-agents-server did not come up at {url}:\n{tail}")


# report


def table(results: dict[str, Any]) -> str:
    lines = []
    for mode in [m for m in MODES if m in results]:
        for workload, row in results[mode].items():
            if workload in ("first_event_ms", "memory"):
                continue
            rows = dict(row)
            if workload == "hello" and "seed" in results:
                rows["llama_deploy_0.2.4"] = results["seed"]
            columns = sorted(
                {k for fig in rows.values() for k in fig if k.startswith("tasks")},
                key=lambda k: int(k.split("@")[1]),
            )
            lines.append(f"\n## {workload}, Serve {mode} settings")
            lines.append("| system | p50 ms | p99 ms | " + " | ".join(columns) + " | cpu ms/task |")
            lines.append("|---" * (4 + len(columns)) + "|")
            for system, fig in rows.items():
                cells = [f"{fig.get(c, float('nan')):.1f}" for c in [*columns, CPU]]
                lines.append(
                    f"| {system} | {fig['p50_ms']:.1f} | {fig['p99_ms']:.1f} | "
                    + " | ".join(cells)
                    + " |"
                )
            ours, floor = row["ours_async_client"], row["serve_http"]
            lines.append(f"\nours (async client) / bare Serve over HTTP: {_ratios(ours, floor)}")
            if "serve_http_again" in row:
                lines.append(
                    "bare Serve again / bare Serve (two identical systems: this run's noise): "
                    + _ratios(row["serve_http_again"], floor)
                )
            handle = row["serve_handle"]["p50_ms"]
            api, nested = row["ours_python_api"]["p50_ms"], row["ours_nested_call"]["p50_ms"]
            lines.append(
                f"ours in the cluster / bare Serve handle, p50: Python API (ClusterSession) "
                f"x{api / handle:.2f}, a nested workflow's call x{nested / handle:.2f}"
            )
            if workload == "hello" and "seed" in results:
                seed = results["seed"]
                faster = seed["p50_ms"] / ours["p50_ms"]
                more = ours.get("tasks_per_s@50", float("nan")) / seed["tasks_per_s@50"]
                lines.append(
                    f"ours vs llama_deploy 0.2.4: p50 {faster:.0f}x lower; "
                    f"tasks/s at 50 sessions {more:.0f}x"
                )
        first = results[mode].get("first_event_ms")
        if first:
            handle = results[mode]["stream3"]["serve_handle"]["p50_ms"]
            lines.append(
                f"\nfirst streamed event, p50 ms: in-process {first['in_process']:.1f}, "
                f"ours {first['ours']:.1f}, x{first['ours'] / handle:.2f} the whole run's p50 "
                f"through a bare Serve handle ({handle:.1f})"
            )
        memory = results[mode].get("memory")
        if not memory:
            continue
        lines.append(
            f"state store writes per task: {memory['store_commits_per_task']:.2f} commits, "
            f"{memory['store_rows_per_task']:.2f} rows"
        )
        lines.append(
            f"memory (task_retention_s={memory['task_retention_s']}): "
            + "; ".join(
                f"{p['tasks_run']} tasks: control plane {p['control_plane_mb']:.0f} MB, "
                f"replica {p['replica_mb']:.0f} MB, {p['tasks_held']} held"
                for p in memory["points"]
            )
        )
    if NO_STORE in results and "fast" in results:
        hello = {"sqlite": results["fast"]["hello"], "memory": results[NO_STORE]["hello"]}
        lines.append(store_cost(hello["sqlite"], hello["memory"]))
        if all("agents_server" in row for row in hello.values()):
            lines.append(against_agents_server(hello))
    return "\n".join(lines)


def against_agents_server(hello: dict[str, Any]) -> str:
    """The workflow server API, hello-world, the same httpx client, in turns in the same run:
    llama-agents-server on its SQLite and in-memory stores against ours (Serve's fast
    settings) with and without ours."""
    rows = {
        (server, store): hello[store][system]
        for server, system in (
            ("llama-agents-server 0.8.0", "agents_server"),
            ("llama-deploy-ray", "ours_ws_api"),
        )
        for store in ("memory", "sqlite")
    }
    columns = sorted(
        {k for fig in rows.values() for k in fig if k.startswith("tasks")},
        key=lambda k: int(k.split("@")[1]),
    )
    lines = [
        "\n## the workflow server API: ours against llama-agents-server (hello, one httpx client)",
        "| server | store | p50 ms | " + " | ".join(columns) + " | cpu ms/task |",
        "|---" * (4 + len(columns)) + "|",
    ]
    for (server, store), fig in rows.items():
        cells = [f"{fig.get(c, float('nan')):.1f}" for c in [*columns, CPU]]
        lines.append(f"| {server} | {store} | {fig['p50_ms']:.1f} | " + " | ".join(cells) + " |")
    for store, durable in (("sqlite", "both durable"), ("memory", "neither durable")):
        other = rows[("llama-agents-server 0.8.0", store)]
        lines.append(
            f"{durable}, ours / theirs: {_ratios(rows[('llama-deploy-ray', store)], other)}"
        )
    # what Ray Serve itself allows against them: a bare deployment, no store, no API
    bare = hello["memory"]["serve_http"]
    theirs = rows[("llama-agents-server 0.8.0", "memory")]
    lines.append(f"bare Serve (no store) / theirs in memory: {_ratios(bare, theirs)}")
    return "\n".join(lines)


def _ratios(mine: dict[str, Any], other: dict[str, Any]) -> str:
    """p50, tasks/s at each level and CPU per task (where both have it), `mine` over
    `other`."""
    shared = [c for c in other if (c.startswith("tasks") or c == CPU) and c in mine]
    rates = [f"{c} x{mine[c] / other[c]:.2f}" for c in shared]
    return ", ".join([f"p50 x{mine['p50_ms'] / other['p50_ms']:.2f}", *rates])


def store_cost(stored: dict[str, Any], memory: dict[str, Any]) -> str:
    """hello-world with the SQLite store against without, each against bare Serve measured in
    its own run (so that the machine's noise between the two runs cancels out)."""
    levels = [k for k in stored["ours_async_client"] if k.startswith("tasks_per_s@")]
    level = "tasks_per_s@50" if "tasks_per_s@50" in levels else max(levels, key=len)
    lines = [
        "\n## the state store's cost: hello, Serve fast settings",
        f"| store | p50 ms | {level} | p50 / bare Serve | {level} / bare Serve |",
        "|---|---|---|---|---|",
    ]
    ratios = {}
    for name, row in (("sqlite", stored), ("memory", memory)):
        ours, floor = row["ours_async_client"], row["serve_http"]
        ratios[name] = (ours["p50_ms"] / floor["p50_ms"], ours[level] / floor[level])
        lines.append(
            f"| {name} | {ours['p50_ms']:.1f} | {ours[level]:.0f} | x{ratios[name][0]:.2f} "
            f"| x{ratios[name][1]:.2f} |"
        )
    (p50_s, tps_s), (p50_m, tps_m) = ratios["sqlite"], ratios["memory"]
    lines.append(
        f"\nsqlite vs memory, each relative to its bare Serve: p50 x{p50_s / p50_m:.2f}, "
        f"{level} x{tps_s / tps_m:.2f}"
    )
    return "\n".join(lines)


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if m in results]
    fig, axes = plt.subplots(1, len(modes) + 1, figsize=(6 * (len(modes) + 1), 4.5))
    for ax, mode in zip(axes, modes, strict=False):
        for system, fig_row in results[mode]["hello"].items():
            levels = sorted(int(k.split("@")[1]) for k in fig_row if k.startswith("tasks"))
            ax.plot(
                levels, [fig_row[f"tasks_per_s@{lvl}"] for lvl in levels], marker="o", label=system
            )
        if "seed" in results:
            seed = results["seed"]
            levels = sorted(int(k.split("@")[1]) for k in seed if k.startswith("tasks"))
            ax.plot(
                levels,
                [seed[f"tasks_per_s@{lvl}"] for lvl in levels],
                marker="x",
                label="llama_deploy 0.2.4",
            )
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="concurrent sessions",
            ylabel="tasks/s",
            title=f"hello-world, Serve {mode} settings",
        )
        ax.legend(fontsize=7)
    ax = axes[-1]
    for mode in modes:
        points = results[mode]["memory"]["points"]
        ax.plot(
            [p["tasks_run"] for p in points],
            [p["control_plane_mb"] for p in points],
            marker="o",
            label=f"control plane ({mode})",
        )
        ax.plot(
            [p["tasks_run"] for p in points],
            [p["replica_mb"] for p in points],
            marker="s",
            label=f"replica ({mode})",
        )
    ax.set(xlabel="tasks run", ylabel="RSS MB", title="memory over tasks")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, no seed system")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--no-seed", action="store_true", help="skip llama_deploy 0.2.4")
    parser.add_argument(
        "--no-agents-server", action="store_true", help="skip llama-agents-server 0.8.0"
    )
    parser.add_argument(
        "--workloads", nargs="+", help="measure hello and only these (wait100ms, cpu, stream3)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--from-json", type=Path, help="only redraw the table and chart")
    parser.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--agents-server", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = Sizes(args.quick)
    if args.child:
        print(json.dumps(measure_mode(sizes, free_port(), args.workloads, args.agents_server)))
        return
    if args.from_json:
        report(json.loads(args.from_json.read_text()), args.out)
        return
    results: dict[str, Any] = {}
    # beside ours in fast mode, in turns with the other systems
    beside: list[str] = []
    if "fast" in args.modes and not (args.quick or args.no_agents_server):
        try:
            beside = ["--agents-server", str(ensure_agents_server_venv())]
        except subprocess.SubprocessError as exc:  # the others are measured all the same
            print(f"llama-agents-server could not be installed: {exc}")
    for mode in args.modes:
        print(f"measuring with Serve's {mode} settings ...", flush=True)
        options = ["--quick"] if args.quick else []
        if args.workloads:
            options += ["--workloads", *args.workloads]
        if mode == "fast":
            options += beside
        results[mode] = run_child(f"{mode} run", mode, options, MODES[mode])
    if "fast" in args.modes:
        print("measuring hello-world with Serve's fast settings and no state store ...", flush=True)
        options = ["--quick"] if args.quick else []
        options += ["--workloads", "hello", *beside]
        no_store = {**FAST_ENV, "BENCH_STATE_STORE": "memory"}
        results[NO_STORE] = run_child("run without a store", "fast", options, no_store)
    if not (args.quick or args.no_seed):
        print("measuring llama_deploy 0.2.4 ...", flush=True)
        try:
            results["seed"] = measure_seed(sizes)
        except (RuntimeError, subprocess.SubprocessError) as exc:  # keep what was measured
            print(f"llama_deploy 0.2.4 was not measured: {exc}", getattr(exc, "stderr", ""))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(results, indent=2))
    report(results, args.out)


def run_child(what: str, mode: str, options: list[str], env: dict[str, str]) -> dict[str, Any]:
    """`measure_mode` in a process of its own, which starts a Ray of its own; its results."""
    child = subprocess.run(
        [sys.executable, __file__, "--child", mode, *options],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )
    if child.returncode != 0:
        sys.exit(f"the {what} failed:\n{child.stderr[-5000:]}")
    for line in child.stderr.splitlines():  # what it could not measure, said on stderr
        if line.startswith("llama-agents-server was not measured"):
            print(line)
    return json.loads(child.stdout.strip().splitlines()[-1])


def report(results: dict[str, Any], out: Path) -> None:
    text = table(results)
    (out / "latest.md").write_text(text + "\n")
    chart(results, out / "latest.png")
    print(text)
    print(f"\nwrote {out / 'latest.json'}, latest.md and latest.png")


if __name__ == "__main__":
    main()
