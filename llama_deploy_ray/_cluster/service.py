"""The workflow service: a Ray Serve deployment whose replicas run one workflow.

A replica takes a task from its request queue (the service's topic on the Ray-native message
queue) and runs it with its run engine (`_run_engine`), from the state the task carries. It
keeps nothing between tasks, so any replica can take any task, and a replica that dies loses
only the tasks it was running (the orchestrator sends those again, or adopts them).

A replica also takes runs over HTTP at `workflow_route(name)`, from the clients, and drives
those itself (`LocalDriver`): the control plane's turn and state before the run, the outcome
recorded after it, one Serve hop in all. It takes `run_nowait` the same way, and answers it with
the task's stream (see `_live_stream`).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .._shared.config import ID_PATTERN, NEW_TASK_HEADER
from .._shared.errors import (
    InvalidRequestError,
    LlamaDeployError,
    NotFoundError,
    error_to_answer,
    error_to_json,
)
from .._shared.events import accepted_events, event_from_dict
from .._shared.types import QueueMessage, TaskDefinition, TaskOutcome, TaskResult
from .._shared.workflows_internals import look_up_steps_once
from .actors import ControlPlaneHandle, OrchestratorHandle
from .driver import LocalDriver
from .guard import RequestGuard
from .handler_routes import RUN_ROUTES, WORKFLOW_ROUTES, HandlerRoutes
from .handler_routes import error_response as handler_error_response
from .live_stream import live_event_lines
from .packaging import PackedWorkflow, unpack_service
from .run_engine import RunEngine
from .state_serializer import SignedStateSerializer
from .task_logging import install_task_logging

_ID = re.compile(ID_PATTERN)


@serve.deployment
class WorkflowService:
    def __init__(
        self,
        packed: PackedWorkflow,
        service_name: str,
        namespace: str,
        input_hold_s: float,
        log_encoding: str,
    ) -> None:
        install_task_logging(log_encoding)
        workflow, additional_events = unpack_service(packed)
        look_up_steps_once(workflow)
        self._service_name = service_name
        control_plane = ControlPlaneHandle.lookup(namespace)
        accepted = accepted_events(workflow, additional_events)
        self._engine = RunEngine(
            workflow,
            control_plane=control_plane,
            orchestrator=OrchestratorHandle.lookup(namespace),
            accepted=accepted,
            # JSON where it can, a signed pickle where it must: state may hold any object a
            # step put there, and may also hold what a client sent
            serializer=SignedStateSerializer(
                control_plane.state_secret_blocking(),
                known_types=[*workflow.events, *accepted.values()],
            ),
            input_hold_s=input_hold_s,
        )
        self._driver: LocalDriver = LocalDriver(control_plane, self._engine.run)
        self._handler_routes = HandlerRoutes(
            workflow, service_name, additional_events, control_plane, self._driver
        )
        self._guard: RequestGuard = RequestGuard(namespace)

    async def __call__(self, request: Request) -> Response:
        """`POST .../sessions/{session_id}/run` with a `TaskDefinition`: run the task here and
        answer with its `TaskResult`, final or `waiting` (parked for input); `.../run-nowait`:
        start it and answer at once, the response carrying its stream; errors as the control
        plane's API sends them."""
        preflight = self._guard.preflight(request.method, request.headers)
        if preflight is not None:
            return preflight
        response = await self._answer(request)
        response.headers.update(self._guard.cors_headers(request.headers))
        return response

    async def _answer(self, request: Request) -> Response:
        path = request.url.path.rstrip("/").split("/")
        # /workflows/{name}/run and the like: the workflow-serving API (see `_handler_routes`)
        handler_route = path[-1] if len(path) >= 3 and path[-3] == "workflows" else None
        respond = handler_error_response if handler_route else _error_response
        refusal = self._guard.refusal(request.method, request.url.path, request.headers)
        if refusal is not None:
            return respond(refusal)
        if handler_route in RUN_ROUTES and request.method == "POST":
            try:
                body = await self._guard.read_body(request.stream())
            except LlamaDeployError as exc:
                return respond(exc)
            return await self._handler_routes.run(body, wait=handler_route == "run")
        if handler_route in WORKFLOW_ROUTES and request.method == "GET":
            return self._handler_routes.describe(handler_route)
        is_run = len(path) >= 3 and path[-3] == "sessions" and path[-1] in ("run", "run-nowait")
        session_id = path[-2] if is_run else ""
        if request.method != "POST" or not _ID.match(session_id):
            return respond(
                NotFoundError(
                    f"no route {request.method} {request.url.path}: a service takes "
                    "POST .../sessions/{session_id}/run or .../run-nowait, the id matching "
                    f"{ID_PATTERN}; "
                    f"POST .../run or .../run-nowait; GET .../schema, .../events or "
                    ".../representation"
                )
            )
        try:
            body = await self._guard.read_body(request.stream())
            task = TaskDefinition.model_validate_json(body)
            # an id this request did not name is made here; one it named, new if it says so
            new = task.is_new or NEW_TASK_HEADER in request.headers
            task = task.sent_to(session_id, self._service_name)
            if path[-1] == "run-nowait":
                return await self._run_nowait(task)
            result = await self._driver.run(task, new=new)
        except ValidationError as exc:
            return _error_response(InvalidRequestError(f"invalid task: {exc}"))
        except (LlamaDeployError, RayActorError) as exc:  # ours, or from the control plane
            return _error_response(exc)
        return Response(result.model_dump_json(), media_type="application/json")

    async def _run_nowait(self, task: TaskDefinition) -> StreamingResponse:
        """Start the task and answer at once; the response goes on with its stream (see
        `_live_stream`)."""
        events = self._engine.watch_stream(task.task_id)  # before it runs: no event is missed
        try:
            submitted = await self._driver.submit_if_first(task)
        except BaseException:
            self._engine.stop_watching(task.task_id)
            raise
        if submitted is None:
            # another task of its session is ahead of it: waiting here would hold a request
            # slot (and count as load); the orchestrator waits for its turn holding nothing
            self._engine.stop_watching(task.task_id)
            await self._engine.orchestrator.submit(task)
            return StreamingResponse(iter(["\n"]), media_type="application/x-ndjson")
        _, driving = submitted
        driving.add_done_callback(lambda _: self._engine.stop_watching(task.task_id))
        lines = live_event_lines(events, driving)
        return StreamingResponse(lines, media_type="application/x-ndjson")

    async def __del__(self) -> None:
        # Serve stops a replica gracefully: what it ran is recorded before it goes
        await self._driver.drain()

    async def run_if_first(self, task: TaskDefinition) -> TaskResult | None:
        """Run a nested task here when it is first in its session's line on this service (its
        parent's replica calls this through the service's handle: one hop); None, with nothing
        recorded, when it would wait for its turn: the orchestrator takes it then."""
        return await self._driver.run_if_first(task)

    async def check_event(self, event: dict[str, Any]) -> None:
        """Raise `InvalidRequestError` unless this workflow can take `event` from a client."""
        event_from_dict(event, self._engine.accepted)

    async def process_message(self, message: QueueMessage) -> TaskOutcome:
        """Run (or resume) the task in `message` from the state it carries."""
        return await self._engine.run(message.data["started"])


def _error_response(exc: Exception) -> JSONResponse:
    error = error_to_answer(exc)
    return JSONResponse(status_code=error.status_code, content=error_to_json(error))
