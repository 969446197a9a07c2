"""The control plane's HTTP API: a stateless Ray Serve FastAPI ingress in front of the control
plane and orchestrator actors, with the routes of llama_deploy's control plane server, and
those of LlamaIndex's workflow server API that need no workflow (see `_handler_api`). (The
clients send a `run` to its service's replicas directly, at `workflow_route(name)`.)

Errors are JSON, `{"error": class name, "message": ..., "detail": {...}}`, with the status of
their class (see `_errors`). Every route but `GET /health` first passes the `RequestGuard`
(API key, cross-site requests, body size; see `_guard`). Workflow state is readable here but
not writable: what replicas restore is only what they saved themselves.
"""

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import FastAPI, Header, Path, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, field_validator
from ray import serve
from ray.exceptions import RayActorError

from .._shared.config import (
    ID_PATTERN,
    MAX_WAIT_S,
    PAGE_SIZE,
    STREAM_KEEPALIVE_S,
)
from .._shared.errors import (
    LlamaDeployError,
    error_to_answer,
    error_to_json,
)
from .._shared.events import SEQ_KEY, TYPE_KEY, EventBatch
from .._shared.types import (
    Id,
    ServiceDefinition,
    ServiceStatus,
    SessionDefinition,
    TaskDefinition,
    TaskResult,
    check_json_depth,
)
from .actors import ControlPlaneHandle, OrchestratorHandle
from .guard import HEALTH_PATH, GuardMiddleware, RequestGuard
from .handler_api import answers_as_workflow_server
from .handler_api import router as handler_router
from .handler_routes import error_response as handler_error_response

API_APP_NAME = "llama_deploy_control_plane"
# Far past any listing's end, and within what Python's slicing takes.
MAX_OFFSET = 10**12


