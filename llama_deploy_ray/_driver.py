"""Driving a task: from its turn on the control plane to its recorded outcome.

Whoever holds a task's request drives it, so a task's path has no hop it does not need: the HTTP
API's replicas drive the runs they answer, the orchestrator actor drives what outlives a request
(tasks started without waiting, tasks resumed by an event, tasks whose driver died). A driver
asks the control plane for the task's turn and state, publishes the task to the service's topic,
awaits the replica's answer, sends the task again when the replica died under it (up to
`max_retries`) and records the outcome. A task that waits for input is parked on the control
plane.

Each driver keeps one call open on the control plane (`watch_driver`). It is the driver's
heartbeat, and it returns the driver's running tasks that a client cancelled, so the driver can
cancel their replica calls; the orchestrator's also returns the tasks of drivers that went
silent, to drive them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Coroutine, Iterator
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentResponse

from ._config import DRIVER_WATCH_S, SimpleOrchestratorConfig
from ._message_queue import RayMessageQueue
from ._types import QueueMessage, StartedTask, TaskDefinition, TaskOutcome, TaskResult

logger = logging.getLogger(__name__)

# A driver's process routes Serve handle calls on its own event loop rather than on a router
# thread: one cross-thread hop less per task.
DRIVER_RUNTIME_ENV = {"env_vars": {"RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}}


class TaskDriver:
    def __init__(
        self,
        control_plane: ray.actor.ActorHandle,
        config: SimpleOrchestratorConfig,
        *,
        adopts_orphans: bool = False,
    ) -> None:
        self.driver_id = uuid.uuid4().hex
        self._control_plane = control_plane
        self._config = config
        self._adopts_orphans = adopts_orphans
        self._queue = RayMessageQueue()
        # tasks this driver started, with their replica call once it is made
        self._in_flight: dict[str, DeploymentResponse | None] = {}
        # of those, the ones cancelled before their replica call was made
        self._cancelled: set[str] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._watcher: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Open the watch on the control plane (needs a running event loop)."""
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def run(self, task: TaskDefinition) -> TaskResult:
        """Record `task`, drive it and return its final result (after any wait for input)."""
        self.start()
        with self._driving(task.task_id):
            started = await self._control_plane.begin_task.remote(task, self.driver_id)
            result = await self.drive(started, task.task_id)
        if result is None:  # parked waiting for input, or cancelled before it started
            result = await self._control_plane.get_task_result.remote(
                task.session_id, task.task_id, float("inf")
            )
        return result

    async def submit(self, task: TaskDefinition) -> TaskResult:
        """Record `task`, drive it in the background and return its pending result."""
        self.start()
        pending: TaskResult = await self._control_plane.create_task.remote(task, self.driver_id)
        self.in_background(self._start_and_drive(task.task_id))
        return pending

    def in_background(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def resume(self, started: StartedTask) -> None:
        """Drive a task that waited for input and was given an event."""
        with self._driving(started.task.task_id):
            await self.drive(started, started.task.task_id)

    async def drive(self, started: StartedTask | None, task_id: str) -> TaskResult | None:
        """Run the task until it is final (its result) or waits for input (None)."""
        while started is not None:
            outcome = await self._deliver(started)
            if outcome.snapshot is None:
                return await self._control_plane.finish_task.remote(task_id, outcome)
            started = await self._control_plane.park_task.remote(task_id, outcome)
        return None

    async def _start_and_drive(self, task_id: str) -> None:
        with self._driving(task_id):
            started = await self._control_plane.start_task.remote(task_id, self.driver_id)
            await self.drive(started, task_id)

    @contextlib.contextmanager
    def _driving(self, task_id: str) -> Iterator[None]:
        # registered before the control plane answers: a cancel may overtake its answer
        self._in_flight[task_id] = None
        try:
            yield
        finally:
            self._in_flight.pop(task_id, None)
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
                self._in_flight[task.task_id] = None

    async def _watch(self) -> None:
        while True:
            try:
                notice = await self._control_plane.watch_driver.remote(
                    self.driver_id, DRIVER_WATCH_S, self._adopts_orphans
                )
            except Exception as exc:  # the control plane restarts: keep watching
                logger.warning("driver %s: the control plane watch failed: %s", self.driver_id, exc)
                await asyncio.sleep(1.0)
                continue
            for task_id in notice.cancelled:
                self._cancel(task_id)
            for task_id in notice.orphaned:
                logger.warning("task %s: its driver went silent, driving it again", task_id)
                self.in_background(self._start_and_drive(task_id))

    def _cancel(self, task_id: str) -> None:
        if task_id not in self._in_flight:
            return  # already done here
        response = self._in_flight[task_id]
        if response is None:  # between its start and its publish: _deliver must not publish it
            self._cancelled.add(task_id)
        else:
            response.cancel()
