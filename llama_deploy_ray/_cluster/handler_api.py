"""The workflow-serving API's routes that the HTTP API's replicas answer (see `_handlers`):
`GET /workflows`, `GET /handlers`, `GET /handlers/{id}`, `POST /handlers/{id}/cancel`,
`GET` and `POST /events/{id}` and `GET /results/{id}`, with the reference's status codes and
bodies (errors are `{"detail": message}`: see `answers_as_workflow_server`).

A handler's stream is its latest run's: the events its workflow wrote, numbered from 0 as
the reference numbers them (our logs number from 1), then the event that ends the run
(`StopEvent`, `WorkflowFailedEvent` or `WorkflowCancelledEvent`), made from the task's result.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .._shared.errors import InvalidRequestError, NotFoundError, TaskStateError
from .._shared.events import SEQ_KEY
from .._shared.handlers import (
    HANDLER_SESSION_PREFIX,
    EventEnvelope,
    HandlerData,
    envelope_from_stream,
    event_from_envelope,
    handler_from_task,
    session_of,
    task_statuses,
    terminal_envelope,
)
from .._shared.types import TaskResult, check_json_depth
from .actors import ControlPlaneHandle, OrchestratorHandle
from .handler_routes import parse_json_body

router = APIRouter(tags=["workflow server"])
# an idle stream's heartbeat, as the reference sends one
HEARTBEAT_S = 25.0
_PATHS = ("/handlers", "/events/", "/results/")


def answers_as_workflow_server(path: str) -> bool:
    """Whether an error on `path` is answered as the reference answers one."""
    return path == "/workflows" or path.startswith(_PATHS)


HANDLER_NOT_FOUND = "Handler not found"


@router.get("/workflows")
async def list_workflows(request: Request) -> dict[str, list[str]]:
    """The deployed services' names, in the order they were registered."""
    services = await _control_plane(request).list_services()
    return {"workflows": [s.service_name for s in services]}


@router.get("/handlers")
async def list_handlers(
    request: Request,
    status: Annotated[list[str] | None, Query()] = None,
    workflow_name: Annotated[list[str] | None, Query()] = None,
) -> dict[str, list[HandlerData]]:
    """Every handler's latest run, filtered by status and workflow name (each repeatable; a
    status outside the four matches nothing), by the control plane."""
    statuses = {s for s in status or [] if s}
    names = {n for n in workflow_name or [] if n}
    tasks = await _control_plane(request).latest_tasks(
        HANDLER_SESSION_PREFIX, task_statuses(statuses) if statuses else None, names or None
    )
    return {"handlers": [handler_from_task(task) for task in tasks]}


@router.get("/handlers/{handler_id}")
async def get_handler(request: Request, handler_id: str) -> JSONResponse:
    """The handler: 200 completed, 202 running, 500 failed or cancelled."""
    handler = handler_from_task(await _latest_run(request, handler_id))
    return JSONResponse(handler.model_dump(mode="json"), status_code=handler.http_status)


@router.get("/results/{handler_id}")
async def get_result(request: Request, handler_id: str) -> JSONResponse:
    """Deprecated in the reference: `GET /handlers/{id}` with the result flattened (a plain
    StopEvent's `result`, a subclass's fields)."""
    task = await _latest_run(request, handler_id)
    handler = handler_from_task(task)
    body = handler.model_dump(mode="json")
    if handler.result is not None:
        body["result"] = task.result
    return JSONResponse(body, status_code=handler.http_status)


@router.post("/handlers/{handler_id}/cancel")
async def cancel_handler(request: Request, handler_id: str, purge: str = "") -> dict[str, str]:
    """Cancel the running handler (404 if it is not running); with `purge=true`, also forget
    it, running or not."""
    task = await _latest_run(request, handler_id)
    shard = _control_plane(request).for_session(task.session_id or "")
    if not task.status.is_final:
        await shard.cancel_task(task.session_id or "", task.task_id)
    elif purge != "true":
        raise NotFoundError(HANDLER_NOT_FOUND)
    if purge == "true":
        await shard.delete_session(task.session_id or "")
        return {"status": "deleted"}
    return {"status": "cancelled"}


