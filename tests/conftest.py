"""One real local Ray for the whole run, started the seed's way: the quickstart's core script
runs in its own process (it starts the Ray it lives with), and the tests attach to it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
import pytest_asyncio
import ray

from llama_deploy_ray import (
    AsyncLlamaDeployClient,
    ControlPlaneConfig,
    LlamaDeployClient,
    RayActorOptions,
    WorkflowServiceConfig,
)

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "examples" / "quickstart"
MAX_EVENTS_PER_TASK = 500

T = TypeVar("T")


def wait_for(
    probe: Callable[[], T | None], *, timeout_s: float, what: str, every_s: float = 0.2
) -> T:
    """Call `probe` until it returns something truthy and return that; fail the test, saying
    `what` was awaited, if `timeout_s` passes first."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout_s} s for {what}")
        time.sleep(every_s)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def core_env() -> dict[str, str]:
    """The environment that points the seed's scripts at this run's control plane."""
    env = {
        **os.environ,
        "CONTROL_PLANE_PORT": str(_free_port()),
        # small enough that a test can stream past it
        "CONTROL_PLANE_MAX_EVENTS_PER_TASK": str(MAX_EVENTS_PER_TASK),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="session")
def control_plane_config(
    core_env: dict[str, str], tmp_path_factory
) -> Iterator[ControlPlaneConfig]:
    log = tmp_path_factory.mktemp("core") / "core.log"
    with open(log, "w") as out:
        core = subprocess.Popen(
            [sys.executable, str(QUICKSTART / "core.py")],
            env=core_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    config = ControlPlaneConfig(port=int(core_env["CONTROL_PLANE_PORT"]))
    deadline = time.monotonic() + 180
    while True:
        if core.poll() is not None:
            pytest.fail(f"core.py exited with {core.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{config.url}/queue_config", timeout=2).is_success:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            core.kill()
            pytest.fail(f"the core did not come up in 180 s:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)
    ray.init(address="auto", namespace=config.namespace)
    yield config
    ray.shutdown()
    core.send_signal(signal.SIGINT)
    try:
        core.wait(timeout=60)
    except subprocess.TimeoutExpired:
        core.kill()
        core.wait()


def service(name: str, **options) -> WorkflowServiceConfig:
    """A service config for tests: replicas ask for no CPU (the machine has 2 cores)."""
    return WorkflowServiceConfig(
        service_name=name, ray_actor_options=RayActorOptions(num_cpus=0), **options
    )


# Each test module defines a `deployed` fixture (its services); these clients point at it.


@pytest.fixture
def client(deployed: ControlPlaneConfig):
    with LlamaDeployClient(deployed) as client:
        yield client


@pytest_asyncio.fixture(loop_scope="session")
async def aclient(deployed: ControlPlaneConfig):
    async with AsyncLlamaDeployClient(deployed) as client:
        yield client
