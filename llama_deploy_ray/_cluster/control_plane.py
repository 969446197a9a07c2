"""The control plane: a named, detached, async Ray actor holding the registry of services and
sessions, every task's record and result, and each session's workflow state per service.

It is also the sequencer that keeps a session's tasks on one service in submission order:
`start_task` returns when the task reaches the head of its (session, service) line, and
`finish_task` (or `cancel_task`) moves the line on. A task waiting for input keeps its place.
Each task has an event stream and an inbox (see `_events`). Each task also has an owner, the
driver (see `_driver`) that drives it: the driver's open `watch_driver` call is its heartbeat
and how it learns which of its tasks were cancelled; a driver whose own event loop may be
blocked by a workflow step (a replica) also beats `heartbeat` from a thread, so a slow step is
never taken for a dead replica. Everything here is in-memory dict work with no awaits in the
middle of an update, so each method is atomic on the actor's event loop.

A core may run several of these actors, shards (`ControlPlaneConfig.shards`): each holds the
sessions whose id hashes to it, with their tasks, events and state, and keeps a copy of the
registry of services. A session's tasks, its nested tasks included, never leave its shard, so
everything above holds per shard without any call between shards (see `_actors`).

Every change is also written through to a state store (see `_store`) before the call that made
it returns: the changes of one turn of the event loop go in one transaction (group commit),
and commits are made in order, so a task's outcome and its session's new state are stored
together before the session's next task can start. A control plane (re)started on a store
loads what it holds: unfinished tasks go back in their lines, owned by their old drivers, and
are adopted by the orchestrator if those stay silent.

Calls that wait (a task's turn, result long polls, stream and inbox reads, driver watches) hold
one of the actor's concurrency slots while they wait; the actor is started with enough slots
(`ACTOR_MAX_CONCURRENCY`) that waits never starve the short calls. Ray's concurrency
groups would give waits their own slots, but each group runs on its own event loop thread,
and every method here relies on sharing one loop with the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import itertools
import json
import logging
import math
import resource
import sys
import time
import uuid
from collections import deque
from typing import Any

from .._shared.config import DRIVER_SILENCE_S, METRICS_REPORT_S, RETENTION_SWEEP_S
from .._shared.errors import (
    ControlPlaneUnavailableError,
    InvalidRequestError,
    LlamaDeployError,
    ServiceConflictError,
    ServiceNotFoundError,
    SessionNotFoundError,
    TaskNotFoundError,
    TaskStateError,
)
from .._shared.events import TYPE_KEY, EventBatch, EventLog
from .._shared.types import (
    DriverNotice,
    FinishedTasks,
    ServiceDefinition,
    SessionDefinition,
    StartedTask,
    TaskDefinition,
    TaskOutcome,
    TaskResult,
    TaskStatus,
)
from .call_socket import Address, CallServer
from .metrics import ControlPlaneMetrics, count_calls
from .scheduling import yield_on_wakeup
from .store import (
    Batch,
    EventAppend,
    EventLogName,
    Records,
    StoredService,
    StoredSession,
    StoredTask,
    Table,
    open_store,
)

logger = logging.getLogger(__name__)

# a listing's sessions read between its turns on the event loop, and tasks answered per call:
# each a few milliseconds of the actor's time, whatever the whole listing holds
LISTING_SLICE = 5000
LISTING_PAGE = 5000
_LOADED_STATE = "(loaded from the store)"  # no task id looks like this
_UNFINISHED = (TaskStatus.PENDING.value, TaskStatus.RUNNING.value, TaskStatus.WAITING.value)
_PairKey = tuple[str, str]
_Key = tuple[Table, str]


# The `turn` and `done` of every final task: kept for `task_retention_s`, a finished task need
# not hold two events (and their waiter queues) of its own. Never cleared; an event binds to no
# loop until it has a waiter to wake, and a set one never has.
_FINAL = asyncio.Event()
_FINAL.set()


class _Session:
    def __init__(self, definition: SessionDefinition, order: int) -> None:
        self.definition = definition
        self.order = order
        self.task_ids: dict[str, None] = {}  # in submission order
        # the services on which its unfinished tasks wait or run: its lines in `_lines`
        self.lines: dict[str, None] = {}
        self.state: dict[str, dict[str, Any]] = {}
        # per service: the task whose outcome left its state, and the driver told it holds
        # that state as the latest (see `finish_tasks`); neither is stored, both start empty
        self.state_from: dict[str, str] = {}
        self.held_by: dict[str, str] = {}
        self.last_active = time.monotonic()


class _Driver:
    def __init__(self) -> None:
        self.cancelled: list[str] = []  # its running tasks cancelled since its last watch
        self.stale_states: list[tuple[str, str]] = []  # (session, service) since then
        self.wake = asyncio.Event()
        self.watching = 0
        self.last_seen = time.monotonic()

    def silent(self, now: float) -> bool:
        return not self.watching and now - self.last_seen > DRIVER_SILENCE_S


class _Task:
    def __init__(
        self,
        definition: TaskDefinition,
        service_name: str,
        owner: str,
        max_events: int,
        order: int,
    ) -> None:
        self.definition = definition
        self.order = order
        self.owner = owner  # the id of the driver driving it
        self.result = TaskResult(
            task_id=definition.task_id,
            session_id=definition.session_id,
            service_name=service_name,
            parent_task_id=definition.parent_task_id,
            status=TaskStatus.PENDING,
        )
        self.done = asyncio.Event()
        self.turn = asyncio.Event()
        self.stream = EventLog(max_events=max_events)
        self.inbox = EventLog(max_events=max_events, full="refuse")
        self.children: list[str] = []
        self.snapshot: dict[str, Any] | None = None  # while waiting for input
        self.inbox_seq = 0

    def update(self, **fields: Any) -> TaskResult:
        self.result = self.result.model_copy(update=fields)
        return self.result

    def stored(self) -> StoredTask:
        return StoredTask(
            order=self.order,
            definition=self.definition,
            result=self.result,
            owner=self.owner,
            children=self.children,
            snapshot=self.snapshot,
            inbox_seq=self.inbox_seq,
        )


@count_calls
class ControlPlane:
    def __init__(
        self,
        task_retention_s: float,
        session_retention_s: float,
        state_secret: bytes,
        max_events_per_task: int = 10_000,
        state_store: str = "memory",
        namespace: str = "default",
        shard: int = 0,
        shards: int = 1,
    ) -> None:
        self._shards = shards
        self._incarnation = uuid.uuid4().hex
        self._task_retention_s = task_retention_s
        self._session_retention_s = session_retention_s
        self._state_secret = state_secret
        self._max_events = max_events_per_task
        # final tasks, oldest first, dropped `task_retention_s` after they ended
        self._finished: deque[tuple[float, str]] = deque()
        self._next_session_sweep = 0.0
        self._services: dict[str, StoredService] = {}
        self._sessions: dict[str, _Session] = {}
        # session ids, least recently active first: the retention sweep reads only the idle
        self._by_activity: dict[str, None] = {}
        # the most sessions held since memory was last given back (see `_drop_expired`)
        self._peak_sessions = 0
        self._tasks: dict[str, _Task] = {}
        self._order = itertools.count()  # creation order of sessions and tasks
        # task ids waiting or running, per (session, service), head first
        self._lines: dict[_PairKey, deque[str]] = {}
        self._drivers: dict[str, _Driver] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._metrics = ControlPlaneMetrics(shard)
        self._reporter: asyncio.Task[None] | None = None
        # write-through: what changed since the last commit, and the commit that will take it
        self._store = open_store(state_store, namespace, shard)
        self._dirty: dict[_Key, None] = {}
        self._appends: list[EventAppend] = []
        self._next_commit: asyncio.Future[None] | None = None
        self._writer_wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._commits = self._rows_written = 0
        if self._store is not None:
            records = self._store.load()
            # records are millions of objects, which the automatic collections would walk
            # again and again as they come, and then once more in full: 100,000 sessions and
            # tasks took 5.3 s and a 0.6 s pause after; without them, then frozen, 3.1 s
            collecting = gc.isenabled()
            gc.disable()
            try:
                self._load(records)
            finally:
                if collecting:
                    gc.enable()
            del records
            _freeze_survivors()
        self._calls = CallServer(self, type(self), self._state_secret)  # the stored one, if any
        self._mark(("meta", "secret"), ("meta", "shards"))

    async def ready(self) -> bool:
        await self._persist()
        return True

    async def shard_count(self) -> int:
        """How many control-plane actors the sessions are spread over (see `_actors`)."""
        return self._shards

    async def call_socket(self) -> tuple[Address, bytes]:
        """Where this actor takes the calls of every process (see `_call_socket`), and the
        secret a connection proves it knows."""
        return await self._calls.address(), self._state_secret

    async def state_secret(self) -> bytes:
        """The key replicas sign pickled workflow state with (see `_state_serializer`); it is
        stored, so state signed before a restart of the cluster still verifies after it."""
        await self._persist()
        return self._state_secret

    # services

    async def register_service(
        self,
        definition: ServiceDefinition,
        accepted_events: list[str] | None = None,
        deployment: str | None = None,
    ) -> ServiceDefinition:
        """Register a service; `accepted_events` names the event classes its workflow takes
        from clients (None: not known), `deployment` is what redeploys it (see `_deploy`)."""
        existing = self._services.get(definition.service_name)
        if existing is not None and existing.definition != definition:
            raise ServiceConflictError(
                f"a different service is already registered as {definition.service_name!r} "
                f"({existing.definition.model_dump()}); deregister it first or pick another name"
            )
        stored = existing or StoredService(definition=definition)
        if accepted_events is not None:
            stored.accepted_events = sorted(accepted_events)
        if deployment is not None:
            stored.deployment = deployment
        self._services[definition.service_name] = stored
        await self._persist(("service", definition.service_name))
        return definition

    async def deregister_service(self, service_name: str) -> None:
        if self._services.pop(service_name, None) is None:
            raise ServiceNotFoundError(service_name)
        await self._persist(("service", service_name))

    async def get_service(self, service_name: str) -> ServiceDefinition:
        try:
            return self._services[service_name].definition
        except KeyError:
            raise ServiceNotFoundError(service_name) from None

    async def list_services(self) -> list[ServiceDefinition]:
        return [s.definition for s in self._services.values()]

    async def service_tasks(self, service_name: str) -> dict[str, int]:
        """The service's unfinished tasks, counted by status."""
        if service_name not in self._services:
            raise ServiceNotFoundError(service_name)
        counts = dict.fromkeys(_UNFINISHED, 0)
        # a line holds its (session, service) pair's unfinished tasks
        for (_, line_service), line in self._lines.items():
            if line_service == service_name:
                for task_id in line:
                    counts[self._tasks[task_id].result.status.value] += 1
        return counts

    async def deployments(self) -> dict[str, str]:
        """What redeploys each service, by name, for those registered with one."""
        return {n: s.deployment for n, s in self._services.items() if s.deployment is not None}

    # sessions

    async def create_session(self, session_id: str | None = None) -> SessionDefinition:
        if session_id is not None and session_id in self._sessions:
            raise InvalidRequestError(
                f"session {session_id!r} already exists; use get_or_create_session to reuse it"
            )
        definition = SessionDefinition(session_id=session_id) if session_id else SessionDefinition()
        self._add_session(definition)
        await self._persist()
        return definition

    async def get_or_create_session(self, session_id: str) -> SessionDefinition:
        if session_id in self._sessions:
            return self._session_definition(session_id)
        return await self.create_session(session_id)

    def _add_session(self, definition: SessionDefinition) -> None:
        session = _Session(definition, next(self._order))
        self._sessions[definition.session_id] = session
        self._touch(session)
        self._mark(("session", definition.session_id))

    def _touch(self, session: _Session) -> None:
        """The session is active now: its idle time starts again."""
        session.last_active = time.monotonic()
        self._by_activity.pop(session.definition.session_id, None)
        self._by_activity[session.definition.session_id] = None

    async def get_session(self, session_id: str) -> SessionDefinition:
        return self._session_definition(session_id)

    async def list_sessions(
        self, offset: int = 0, limit: int | None = None
    ) -> list[SessionDefinition]:
        """Sessions in the order they were created, `limit` of them from `offset`."""
        ids = itertools.islice(self._sessions, offset, None if limit is None else offset + limit)
        return [self._session_definition(sid) for sid in ids]

    async def delete_session(self, session_id: str) -> None:
        session = self._session(session_id)
        self._forget_session(session)
        changed: list[_Key] = [("session", session_id)]
        changed += [("state", _state_key(session_id, s)) for s in session.state]
        for task_id in session.task_ids:
            task = self._tasks.get(task_id)
            if task is not None and task.result.status.is_final:
                del self._tasks[task_id]
                changed.append(("task", task_id))
        await self._persist(*changed)

    async def sizes(self) -> dict[str, int]:
        """How much the control plane holds (for monitoring and the benchmarks)."""
        return {
            "services": len(self._services),
            "sessions": len(self._sessions),
            "tasks": len(self._tasks),
            "finished_tasks": len(self._finished),
            "drivers": len(self._drivers),
            "rss_bytes": _rss_bytes(),
            "store_commits": self._commits,
            "store_rows_written": self._rows_written,
        }

    async def get_session_state(self, session_id: str) -> dict[str, dict[str, Any]]:
        return dict(self._session(session_id).state)

    # tasks

    async def create_task(
        self, task: TaskDefinition, owner: str, handler: bool = False
    ) -> TaskResult:
        """Record a task and put it in its session's line for its service; `owner` is the id
        of the driver that will drive it. `handler` says it is a run of a workflow-server
        handler: its session is created if new (one call, not two, per run of a new handler),
        and it is refused (`TaskStateError`) while another task of the session is unfinished
        (a handler runs once at a time).

        A task whose id this session already has is not created again: its existing record is
        returned, so a client that retries after a timeout or a cut connection never runs the
        work twice."""
        record = self._create_task(task, owner, handler)
        await self._persist(("task", task.task_id))
        return record.result

    def _create_task(self, task: TaskDefinition, owner: str, handler: bool = False) -> _Task:
        service_name = task.agent_id
        if not service_name:
            raise InvalidRequestError("the task names no service: set agent_id")
        if handler and task.session_id and task.session_id not in self._sessions:
            self._add_session(SessionDefinition(session_id=task.session_id))
        session = self._session(task.session_id or "")
        existing = self._tasks.get(task.task_id)
        if existing is not None:
            if existing.definition != task:
                raise InvalidRequestError(
                    f"a different task with id {task.task_id!r} already exists; a task id "
                    "names one task: leave it out to get a new one"
                )
            return existing
        if service_name not in self._services:
            raise ServiceNotFoundError(service_name)
        if handler and session.lines:
            line = self._lines[(session.definition.session_id, next(iter(session.lines)))]
            raise TaskStateError(
                f"session {task.session_id!r} already runs task {line[0]}: one at a time"
            )
        parent = None
        if task.parent_task_id is not None:
            parent = self._tasks.get(task.parent_task_id)
            if parent is None or parent.definition.session_id != session.definition.session_id:
                raise InvalidRequestError(
                    f"parent task {task.parent_task_id!r} is not a task of session "
                    f"{session.definition.session_id!r}"
                )
        record = _Task(task, service_name, owner, self._max_events, next(self._order))
        self._heard_from(owner)
        if parent is not None:
            parent.children.append(task.task_id)
            self._mark(("task", parent.definition.task_id))
        self._tasks[task.task_id] = record
        session.task_ids[task.task_id] = None
        self._outdate_held_state(session, service_name, owner)
        self._touch(session)
        if self._join_line(session.definition.session_id, service_name, task.task_id):
            record.turn.set()
        return record

    def _join_line(self, session_id: str, service_name: str, task_id: str) -> bool:
        """Put an unfinished task at the end of its session's line on its service; True when
        it is first (its turn has come)."""
        line = self._lines.setdefault((session_id, service_name), deque())
        line.append(task_id)
        if session := self._sessions.get(session_id):
            session.lines[service_name] = None
        return len(line) == 1

    async def start_task(self, task_id: str, owner: str) -> StartedTask | None:
        """Wait for the task's turn, mark it running (driven by `owner`) and return the state
        it starts from; None if it was cancelled meanwhile, or if another driver owns it (a
        task runs once at a time: only its owner, or the driver that adopted it, starts it)."""
        record = self._task(task_id)
        await record.turn.wait()
        started = self._start(record, owner)
        await self._persist(("task", task_id))
        return started

    async def begin_tasks(
        self, begins: list[tuple[TaskDefinition, str, bool, bool, bool, str | None]]
    ) -> list[StartedTask | TaskResult | LlamaDeployError | None]:
        """For each `(task, owner, resent, handler, queue, held)`: `create_task`, and
        `start_task` when the task's turn has come, all in one call and one commit. Each answer
        is the task started (`StartedTask`); its pending result when it waits for its turn (its
        driver starts it with `start_task`); None for a task that already existed (a client's
        retry: the first request's driver runs it), or that would wait for its turn when
        `queue` is false (then it is not recorded); or the error that refused it. `resent` says
        the driver sends this call again because it got no answer (the control plane
        restarted): the task it may have begun is its own. `handler` as in `create_task`.
        `held`: the driver holds the state task `held` left ('' for none); if the task starts
        from that state, it is not sent back."""
        answers: list[StartedTask | TaskResult | LlamaDeployError | None] = []
        for task, owner, resent, handler, queue, held in begins:
            try:
                answers.append(self._begin(task, owner, resent, handler, queue, held))
            except LlamaDeployError as exc:
                answers.append(exc)
        await self._persist(*(("task", task.task_id) for task, *_ in begins))
        return answers

    def _begin(
        self,
        task: TaskDefinition,
        owner: str,
        resent: bool,
        handler: bool,
        queue: bool,
        held: str | None,
    ) -> StartedTask | TaskResult | None:
        existing = self._tasks.get(task.task_id)
        line = self._lines.get((task.session_id or "", task.agent_id or ""))
        if existing is None and not queue and line:
            return None  # another task of its session is ahead of it on the service
        record = self._create_task(task, owner, handler)  # refuses another task, same id
        if existing is not None and not (resent and existing.owner == owner):
            return None
        answer = self._start(record, owner, held) if record.turn.is_set() else record.result
        if held is not None:  # the run started ahead: from the latest state, or run again
            ahead = isinstance(answer, StartedTask) and answer.state_from == held
            self._metrics.run_ahead(task.agent_id or "", ahead)
        return answer

    def _start(self, record: _Task, owner: str, held: str | None = None) -> StartedTask | None:
        if record.result.status.is_final or record.owner != owner:
            return None
        if not record.result.attempts:
            self._metrics.task_started(
                record.result.service_name or "", time.time() - record.result.created_at
            )
        record.update(status=TaskStatus.RUNNING, attempts=record.result.attempts + 1)
        service_name = record.result.service_name or ""
        session = self._sessions.get(record.definition.session_id or "")
        state_from = session.state_from.get(service_name, "") if session else ""
        state = session.state.get(service_name) if session and held != state_from else None
        return StartedTask(
            task=record.definition, running=record.result, state=state, state_from=state_from
        )

    async def record_retry(self, task_id: str) -> None:
        record = self._task(task_id)
        record.update(attempts=record.result.attempts + 1)
        await self._persist(("task", task_id))

    async def park_task(self, task_id: str, outcome: TaskOutcome) -> StartedTask | None:
        """The task waits for input: keep its snapshot, free its replica. If an event
        arrived while it was being parked, return it to be resumed at once."""
        record = self._task(task_id)
        if record.result.status.is_final or record.result.status is TaskStatus.WAITING:
            return None  # a park sent again after it was recorded
        self._append_events(record, outcome.events)
        record.snapshot, record.inbox_seq = outcome.snapshot, outcome.inbox_seq
        record.update(status=TaskStatus.WAITING)
        started = self._resume(record) if len(record.inbox) > record.inbox_seq else None
        await self._persist(("task", task_id))
        return started

    async def deliver_event(
        self, session_id: str, task_id: str, service_name: str, event: dict[str, Any], owner: str
    ) -> StartedTask | None:
        """Put `event` in the task's inbox; if the task was waiting, return it to be resumed
        by `owner`."""
        record = self._task_in_session(session_id, task_id)
        if record.result.service_name != service_name:
            raise InvalidRequestError(
                f"task {task_id} runs on service {record.result.service_name!r}, "
                f"not {service_name!r}"
            )
        if record.result.status.is_final:
            raise TaskStateError(
                f"task {task_id} is {record.result.status.value}: it takes no more events"
            )
        service = self._services.get(service_name)
        accepted = service.accepted_events if service is not None else None
        if accepted is not None and event.get(TYPE_KEY) not in accepted:
            raise InvalidRequestError(
                f"service {service_name!r} accepts no event of type {event.get(TYPE_KEY)!r}; "
                f"it accepts {accepted}"
            )
        self._extend(record, "inbox", [event])
        started = None
        if record.result.status is TaskStatus.WAITING:
            record.owner = owner
            started = self._resume(record)
        await self._persist(("task", task_id))
        return started

    async def read_inbox(self, task_id: str, after: int, wait_s: float) -> EventBatch:
        return await self._task(task_id).inbox.read(after, wait_s)

    async def append_events(self, events: dict[str, list[dict[str, Any]]]) -> None:
        """Add what the tasks' workflows streamed, by task id (one replica's runs); a nested
        task's events reach its parents. A task no longer here (it expired) is skipped."""
        for task_id, streamed in events.items():
            record = self._tasks.get(task_id)
            if record is None:
                logger.warning("dropped %d events of task %s: no such task", len(streamed), task_id)
                continue
            self._append_events(record, streamed)
        await self._persist()

    async def read_events(
        self, session_id: str, task_id: str, after: int, wait_s: float
    ) -> EventBatch:
        return await self._task_in_session(session_id, task_id).stream.read(after, wait_s)

    async def cancel_task(self, session_id: str, task_id: str) -> TaskResult:
        """Cancel the task and its unfinished children; the drivers of those running are told,
        to stop their replica calls."""
        record = self._task_in_session(session_id, task_id)
        if record.result.status.is_final:
            raise TaskStateError(f"task {task_id} is already {record.result.status.value}")
        todo = [record]
        changed: list[_Key] = []
        while todo:
            task = todo.pop()
            todo.extend(self._tasks[c] for c in task.children if c in self._tasks)
            driver = self._drivers.get(task.owner)
            if task.result.status is TaskStatus.RUNNING and driver is not None:
                driver.cancelled.append(task.definition.task_id)
                driver.wake.set()
            if not task.result.status.is_final:
                self._close(task, status=TaskStatus.CANCELLED, error="cancelled by a client")
                changed.append(("task", task.definition.task_id))
        await self._persist(*changed)
        return record.result

    async def finish_task(self, task_id: str, outcome: TaskOutcome) -> TaskResult:
        """Record the task's outcome and state (stored together), then let the next task in
        its line start. An outcome for a task already final (cancelled while it ran, or sent
        again by a replica's retry) is ignored."""
        record = self._finish(task_id, outcome)
        await self._persist()
        return record.result

    async def finish_tasks(
        self, outcomes: dict[str, TaskOutcome], hold_states: bool = False
    ) -> FinishedTasks:
        """`finish_task` for each task, in one call and one commit; answers what could not be
        recorded (a task this control plane does not know: it was forgotten since). With
        `hold_states`, the driver holds the states these outcomes leave: the answer says which
        are not the latest, and the driver is told (`watch_driver`) once a task of the
        session and service of one that is gets created elsewhere."""
        answer = FinishedTasks(incarnation=self._incarnation)
        for task_id, outcome in outcomes.items():
            try:
                applied = not self._task(task_id).result.status.is_final
                record = self._finish(task_id, outcome)
            except TaskNotFoundError as exc:
                answer.problems.append(f"task {task_id}: {exc}")
                answer.not_latest.append(task_id)
                continue
            if not hold_states:
                continue
            session_id = record.definition.session_id or ""
            service_name = record.result.service_name or ""
            session = self._sessions.get(session_id)
            if applied and session and (session_id, service_name) not in self._lines:
                session.held_by[service_name] = record.owner
            else:
                answer.not_latest.append(task_id)
        await self._persist()
        return answer

    def _finish(self, task_id: str, outcome: TaskOutcome) -> _Task:
        record = self._task(task_id)
        if record.result.status.is_final:
            return record
        self._append_events(record, outcome.events)
        session_id, service_name = record.definition.session_id or "", record.result.service_name
        session = self._sessions.get(session_id)
        if session is not None and outcome.state is not None:
            session.state[service_name or ""] = outcome.state
            session.state_from[service_name or ""] = task_id
            self._mark(("state", _state_key(session_id, service_name or "")))
        self._close(record, **outcome.final_fields())
        self._mark(("task", task_id))
        return record

    async def get_task(self, session_id: str, task_id: str, wait_s: float = 0.0) -> TaskResult:
        """The task's result; with `wait_s`, first wait up to that long for it to finish."""
        record = self._task_in_session(session_id, task_id)
        if wait_s > 0 and not record.done.is_set():
            timeout = None if math.isinf(wait_s) else wait_s
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(record.done.wait(), timeout=timeout)
        return record.result

    async def list_tasks(
        self, session_id: str, offset: int = 0, limit: int | None = None
    ) -> list[TaskResult]:
        """The session's tasks in the order they were created, `limit` of them from `offset`."""
        session = self._session(session_id)
        results = (self._tasks[t].result for t in session.task_ids if t in self._tasks)
        return list(itertools.islice(results, offset, None if limit is None else offset + limit))

    async def latest_tasks(
        self,
        session_prefix: str,
        statuses: set[TaskStatus] | None = None,
        services: set[str] | None = None,
        after: int = -1,
    ) -> tuple[list[TaskResult], int | None]:
        """The latest task of each session whose id starts with `session_prefix` (a handler's
        run, see `_handlers`), only those in one of `statuses`, on one of `services` (None:
        any), a page at a time: of the sessions created after the one numbered `after`, in
        the order they were created, up to `LISTING_PAGE` tasks, and the number to ask after
        next (None: no more)."""
        if statuses is not None and all(s.value in _UNFINISHED for s in statuses):
            # what runs is in the lines: read those, not every session kept (a day's handlers)
            unfinished = {session_id for session_id, _ in self._lines}
            held = (self._sessions.get(s) for s in unfinished if s.startswith(session_prefix))
            sessions = sorted(
                (s for s in held if s is not None and s.order > after), key=lambda s: s.order
            )
        else:
            sessions = [
                s
                for i, s in self._sessions.items()
                if s.order > after and i.startswith(session_prefix)
            ]
        found = []
        for n, session in enumerate(sessions, 1):
            latest = next((t for t in reversed(session.task_ids) if t in self._tasks), None)
            result = self._tasks[latest].result if latest is not None else None
            if (
                result is not None
                and (statuses is None or result.status in statuses)
                and (services is None or result.service_name in services)
            ):
                found.append(result)
                if len(found) == LISTING_PAGE:
                    return found, session.order
            if n % LISTING_SLICE == 0:  # a long listing lets the calls behind it in
                await asyncio.sleep(0)
        return found, None

    async def get_current_task(self, session_id: str) -> TaskResult | None:
        session = self._session(session_id)
        for task_id in reversed(session.task_ids):
            if task_id in self._tasks:
                return self._tasks[task_id].result
        return None

    # drivers

    async def heartbeat(self, driver_id: str) -> None:
        """A driver is alive (sent from a thread of its own, whatever its event loop does)."""
        self._heard_from(driver_id)

    async def watch_driver(
        self, driver_id: str, wait_s: float, adopt_orphans: bool = False, incarnation: str = ""
    ) -> DriverNotice:
        """A driver's heartbeat: wait up to `wait_s` for one of its running tasks to be
        cancelled, or a state it holds to be outdated (see `finish_tasks`), and return those.
        With `adopt_orphans`, also hand it the unfinished tasks of drivers gone silent
        (presumed dead), oldest first, to drive again. A driver that last heard from another
        `incarnation` is answered at once: what that one said of its states no longer holds."""
        driver = self._heard_from(driver_id)
        restarted = incarnation not in ("", self._incarnation)
        driver.watching += 1
        try:
            if not (driver.cancelled or driver.stale_states or restarted):
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(driver.wake.wait(), timeout=wait_s)
        finally:
            driver.watching -= 1
            driver.last_seen = time.monotonic()
        cancelled, driver.cancelled = driver.cancelled, []
        stale_states, driver.stale_states = driver.stale_states, []
        driver.wake.clear()
        orphaned = self._adopt_orphans(driver_id) if adopt_orphans else []
        if orphaned:  # a watch that changed nothing commits nothing (every 5 s, every driver)
            await self._persist(*(("task", t) for t in orphaned))
        return DriverNotice(
            incarnation=self._incarnation,
            cancelled=cancelled,
            orphaned=orphaned,
            stale_states=stale_states,
        )

    # the store

    def _mark(self, *keys: _Key) -> asyncio.Future[None] | None:
        """Note records changed; they go to the store in the next commit, which is returned."""
        if self._store is None:
            return None
        self._dirty.update(dict.fromkeys(keys))
        if self._next_commit is None:
            loop = asyncio.get_running_loop()
            self._next_commit = loop.create_future()
            if self._writer is None:
                self._writer = loop.create_task(self._write_forever())
            self._writer_wake.set()
        return self._next_commit

    async def _persist(self, *keys: _Key) -> None:
        """Note records changed and return once they (and the event appends before them) are
        committed. A caller cancelled meanwhile leaves the commit to go on for the others."""
        if self._sweeper is None:
            self._start_timers()
        commit = self._mark(*keys)
        if commit is not None:
            await asyncio.shield(commit)

    async def _write_forever(self) -> None:
        assert self._store is not None
        while True:
            await self._writer_wake.wait()
            self._writer_wake.clear()
            # what changed until now goes in this commit; later changes wait for the next
            commit, self._next_commit = self._next_commit, None
            batch = self._batch()
            try:
                await self._store.write(batch)
            except Exception as exc:
                logger.exception("the state store could not commit %d changes", len(batch))
                if commit is not None:
                    commit.set_exception(
                        ControlPlaneUnavailableError(
                            f"the control plane could not store a change ({exc}); it is kept "
                            "in memory and stored with the next change that commits: check "
                            "the state store, then retry"
                        )
                    )
                    commit.exception()  # retrieved: a caller may have gone
                continue
            self._commits += 1
            self._rows_written += len(batch)
            self._metrics.store_commit(len(batch))
            if commit is not None:
                commit.set_result(None)

    def _batch(self) -> Batch:
        batch = Batch(events=self._appends)
        dirty, self._dirty, self._appends = self._dirty, {}, []
        for table, key in dirty:
            value = self._stored(table, key)
            if value is None:
                batch.deletes.append((table, key))
            else:
                batch.puts.append((table, key, value))
        return batch

    def _stored(self, table: Table, key: str) -> str | None:
        """The record as the store keeps it, JSON; None when it is gone."""
        if table == "task":
            task = self._tasks.get(key)
            return task.stored().model_dump_json() if task else None
        if table == "session":
            session = self._sessions.get(key)
            if session is None:
                return None
            return StoredSession(
                order=session.order, definition=session.definition
            ).model_dump_json()
        if table == "state":
            session_id, service_name = key.split("/", 1)
            session = self._sessions.get(session_id)
            state = session.state.get(service_name) if session else None
            return None if state is None else json.dumps(state)
        if table == "service":
            service = self._services.get(key)
            return service.model_dump_json() if service else None
        return self._state_secret.hex() if key == "secret" else str(self._shards)  # meta

    def _load(self, records: Records) -> None:
        """Take back what the store holds (see the module's docstring)."""
        tables, now, wall = records.tables, time.monotonic(), time.time()
        meta = tables["meta"]
        written_by = int(meta.get("shards", self._shards))
        if written_by != self._shards:
            raise InvalidRequestError(
                f"this state store was written by a control plane of {written_by} shards, not "
                f"{self._shards}: a session lives on the shard its id hashes to, so keep "
                f"ControlPlaneConfig.shards={written_by} with this store, or start on a new one"
            )
        if "secret" in meta:
            self._state_secret = bytes.fromhex(meta["secret"])
        for name, text in tables["service"].items():
            self._services[name] = StoredService.model_validate_json(text)
        sessions = sorted(
            map(StoredSession.model_validate_json, tables["session"].values()), key=_order
        )
        for stored_session in sessions:
            loaded = _Session(stored_session.definition, stored_session.order)
            self._sessions[loaded.definition.session_id] = loaded
            self._touch(loaded)
        for key, text in tables["state"].items():
            session_id, service_name = key.split("/", 1)
            if session_id in self._sessions:
                self._sessions[session_id].state[service_name] = json.loads(text)
                # which task left it is not stored: a mark no task id equals, never "none yet"
                self._sessions[session_id].state_from[service_name] = _LOADED_STATE
        finished = []
        for stored in sorted(
            map(StoredTask.model_validate_json, tables["task"].values()), key=_order
        ):
            task_id = stored.definition.task_id
            record = _Task(
                stored.definition,
                stored.result.service_name or "",
                stored.owner,
                self._max_events,
                stored.order,
            )
            record.result, record.children = stored.result, stored.children
            record.snapshot, record.inbox_seq = stored.snapshot, stored.inbox_seq
            final = stored.result.status.is_final
            record.stream.restore(records.events.get((task_id, "stream"), []), closed=final)
            record.inbox.restore(records.events.get((task_id, "inbox"), []), closed=final)
            self._tasks[task_id] = record
            session = self._sessions.get(stored.definition.session_id or "")
            if session is not None:
                session.task_ids[task_id] = None
            if final:
                record.turn = record.done = _FINAL
                ended = now - (wall - (stored.result.finished_at or wall))
                finished.append((ended, task_id))
            else:
                session_id = stored.definition.session_id or ""
                self._join_line(session_id, record.result.service_name or "", task_id)
                # its driver may live on (a replica still running it): give it the time any
                # driver has to be heard from before its tasks are adopted
                self._heard_from(stored.owner)
        for waiting in self._lines.values():
            self._tasks[waiting[0]].turn.set()
        self._finished = deque(sorted(finished))
        orders = [s.order for s in self._sessions.values()] + [
            t.order for t in self._tasks.values()
        ]
        self._order = itertools.count(max(orders, default=-1) + 1)

    # helpers

    def _append_events(self, record: _Task, events: list[dict[str, Any]]) -> None:
        if not events:
            return
        self._metrics.events_streamed(record.result.service_name or "", len(events))
        parent: _Task | None = record
        while parent is not None:
            self._extend(parent, "stream", events)
            parent = self._tasks.get(parent.definition.parent_task_id or "")

    def _extend(self, record: _Task, name: EventLogName, events: list[dict[str, Any]]) -> None:
        log = record.stream if name == "stream" else record.inbox
        added = log.extend(events)
        if self._store is not None and added:
            self._appends.append(
                EventAppend(record.definition.task_id, name, added, log.first_kept)
            )

    def _heard_from(self, driver_id: str) -> _Driver:
        driver = self._drivers.get(driver_id)
        if driver is None:
            driver = self._drivers[driver_id] = _Driver()
        driver.last_seen = time.monotonic()
        return driver

    def _forget_session(self, session: _Session) -> None:
        del self._sessions[session.definition.session_id]
        del self._by_activity[session.definition.session_id]
        for service_name in list(session.held_by):
            self._outdate_held_state(session, service_name, owner="")

    def _outdate_held_state(self, session: _Session, service_name: str, owner: str) -> None:
        """A task of the session on the service was created by `owner`: a driver that holds
        the state it starts from (see `finish_tasks`) no longer holds the latest."""
        holder = session.held_by.pop(service_name, None)
        driver = self._drivers.get(holder) if holder not in (None, owner) else None
        if driver is not None:
            driver.stale_states.append((session.definition.session_id, service_name))
            driver.wake.set()

    def _adopt_orphans(self, owner: str) -> list[str]:
        now = time.monotonic()
        silent = {d for d, driver in self._drivers.items() if driver.silent(now) and d != owner}
        if not silent:
            return []
        for driver_id in silent:
            del self._drivers[driver_id]
        driven = (TaskStatus.PENDING, TaskStatus.RUNNING)  # waiting tasks resume on an event
        # the unfinished are all in a line: a scan of every task kept would grow with retention
        unfinished = (self._tasks[t] for line in self._lines.values() for t in line)
        orphans = sorted(
            (r for r in unfinished if r.owner in silent and r.result.status in driven),
            key=lambda r: r.order,
        )
        for record in orphans:
            record.owner = owner
        return [r.definition.task_id for r in orphans]

    def _close(self, record: _Task, **fields: Any) -> None:
        """Make the task final: record it, end its logs, move its line on, wake waiters."""
        record.snapshot = None
        finished_at = time.time()
        result = record.update(finished_at=finished_at, **fields)
        self._metrics.task_finished(
            result.service_name or "", result.status.value, finished_at - result.created_at
        )
        self._finished.append((time.monotonic(), record.definition.task_id))
        self._drop_expired()
        record.stream.close()
        record.inbox.close()
        key = (record.definition.session_id or "", record.result.service_name or "")
        self._advance_line(key, record.definition.task_id)
        record.turn.set()  # a cancelled task still waiting for its turn stops waiting
        record.done.set()
        record.turn = record.done = _FINAL

    def _drop_expired(self) -> None:
        """Forget final tasks past their retention, and sessions idle past theirs."""
        now = time.monotonic()
        while self._finished and self._finished[0][0] < now - self._task_retention_s:
            _, task_id = self._finished.popleft()
            record = self._tasks.pop(task_id, None)
            self._mark(("task", task_id))
            session = self._sessions.get(record.definition.session_id or "") if record else None
            if session is not None:
                session.task_ids.pop(task_id, None)
        if now < self._next_session_sweep:
            return
        self._next_session_sweep = now + min(RETENTION_SWEEP_S, self._session_retention_s)
        self._peak_sessions = max(self._peak_sessions, len(self._sessions))
        cutoff = now - self._session_retention_s
        idle = []
        for session_id in self._by_activity:  # least recently active first
            if self._sessions[session_id].last_active >= cutoff:
                break
            idle.append(session_id)
        for session_id in idle:
            session = self._sessions[session_id]
            if all(t not in self._tasks for t in session.task_ids):
                self._forget_session(session)
                self._mark(("session", session_id))
                self._mark(*(("state", _state_key(session_id, s)) for s in session.state))
        # a full garbage collection pauses the actor for as long as what it holds takes to
        # walk (a second per 100,000 sessions and tasks): only once a quarter of them are gone;
        # until then what it holds is frozen, out of the walks of Python's own collections
        if len(self._sessions) < 0.75 * self._peak_sessions:
            _release_memory()
            self._peak_sessions = len(self._sessions)
        else:
            _freeze_survivors()

    def _start_timers(self) -> None:
        """Retention runs on a timer too, not only when tasks finish (an idle cluster still
        forgets what it should), and so do the metrics. Started by the first change this
        incarnation of the actor makes: a restarted actor is not sent `ready` again."""
        loop = asyncio.get_running_loop()
        self._sweeper = loop.create_task(self._sweep_forever())
        self._reporter = loop.create_task(self._report_forever())

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(min(RETENTION_SWEEP_S, self._session_retention_s))
            self._drop_expired()

    async def _report_forever(self) -> None:
        while True:
            # every registered service's series, zeros included: a chart shows them all
            counts = dict.fromkeys(itertools.product(self._services, _UNFINISHED), 0)
            for (_, service_name), line in self._lines.items():
                for task_id in line:
                    key = (service_name, self._tasks[task_id].result.status.value)
                    counts[key] = counts.get(key, 0) + 1
            self._metrics.unfinished(counts)
            self._metrics.flush()
            await asyncio.sleep(METRICS_REPORT_S)

    def _resume(self, record: _Task) -> StartedTask:
        record.update(status=TaskStatus.RUNNING)
        started = StartedTask(
            task=record.definition,
            running=record.result,
            state=record.snapshot,
            resume=True,
            inbox_seq=record.inbox_seq,
        )
        record.snapshot = None
        return started

    def _task_in_session(self, session_id: str, task_id: str) -> _Task:
        record = self._task(task_id)
        if record.definition.session_id != session_id:
            raise TaskNotFoundError(task_id)
        return record

    def _advance_line(self, key: _PairKey, task_id: str) -> None:
        line = self._lines.get(key)
        if line is None:
            return
        try:
            line.remove(task_id)
        except ValueError:
            return
        if line:
            self._tasks[line[0]].turn.set()
            return
        del self._lines[key]
        if session := self._sessions.get(key[0]):
            session.lines.pop(key[1], None)

    def _session(self, session_id: str) -> _Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise SessionNotFoundError(session_id) from None

    def _session_definition(self, session_id: str) -> SessionDefinition:
        session = self._session(session_id)
        return session.definition.model_copy(
            update={"task_ids": list(session.task_ids), "state": dict(session.state)}
        )

    def _task(self, task_id: str) -> _Task:
        try:
            return self._tasks[task_id]
        except KeyError:
            raise TaskNotFoundError(task_id) from None