@router.post("/events/{handler_id}")
async def send_event(request: Request, handler_id: str) -> dict[str, str]:
    """Send an event into the running handler (human input): 200 once it is in the run's
    inbox, 409 if the run ended."""
    body = parse_json_body(await request.body())
    if not isinstance(body, dict) or not body.get("event"):
        raise InvalidRequestError("Event data is required")
    event = event_from_envelope(body["event"])
    check_json_depth(event, "the event")
    task = await _latest_run(request, handler_id)
    if task.status.is_final:
        raise TaskStateError("Workflow already completed")
    orchestrator: OrchestratorHandle = request.app.state.orchestrator
    await orchestrator.send_event(
        task.session_id or "", task.task_id, task.service_name or "", event
    )
    return {"status": "sent"}


@router.get("/events/{handler_id}", response_model=None)
async def stream_events(
    request: Request,
    handler_id: str,
    sse: bool = True,
    after_sequence: str = "now",
    include_qualified_name: bool = True,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Response:
    """The latest run's events after `after_sequence` (-1: all; `now`: only new ones), as
    server-sent events with `id:` lines (`Last-Event-ID` resumes), or NDJSON with
    `sse=false`; the stream ends with the run. 204 when nothing is left to send. (The
    reference's `include_internal` has nothing to add: our streams hold what workflows
    wrote.)"""
    task = await _latest_run(request, handler_id)
    shard = _control_plane(request).for_session(task.session_id or "")
    session_id, task_id = task.session_id or "", task.task_id
    if sse and last_event_id is not None and last_event_id.lstrip("-").isdigit():
        after_sequence = last_event_id
    if after_sequence == "now":
        now = await shard.read_events(session_id, task_id, 0, 0.0)
        after = now.last_seq + (1 if now.closed else 0)  # an ended run has nothing new
    elif after_sequence.lstrip("-").isdigit():
        after = max(int(after_sequence) + 1, 0)  # ours: the sequence number of the last seen
    else:
        raise InvalidRequestError(f"Invalid after_sequence: {after_sequence!r}")
    first = await shard.read_events(session_id, task_id, after, 0.0)
    if first.closed and not first.events and after > first.last_seq:
        return Response(status_code=204)  # the terminal event was seen too

    async def stream() -> AsyncIterator[str]:
        nonlocal after
        batch = first
        while True:
            for event in batch.events:
                after = event[SEQ_KEY]
                yield _frame(envelope_from_stream(event), after - 1, sse, include_qualified_name)
            if batch.closed:
                final = await shard.get_task(session_id, task_id, 0.0)
                envelope = terminal_envelope(final)
                yield _frame(envelope, batch.last_seq, sse, include_qualified_name)
                return
            if not batch.events and sse:
                yield ": heartbeat\n\n"
            batch = await shard.read_events(session_id, task_id, after, HEARTBEAT_S)

    media_type = "text/event-stream" if sse else "application/x-ndjson"
    return StreamingResponse(stream(), media_type=media_type)


def _frame(envelope: EventEnvelope, sequence: int, sse: bool, qualified_name: bool) -> str:
    if not qualified_name:
        envelope = envelope.model_copy(update={"qualified_name": None})
    data = envelope.model_dump_json()
    return f"id: {sequence}\ndata: {data}\n\n" if sse else data + "\n"


def _control_plane(request: Request) -> ControlPlaneHandle:
    return request.app.state.control_plane


async def _latest_run(request: Request, handler_id: str) -> TaskResult:
    session_id = session_of(handler_id)
    try:
        task = await _control_plane(request).for_session(session_id).get_current_task(session_id)
    except NotFoundError:
        task = None
    if task is None:
        raise NotFoundError(HANDLER_NOT_FOUND)
    return task
