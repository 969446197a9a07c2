"""The orchestrator: a Ray actor that drives tasks by publishing them to their service.

A `run` sent by the clients goes straight to a replica of its service, which drives it (see
`_driver`), and so does a new task's run asked of the orchestrator (see `run`); the
orchestrator drives the rest: runs a replica did not take (the task waits for its turn, or
may have been sent before), tasks started without waiting for them, tasks resumed by an event
after they waited for input, and the unfinished tasks of drivers that went silent (a replica
that died mid-run, an earlier incarnation of this actor), which it adopts within seconds.
"""

from __future__ import annotations

import contextlib
from typing import Any

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from .._shared.config import MAX_WAIT_S, SimpleOrchestratorConfig
from .._shared.errors import ServiceNotFoundError
from .._shared.types import TaskDefinition, TaskResult
from .actors import ControlPlaneHandle
from .driver import PublishingDriver
from .message_queue import RayMessageQueue


class SimpleOrchestrator:
    def __init__(self, config: SimpleOrchestratorConfig, namespace: str) -> None:
        self._control_plane = ControlPlaneHandle.lookup(namespace)
        self._services = RayMessageQueue()
        self._driver = PublishingDriver(self._control_plane, config, self._services)
        # an async actor's __init__ runs on its event loop: a restarted orchestrator starts
        # adopting orphans without waiting for a request
        self._driver.start()

    async def ready(self) -> bool:
        return True

    async def run(self, task: TaskDefinition) -> TaskResult:
        """Run `task` and return its result: final, or still `waiting` for input after
        `MAX_WAIT_S` (the caller waits on; every wait here is bounded).

        A task whose id its sender did not name is new: it goes straight to a replica of its
        service, which records and runs it when it is first in its session's line there, as a
        nested call's child does (ahead of its begin, from the state it holds; see `_driver`).
        One that would wait for its turn, or that names its id (it may have been sent
        before, and its steps must not run again), is driven from here."""
        result = None
        if task.is_new:
            # no Serve application, its replica died, or its queue is full: as for any task
            with contextlib.suppress(ServiceNotFoundError, RayActorError, BackPressureError):
                result = await self._services.run_if_first(task)
        if result is None:
            result = await self._driver.run(task)
        if not result.status.is_final:  # parked: wait here, where it holds no replica slot
            result = await self._control_plane.for_session(task.session_id).get_task(
                task.session_id, task.task_id, MAX_WAIT_S
            )
        return result

    async def submit(self, task: TaskDefinition) -> TaskResult:
        """Record `task`, drive it in the background and return its pending result."""
        pending, _ = await self._driver.submit(task)
        return pending

    async def send_event(
        self, session_id: str, task_id: str, service_name: str, event: dict[str, Any]
    ) -> None:
        """Deliver `event` into the task; a task parked waiting for input is resumed. An event
        the service's workflow could not take (an unknown class, fields that do not fit it) is
        refused here, by one of its replicas, not dropped later."""
        await self._services.check_event(service_name, event)
        started = await self._control_plane.for_session(session_id).deliver_event(
            session_id, task_id, service_name, event, self._driver.driver_id
        )
        if started is not None:
            self._driver.resume(started)