class ControlPlaneActor(ControlPlane):
    """The control plane as the core runs it: a Ray actor with a process of its own, whose
    threads let the replicas beside it keep their cores when it wakes (see `_scheduling`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        yield_on_wakeup()
        super().__init__(*args, **kwargs)


def _state_key(session_id: str, service_name: str) -> str:
    return f"{session_id}/{service_name}"


def _order(stored: StoredSession | StoredTask) -> int:
    return stored.order


def _rss_bytes() -> int:
    """This process's resident memory now (Linux), or its peak elsewhere."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def _freeze_survivors() -> None:
    """Move what the actor holds out of the garbage collector's sight. Python's automatic full
    collections walk every object it tracks, and the records held are most of them: a second
    per 100,000 sessions and tasks, each time those grew by a quarter. Frozen, they are freed
    as ever when forgotten (records hold no reference cycles), and a collection walks only what
    came since the last sweep. This one does, first: garbage is not frozen with the rest."""
    gc.collect()
    gc.freeze()


def _release_memory() -> None:
    """Give freed memory back to the system: CPython frees objects, but glibc keeps the pages
    it got for them unless asked, so a burst of sessions would hold the actor's memory high.
    It also collects the frozen (see `_freeze_survivors`): the one walk of all that is held,
    for cycles made among them since they were frozen."""
    gc.unfreeze()
    _freeze_survivors()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
