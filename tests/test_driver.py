"""A replica's driver against an in-process control plane: it hears of a cancel, a task that
cannot run fails, and a task whose asker went away is driven to its end."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest
from ray.exceptions import ActorUnavailableError

from llama_deploy_ray import SimpleOrchestratorConfig, TaskDefinition
from llama_deploy_ray._cluster.actors import ControlPlaneHandle, ControlPlaneShard
from llama_deploy_ray._cluster.control_plane import ControlPlane
from llama_deploy_ray._cluster.driver import LocalDriver, PublishingDriver
from llama_deploy_ray._shared import retry
from llama_deploy_ray._shared.errors import ControlPlaneUnavailableError, ServiceNotFoundError
from llama_deploy_ray._shared.types import (
    DriverNotice,
    QueueMessage,
    ServiceDefinition,
    StartedTask,
    TaskOutcome,
    TaskStatus,
)

from .fakes import ActorLike, begin

SECRET = b"0123456789abcdef0123456789abcdef"


async def _control_plane() -> tuple[ControlPlane, str]:
    """A control plane in this process with a service `svc`, and a session's id."""
    control_plane = ControlPlane(task_retention_s=60, session_retention_s=60, state_secret=SECRET)
    await control_plane.register_service(ServiceDefinition(service_name="svc"))
    return control_plane, (await control_plane.create_session()).session_id


def _driver(
    target: object, run_here: Callable[[StartedTask], Awaitable[TaskOutcome]]
) -> LocalDriver:
    """A replica's driver whose control plane is `target`, called as a Ray actor would be,
    running each task with `run_here` (which is not told of a pending begin)."""
    shard = ControlPlaneShard(ActorLike(target))  # type: ignore[arg-type]
    return LocalDriver(ControlPlaneHandle([shard]), lambda started, _: run_here(started))


async def test_a_replica_driver_hears_of_a_cancel_and_a_task_that_cannot_run_fails() -> None:
    control_plane, session_id = await _control_plane()
    started_runs: list[str] = []

    async def run_here(started: StartedTask) -> TaskOutcome:
        started_runs.append(started.task.task_id)
        if started.task.run_kwargs.get("fail"):
            raise RuntimeError("the replica broke")
        await asyncio.sleep(60)
        return TaskOutcome(result="never")

    driver = _driver(control_plane, run_here)

    def task(**kwargs: object) -> TaskDefinition:
        return TaskDefinition(input=json.dumps(kwargs), agent_id="svc", session_id=session_id)

    long_task, broken, after = task(), task(fail=True), task()
    running = asyncio.ensure_future(driver.run(long_task))
    await asyncio.sleep(0.2)
    assert started_runs == [long_task.task_id]
    await control_plane.cancel_task(session_id, long_task.task_id)
    result = await asyncio.wait_for(running, timeout=5)  # the watch told the driver
    assert result.status is TaskStatus.CANCELLED

    failed = await asyncio.wait_for(driver.run(broken), timeout=5)
    assert failed.status is TaskStatus.FAILED and "the replica broke" in (failed.error or "")
    # the session's line moved on: the next task starts (and is cancelled in its turn)
    nxt = asyncio.ensure_future(driver.run(after))
    await asyncio.sleep(0.2)
    assert started_runs[-1] == after.task_id
    await control_plane.cancel_task(session_id, after.task_id)
    assert (await asyncio.wait_for(nxt, timeout=5)).status is TaskStatus.CANCELLED
    await driver.drain()


async def test_a_task_whose_asker_gave_up_before_its_begin_was_answered_still_runs() -> None:
    """A client that stops waiting for `run_nowait` (its fallback after a second) cancels the
    replica's request; the task its begin recorded and started is driven to the end anyway,
    else it would stay running, owned by a live driver, and never be adopted."""
    control_plane, session_id = await _control_plane()

    async def run_here(started: StartedTask) -> TaskOutcome:
        return TaskOutcome(result="done")

    driver = _driver(control_plane, run_here)
    task = TaskDefinition(input="{}", agent_id="svc", session_id=session_id)

    asking = asyncio.ensure_future(driver.submit_if_first(task))
    await asyncio.sleep(0)  # the begin is on its way, unanswered
    asking.cancel()
    await asyncio.sleep(0.2)  # recorded, and driven if the driving went on
    result = await control_plane.get_task(session_id, task.task_id, wait_s=5)
    assert result.status is TaskStatus.COMPLETED and result.result == "done", result
    await driver.drain()


