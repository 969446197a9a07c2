"""One real local Ray for the whole run, started the seed's way: the quickstart's core script
runs in its own process (it starts the Ray it lives with), and the tests attach to it."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import psutil
import pytest
import pytest_asyncio
import ray
from ray import serve

from llama_deploy_ray import (
    AsyncLlamaDeployClient,
    ControlPlaneConfig,
    LlamaDeployClient,
    RayActorOptions,
    WorkflowServiceConfig,
)
from llama_deploy_ray._cluster.actors import ControlPlaneHandle
from llama_deploy_ray._shared.config import workflow_route

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
def core_env(tmp_path_factory) -> dict[str, str]:
    """The environment that points the seed's scripts at this run's control plane."""
    env = {
        **os.environ,
        "CONTROL_PLANE_PORT": str(_free_port()),
        # this run's own records, not those of the user's own local core
        "CONTROL_PLANE_STATE_STORE": str(tmp_path_factory.mktemp("store") / "state.sqlite3"),
        # the HTTP API is stateless: every test goes through two of its replicas
        "CONTROL_PLANE_API_REPLICAS": "2",
        # and every session through the shard its id hashes to, of two
        "CONTROL_PLANE_SHARDS": "2",
        # small enough that a test can stream past it
        "CONTROL_PLANE_MAX_EVENTS_PER_TASK": str(MAX_EVENTS_PER_TASK),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("RAY_ADDRESS", None)
    return env


class Core:
    """A core started the seed's way: the quickstart's core.py in a process of its own, which
    starts the local Ray it lives with; stopping it stops that Ray."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "w") as out:
            self.process = subprocess.Popen(
                [sys.executable, str(QUICKSTART / "core.py")],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.config = ControlPlaneConfig(
            port=int(env["CONTROL_PLANE_PORT"]), state_store=env["CONTROL_PLANE_STATE_STORE"]
        )
        deadline = time.monotonic() + 180
        while not self._answers():
            if self.process.poll() is not None:
                pytest.fail(f"core.py exited with {self.process.returncode}:\n{self._tail()}")
            if time.monotonic() > deadline:
                self.process.kill()
                pytest.fail(f"the core did not come up in 180 s:\n{self._tail()}")
            time.sleep(0.5)
        ray.init(address="auto", namespace=self.config.namespace)

    def _answers(self) -> bool:
        try:
            return httpx.get(f"{self.config.url}/queue_config", timeout=2).is_success
        except httpx.TransportError:
            return False

    def _tail(self) -> str:
        return self.log.read_text()[-4000:]

    def crash(self) -> None:
        """Stop its Ray the hard way (`ray stop --force`: no replica drains), then the core."""
        ray.shutdown()
        # no grace period to wait out: Ray's processes are the core's children, so once killed
        # they stay zombies until the core goes too, and `ray stop` would wait the whole period
        # for each of its three groups of processes (16 s of the 25 s it took here)
        stop = ["ray", "stop", "--force", "--grace-period", "0"]
        subprocess.run(stop, check=True, capture_output=True, timeout=120)
        self.process.kill()
        self.process.wait()
        _kill_haproxy()

    def stop(self) -> bool:
        """Stop it as a service manager would (SIGTERM: a background job, as CI runs this
        suite, inherits SIGINT ignored); True if it stopped of itself, not killed."""
        ray.shutdown()
        stopped = True
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                stopped = False
        # a core killed before its Serve shut down leaves its HAProxy, which would hold the
        # next core's ports
        _kill_haproxy()
        return stopped


def _kill_haproxy() -> None:
    """Serve's HAProxy outlives a Ray stopped under it and keeps its ports (see _deploy)."""
    haproxies = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "haproxy"]
    for process in haproxies:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()

    def gone(process: psutil.Process) -> bool:  # a zombie holds no port
        try:
            return process.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(lambda: all(map(gone, haproxies)), timeout_s=30, what="HAProxy to exit")


_shared_cores: list[Core] = []


def stop_shared_core() -> None:
    """For tests that need a Ray of their own: the shared core's Ray must be gone first (the
    modules that call this run last, see `pytest_collection_modifyitems`)."""
    while _shared_cores:
        _shared_cores.pop().stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("own_ray") is not None)


@pytest.fixture(autouse=True)
def _the_test_process_stays_unfrozen(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A control plane made in this process (several tests make one, and its timers outlive
    them) would freeze every object of the process at its sweeps (see `_freeze_survivors`),
    and a test's `gc.collect()` would then miss the cycles among them. Not here, but in the
    tests marked `gc_freeze`."""
    if request.node.get_closest_marker("gc_freeze") is None:
        monkeypatch.setattr(gc, "freeze", lambda: None)


@pytest.fixture(scope="session")
def control_plane_config(
    core_env: dict[str, str], tmp_path_factory
) -> Iterator[ControlPlaneConfig]:
    core = Core(core_env, tmp_path_factory.mktemp("core") / "core.log")
    _shared_cores.append(core)
    yield core.config
    stop_shared_core()


@pytest_asyncio.fixture(scope="module", loop_scope="session", autouse=True)
async def _a_modules_services_go_with_it() -> AsyncIterator[None]:
    """After each module, the services deployed on the shared core go: the replicas of every
    module before would otherwise stay up to the end (dozens of processes), taking memory and
    CPU from the tests after them, and Serve's controller looks after each one."""
    yield
    if not _shared_cores or not ray.is_initialized():
        return
    control_plane = ControlPlaneHandle.lookup(_shared_cores[-1].config.namespace)
    for definition in await control_plane.list_services():
        # not blocking: a replica drains its runs (however long) while the next module goes on
        serve.delete(definition.service_name, _blocking=False)
        await control_plane.deregister_service(definition.service_name)


def service(name: str, **options) -> WorkflowServiceConfig:
    """A service config for tests: replicas ask for no CPU (the machine has 2 cores)."""
    return WorkflowServiceConfig(
        service_name=name, ray_actor_options=RayActorOptions(num_cpus=0), **options
    )


def run_url(config: ControlPlaneConfig, service_name: str, session_id: str) -> str:
    return f"{config.url}{workflow_route(service_name)}/sessions/{session_id}/run"


# Each test module defines a `deployed` fixture (its services); these clients point at it.


@pytest.fixture
def client(deployed: ControlPlaneConfig):
    with LlamaDeployClient(deployed) as client:
        yield client


@pytest_asyncio.fixture(loop_scope="session")
async def aclient(deployed: ControlPlaneConfig):
    async with AsyncLlamaDeployClient(deployed) as client:
        yield client
