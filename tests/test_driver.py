"""A replica's driver against an in-process control plane: it hears of a cancel, and a task that
cannot run fails."""

from __future__ import annotations

import asyncio
import json

from llama_deploy_ray import TaskDefinition

from .fakes import ActorLike

SECRET = b"0123456789abcdef0123456789abcdef"


async def test_a_replica_driver_hears_of_a_cancel_and_a_task_that_cannot_run_fails() -> None:
    from llama_deploy_ray._cluster.actors import ControlPlaneHandle, ControlPlaneShard
    from llama_deploy_ray._cluster.control_plane import ControlPlane
    from llama_deploy_ray._cluster.driver import LocalDriver
    from llama_deploy_ray._shared.types import (
        ServiceDefinition,
        StartedTask,
        TaskOutcome,
        TaskStatus,
    )

    control_plane = ControlPlane(task_retention_s=60, session_retention_s=60, state_secret=SECRET)
    await control_plane.register_service(ServiceDefinition(service_name="svc"))
    session = await control_plane.create_session()
    started_runs: list[str] = []

    async def run_here(started: StartedTask) -> TaskOutcome:
        started_runs.append(started.task.task_id)
        if started.task.run_kwargs.get("fail"):
            raise RuntimeError("the replica broke")
        await asyncio.sleep(60)
        return TaskOutcome(result="never")

    shard = ControlPlaneShard(ActorLike(control_plane))  # type: ignore[arg-type]
    driver = LocalDriver(ControlPlaneHandle([shard]), run_here)

    def task(**kwargs: object) -> TaskDefinition:
        return TaskDefinition(
            input=json.dumps(kwargs), agent_id="svc", session_id=session.session_id
        )

    long_task, broken, after = task(), task(fail=True), task()
    running = asyncio.ensure_future(driver.run(long_task))
    await asyncio.sleep(0.2)
    assert started_runs == [long_task.task_id]
    await control_plane.cancel_task(session.session_id, long_task.task_id)
    result = await asyncio.wait_for(running, timeout=5)  # the watch told the driver
    assert result.status is TaskStatus.CANCELLED

    failed = await asyncio.wait_for(driver.run(broken), timeout=5)
    assert failed.status is TaskStatus.FAILED and "the replica broke" in (failed.error or "")
    # the session's line moved on: the next task starts (and is cancelled in its turn)
    nxt = asyncio.ensure_future(driver.run(after))
    await asyncio.sleep(0.2)
    assert started_runs[-1] == after.task_id
    await control_plane.cancel_task(session.session_id, after.task_id)
    assert (await asyncio.wait_for(nxt, timeout=5)).status is TaskStatus.CANCELLED
    await driver.drain()