async def test_a_begin_that_landed_but_was_never_answered_is_driven_once_answered(
    monkeypatch,
) -> None:
    """The control plane recorded and started the task, then stayed unreachable for the whole
    budget: the asker gets the 503, and the driver, which owns the task, asks again in the
    background until answered and drives it (else nobody would: its owner is alive)."""
    monkeypatch.setattr(retry.call_actor, "__defaults__", (0.3,))  # the budget, shortened
    control_plane, session_id = await _control_plane()
    unreachable_until = asyncio.get_running_loop().time() + 1.0

    class AnswerLost:
        """The control plane, whose begins land but whose answers are lost for a second."""

        def __getattr__(self, name: str) -> object:
            return getattr(control_plane, name)

        async def begin_tasks(self, begins: list) -> list:
            answers = await control_plane.begin_tasks(begins)
            if asyncio.get_running_loop().time() < unreachable_until:
                raise ActorUnavailableError("The actor is restarting", None)
            return answers

    async def run_here(started: StartedTask) -> TaskOutcome:
        return TaskOutcome(result="done")

    driver = _driver(AnswerLost(), run_here)
    task = TaskDefinition(input="{}", agent_id="svc", session_id=session_id)

    try:
        await driver.submit_if_first(task)
    except ControlPlaneUnavailableError:
        pass
    else:
        raise AssertionError("the begin was answered within the budget: the test proved less")
    result = await control_plane.get_task(session_id, task.task_id, wait_s=10)
    assert result.status is TaskStatus.COMPLETED and result.result == "done", result
    await driver.drain()


async def test_a_new_handlers_run_starts_before_its_begin_is_answered() -> None:
    """`run_new` runs the task while its begin is on its way; the run reaches the control
    plane only once the task is recorded, and a begin that is refused cancels the run."""
    control_plane, _ = await _control_plane()

    class SlowBegin:
        def __getattr__(self, name: str) -> object:
            return getattr(control_plane, name)

        async def begin_tasks(self, begins: list) -> list:
            await asyncio.sleep(0.3)
            return await control_plane.begin_tasks(begins)

    seen: list[str] = []

    async def run_here(started: StartedTask, recorded: asyncio.Future[None] | None) -> TaskOutcome:
        assert recorded is not None
        task_id = started.task.task_id
        seen.append("unrecorded" if task_id not in control_plane._tasks else "recorded")
        await recorded
        seen.append("recorded" if task_id in control_plane._tasks else "unrecorded")
        return TaskOutcome(result="done")

    shard = ControlPlaneShard(ActorLike(SlowBegin()))  # type: ignore[arg-type]
    driver = LocalDriver(ControlPlaneHandle([shard]), run_here)
    task = TaskDefinition(input="{}", agent_id="svc", session_id="handler-new")
    result = await asyncio.wait_for(driver.run_new(task), 5)
    assert result.status is TaskStatus.COMPLETED and result.result == "done", result
    assert seen == ["unrecorded", "recorded"]
    recorded = await control_plane.get_task("handler-new", task.task_id, wait_s=5)
    assert recorded.status is TaskStatus.COMPLETED and recorded.attempts == 1

    refused = TaskDefinition(input="{}", agent_id="nowhere", session_id="handler-other")
    with pytest.raises(ServiceNotFoundError):
        await asyncio.wait_for(driver.run_new(refused), 5)
    assert seen[-1] == "unrecorded"  # it ran, waited for its record, and was cancelled
    assert refused.task_id not in driver._in_flight  # and left nothing behind
    await driver.drain()