class SendEventRequest(BaseModel):
    """An event for a running task: `event` holds its fields and `__type__`, its class name."""

    service_name: Id
    event: dict[str, Any]

    @field_validator("event")
    @classmethod
    def _names_its_class(cls, event: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(event.get(TYPE_KEY), str):
            raise ValueError(f"the event has no {TYPE_KEY!r} naming its class")
        check_json_depth(event, "the event")
        return event


# What a path segment naming a session, task or service may hold.
PathId = Annotated[str, Path(pattern=ID_PATTERN)]

app = FastAPI(
    title="llama-deploy-ray control plane",
    description="Services, sessions and tasks of llama-index workflows deployed on Ray Serve.",
)
app.add_middleware(GuardMiddleware)
app.include_router(handler_router)


@app.exception_handler(LlamaDeployError)
@app.exception_handler(RayActorError)
async def _error_response(request: Request, exc: Exception) -> JSONResponse:
    if answers_as_workflow_server(request.url.path):
        return handler_error_response(exc)
    error = error_to_answer(exc)
    return JSONResponse(status_code=error.status_code, content=error_to_json(error))


def serve_status(service_name: str, applications: dict[str, Any]) -> ServiceStatus:
    """A service's replicas as Serve reports them (`serve.status().applications`), without
    its tasks."""
    application = applications.get(service_name)
    if application is None:
        return ServiceStatus(service_name=service_name, status="NOT_DEPLOYED")
    replicas: dict[str, int] = {}
    messages = [application.message]
    for deployment in application.deployments.values():
        messages.append(deployment.message)  # why a replica is not placed, say
        for state, count in deployment.replica_states.items():
            replicas[_name(state)] = replicas.get(_name(state), 0) + count
    return ServiceStatus(
        service_name=service_name,
        status=_name(application.status),
        message=" ".join(m for m in messages if m),
        replicas=replicas,
    )


def _name(state: Any) -> str:
    """A state from `serve.status()`: an enum member or, in some fields, its value already."""
    return str(getattr(state, "value", state))


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(app)
class ControlPlaneAPI:
    def __init__(self, namespace: str) -> None:
        self._control_plane = ControlPlaneHandle.lookup(namespace)
        self._orchestrator = OrchestratorHandle.lookup(namespace)
        app.state.guard = RequestGuard(namespace)
        # for the workflow server API's routes (see `_handler_api`)
        app.state.control_plane, app.state.orchestrator = self._control_plane, self._orchestrator

    @app.get(HEALTH_PATH)
    async def health(self) -> dict[str, str]:
        """Open to load balancers: needs no API key."""
        return {"status": "healthy"}

    @app.get("/")
    async def home(self) -> dict[str, str]:
        return {"service": "llama-deploy-ray control plane", "docs": "/docs"}

    @app.get("/queue_config")
    async def queue_config(self) -> dict[str, str]:
        return {"type": "ray"}

    @app.post("/services/register")
    async def register_service(self, service: ServiceDefinition) -> ServiceDefinition:
        return await self._control_plane.register_service(service)

    @app.post("/services/deregister")
    async def deregister_service(
        self, service_name: Annotated[str, Query(pattern=ID_PATTERN)]
    ) -> None:
        await self._control_plane.deregister_service(service_name)

    @app.get("/services/{service_name}")
    async def get_service(self, service_name: PathId) -> ServiceDefinition:
        return await self._control_plane.get_service(service_name)

    @app.get("/services/{service_name}/status")
    async def get_service_status(self, service_name: PathId) -> ServiceStatus:
        """Replicas running and starting, from Serve; tasks pending, running and waiting."""
        tasks = await self._control_plane.service_tasks(service_name)
        applications = (await asyncio.to_thread(serve.status)).applications
        return serve_status(service_name, applications).model_copy(update={"tasks": tasks})

    @app.get("/services")
    async def list_services(self) -> list[ServiceDefinition]:
        return await self._control_plane.list_services()

    @app.post("/sessions/create")
    async def create_session(self) -> SessionDefinition:
        return await self._control_plane.create_session()

    @app.put("/sessions/{session_id}")
    async def get_or_create_session(self, session_id: PathId) -> SessionDefinition:
        return await self._control_plane.for_session(session_id).get_or_create_session(session_id)

    @app.get("/sessions/{session_id}")
    async def get_session(self, session_id: PathId) -> SessionDefinition:
        return await self._control_plane.for_session(session_id).get_session(session_id)

    @app.get("/sessions")
    async def list_sessions(
        self,
        offset: int = Query(default=0, ge=0, le=MAX_OFFSET),
        limit: int = Query(default=PAGE_SIZE, ge=1, le=PAGE_SIZE),
    ) -> list[SessionDefinition]:
        """Sessions in the order they were created, a page at a time."""
        return await self._control_plane.list_sessions(offset, limit)

    @app.post("/sessions/{session_id}/delete")
    async def delete_session(self, session_id: PathId) -> None:
        await self._control_plane.for_session(session_id).delete_session(session_id)

    @app.get("/sessions/{session_id}/state")
    async def get_session_state(self, session_id: PathId) -> dict[str, Any]:
        return await self._control_plane.for_session(session_id).get_session_state(session_id)

    @app.post("/sessions/{session_id}/tasks")
    async def create_task(self, session_id: PathId, task: TaskDefinition) -> TaskResult:
        """Start a task and answer at once with its pending result."""
        return await self._orchestrator.submit(task.sent_to(session_id))

    @app.post("/sessions/{session_id}/run")
    async def run_task(self, session_id: PathId, task: TaskDefinition) -> TaskResult:
        """Run a task and answer when it is final (the response is the long poll)."""
        return await self._orchestrator.run(task.sent_to(session_id))

    @app.get("/sessions/{session_id}/tasks")
    async def list_tasks(
        self,
        session_id: PathId,
        offset: int = Query(default=0, ge=0, le=MAX_OFFSET),
        limit: int = Query(default=PAGE_SIZE, ge=1, le=PAGE_SIZE),
    ) -> list[TaskResult]:
        """The session's tasks in the order they were created, a page at a time."""
        return await self._control_plane.for_session(session_id).list_tasks(
            session_id, offset, limit
        )

    @app.get("/sessions/{session_id}/current_task")
    async def get_current_task(self, session_id: PathId) -> TaskResult | None:
        return await self._control_plane.for_session(session_id).get_current_task(session_id)

    @app.get("/sessions/{session_id}/tasks/{task_id}/events")
    async def stream_events(
        self,
        session_id: PathId,
        task_id: PathId,
        after: int = Query(default=0, ge=0, description="Resume after this sequence number."),
        accept: str = Header(default="application/x-ndjson"),
        last_event_id: int | None = Header(default=None),
    ) -> StreamingResponse:
        """The task's stream: NDJSON lines, or server-sent events when the request accepts
        `text/event-stream` (which also resumes from `Last-Event-ID`). Ends with the task."""
        sse = "text/event-stream" in accept
        if sse and last_event_id is not None:
            after = max(after, last_event_id)
        # read once before answering, so an unknown task is a 404 and not an empty stream
        first = await self._control_plane.for_session(session_id).read_events(
            session_id, task_id, after, 0.0
        )
        return StreamingResponse(
            self._stream(session_id, task_id, after, first, sse),
            media_type="text/event-stream" if sse else "application/x-ndjson",
        )

    async def _stream(
        self, session_id: str, task_id: str, after: int, batch: EventBatch, sse: bool
    ) -> AsyncIterator[str]:
        while True:
            for event in batch.events:
                after = event[SEQ_KEY]
                data = json.dumps(event)
                yield (
                    f"id: {after}\nevent: {event[TYPE_KEY]}\ndata: {data}\n\n"
                    if sse
                    else data + "\n"
                )
            if batch.closed:
                return
            if not batch.events:
                yield ": keep-alive\n\n" if sse else "\n"
            # an open stream outlives a restart of the control plane (the handle sends again)
            batch = await self._control_plane.for_session(session_id).read_events(
                session_id, task_id, after, STREAM_KEEPALIVE_S
            )

    @app.post("/sessions/{session_id}/tasks/{task_id}/events")
    async def send_event(self, session_id: PathId, task_id: PathId, body: SendEventRequest) -> None:
        """Send an event into a running task (e.g. a HumanResponseEvent); exactly once."""
        await self._orchestrator.send_event(session_id, task_id, body.service_name, body.event)

    @app.post("/sessions/{session_id}/tasks/{task_id}/cancel")
    async def cancel_task(self, session_id: PathId, task_id: PathId) -> TaskResult:
        """Cancel a pending, running or waiting task and its children."""
        return await self._control_plane.for_session(session_id).cancel_task(session_id, task_id)

    @app.get("/sessions/{session_id}/tasks/{task_id}")
    async def get_task(
        self,
        session_id: PathId,
        task_id: PathId,
        wait_s: float = Query(default=0.0, ge=0.0, le=MAX_WAIT_S),
    ) -> TaskResult:
        """The task as it is now (`status`); with `wait_s`, first wait up to that long for it
        to finish."""
        return await self._control_plane.for_session(session_id).get_task(
            session_id, task_id, wait_s
        )

    @app.get("/sessions/{session_id}/tasks/{task_id}/result")
    async def get_task_result(
        self,
        session_id: PathId,
        task_id: PathId,
        wait_s: float = Query(default=0.0, ge=0.0, le=MAX_WAIT_S),
    ) -> TaskResult | None:
        """The task's result once it is final, null until then (as llama_deploy's); with
        `wait_s`, first wait up to that long for it to finish."""
        task = await self._control_plane.for_session(session_id).get_task(
            session_id, task_id, wait_s
        )
        return task if task.status.is_final else None
