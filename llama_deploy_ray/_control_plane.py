"""The control plane: a named, detached, async Ray actor holding the registry of services and
sessions, every task's record and result, and each session's workflow state per service.

It is also the sequencer that keeps a session's tasks on one service in submission order:
`start_task` returns when the task reaches the head of its (session, service) line, and
`finish_task` moves the line on. Everything here is in-memory dict work with no awaits in the
middle of an update, so each method is atomic on the actor's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import Any

from pydantic import BaseModel

from ._errors import (
    InvalidRequestError,
    ServiceConflictError,
    ServiceNotFoundError,
    SessionNotFoundError,
    TaskNotFoundError,
)
from ._service import TaskOutcome
from ._types import ServiceDefinition, SessionDefinition, TaskDefinition, TaskResult, TaskStatus

CONTROL_PLANE_ACTOR_NAME = "llama_deploy_control_plane"

_PairKey = tuple[str, str]


class StartedTask(BaseModel):
    """A task whose turn has come, with the state its session left on its service."""

    task: TaskDefinition
    state: dict[str, Any] | None = None


class _Session:
    def __init__(self, definition: SessionDefinition) -> None:
        self.definition = definition
        self.task_ids: list[str] = []
        self.state: dict[str, dict[str, Any]] = {}


class _Task:
    def __init__(self, definition: TaskDefinition, service_name: str, owner: str) -> None:
        self.definition = definition
        self.owner = owner  # the orchestrator incarnation driving it
        self.result = TaskResult(
            task_id=definition.task_id,
            session_id=definition.session_id,
            service_name=service_name,
            status=TaskStatus.PENDING,
        )
        self.done = asyncio.Event()
        self.turn = asyncio.Event()


class ControlPlane:
    def __init__(self) -> None:
        self._services: dict[str, ServiceDefinition] = {}
        self._sessions: dict[str, _Session] = {}
        self._tasks: dict[str, _Task] = {}
        # task ids waiting or running, per (session, service), head first
        self._lines: dict[_PairKey, deque[str]] = {}

    async def ready(self) -> bool:
        return True

    # services

    async def register_service(self, definition: ServiceDefinition) -> ServiceDefinition:
        existing = self._services.get(definition.service_name)
        if existing is not None and existing != definition:
            raise ServiceConflictError(
                f"a different service is already registered as {definition.service_name!r} "
                f"({existing.model_dump()}); deregister it first or pick another name"
            )
        self._services[definition.service_name] = definition
        return definition

    async def deregister_service(self, service_name: str) -> None:
        if self._services.pop(service_name, None) is None:
            raise ServiceNotFoundError(service_name)

    async def get_service(self, service_name: str) -> ServiceDefinition:
        try:
            return self._services[service_name]
        except KeyError:
            raise ServiceNotFoundError(service_name) from None

    async def list_services(self) -> list[ServiceDefinition]:
        return list(self._services.values())

    # sessions

    async def create_session(self, session_id: str | None = None) -> SessionDefinition:
        if session_id is not None and session_id in self._sessions:
            raise InvalidRequestError(
                f"session {session_id!r} already exists; use get_or_create_session to reuse it"
            )
        definition = SessionDefinition(session_id=session_id) if session_id else SessionDefinition()
        self._sessions[definition.session_id] = _Session(definition)
        return definition

    async def get_or_create_session(self, session_id: str) -> SessionDefinition:
        if session_id in self._sessions:
            return self._session_definition(session_id)
        return await self.create_session(session_id)

    async def get_session(self, session_id: str) -> SessionDefinition:
        return self._session_definition(session_id)

    async def list_sessions(self) -> list[SessionDefinition]:
        return [self._session_definition(sid) for sid in self._sessions]

    async def delete_session(self, session_id: str) -> None:
        session = self._session(session_id)
        del self._sessions[session_id]
        for task_id in session.task_ids:
            task = self._tasks.get(task_id)
            if task is not None and task.result.status.is_final:
                del self._tasks[task_id]

    async def get_session_state(self, session_id: str) -> dict[str, dict[str, Any]]:
        return dict(self._session(session_id).state)

    # tasks

    async def create_task(self, task: TaskDefinition, owner: str = "") -> TaskResult:
        """Record a task and put it in its session's line for its service; `owner` is the
        orchestrator incarnation that will drive it."""
        service_name = task.agent_id
        if not service_name:
            raise InvalidRequestError("the task names no service: set agent_id")
        session = self._session(task.session_id or "")
        if service_name not in self._services:
            raise ServiceNotFoundError(service_name)
        if task.task_id in self._tasks:
            raise InvalidRequestError(f"a task with id {task.task_id!r} already exists")
        record = _Task(task, service_name, owner)
        self._tasks[task.task_id] = record
        session.task_ids.append(task.task_id)
        line = self._lines.setdefault((session.definition.session_id, service_name), deque())
        line.append(task.task_id)
        if len(line) == 1:
            record.turn.set()
        return record.result

    async def start_task(self, task_id: str) -> StartedTask:
        """Wait for the task's turn, mark it running and return the state it starts from."""
        record = self._task(task_id)
        await record.turn.wait()
        record.result = record.result.model_copy(
            update={"status": TaskStatus.RUNNING, "attempts": record.result.attempts + 1}
        )
        session = self._sessions.get(record.definition.session_id or "")
        state = session.state.get(record.result.service_name or "") if session else None
        return StartedTask(task=record.definition, state=state)

    async def begin_task(self, task: TaskDefinition, owner: str = "") -> StartedTask:
        """`create_task` then `start_task`, in one call."""
        await self.create_task(task, owner)
        return await self.start_task(task.task_id)

    async def record_retry(self, task_id: str) -> None:
        record = self._task(task_id)
        record.result = record.result.model_copy(update={"attempts": record.result.attempts + 1})

    async def finish_task(self, task_id: str, outcome: TaskOutcome) -> TaskResult:
        """Record the task's outcome and state, then let the next task in its line start."""
        record = self._task(task_id)
        failed = outcome.error is not None
        record.result = record.result.model_copy(
            update={
                "status": TaskStatus.FAILED if failed else TaskStatus.COMPLETED,
                "result": outcome.result,
                "error": outcome.error,
                "error_type": outcome.error_type,
                "finished_at": time.time(),
            }
        )
        session_id = record.definition.session_id or ""
        service_name = record.result.service_name or ""
        session = self._sessions.get(session_id)
        if session is not None and outcome.state is not None:
            session.state[service_name] = outcome.state
        self._advance_line((session_id, service_name), task_id)
        record.done.set()
        return record.result

    async def get_task_result(
        self, session_id: str, task_id: str, wait_s: float = 0.0
    ) -> TaskResult:
        """The task's result; with `wait_s`, first wait up to that long for it to finish."""
        record = self._task(task_id)
        if record.definition.session_id != session_id:
            raise TaskNotFoundError(task_id)
        if wait_s > 0 and not record.done.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(record.done.wait(), timeout=wait_s)
        return record.result

    async def list_tasks(self, session_id: str) -> list[TaskResult]:
        session = self._session(session_id)
        return [self._tasks[t].result for t in session.task_ids if t in self._tasks]

    async def get_current_task(self, session_id: str) -> TaskResult | None:
        session = self._session(session_id)
        for task_id in reversed(session.task_ids):
            if task_id in self._tasks:
                return self._tasks[task_id].result
        return None

    async def claim_orphaned_tasks(self, owner: str) -> list[str]:
        """Hand the unfinished tasks of earlier orchestrator incarnations to `owner`, oldest
        first: what a restarted orchestrator must drive again."""
        orphans = [
            r for r in self._tasks.values() if not r.result.status.is_final and r.owner != owner
        ]
        for record in orphans:
            record.owner = owner
        return [r.definition.task_id for r in orphans]

    # helpers

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
        else:
            del self._lines[key]

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
