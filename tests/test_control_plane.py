"""The control plane's logic, called in-process: retention, outcomes, drivers and adoption, streams
and inboxes, one task per id, one run at a time per handler."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from llama_deploy_ray import (
    InvalidRequestError,
    TaskDefinition,
    TaskNotFoundError,
    TaskStateError,
)

from .fakes import begin

T = TypeVar("T")
SECRET = b"0123456789abcdef0123456789abcdef"


async def until(read: Callable[[], Awaitable[T]], done: Callable[[T], bool]) -> None:
    """Read until `done` holds, for 3 s at most (retention sweeps run on their own timer)."""

    async def poll() -> None:
        while not done(await read()):
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), timeout=3)


async def test_finished_tasks_and_idle_sessions_are_dropped_after_their_retention() -> None:
    from llama_deploy_ray._cluster.control_plane import ControlPlane
    from llama_deploy_ray._shared.types import ServiceDefinition, TaskOutcome

    control_plane = ControlPlane(task_retention_s=0.2, session_retention_s=0.4, state_secret=SECRET)
    await control_plane.register_service(ServiceDefinition(service_name="svc"))
    session = await control_plane.create_session()

    async def run_one() -> str:
        task = TaskDefinition(input="{}", agent_id="svc", session_id=session.session_id)
        await begin(control_plane, task, "driver")
        await control_plane.finish_task(task.task_id, TaskOutcome(result="ok"))
        return task.task_id

    old = [await run_one() for _ in range(5)]
    assert (await control_plane.sizes())["tasks"] == 5
    await asyncio.sleep(0.3)
    recent = await run_one()  # finishing a task drops what is past its retention
    assert [t.task_id for t in await control_plane.list_tasks(session.session_id)] == [recent]
    with pytest.raises(TaskNotFoundError):
        await control_plane.get_task(session.session_id, old[0])
    busy = await control_plane.create_session()  # idle as long, but a task still runs in it
    await begin(
        control_plane,
        TaskDefinition(input="{}", agent_id="svc", session_id=busy.session_id),
        "driver",
    )

    async def session_ids() -> set[str]:
        return {s.session_id for s in await control_plane.list_sessions()}

    assert await session_ids() == {session.session_id, busy.session_id}  # not idle yet
    # sessions are swept at most once per sweep interval (here the 0.4 s retention), by a
    # finish or by the timer, whichever comes first: gone within retention plus one interval
    await until(session_ids, lambda ids: session.session_id not in ids)
    assert await session_ids() == {busy.session_id}


async def test_outcomes_recorded_together_move_each_line_on_and_name_unknown_tasks() -> None:
    from llama_deploy_ray._cluster.control_plane import ControlPlane
    from llama_deploy_ray._shared.types import ServiceDefinition, TaskOutcome, TaskStatus

    control_plane = ControlPlane(task_retention_s=60, session_retention_s=60, state_secret=SECRET)
    await control_plane.register_service(ServiceDefinition(service_name="svc"))
    sessions = [await control_plane.create_session() for _ in range(2)]
    tasks = [TaskDefinition(input="{}", agent_id="svc", session_id=s.session_id) for s in sessions]
    for task in tasks:
        await begin(control_plane, task, "driver")
    later = TaskDefinition(input="{}", agent_id="svc", session_id=sessions[0].session_id)
    # a replica begins only what it can start now: the orchestrator queues the rest
    assert await begin(control_plane, later, "replica", queue=False) is None
    assert len(await control_plane.list_tasks(sessions[0].session_id)) == 1  # not recorded
    assert (await begin(control_plane, later, "driver")).status is TaskStatus.PENDING
    waiting = asyncio.create_task(control_plane.start_task(later.task_id, "driver"))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # in its session's line behind tasks[0]

    outcomes = {t.task_id: TaskOutcome(result=i, state={"n": i}) for i, t in enumerate(tasks)}
    problems = (
        await control_plane.finish_tasks({**outcomes, "gone": TaskOutcome(result=0)})
    ).problems

    assert len(problems) == 1 and "gone" in problems[0]
    for i, task in enumerate(tasks):
        result = await control_plane.get_task(task.session_id, task.task_id)
        assert (result.status, result.result) == (TaskStatus.COMPLETED, i)
    started = await asyncio.wait_for(waiting, 5)
    assert started is not None and started.state == {"n": 0}


async def test_a_driver_hears_of_its_cancelled_tasks_and_a_silent_drivers_tasks_are_adopted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from llama_deploy_ray._cluster import control_plane as _control_plane
    from llama_deploy_ray._shared.types import ServiceDefinition

    monkeypatch.setattr(_control_plane, "DRIVER_SILENCE_S", 0.2)
    control_plane = _control_plane.ControlPlane(
        task_retention_s=60, session_retention_s=60, state_secret=SECRET
    )
    await control_plane.register_service(ServiceDefinition(service_name="svc"))
    session = await control_plane.create_session()

    def new_task() -> TaskDefinition:
        return TaskDefinition(input="{}", agent_id="svc", session_id=session.session_id)

    cancelled, orphan, other_session_task = new_task(), new_task(), new_task()
    await begin(control_plane, cancelled, "api")
    watch = asyncio.ensure_future(control_plane.watch_driver("api", wait_s=5))
    await asyncio.sleep(0.05)
    assert not watch.done()  # nothing to say: the watch waits
    await control_plane.cancel_task(session.session_id, cancelled.task_id)
    notice = await asyncio.wait_for(watch, timeout=1)
    assert notice.cancelled == [cancelled.task_id]

    await control_plane.create_task(orphan, "dead")  # a driver that never watches again
    other = await control_plane.create_session()
    elsewhere = other_session_task.model_copy(
        update={"session_id": other.session_id, "task_id": str(uuid.uuid4())}
    )
    await control_plane.create_task(elsewhere, "dead")
    other_session_task = other_session_task.model_copy(update={"session_id": other.session_id})
    await control_plane.create_task(other_session_task, "api")
    queued_orphan = new_task()  # behind the first orphan in its session's line
    await control_plane.create_task(queued_orphan, "dead")
    await asyncio.sleep(0.3)
    await control_plane.watch_driver("api", wait_s=0)  # "api" is alive: it keeps watching
    notice = await control_plane.watch_driver("orchestrator", wait_s=0, adopt_orphans=True)
    # oldest first, across sessions
    assert notice.orphaned == [orphan.task_id, elsewhere.task_id, queued_orphan.task_id]
    # adopted once: a later watch finds nothing more
    notice = await control_plane.watch_driver("orchestrator", wait_s=0, adopt_orphans=True)
    assert notice.orphaned == []
    started = await control_plane.start_task(orphan.task_id, "orchestrator")
    assert started is not None and started.task.task_id == orphan.task_id


async def test_a_stream_drops_its_oldest_events_past_its_cap_and_an_inbox_refuses() -> None:
    from llama_deploy_ray._shared.events import DROPPED_TYPE, SEQ_KEY, TYPE_KEY, EventLog

    stream = EventLog(max_events=3)
    stream.extend({"n": i} for i in range(5))
    batch = await stream.read(after=0, wait_s=0)
    assert batch.events[0] == {TYPE_KEY: DROPPED_TYPE, "dropped": 2, SEQ_KEY: 2}
    assert [(e["n"], e[SEQ_KEY]) for e in batch.events[1:]] == [(2, 3), (3, 4), (4, 5)]
    assert [e["n"] for e in (await stream.read(after=3, wait_s=0)).events] == [3, 4]
    assert (await stream.read(after=1, wait_s=0)).events[0]["dropped"] == 1
    assert len(stream) == 5

    inbox = EventLog(max_events=2, full="refuse")
    inbox.extend([{"n": 0}, {"n": 1}])
    with pytest.raises(InvalidRequestError, match="the most one task takes"):
        inbox.extend([{"n": 2}])
    assert len(inbox) == 2


async def test_a_task_is_created_once_runs_under_one_owner_and_stays_in_its_session() -> None:
    from llama_deploy_ray._cluster.control_plane import ControlPlane
    from llama_deploy_ray._shared.types import ServiceDefinition

    control_plane = ControlPlane(task_retention_s=60, session_retention_s=60, state_secret=SECRET)
    await control_plane.register_service(ServiceDefinition(service_name="svc"))
    session, other = await control_plane.create_session(), await control_plane.create_session()
    task = TaskDefinition(input="{}", agent_id="svc", session_id=session.session_id)
    first = await control_plane.create_task(task, "driver")
    assert await control_plane.create_task(task, "another") == first  # a retry: the same task
    assert await begin(control_plane, task, "another") is None  # not started a second time
    with pytest.raises(InvalidRequestError, match="already exists"):
        await control_plane.create_task(task.model_copy(update={"input": '{"a": 1}'}), "driver")
    assert len(await control_plane.list_tasks(session.session_id)) == 1

    assert await control_plane.start_task(task.task_id, "another") is None  # not its owner
    started = await control_plane.start_task(task.task_id, "driver")
    assert started is not None and started.running.status.value == "running"

    foreign_child = TaskDefinition(
        input="{}", agent_id="svc", session_id=other.session_id, parent_task_id=task.task_id
    )
    with pytest.raises(InvalidRequestError, match="is not a task of session"):
        await control_plane.create_task(foreign_child, "driver")


async def test_retention_runs_on_a_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    from llama_deploy_ray._cluster import control_plane as _control_plane

    monkeypatch.setattr(_control_plane, "RETENTION_SWEEP_S", 0.1)
    control_plane = _control_plane.ControlPlane(
        task_retention_s=0.1, session_retention_s=0.2, state_secret=SECRET
    )
    await control_plane.ready()
    for _ in range(10):
        await control_plane.create_session()
    assert (await control_plane.sizes())["sessions"] == 10
    # no task ends: only the timer can forget them
    await until(control_plane.sizes, lambda sizes: sizes["sessions"] == 0)


async def test_its_timers_start_with_its_first_change_as_after_a_restart() -> None:
    """A restarted control plane is not sent `ready` again: retention and metrics must run
    all the same."""
    from llama_deploy_ray._cluster.control_plane import ControlPlane
    from llama_deploy_ray._shared.config import METRICS_REPORT_S

    control_plane = ControlPlane(task_retention_s=60, session_retention_s=60, state_secret=SECRET)
    await control_plane.create_session()  # counted, not yet handed to Ray
    await asyncio.sleep(METRICS_REPORT_S * 1.5)
    assert not control_plane._metrics._counts  # the reporter handed it over


async def test_a_held_state_is_checked_and_its_holder_told_when_it_is_outdated() -> None:
    """A driver holds the state its outcome left: the control plane answers which outcomes
    did not leave their session's latest, starts a task begun from the held state without
    sending it back, refuses (sends the latest) a begin from another, and tells the holder
    once a task of that session is created by another driver, or the session is deleted."""
    from llama_deploy_ray._cluster.control_plane import ControlPlane
    from llama_deploy_ray._shared.types import ServiceDefinition, StartedTask, TaskOutcome

    control_plane = ControlPlane(task_retention_s=60, session_retention_s=60, state_secret=SECRET)
    await control_plane.register_service(ServiceDefinition(service_name="svc"))
    session_id = (await control_plane.create_session()).session_id

    def task() -> TaskDefinition:
        return TaskDefinition(input="{}", agent_id="svc", session_id=session_id)

    async def notice(driver: str) -> list[tuple[str, str]]:
        watched = await control_plane.watch_driver(driver, 0.05)
        return watched.stale_states

    first, queued = task(), task()
    await begin(control_plane, first, "here")
    await begin(control_plane, queued, "here")  # behind it: the state `first` leaves is not
    answer = await control_plane.finish_tasks(
        {first.task_id: TaskOutcome(result=1, state={"n": 1})}, hold_states=True
    )
    assert answer.not_latest == [first.task_id]
    answer = await control_plane.finish_tasks(
        {queued.task_id: TaskOutcome(result=2, state={"n": 2})}, hold_states=True
    )
    assert answer.not_latest == []

    (started,) = await control_plane.begin_tasks(
        [(task(), "here", False, False, True, queued.task_id)]
    )
    assert isinstance(started, StartedTask) and started.state_from == queued.task_id
    assert started.state is None  # held there: not sent back
    await control_plane.finish_tasks(
        {started.task.task_id: TaskOutcome(result=3, state={"n": 3})}, hold_states=True
    )
    (stale,) = await control_plane.begin_tasks(
        [(task(), "here", False, False, True, queued.task_id)]
    )
    assert isinstance(stale, StartedTask) and stale.state == {"n": 3}  # the latest, sent
    await control_plane.finish_tasks({stale.task.task_id: TaskOutcome(result=4)}, hold_states=True)

    assert await notice("here") == []
    elsewhere = task()
    await begin(control_plane, elsewhere, "elsewhere")
    assert await notice("here") == [(session_id, "svc")]
    assert await notice("here") == []  # said once
    await control_plane.finish_task(elsewhere.task_id, TaskOutcome(result=0))
    other = task()
    await begin(control_plane, other, "here")
    await control_plane.finish_tasks({other.task_id: TaskOutcome(result=5)}, hold_states=True)
    await control_plane.delete_session(session_id)
    assert await notice("here") == [(session_id, "svc")]


async def test_a_handler_runs_once_at_a_time_whatever_its_session_holds(tmp_path: Path) -> None:
    """A handler's run is refused while any task of its session is unfinished (waiting for
    input, or on another service), also after a restart; its finished runs do not count."""
    from llama_deploy_ray._cluster.control_plane import ControlPlane
    from llama_deploy_ray._shared.types import ServiceDefinition, TaskOutcome

    store = str(tmp_path / "state.sqlite3")
    control_plane = ControlPlane(60, 60, SECRET, state_store=store)
    for name in ("svc", "other"):
        await control_plane.register_service(ServiceDefinition(service_name=name))
    session_id = (await control_plane.create_session("handler.h")).session_id

    def run(service: str = "svc") -> TaskDefinition:
        return TaskDefinition(input="{}", agent_id=service, session_id=session_id)

    for _ in range(3):
        done = run()
        await control_plane.create_task(done, "driver", handler=True)
        await control_plane.start_task(done.task_id, "driver")
        await control_plane.finish_task(done.task_id, TaskOutcome(result="ok"))
    waiting = run()
    await begin(control_plane, waiting, "driver")
    await control_plane.park_task(waiting.task_id, TaskOutcome(snapshot={}, inbox_seq=0))
    with pytest.raises(TaskStateError, match=f"already runs task {waiting.task_id}"):
        await control_plane.create_task(run(), "driver", handler=True)

    restarted = ControlPlane(60, 60, SECRET, state_store=store)
    with pytest.raises(TaskStateError, match=f"already runs task {waiting.task_id}"):
        await restarted.create_task(run("other"), "driver", handler=True)
    await restarted.cancel_task(session_id, waiting.task_id)
    elsewhere = run("other")  # a task of the session on another service, not a handler's
    await begin(restarted, elsewhere, "driver")
    with pytest.raises(TaskStateError, match=f"already runs task {elsewhere.task_id}"):
        await restarted.create_task(run(), "driver", handler=True)
    await restarted.finish_task(elsewhere.task_id, TaskOutcome(result="ok"))
    await restarted.create_task(run(), "driver", handler=True)
    assert len(await restarted.list_tasks(session_id)) == 6


async def test_the_sweep_forgets_sessions_by_last_activity_and_gives_memory_back_in_bulk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sessions are forgotten once idle past their retention, whenever they were created (a
    new task makes one active again); the freed memory is handed back (a full garbage
    collection, a pause as long as what the actor holds) once a quarter of the sessions are
    gone, not at every sweep that forgets a few."""
    from llama_deploy_ray._cluster import control_plane as _control_plane
    from llama_deploy_ray._shared.types import ServiceDefinition, TaskOutcome

    releases: list[int] = []
    monkeypatch.setattr(_control_plane, "_release_memory", lambda: releases.append(1))
    monkeypatch.setattr(_control_plane, "_freeze_survivors", lambda: None)
    monkeypatch.setattr(_control_plane.ControlPlane, "_start_timers", lambda self: None)
    control_plane = _control_plane.ControlPlane(
        task_retention_s=0.05, session_retention_s=2.0, state_secret=SECRET
    )
    await control_plane.register_service(ServiceDefinition(service_name="svc"))

    async def sweep() -> set[str]:
        control_plane._next_session_sweep = 0.0  # the timer's next sweep, now
        control_plane._drop_expired()
        return {s.session_id for s in await control_plane.list_sessions()}

    old = [(await control_plane.create_session()).session_id for _ in range(4)]
    await asyncio.sleep(1.0)
    task = TaskDefinition(input="{}", agent_id="svc", session_id=old[0])
    await begin(control_plane, task, "driver")  # the first session created is active again
    await control_plane.finish_task(task.task_id, TaskOutcome(result="ok"))
    new = {(await control_plane.create_session()).session_id for _ in range(28)}
    await asyncio.sleep(1.3)  # the old ones idle past their retention, the new ones not yet
    assert await sweep() == {old[0], *new}  # 3 of 32 forgotten: memory not handed back yet
    assert releases == []
    await asyncio.sleep(1.0)
    assert await sweep() == set()
    assert releases == [1]


