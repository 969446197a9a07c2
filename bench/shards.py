"""The control plane's ceiling, and how its shards share the load.

Every task costs the control plane two calls: `begin_task` (its turn and state) and its outcome
(`finish_task`). Load generators (Ray actors of their own, so the measuring process is not the
limit) keep 1,000 sessions busy with tasks on a service that does nothing else, for a few
seconds each against:

- an empty actor answering the same two calls on the same socket (the cost of a call: the
  floor);
- the control plane with one shard, its store off (`memory`) and on (SQLite, the default);
- the control plane with 2 and 4 shards, store on;

and reports tasks sequenced per second, the control plane's CPU time per task (summed over its
shards' processes: on a shared machine that, not the wall clock, says what one core can
sequence), and how the sessions and tasks spread over the shards.
Usage (stop any other local Ray first, `ray stop`):

    python bench/shards.py            # about two minutes

Writes bench/results/shards.json and prints the table. It reports figures; it never fails on
one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import ray

from llama_deploy_ray import ServiceDefinition, TaskDefinition
from llama_deploy_ray._cluster.actors import (
    ControlPlaneHandle,
    ControlPlaneShard,
    core_actor_options,
)
from llama_deploy_ray._cluster.call_socket import Address, CallServer
from llama_deploy_ray._cluster.control_plane import ControlPlaneActor
from llama_deploy_ray._shared.config import control_plane_actor_name
from llama_deploy_ray._shared.types import StartedTask, TaskOutcome, TaskResult, TaskStatus

RESULTS = Path(__file__).resolve().parent / "results"
SESSIONS = 1000
GENERATORS = 2
OUTCOME = TaskOutcome(result="ok", state={"n": 1})
EMPTY_SECRET = secrets.token_bytes(32)


class EmptyControlPlane:
    """Answers a driver's two calls per task at once, remembering nothing, on a socket as the
    control plane takes them."""

    def __init__(self) -> None:
        self._calls = CallServer(self, EmptyControlPlane, EMPTY_SECRET)

    async def ready(self) -> bool:
        return True

    async def call_socket(self) -> tuple[Address, bytes]:
        return await self._calls.address(), EMPTY_SECRET

    async def begin_tasks(self, begins: list[tuple[Any, ...]]) -> list[StartedTask]:
        return [
            StartedTask(
                task=task,
                running=TaskResult(task_id=task.task_id, status=TaskStatus.RUNNING),
                state=None,
            )
            for task, *_ in begins
        ]

    async def finish_task(self, task_id: str, outcome: TaskOutcome) -> None:
        return None


@ray.remote(num_cpus=0)
class LoadGenerator:
    async def run(self, shards: list[Any], sessions: list[str], seconds: float) -> dict[str, int]:
        control_plane = ControlPlaneHandle(
            [ControlPlaneShard(actor, i) for i, actor in enumerate(shards)]
        )
        owner = secrets.token_hex(8)
        done = 0
        deadline = time.monotonic() + seconds

        async def one(session_id: str) -> None:
            nonlocal done
            shard = control_plane.for_session(session_id)
            while time.monotonic() < deadline:
                task = TaskDefinition(input="{}", agent_id="svc", session_id=session_id)
                await shard.begin_task(task, owner)
                await shard.finish_task(task.task_id, OUTCOME)
                done += 1

        await asyncio.gather(*(one(session_id) for session_id in sessions))
        return {"tasks": done}


def control_plane_cpu_s() -> float:
    """CPU seconds used so far by the processes of the control plane's actors."""
    total = 0.0
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if cmdline and cmdline[0].startswith(("ray::ControlPlane", "ray::EmptyControlPlane")):
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                total += times.user + times.system
    return total


def start_control_plane(count: int, store: str) -> list[Any]:
    namespace = ray.get_runtime_context().namespace
    actors = [
        ray.remote(ControlPlaneActor)
        .options(**core_actor_options(control_plane_actor_name(i), namespace))
        .remote(60.0, 600.0, b"s" * 32, 10_000, store, namespace, i, count)
        for i in range(count)
    ]
    ray.get([actor.ready.remote() for actor in actors])
    return actors


