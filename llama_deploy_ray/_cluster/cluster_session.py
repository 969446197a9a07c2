"""`ClusterSession`: deployed workflows run from Python inside the Ray cluster, without HTTP.

Code that runs in the cluster (a Ray task or actor, a replica of another deployment, a driver
connected with `ray.init(address=...)`) can skip the HTTP API: a task goes straight to a
replica of its service (one Serve hop, as a bare `DeploymentHandle` call), which records and
runs it when it is first in its session's line there. One that would wait for its turn goes
through the orchestrator, which waits holding no replica, as it does when the replica dies
mid-run (it adopts the task once that replica's driver is silent). Nested workflows' child
tasks take the same path (`_nested`).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from .._client.core import result_value, task_definition
from .._shared.config import MAX_WAIT_S, ControlPlaneConfig
from .._shared.errors import ControlPlaneUnavailableError, ServiceNotFoundError
from .._shared.types import TaskDefinition, TaskResult
from .actors import ControlPlaneHandle, OrchestratorHandle
from .message_queue import RayMessageQueue


async def run_task(
    task: TaskDefinition,
    services: RayMessageQueue,
    orchestrator: OrchestratorHandle,
    control_plane: ControlPlaneHandle,
) -> TaskResult:
    """Run a new `task` (`is_new`) and return its final result."""
    result = None
    # no Serve application (registered only, or not at all), its replica died, or its queue
    # is full: the orchestrator knows whether the service is registered, and finds a task
    # that was begun
    with contextlib.suppress(ServiceNotFoundError, RayActorError, BackPressureError):
        result = await services.run_if_first(task)
    if result is None:
        # the control plane refuses an unknown service before recording anything; its id
        # named, the orchestrator drives the task itself (it may have begun on the replica
        # just asked)
        result = await orchestrator.run(task.id_named())
    while not result.status.is_final:  # it waits for input
        shard = control_plane.for_session(task.session_id)
        result = await shard.get_task(task.session_id, task.task_id, MAX_WAIT_S)
    return result


@dataclass(frozen=True)
class _Core:
    control_plane: ControlPlaneHandle
    orchestrator: OrchestratorHandle
    services: RayMessageQueue


# One per Ray connection and namespace: a `DeploymentHandle` is made once per process and
# service, and the control plane's socket connections are kept.
_cores: dict[tuple[str, str], _Core] = {}


async def _core(namespace: str) -> _Core:
    if not ray.is_initialized():
        raise ControlPlaneUnavailableError(
            "ClusterSession runs inside a Ray cluster: connect first with "
            "ray.init(address=...), or from outside use AsyncLlamaDeployClient"
        )
    key = (ray.get_runtime_context().get_job_id(), namespace)
    core = _cores.get(key)
    if core is None:

        def lookup() -> _Core:  # blocking Ray calls, kept off the event loop
            return _Core(
                ControlPlaneHandle.lookup(namespace),
                OrchestratorHandle.lookup(namespace),
                RayMessageQueue(),
            )

        core = _cores.setdefault(key, await asyncio.to_thread(lookup))
    return core


class ClusterSession:
    """A session of the core deployed in this Ray cluster, run from inside the cluster.

        session = await ClusterSession.create()  # or ClusterSession.get(session_id)
        result = await session.run("my_workflow", arg1="hello_world")

    `run` is one Serve hop to a replica of the service when the session has no earlier task
    in its line there, as a bare handle call. The session is the clients': read its tasks,
    streams and state, send events, cancel, through `AsyncLlamaDeployClient` with
    `session.session_id`.
    """

    def __init__(self, session_id: str, core: _Core) -> None:
        self.session_id = session_id
        self._core = core

    @classmethod
    async def create(cls, control_plane_config: ControlPlaneConfig | None = None) -> ClusterSession:
        """A new session of the core deployed with `control_plane_config` (its namespace)."""
        core = await _core((control_plane_config or ControlPlaneConfig()).namespace)
        session = await core.control_plane.create_session()
        return cls(session.session_id, core)

    @classmethod
    async def get(
        cls, session_id: str, control_plane_config: ControlPlaneConfig | None = None
    ) -> ClusterSession:
        """The existing session `session_id`; raises `SessionNotFoundError` when there is none."""
        core = await _core((control_plane_config or ControlPlaneConfig()).namespace)
        await core.control_plane.for_session(session_id).get_session(session_id)
        return cls(session_id, core)

    async def run(self, service_name: str, **run_kwargs: Any) -> Any:
        """Run the service's workflow with `run_kwargs` and return its result once final;
        raises `TaskFailedError` (with the workflow's own error) when it fails. A task that
        waits for input waits here until it gets it (send it with a client's `send_event`)."""
        task = task_definition(service_name, run_kwargs).sent_to(self.session_id)
        core = self._core
        return result_value(
            await run_task(task, core.services, core.orchestrator, core.control_plane)
        )