async def test_a_sessions_next_run_starts_from_the_state_its_last_run_here_left() -> None:
    """A replica's driver keeps the state its own runs leave once the control plane says it is
    the session's latest: the session's next run there starts from it before its begin is
    answered. A task of the session that begins elsewhere makes the control plane tell it so;
    a run that started from a state no longer the latest (that word did not arrive in time)
    is cancelled before anything of it is recorded, and runs again from the latest."""
    control_plane, session_id = await _control_plane()
    deaf = False  # when set, the first driver does not hear that its state is stale

    class SlowBegin:
        def __getattr__(self, name: str) -> object:
            return getattr(control_plane, name)

        async def begin_tasks(self, begins: list) -> list:
            await asyncio.sleep(0.2)
            return await control_plane.begin_tasks(begins)

        async def watch_driver(self, *args: object) -> DriverNotice:
            notice = await control_plane.watch_driver(*args)
            return notice.model_copy(update={"stale_states": []}) if deaf else notice

    # each run: (task id, the state's n it started from, run ahead of its begin, recorded yet)
    runs: list[tuple[str, int, bool, bool]] = []

    async def run_here(started: StartedTask, recorded: asyncio.Future[None] | None) -> TaskOutcome:
        n = (started.state or {}).get("n", 0)
        task_id = started.task.task_id
        runs.append((task_id, n, recorded is not None, task_id in control_plane._tasks))
        if recorded is not None:
            await recorded
        if started.task.run_kwargs.get("stateless"):
            return TaskOutcome(result=0)
        return TaskOutcome(result=n + 1, state={"n": n + 1})

    def driver() -> LocalDriver:
        shard = ControlPlaneShard(ActorLike(SlowBegin()))  # type: ignore[arg-type]
        return LocalDriver(ControlPlaneHandle([shard]), run_here)

    here, elsewhere = driver(), driver()

    async def holds(state: dict | None) -> None:
        for _ in range(50):
            assert here._held is not None
            held = here._held._entries.get((session_id, "svc"), ("", None, ""))[1]
            if (held and held[1]) == state:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"the driver never held {state}")

    async def run(
        driver: LocalDriver, session: str = session_id, **kwargs: object
    ) -> tuple[str, object]:
        task = TaskDefinition(input=json.dumps(kwargs), agent_id="svc", session_id=session)
        result = await asyncio.wait_for(driver.run(task, new=True), 5)
        assert result.status is TaskStatus.COMPLETED, result
        return task.task_id, result.result

    first = await run(here)  # nothing held yet: the ordinary way
    assert runs[-1] == (first[0], 0, False, True) and first[1] == 1
    await holds({"n": 1})
    second = await run(here)
    assert runs[-1] == (second[0], 1, True, False) and second[1] == 2  # ran before recorded
    await holds({"n": 2})
    # sent again, the task is not new: it does not run (ahead or not), its record answers
    resent = TaskDefinition(task_id=second[0], input="{}", agent_id="svc", session_id=session_id)
    # nor as a nested call's child (those run ahead unasked): it began here before
    assert await asyncio.wait_for(here.run_if_first(resent), 5) is None
    assert (await asyncio.wait_for(here.run(resent), 5)).result == 2
    assert runs[-1][0] == second[0] and len([r for r in runs if r[0] == second[0]]) == 1

    third = await run(elsewhere)
    assert third[1] == 3
    await holds(None)  # told its state is no longer the latest
    fourth = await run(here)
    assert runs[-1] == (fourth[0], 3, False, True) and fourth[1] == 4
    await holds({"n": 4})

    deaf = True
    assert (await run(elsewhere))[1] == 5
    sixth = await run(here)  # from {"n": 4}, held still: cancelled, then from the latest
    assert [r for r in runs if r[0] == sixth[0]] == [
        (sixth[0], 4, True, False),
        (sixth[0], 5, False, True),
    ]
    assert sixth[1] == 6
    recorded = await control_plane.get_task(session_id, sixth[0])
    assert recorded.attempts == 1 and recorded.result == 6
    assert (await control_plane.get_session_state(session_id))["svc"] == {"n": 6}

    # a nested call (`run_if_first`) runs ahead too; one that would wait for its turn behind a
    # task begun elsewhere is cancelled, not recorded, and left to the orchestrator
    await holds({"n": 6})
    ahead_of_it = TaskDefinition(input="{}", agent_id="svc", session_id=session_id)
    await begin(control_plane, ahead_of_it, "elsewhere")  # not heard of: `here` is deaf
    nested = TaskDefinition(input="{}", agent_id="svc", session_id=session_id)
    assert await asyncio.wait_for(here.run_if_first(nested), 5) is None
    assert runs[-1] == (nested.task_id, 6, True, False)
    assert nested.task_id not in control_plane._tasks

    # a workflow that keeps no state: the session's state is "none yet", held all the same
    stateless = (await control_plane.create_session()).session_id
    assert (await run(here, stateless, stateless=True))[1] == 0
    for _ in range(50):
        if here._held._entries.get((stateless, "svc"), ("", None, ""))[1] == ("", None):
            break
        await asyncio.sleep(0.1)
    again = await run(here, stateless, stateless=True)
    assert runs[-1] == (again[0], 0, True, False)
    await here.drain()
    await elsewhere.drain()