class _Node:
    """Something to make a reference cycle of, and watch with a weak reference."""

    link: _Node | None = None


@pytest.mark.gc_freeze
async def test_the_sweep_freezes_what_is_held_and_records_are_freed_without_a_collection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Python's full collections walk every object tracked, a second per 100,000 sessions and
    tasks held: the sweep freezes what is held, after collecting the garbage (which is not
    frozen with it). That is sound because a forgotten record is freed at once, by reference
    counting (it holds no cycle). Cycles formed among frozen objects wait for the next time
    memory is handed back, which collects the frozen too."""
    import gc
    import weakref

    from llama_deploy_ray._cluster import control_plane as _control_plane
    from llama_deploy_ray._shared.types import ServiceDefinition, TaskOutcome

    monkeypatch.setattr(_control_plane.ControlPlane, "_start_timers", lambda self: None)
    control_plane = _control_plane.ControlPlane(
        task_retention_s=0.5, session_retention_s=3600.0, state_secret=SECRET
    )
    await control_plane.register_service(ServiceDefinition(service_name="svc"))

    def sweep() -> None:
        control_plane._next_session_sweep = 0.0  # the timer's next sweep, now
        control_plane._drop_expired()

    async def finished_task() -> TaskDefinition:
        session_id = (await control_plane.create_session()).session_id
        task = TaskDefinition(input="{}", agent_id="svc", session_id=session_id)
        await begin(control_plane, task, "driver")
        await control_plane.finish_task(task.task_id, TaskOutcome(result="ok", state={"n": 1}))
        return task

    try:
        tasks = [await finished_task() for _ in range(20)]
        record = weakref.ref(control_plane._tasks[tasks[0].task_id])
        garbage = _Node()
        garbage.link = garbage
        collected = weakref.ref(garbage)
        del garbage
        sweep()
        assert collected() is None  # garbage collected, not frozen
        assert gc.get_freeze_count() > 0
        assert not any(o is record() for o in gc.get_objects())  # frozen: out of a walk's way

        cycle_to_be = _Node()
        frozen = weakref.ref(cycle_to_be)
        sweep()
        await asyncio.sleep(0.6)
        control_plane._drop_expired()  # the tasks are past their retention: forgotten
        assert tasks[0].task_id not in control_plane._tasks
        assert record() is None  # freed at once, though frozen: no cycle held it

        cycle_to_be.link = cycle_to_be
        del cycle_to_be
        gc.collect()
        assert frozen() is not None  # a cycle of frozen objects is out of a collection's way
        for task in tasks:  # every session gone: memory handed back, the frozen collected
            await control_plane.delete_session(task.session_id or "")
        sweep()
        assert frozen() is None
    finally:
        gc.unfreeze()


async def test_the_latest_task_of_each_handler_filtered_by_status_and_service(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`GET /handlers` asks for the latest run of each handler session, in the order they were
    created, filtered where they are kept, a page at a time; one asked for what runs reads the
    lines, not every session kept, and a long listing lets other calls in every
    `LISTING_SLICE` sessions."""
    from llama_deploy_ray._cluster import control_plane as _control_plane
    from llama_deploy_ray._shared.handlers import HANDLER_SESSION_PREFIX, session_of
    from llama_deploy_ray._shared.types import ServiceDefinition, TaskOutcome, TaskStatus

    control_plane = _control_plane.ControlPlane(60, 60, SECRET)
    for service in ("svc", "other"):
        await control_plane.register_service(ServiceDefinition(service_name=service))

    async def run(handler: str, service: str = "svc") -> str:
        task = TaskDefinition(input="{}", agent_id=service, session_id=session_of(handler))
        await control_plane.create_task(task, "driver", handler=True)
        return task.task_id

    async def finish(task_id: str, **outcome: str) -> None:
        await control_plane.start_task(task_id, "driver")
        await control_plane.finish_task(task_id, TaskOutcome(**outcome))

    await finish(await run("done"), result="first")
    again = await run("done")  # its latest run counts, not its first
    await finish(again, result="second")
    running = await run("running")
    await control_plane.start_task(running, "driver")
    pending = await run("pending")
    await finish(await run("failed", "other"), error="boom")
    plain = await control_plane.create_session()  # not a handler's: never listed
    await begin(
        control_plane,
        TaskDefinition(input="{}", agent_id="svc", session_id=plain.session_id),
        "driver",
    )

    async def latest(
        statuses: set[TaskStatus] | None = None, services: set[str] | None = None
    ) -> list[str]:
        found: list[str] = []
        after: int | None = -1
        while after is not None:
            page, after = await control_plane.latest_tasks(
                HANDLER_SESSION_PREFIX, statuses, services, after
            )
            found += [t.task_id for t in page]
        return found

    unfinished = {TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.WAITING}
    everything = await latest()
    assert everything[:3] == [again, running, pending] and len(everything) == 4
    assert await latest(unfinished) == [running, pending]
    assert await latest({TaskStatus.RUNNING}) == [running]
    assert await latest({TaskStatus.COMPLETED}) == [again]
    assert await latest(services={"other"}) == everything[3:]
    assert await latest({TaskStatus.COMPLETED}, {"other"}) == []
    assert await latest(set()) == []  # only statuses outside the four were asked for
    monkeypatch.setattr(_control_plane, "LISTING_SLICE", 1)
    assert await latest() == everything
    monkeypatch.setattr(_control_plane, "LISTING_PAGE", 1)  # a call per task
    page, after = await control_plane.latest_tasks(HANDLER_SESSION_PREFIX, None, None)
    assert [t.task_id for t in page] == everything[:1] and after is not None
    assert await latest() == everything
    assert await latest(unfinished) == [running, pending]
    await finish(running, result="ok")
    assert await latest(unfinished) == [pending]


