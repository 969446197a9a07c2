"""The Ray-native message queue.

A service's topic is its Ray Serve application: publishing a task is a call on the
application's `DeploymentHandle`, the replicas' request queues are the mailboxes, and Serve's
router gives each message to exactly one replica (competing consumers). The reply is a
`DeploymentResponse` that is awaited (or cancelled), so nothing polls for results. A nested
task goes straight to a replica of its service the same way (`run_if_first`), without a
driver in between.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from .._shared.errors import ServiceNotFoundError
from .._shared.types import QueueMessage, TaskDefinition


class RayMessageQueue:
    def __init__(self) -> None:
        self._handles: dict[str, DeploymentHandle] = {}

    def publish(self, message: QueueMessage) -> DeploymentResponse:
        """Deliver `message` to one replica of the service named by its `type`; await the
        response for the replica's `TaskOutcome`."""
        response = self._handle(message.type).process_message.remote(message)
        assert isinstance(response, DeploymentResponse)  # not a streaming call
        return response

    def run_if_first(self, task: TaskDefinition) -> DeploymentResponse:
        """Have one replica of the task's service record and run it if no other task of its
        session is ahead of it there; await the response for its `TaskResult`, or None (it
        would wait: nothing was recorded)."""
        response = self._handle(task.agent_id or "").run_if_first.remote(task)
        assert isinstance(response, DeploymentResponse)
        return response

    async def check_event(self, service_name: str, event: dict[str, Any]) -> None:
        """Ask one replica of the service whether its workflow takes `event`."""
        await self._handle(service_name).check_event.remote(event)

    def _handle(self, service_name: str) -> DeploymentHandle:
        handle = self._handles.get(service_name)
        if handle is None:
            try:
                handle = serve.get_app_handle(service_name)
            except RayServeException as exc:  # registered only, or deleted from Serve
                raise ServiceNotFoundError(
                    service_name, f"service {service_name!r} has no Serve application: {exc}"
                ) from None
            self._handles[service_name] = handle
        return handle