async def test_a_sessions_next_run_sends_its_last_outcome_first() -> None:
    """Under load a run's outcome waits for the outcomes call on its way; the session's next
    run sends it at once, before its own begin: the begin finds the task before it finished
    (no wait for its turn), and the run starts ahead from the state that outcome left."""
    control_plane, session_id = await _control_plane()
    other = (await control_plane.create_session()).session_id
    release = asyncio.Event()
    waited_for_turn: list[str] = []

    class SlowFinish:
        def __getattr__(self, name: str) -> object:
            return getattr(control_plane, name)

        async def finish_tasks(self, outcomes: dict, hold_states: bool = False) -> object:
            if any(control_plane._tasks[t].definition.session_id == other for t in outcomes):
                await release.wait()
            return await control_plane.finish_tasks(outcomes, hold_states)

        async def start_task(self, task_id: str, owner: str) -> object:
            waited_for_turn.append(task_id)
            return await control_plane.start_task(task_id, owner)

    runs: list[tuple[str, int, bool]] = []  # (task id, the state's n, run ahead of its begin)

    async def run_here(started: StartedTask, recorded: asyncio.Future[None] | None) -> TaskOutcome:
        n = (started.state or {}).get("n", 0)
        runs.append((started.task.task_id, n, recorded is not None))
        if recorded is not None:
            await recorded
        return TaskOutcome(result=n + 1, state={"n": n + 1})

    shard = ControlPlaneShard(ActorLike(SlowFinish()))  # type: ignore[arg-type]
    driver = LocalDriver(ControlPlaneHandle([shard]), run_here)

    async def run(session: str) -> TaskDefinition:
        task = TaskDefinition(input="{}", agent_id="svc", session_id=session)
        assert (await asyncio.wait_for(driver.run(task, new=True), 5)).status.is_final
        return task

    asyncio.get_running_loop().call_later(1.0, release.set)  # a bound, should it be needed
    await run(other)  # its outcomes call stays on its way
    await run(session_id)  # its outcome waits for the call on its way
    second = await run(session_id)
    assert runs[-1] == (second.task_id, 1, True)  # from the state the first left, ahead
    assert waited_for_turn == []
    release.set()
    await driver.drain()
    assert (await control_plane.get_session_state(session_id))["svc"] == {"n": 2}


@pytest.mark.parametrize(
    ("dead_replicas", "status"),
    [
        # Serve routes to a dead replica until it notices: five sends to the same one
        ([b"\x01" * 16] * 5, TaskStatus.COMPLETED),
        # three replicas died under it, one more than max_retries allows
        ([b"\x01" * 16, b"\x02" * 16, b"\x03" * 16], TaskStatus.FAILED),
    ],
)
async def test_only_a_replica_not_seen_dead_counts_against_max_retries(
    dead_replicas: list[bytes], status: TaskStatus
) -> None:
    control_plane, session_id = await _control_plane()
    failures = iter(dead_replicas)

    class Replicas:
        """The service's topic: each send reaches the next dead replica, then a live one."""

        def publish(self, message: QueueMessage) -> asyncio.Future[TaskOutcome]:
            async def answer() -> TaskOutcome:
                actor_id = next(failures, None)
                if actor_id is not None:
                    raise ActorUnavailableError("Actor is unavailable.", actor_id)
                return TaskOutcome(result="done")

            return asyncio.ensure_future(answer())

    shard = ControlPlaneShard(ActorLike(control_plane))  # type: ignore[arg-type]
    config = SimpleOrchestratorConfig(max_retries=2, retry_backoff_s=0.01)
    driver = PublishingDriver(ControlPlaneHandle([shard]), config, Replicas())  # type: ignore[arg-type]
    task = TaskDefinition(input="{}", agent_id="svc", session_id=session_id)

    result = await asyncio.wait_for(driver.run(task), timeout=30)
    assert result.status is status, result
    if status is TaskStatus.FAILED:
        assert result.error_type == "ReplicaDiedError"
        assert "died 3 times (max_retries=2)" in (result.error or "")
    else:
        assert result.result == "done" and result.attempts == len(dead_replicas) + 1
    recorded = await control_plane.get_task(session_id, task.task_id)
    assert result.model_dump(exclude={"finished_at"}) == recorded.model_dump(
        exclude={"finished_at"}
    )
    await driver.drain()