def measure(actors: list[Any], seconds: float, real: bool) -> dict[str, Any]:
    control_plane = ControlPlaneHandle(
        [ControlPlaneShard(actor, i) for i, actor in enumerate(actors)]
    )

    async def sessions() -> list[str]:
        if not real:
            return [secrets.token_hex(16) for _ in range(SESSIONS)]
        await control_plane.register_service(ServiceDefinition(service_name="svc"))
        return [(await control_plane.create_session()).session_id for _ in range(SESSIONS)]

    ids = asyncio.run(sessions())
    generators = [LoadGenerator.remote() for _ in range(GENERATORS)]
    cpu_before = control_plane_cpu_s()
    start = time.monotonic()
    counts = ray.get(
        [g.run.remote(actors, ids[i::GENERATORS], seconds) for i, g in enumerate(generators)]
    )
    elapsed = time.monotonic() - start
    tasks = sum(c["tasks"] for c in counts)
    cpu_ms_per_task = 1000 * (control_plane_cpu_s() - cpu_before) / tasks
    row: dict[str, Any] = {
        "tasks_per_s": tasks / elapsed,
        "calls_per_s": 2 * tasks / elapsed,
        "cpu_ms_per_task": cpu_ms_per_task,
        "tasks_per_s_per_core": 1000 / cpu_ms_per_task,
    }
    if real:
        per_shard = [ray.get(actor.sizes.remote()) for actor in actors]
        row["sessions_per_shard"] = [s["sessions"] for s in per_shard]
        row["tasks_per_shard"] = [s["tasks"] for s in per_shard]
        mean = statistics.mean(row["tasks_per_shard"])
        row["busiest_shard_vs_mean"] = max(row["tasks_per_shard"]) / mean
    for actor in [*actors, *generators]:
        ray.kill(actor)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="load per measurement")
    parser.add_argument("--out", type=Path, default=RESULTS / "shards.json")
    args = parser.parse_args()
    ray.init(
        address="local", include_dashboard=False, logging_level="ERROR", namespace="bench_shards"
    )
    store_dir = Path(tempfile.mkdtemp())
    cases: dict[str, tuple[int, str | None]] = {
        "empty actor": (1, None),
        "1 shard, store off": (1, "memory"),
        "1 shard": (1, str(store_dir / "one.sqlite3")),
        "2 shards": (2, str(store_dir / "two.sqlite3")),
        "4 shards": (4, str(store_dir / "four.sqlite3")),
    }
    results: dict[str, Any] = {"sessions": SESSIONS, "seconds": args.seconds, "cases": {}}
    for name, (count, store) in cases.items():
        if store is None:
            actor = (
                ray.remote(EmptyControlPlane)
                .options(**core_actor_options("empty_control_plane", "bench"))
                .remote()
            )
            ray.get(actor.ready.remote())
            actors = [actor]
        else:
            actors = start_control_plane(count, store)
        results["cases"][name] = measure(actors, args.seconds, real=store is not None)
        print(name, json.dumps(results["cases"][name]), flush=True)
    ray.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(table(results))


def table(results: dict[str, Any]) -> str:
    lines = [
        f"{results['sessions']} sessions, {results['seconds']:.0f} s each, "
        f"{GENERATORS} load generators",
        "| control plane | tasks/s | calls/s | CPU ms/task | tasks/s per core | "
        "tasks per shard | busiest / mean |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for name, row in results["cases"].items():
        spread = ", ".join(map(str, row.get("tasks_per_shard", []))) or "-"
        busiest = f"{row['busiest_shard_vs_mean']:.2f}" if "busiest_shard_vs_mean" in row else "-"
        lines.append(
            f"| {name} | {row['tasks_per_s']:.0f} | {row['calls_per_s']:.0f} | "
            f"{row['cpu_ms_per_task']:.2f} | {row['tasks_per_s_per_core']:.0f} | {spread} | "
            f"{busiest} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
