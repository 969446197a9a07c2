"""The orchestrator: a Ray actor that drives each task from submission to its recorded outcome.

For each task it asks the control plane for the task's turn and state, publishes the task to
the service's topic, awaits the replica's answer, sends the task again when the replica died
under it (up to `max_retries`), and records the outcome. A task that waits for input is
parked on the control plane and driven again (on any replica) when an event is sent to it.
Cancelling a task cancels its replica call and its children's. When the orchestrator restarts,
it picks up the tasks the control plane still holds as unfinished.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Coroutine
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentResponse

from ._config import CONTROL_PLANE_ACTOR_NAME, SimpleOrchestratorConfig
from ._message_queue import RayMessageQueue
from ._types import QueueMessage, StartedTask, TaskDefinition, TaskOutcome, TaskResult

logger = logging.getLogger(__name__)


class SimpleOrchestrator:
    def __init__(self, config: SimpleOrchestratorConfig, namespace: str) -> None:
        self._config = config
        self._control_plane = ray.get_actor(CONTROL_PLANE_ACTOR_NAME, namespace=namespace)
        self._queue = RayMessageQueue()
        self._background: set[asyncio.Task[Any]] = set()
        self._in_flight: dict[str, DeploymentResponse] = {}
        # running tasks cancelled before their replica call existed
        self._cancelled: set[str] = set()
        self._resumed = False
        self._incarnation = uuid.uuid4().hex

    async def ready(self) -> bool:
        self._resume_once()
        return True

    async def run(self, task: TaskDefinition) -> TaskResult:
        """Run `task` and return its final result (after any wait for input)."""
        self._resume_once()
        started = await self._control_plane.begin_task.remote(task, self._incarnation)
        result = await self._drive(started, task.task_id)
        if result is None:  # parked waiting for input, or cancelled before it started
            result = await self._control_plane.get_task_result.remote(
                task.session_id, task.task_id, float("inf")
            )
        return result

    async def submit(self, task: TaskDefinition) -> TaskResult:
        """Record `task`, start driving it in the background and return its pending result."""
        self._resume_once()
        pending: TaskResult = await self._control_plane.create_task.remote(task, self._incarnation)
        self._in_background(self._start_and_drive(task.task_id))
        return pending

    async def send_event(
        self, session_id: str, task_id: str, service_name: str, event: dict[str, Any]
    ) -> None:
        """Deliver `event` into the task; a task parked waiting for input is resumed."""
        started = await self._control_plane.deliver_event.remote(
            session_id, task_id, service_name, event
        )
        if started is not None:
            self._in_background(self._drive(started, task_id))

    async def cancel(self, session_id: str, task_id: str) -> TaskResult:
        """Cancel the task and its children, freeing the replicas running them."""
        for running in await self._control_plane.cancel_task.remote(session_id, task_id):
            response = self._in_flight.get(running)
            if response is not None:
                response.cancel()
            else:  # between its start and its publish: _deliver must not publish it
                self._cancelled.add(running)
        return await self._control_plane.get_task_result.remote(session_id, task_id)

    def _resume_once(self) -> None:
        """After a restart, drive again what the control plane still holds as unfinished."""
        if not self._resumed:
            self._resumed = True
            self._in_background(self._resume())

    async def _resume(self) -> None:
        for task_id in await self._control_plane.claim_orphaned_tasks.remote(self._incarnation):
            self._in_background(self._start_and_drive(task_id))

    async def _start_and_drive(self, task_id: str) -> TaskResult | None:
        started = await self._control_plane.start_task.remote(task_id)
        return await self._drive(started, task_id)

    async def _drive(self, started: StartedTask | None, task_id: str) -> TaskResult | None:
        """Run the task until it is final (its result) or waits for input (None)."""
        try:
            while started is not None:
                outcome = await self._deliver(started)
                if outcome.snapshot is None:
                    return await self._control_plane.finish_task.remote(task_id, outcome)
                started = await self._control_plane.park_task.remote(task_id, outcome)
            return None
        finally:
            self._cancelled.discard(task_id)

    async def _deliver(self, started: StartedTask) -> TaskOutcome:
        task = started.task
        message = QueueMessage(
            type=task.agent_id or "",
            data={
                "task": task,
                "state": started.state,
                "resume": started.resume,
                "inbox_seq": started.inbox_seq,
            },
        )
        attempt = 0
        while True:
            if task.task_id in self._cancelled:
                return TaskOutcome(error="cancelled by a client", error_type="TaskCancelledError")
            response = self._queue.publish(message)
            self._in_flight[task.task_id] = response
            try:
                return await response
            except (RayActorError, ActorUnavailableError) as exc:
                if attempt >= self._config.max_retries:
                    return TaskOutcome(
                        error=(
                            f"the replica running the task died {attempt + 1} times "
                            f"(max_retries={self._config.max_retries}): {exc}"
                        ),
                        error_type="ReplicaDiedError",
                    )
                attempt += 1
                logger.warning("task %s: replica died, retry %d: %s", task.task_id, attempt, exc)
                await self._control_plane.record_retry.remote(task.task_id)
                await asyncio.sleep(self._config.retry_backoff_s)
            except Exception as exc:
                return TaskOutcome(
                    error=f"the task could not be delivered to {message.type!r}: {exc}",
                    error_type=type(exc).__name__,
                )
            finally:
                self._in_flight.pop(task.task_id, None)

    def _in_background(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
