"""The control plane's HTTP API: a stateless Ray Serve FastAPI ingress in front of the control
plane and orchestrator actors, with the routes of llama_deploy's control plane server.

Errors are JSON, `{"error": class name, "message": ..., "detail": {...}}`, with the status of
their class (see `_errors`). Workflow state is readable here but not writable: it may hold
pickled objects, and unpickling what a request sent would run its code.
"""

from typing import Any

import ray
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError, RayTaskError

from ._control_plane import CONTROL_PLANE_ACTOR_NAME
from ._errors import (
    ControlPlaneUnavailableError,
    InvalidRequestError,
    LlamaDeployError,
    error_to_json,
)
from ._orchestrator import ORCHESTRATOR_ACTOR_NAME
from ._types import ServiceDefinition, SessionDefinition, TaskDefinition, TaskResult

API_APP_NAME = "llama_deploy_control_plane"
MAX_WAIT_S = 300.0

app = FastAPI(
    title="llama-deploy-ray control plane",
    description="Services, sessions and tasks of llama-index workflows deployed on Ray Serve.",
)


@app.exception_handler(LlamaDeployError)
@app.exception_handler(RayActorError)
async def _error_response(request: Request, exc: Exception) -> JSONResponse:
    # Errors raised in an actor arrive as RayTaskError(cls): answer with the original.
    cause = exc.cause if isinstance(exc, RayTaskError) else exc
    if not isinstance(cause, LlamaDeployError):
        cause = ControlPlaneUnavailableError(
            f"the control plane actors are not reachable ({type(exc).__name__}); "
            "they restart on their own, retry shortly or run deploy_core again"
        )
    return JSONResponse(status_code=cause.status_code, content=error_to_json(cause))


def _task_in_session(session_id: str, task: TaskDefinition) -> TaskDefinition:
    if task.session_id not in (None, session_id):
        raise InvalidRequestError(
            f"the task names session {task.session_id!r} but was sent to session {session_id!r}"
        )
    return task.model_copy(update={"session_id": session_id})


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(app)
class ControlPlaneAPI:
    def __init__(self, namespace: str) -> None:
        self._control_plane = ray.get_actor(CONTROL_PLANE_ACTOR_NAME, namespace=namespace)
        self._orchestrator = ray.get_actor(ORCHESTRATOR_ACTOR_NAME, namespace=namespace)

    @app.get("/")
    async def home(self) -> dict[str, str]:
        return {"service": "llama-deploy-ray control plane", "docs": "/docs"}

    @app.get("/queue_config")
    async def queue_config(self) -> dict[str, str]:
        return {"type": "ray"}

    @app.post("/services/register")
    async def register_service(self, service: ServiceDefinition) -> ServiceDefinition:
        return await self._control_plane.register_service.remote(service)

    @app.post("/services/deregister")
    async def deregister_service(self, service_name: str) -> None:
        await self._control_plane.deregister_service.remote(service_name)

    @app.get("/services/{service_name}")
    async def get_service(self, service_name: str) -> ServiceDefinition:
        return await self._control_plane.get_service.remote(service_name)

    @app.get("/services")
    async def list_services(self) -> list[ServiceDefinition]:
        return await self._control_plane.list_services.remote()

    @app.post("/sessions/create")
    async def create_session(self) -> SessionDefinition:
        return await self._control_plane.create_session.remote()

    @app.put("/sessions/{session_id}")
    async def get_or_create_session(self, session_id: str) -> SessionDefinition:
        return await self._control_plane.get_or_create_session.remote(session_id)

    @app.get("/sessions/{session_id}")
    async def get_session(self, session_id: str) -> SessionDefinition:
        return await self._control_plane.get_session.remote(session_id)

    @app.get("/sessions")
    async def list_sessions(self) -> list[SessionDefinition]:
        return await self._control_plane.list_sessions.remote()

    @app.post("/sessions/{session_id}/delete")
    async def delete_session(self, session_id: str) -> None:
        await self._control_plane.delete_session.remote(session_id)

    @app.get("/sessions/{session_id}/state")
    async def get_session_state(self, session_id: str) -> dict[str, Any]:
        return await self._control_plane.get_session_state.remote(session_id)

    @app.post("/sessions/{session_id}/tasks")
    async def create_task(self, session_id: str, task: TaskDefinition) -> TaskResult:
        """Start a task and answer at once with its pending result."""
        return await self._orchestrator.submit.remote(_task_in_session(session_id, task))

    @app.post("/sessions/{session_id}/run")
    async def run_task(self, session_id: str, task: TaskDefinition) -> TaskResult:
        """Run a task and answer when it is final (the response is the long poll)."""
        return await self._orchestrator.run.remote(_task_in_session(session_id, task))

    @app.get("/sessions/{session_id}/tasks")
    async def list_tasks(self, session_id: str) -> list[TaskResult]:
        return await self._control_plane.list_tasks.remote(session_id)

    @app.get("/sessions/{session_id}/current_task")
    async def get_current_task(self, session_id: str) -> TaskResult | None:
        return await self._control_plane.get_current_task.remote(session_id)

    @app.get("/sessions/{session_id}/tasks/{task_id}/result")
    async def get_task_result(
        self,
        session_id: str,
        task_id: str,
        wait_s: float = Query(default=0.0, ge=0.0, le=MAX_WAIT_S),
    ) -> TaskResult:
        """The task's result; with `wait_s`, first wait up to that long for it to finish."""
        return await self._control_plane.get_task_result.remote(session_id, task_id, wait_s)
