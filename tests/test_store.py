"""The control plane's state store, without Ray: a control plane started on the store another
one wrote takes everything back, and each commit holds one turn's changes."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import pytest

from llama_deploy_ray import InvalidRequestError, TaskDefinition, TaskStatus
from llama_deploy_ray._cluster.control_plane import ControlPlane
from llama_deploy_ray._cluster.store import open_store
from llama_deploy_ray._shared.errors import SessionNotFoundError
from llama_deploy_ray._shared.events import DROPPED_TYPE, TYPE_KEY
from llama_deploy_ray._shared.types import ServiceDefinition, StartedTask, TaskOutcome

from .fakes import begin

SECRET = b"k" * 32


def control_plane(store: str, secret: bytes = SECRET) -> ControlPlane:
    return ControlPlane(
        task_retention_s=60,
        session_retention_s=60,
        state_secret=secret,
        max_events_per_task=3,
        state_store=store,
    )


async def test_a_control_plane_on_the_same_store_takes_everything_back(tmp_path: Path) -> None:
    store = str(tmp_path / "state.sqlite3")
    first = control_plane(store)
    await first.register_service(ServiceDefinition(service_name="svc"), ["Ping"], '{"x": 1}')
    session = await first.create_session("kept")
    tasks = [TaskDefinition(input="{}", agent_id="svc", session_id="kept") for _ in range(4)]
    # one finished with state and more events than a stream keeps; one parked for input (it
    # keeps its place in the session's line); two waiting for their turn behind it
    await begin(first, tasks[0], "replica-1")
    await first.append_events(
        {tasks[0].task_id: [{TYPE_KEY: "Progress", "n": n} for n in range(5)]}
    )
    await first.finish_task(tasks[0].task_id, TaskOutcome(result="done", state={"count": 1}))
    await begin(first, tasks[1], "replica-1")
    snapshot = {"parked": True}
    await first.park_task(tasks[1].task_id, TaskOutcome(snapshot=snapshot, inbox_seq=0))
    await first.create_task(tasks[2], "replica-2")
    await first.create_task(tasks[3], "replica-2")
    before = await first.list_tasks("kept")

    second = control_plane(store, secret=b"other" * 8)
    assert gc.isenabled()  # the load holds the garbage collector off only while it runs
    assert await second.state_secret() == SECRET  # the stored key wins
    assert [s.service_name for s in await second.list_services()] == ["svc"]
    assert await second.deployments() == {"svc": '{"x": 1}'}
    assert (await second.get_session("kept")).task_ids == session.task_ids + [
        t.task_id for t in tasks
    ]
    assert await second.get_session_state("kept") == {"svc": {"count": 1}}
    assert await second.list_tasks("kept") == before
    events = (await second.read_events("kept", tasks[0].task_id, 0, 0)).events
    assert [e.get("n") for e in events] == [None, 2, 3, 4]  # the kept three after a marker
    assert events[0][TYPE_KEY] == DROPPED_TYPE
    # the parked task resumes from its snapshot when its event comes
    started = await second.deliver_event(
        "kept", tasks[1].task_id, "svc", {TYPE_KEY: "Ping"}, "replica-3"
    )
    assert started is not None and started.resume and started.state == snapshot
    with pytest.raises(InvalidRequestError, match="accepts no event"):
        await second.deliver_event("kept", tasks[1].task_id, "svc", {TYPE_KEY: "Pong"}, "x")
    await second.finish_task(tasks[1].task_id, TaskOutcome(result="answered"))
    # the next in line starts, for the driver that created it, from the stored state
    started = await asyncio.wait_for(second.start_task(tasks[2].task_id, "replica-2"), 5)
    assert started is not None and started.state == {"count": 1}
    await second.finish_task(tasks[2].task_id, TaskOutcome(result="again", state={"count": 2}))
    started = await asyncio.wait_for(second.start_task(tasks[3].task_id, "replica-2"), 5)
    assert started is not None and started.state == {"count": 2}


async def test_one_turn_of_changes_is_one_commit(tmp_path: Path) -> None:
    plane = control_plane(str(tmp_path / "state.sqlite3"))
    await plane.register_service(ServiceDefinition(service_name="svc"))
    before = (await plane.sizes())["store_commits"]
    await asyncio.gather(*(plane.create_session() for _ in range(50)))
    assert (await plane.sizes())["store_commits"] - before == 1


async def test_a_handlers_first_run_creates_its_session_in_the_same_commit(
    tmp_path: Path,
) -> None:
    store = str(tmp_path / "state.sqlite3")
    plane = control_plane(store)
    await plane.register_service(ServiceDefinition(service_name="svc"))
    before = (await plane.sizes())["store_commits"]
    task = TaskDefinition(input="{}", agent_id="svc", session_id="handler-new")
    (started,) = await plane.begin_tasks([(task, "d", False, True, True, None)])
    assert isinstance(started, StartedTask) and started.state is None
    assert (await plane.sizes())["store_commits"] - before == 1
    assert (await control_plane(store).get_session("handler-new")).task_ids == [task.task_id]
    # a task that is not a handler's run names an existing session
    other = TaskDefinition(input="{}", agent_id="svc", session_id="never-made")
    (refused,) = await plane.begin_tasks([(other, "d", False, False, True, None)])
    assert isinstance(refused, SessionNotFoundError)


async def one_finished_task(store: str, session_id: str) -> tuple[ControlPlane, str]:
    """A control plane on `store` with a service, a session and a task that finished with
    result 1 and state {"n": 1}."""
    plane = control_plane(store)
    await plane.register_service(ServiceDefinition(service_name="svc"))
    await plane.create_session(session_id)
    task = TaskDefinition(input="{}", agent_id="svc", session_id=session_id)
    await begin(plane, task, "d")
    await plane.finish_task(task.task_id, TaskOutcome(result=1, state={"n": 1}))
    return plane, task.task_id


async def test_a_finished_task_sent_again_is_not_applied_twice(tmp_path: Path) -> None:
    store = str(tmp_path / "state.sqlite3")
    plane, task_id = await one_finished_task(store, "s")
    await plane.finish_task(task_id, TaskOutcome(result=2, state={"n": 2}))  # a retry
    again = control_plane(store)
    result = await again.get_task("s", task_id)
    assert (result.status, result.result) == (TaskStatus.COMPLETED, 1)
    assert await again.get_session_state("s") == {"svc": {"n": 1}}


async def test_a_state_loaded_from_the_store_is_not_taken_for_none(tmp_path: Path) -> None:
    """Which task left a state is not stored: a restarted control plane says a stored state
    came from the store, never that there is none yet (a replica would run a task ahead from
    no state), and a driver that was sent it may then say it holds it."""
    store = str(tmp_path / "state.sqlite3")
    await one_finished_task(store, "s")
    again = control_plane(store)
    task = TaskDefinition(input="{}", agent_id="svc", session_id="s")
    (started,) = await again.begin_tasks([(task, "d", False, False, True, "")])
    assert isinstance(started, StartedTask) and started.state == {"n": 1}
    assert started.state_from not in ("", task.task_id, None)
    answer = await again.finish_tasks({task.task_id: TaskOutcome(result=2)}, hold_states=True)
    assert answer.not_latest == []  # a stateless outcome: the stored state is still the latest
    after = TaskDefinition(input="{}", agent_id="svc", session_id="s")
    (held,) = await again.begin_tasks([(after, "d", False, False, True, started.state_from)])
    assert isinstance(held, StartedTask) and held.state is None  # not sent: held there


async def test_deleted_records_leave_the_store(tmp_path: Path) -> None:
    store = str(tmp_path / "state.sqlite3")
    plane, _ = await one_finished_task(store, "gone")
    await plane.delete_session("gone")
    await plane.deregister_service("svc")
    records = open_store(store, "default")
    assert records is not None
    loaded = records.load()
    assert {t: v for t, v in loaded.tables.items() if t != "meta"} == {
        "service": {},
        "session": {},
        "task": {},
        "state": {},
    }
    assert loaded.events == {}


def test_an_unknown_store_is_named() -> None:
    with pytest.raises(InvalidRequestError, match="ftp://x"):
        open_store("ftp://x", "default")
