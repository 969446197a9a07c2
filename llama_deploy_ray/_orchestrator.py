"""The orchestrator: a Ray actor that drives each task from submission to its recorded outcome.

For each task it asks the control plane for the task's turn and state, publishes the task to
the service's topic, awaits the replica's answer, sends the task again when the replica died
under it (up to `max_retries`), and records the outcome before answering. When it restarts, it
picks up the tasks the control plane still holds as unfinished.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Coroutine
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from ._config import SimpleOrchestratorConfig
from ._control_plane import CONTROL_PLANE_ACTOR_NAME, StartedTask
from ._message_queue import RayMessageQueue
from ._service import TaskOutcome
from ._types import QueueMessage, TaskDefinition, TaskResult

ORCHESTRATOR_ACTOR_NAME = "llama_deploy_orchestrator"

logger = logging.getLogger(__name__)


class SimpleOrchestrator:
    def __init__(self, config: SimpleOrchestratorConfig, namespace: str) -> None:
        self._config = config
        self._control_plane = ray.get_actor(CONTROL_PLANE_ACTOR_NAME, namespace=namespace)
        self._queue = RayMessageQueue()
        self._background: set[asyncio.Task[Any]] = set()
        self._resumed = False
        self._incarnation = uuid.uuid4().hex

    async def ready(self) -> bool:
        self._resume_once()
        return True

    async def run(self, task: TaskDefinition) -> TaskResult:
        """Run `task` and return its final result."""
        self._resume_once()
        started: StartedTask = await self._control_plane.begin_task.remote(task, self._incarnation)
        return await self._drive(started)

    async def submit(self, task: TaskDefinition) -> TaskResult:
        """Record `task`, start driving it in the background and return its pending result."""
        self._resume_once()
        pending: TaskResult = await self._control_plane.create_task.remote(task, self._incarnation)
        self._in_background(self._start_and_drive(task.task_id))
        return pending

    def _resume_once(self) -> None:
        """After a restart, drive again what the control plane still holds as unfinished."""
        if not self._resumed:
            self._resumed = True
            self._in_background(self._resume())

    async def _resume(self) -> None:
        for task_id in await self._control_plane.claim_orphaned_tasks.remote(self._incarnation):
            self._in_background(self._start_and_drive(task_id))

    async def _start_and_drive(self, task_id: str) -> TaskResult:
        started: StartedTask = await self._control_plane.start_task.remote(task_id)
        return await self._drive(started)

    async def _drive(self, started: StartedTask) -> TaskResult:
        task = started.task
        message = QueueMessage(
            type=task.agent_id or "",
            data={"task": task, "state": started.state},
        )
        outcome = await self._deliver(task, message)
        return await self._control_plane.finish_task.remote(task.task_id, outcome)

    async def _deliver(self, task: TaskDefinition, message: QueueMessage) -> TaskOutcome:
        attempt = 0
        while True:
            try:
                return await self._queue.publish(message)
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

    def _in_background(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
