"""The Ray-native message queue.

A service's topic is its Ray Serve application: publishing a task is a call on the
application's `DeploymentHandle`, the replicas' request queues are the mailboxes, and Serve's
router gives each message to exactly one replica (competing consumers). The reply is a
`DeploymentResponse` that is awaited (or cancelled), so nothing polls for results.
"""

from __future__ import annotations

from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from ._types import QueueMessage


class RayMessageQueue:
    def __init__(self) -> None:
        self._handles: dict[str, DeploymentHandle] = {}

    def publish(self, message: QueueMessage) -> DeploymentResponse:
        """Deliver `message` to one replica of the service named by its `type`; await the
        response for the replica's `TaskOutcome`."""
        return self._handle(message.type).process_message.remote(message)

    def _handle(self, service_name: str) -> DeploymentHandle:
        handle = self._handles.get(service_name)
        if handle is None:
            handle = serve.get_app_handle(service_name)
            self._handles[service_name] = handle
        return handle
