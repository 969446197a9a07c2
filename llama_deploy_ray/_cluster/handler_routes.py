"""The workflow-serving API's routes that a workflow's own replicas answer (see `_handlers`):
`POST /workflows/{name}/run` and `/run-nowait`, one Serve hop from the client to the replica
that runs the task, and the routes that need the workflow itself, `GET
/workflows/{name}/schema`, `/events` and `/representation`.

Errors are the reference's: `{"detail": message}`, 400 for a request it cannot take.
"""

from __future__ import annotations

import json
import re
from typing import Any, cast

from pydantic import ValidationError
from ray.exceptions import RayActorError
from starlette.responses import JSONResponse, Response
from workflows import Workflow
from workflows.events import Event
from workflows.representation import get_workflow_representation

from .._shared.config import MAX_WAIT_S
from .._shared.errors import (
    InvalidRequestError,
    LlamaDeployError,
    TaskStateError,
    error_to_answer,
)
from .._shared.handlers import (
    HANDLER_ID_PATTERN,
    handler_from_task,
    new_handler_id,
    session_of,
    start_kwargs,
)
from .._shared.types import TaskDefinition, check_json_depth
from .actors import ControlPlaneHandle
from .driver import LocalDriver

_HANDLER_ID = re.compile(HANDLER_ID_PATTERN)
RUN_ROUTES = ("run", "run-nowait")
WORKFLOW_ROUTES = ("schema", "events", "representation")


class HandlerRoutes:
    def __init__(
        self,
        workflow: Workflow,
        service_name: str,
        additional_events: list[type[Event]],
        control_plane: ControlPlaneHandle,
        driver: LocalDriver,
    ) -> None:
        self._workflow = workflow
        self._service_name = service_name
        self._additional_events = additional_events
        self._control_plane = control_plane
        self._driver = driver

    async def run(self, body: bytes, *, wait: bool) -> Response:
        """Start a run of a new or finished handler; with `wait`, answer when it is final
        (200 completed, 500 failed or cancelled, the handler in the body), else at once."""
        try:
            handler_id, task, made_here = self._new_run(body)
            try:  # refused while the handler's last run is unfinished
                if wait and made_here:  # nothing can be ahead of it: it runs as it begins
                    result = await self._driver.run_new(task)
                elif wait:
                    result = await self._driver.run(task, handler=True, new=True)
                else:
                    result, _ = await self._driver.submit(task, handler=True)
            except TaskStateError:
                raise TaskStateError(f"Handler '{handler_id}' is already running") from None
            shard = self._control_plane.for_session(task.session_id or "")
            while wait and not result.status.is_final:  # it waits for input, or runs elsewhere
                result = await shard.get_task(result.session_id or "", task.task_id, MAX_WAIT_S)
        except (LlamaDeployError, RayActorError) as exc:
            return error_response(exc)
        handler = handler_from_task(result)
        # a final run answers as GET /handlers/{id} does; a started one, 200
        status = handler.http_status if wait else 200
        return JSONResponse(handler.model_dump(mode="json"), status_code=status)

    def _new_run(self, body: bytes) -> tuple[str, TaskDefinition, bool]:
        """The handler's id, its run's task, and whether the id was made here (a new
        handler)."""
        data = parse_json_body(body)
        if not isinstance(data, dict):
            raise InvalidRequestError("Invalid JSON body: expected an object")
        if data.get("context"):
            raise InvalidRequestError(
                "Context API is disabled: a handler's run starts from the state its last run "
                "left; reuse its handler_id to continue it"
            )
        kwargs = start_kwargs(data)
        check_json_depth(kwargs, "the start event")
        try:
            self._workflow.start_event_class(**kwargs)
        except (ValidationError, TypeError) as exc:
            raise InvalidRequestError(f"Validation error for 'start_event': {exc}") from None
        handler_id = data.get("handler_id")
        made_here = not handler_id
        handler_id = handler_id or new_handler_id()
        if not isinstance(handler_id, str) or not _HANDLER_ID.match(handler_id):
            raise InvalidRequestError(
                f"handler_id {handler_id!r} must match {HANDLER_ID_PATTERN} (it names a session)"
            )
        # the task's begin creates its session if new
        task = TaskDefinition(
            input=json.dumps(kwargs), session_id=session_of(handler_id), agent_id=self._service_name
        )
        return handler_id, task, made_here

    def describe(self, what: str) -> Response:
        """The workflow's start and stop event schemas, every event it knows, or its graph."""
        workflow = self._workflow
        content: dict[str, Any]
        if what == "schema":
            content = {
                "start": workflow.start_event_class.model_json_schema(),
                "stop": cast("type[Event]", workflow.stop_event_class).model_json_schema(),
            }
        elif what == "events":
            events = [*workflow.events, *self._additional_events]
            content = {"events": [cls.model_json_schema() for cls in events]}
        else:
            content = {"graph": get_workflow_representation(workflow).model_dump(mode="json")}
        return JSONResponse(content)


def parse_json_body(body: bytes) -> Any:
    """A request's JSON body; one that does not parse, or nests deeper than the parser goes,
    is the reference's 400."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        reason = exc if isinstance(exc, ValueError) else "it nests too deeply"
        raise InvalidRequestError(f"Invalid JSON body: {reason}") from None


def error_response(exc: Exception) -> JSONResponse:
    """Our error as the reference answers one: `{"detail": message}`; a request we cannot
    take is its 400."""
    error = error_to_answer(exc)
    status = 400 if isinstance(error, InvalidRequestError) else error.status_code
    return JSONResponse({"detail": str(error)}, status_code=status)