async def test_a_finished_task_and_its_session_cost_a_few_kilobytes_while_kept() -> None:
    """What a deployment holds grows with `task_retention_s` and `session_retention_s` (an
    hour and a day by default): a finished task keeps no event or empty log of its own (as
    measured here, 8.2 KB per session and task when each did, 5.0 KB since), and one waited on
    answers at once."""
    import gc
    import tracemalloc

    from llama_deploy_ray._cluster import control_plane as _control_plane
    from llama_deploy_ray._shared.types import ServiceDefinition, TaskOutcome, TaskStatus

    control_plane = _control_plane.ControlPlane(
        task_retention_s=3600.0, session_retention_s=3600.0, state_secret=SECRET
    )
    await control_plane.register_service(ServiceDefinition(service_name="svc"))

    async def finished_tasks(count: int) -> list[TaskDefinition]:
        tasks = []
        for _ in range(count):
            session_id = (await control_plane.create_session()).session_id
            tasks.append(TaskDefinition(input='{"a": 1}', agent_id="svc", session_id=session_id))
        await control_plane.begin_tasks([(t, "driver", False, True, True, "") for t in tasks])
        outcome = TaskOutcome(result="a_result", state={"state_data": {"n": 1}})
        await control_plane.finish_tasks({t.task_id: outcome for t in tasks}, True)
        return tasks

    await finished_tasks(200)  # the first of everything (caches, tables) before counting
    count = 2000
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tasks = await finished_tasks(count)
        gc.collect()
        per_task = (tracemalloc.get_traced_memory()[0] - before) / count
    finally:
        tracemalloc.stop()
    assert per_task < 6500, f"{per_task:.0f} bytes per finished task and its session"

    task = tasks[0]
    result = await asyncio.wait_for(
        control_plane.get_task(task.session_id or "", task.task_id, 30.0), timeout=1
    )
    assert result is not None and result.status is TaskStatus.COMPLETED
