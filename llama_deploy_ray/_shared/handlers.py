"""LlamaIndex's workflow-serving API (`llama-agents-server`'s `WorkflowServer`), in our words.

That API runs *handlers*: a handler is a session of ours, `handler.<handler_id>`, and each run
of it is one of the session's tasks (its `run_id` is the task id). A new run under a finished
handler's id is the session's next task, so it starts from the state the last one left, as
the reference server's does. Everything durable, cancellable and observable about tasks
holds for handlers; a session made through this API also reads through llama_deploy's.

This module holds the wire types of that API (its field names) and the translation between
them and ours; the routes are in `_cluster/handler_routes.py` (on each workflow's replicas)
and `_cluster/handler_api.py` (on the API's).
"""

from __future__ import annotations

import datetime
import json
import secrets
import string
from collections.abc import Collection
from typing import Any, Literal

from pydantic import BaseModel

from .config import ID_PATTERN
from .errors import InvalidRequestError
from .events import SEQ_KEY, TYPE_KEY, TYPES_KEY
from .types import TaskResult, TaskStatus

HANDLER_SESSION_PREFIX = "handler."
# what a caller-chosen handler id may hold: a session id, less the prefix
HANDLER_ID_PATTERN = ID_PATTERN.replace("{1,128}", f"{{1,{128 - len(HANDLER_SESSION_PREFIX)}}}")

HandlerStatus = Literal["running", "completed", "failed", "cancelled"]
_STATUS: dict[TaskStatus, HandlerStatus] = {
    TaskStatus.PENDING: "running",
    TaskStatus.RUNNING: "running",
    TaskStatus.WAITING: "running",  # for input: still running, as the reference says
    TaskStatus.COMPLETED: "completed",
    TaskStatus.FAILED: "failed",
    TaskStatus.CANCELLED: "cancelled",
}


def task_statuses(statuses: Collection[str]) -> set[TaskStatus]:
    """The task statuses shown as one of the handler `statuses` (a name outside the four
    matches none)."""
    return {task_status for task_status, shown in _STATUS.items() if shown in statuses}


class EventEnvelope(BaseModel):
    """An event as the API sends it: its fields (`value`) and class (`type`)."""

    value: dict[str, Any]
    qualified_name: str | None = None
    type: str
    types: list[str] | None = None


class HandlerData(BaseModel):
    handler_id: str
    workflow_name: str
    run_id: str | None = None
    status: HandlerStatus
    error: str | None = None
    result: EventEnvelope | None = None
    result_unreadable: bool = False
    started_at: str
    updated_at: str | None = None
    completed_at: str | None = None

    @property
    def http_status(self) -> int:
        """The reference's status code for a handler: 200 completed, 202 running, 500 failed
        or cancelled (the body is the handler in all three)."""
        return {"completed": 200, "running": 202}.get(self.status, 500)


def session_of(handler_id: str) -> str:
    return HANDLER_SESSION_PREFIX + handler_id


def handler_of(session_id: str) -> str:
    return session_id.removeprefix(HANDLER_SESSION_PREFIX)


_ID_ALPHABET = string.ascii_letters + string.digits


def new_handler_id() -> str:
    """Ten random letters and digits, as the reference's handler and run ids: the digits of
    one random number (one read of the system's randomness, not one per letter)."""
    number = secrets.randbelow(len(_ID_ALPHABET) ** 10)
    letters = []
    for _ in range(10):
        number, digit = divmod(number, len(_ID_ALPHABET))
        letters.append(_ID_ALPHABET[digit])
    return "".join(letters)


def handler_from_task(task: TaskResult) -> HandlerData:
    status = _STATUS[task.status]
    completed = _iso(task.finished_at) if task.finished_at is not None else None
    return HandlerData(
        handler_id=handler_of(task.session_id or ""),
        workflow_name=task.service_name or "",
        run_id=task.task_id,
        status=status,
        error=task.error if status == "failed" else None,
        result=stop_envelope(task) if status == "completed" else None,
        started_at=_iso(task.created_at),
        updated_at=completed or _iso(task.created_at),
        completed_at=completed,
    )


def stop_envelope(task: TaskResult) -> EventEnvelope:
    """The completed task's StopEvent: a plain one's `result`, or a subclass's fields."""
    if task.result_type is not None:
        return EventEnvelope(value=task.result, type=task.result_type, types=["StopEvent"])
    return EventEnvelope(
        value={"result": task.result},
        qualified_name="workflows.events.StopEvent",
        type="StopEvent",
    )


def terminal_envelope(task: TaskResult) -> EventEnvelope:
    """The event that ends a final task's stream, as the reference ends a handler's."""
    if task.status is TaskStatus.COMPLETED:
        return stop_envelope(task)
    if task.status is TaskStatus.CANCELLED:
        return EventEnvelope(value={}, type="WorkflowCancelledEvent", types=["StopEvent"])
    exception = {"exception_type": task.error_type, "exception_message": task.error}
    return EventEnvelope(
        value={"step_name": None, "exception": exception, "attempts": task.attempts},
        type="WorkflowFailedEvent",
        types=["StopEvent"],
    )


def envelope_from_stream(event: dict[str, Any]) -> EventEnvelope:
    """An event of our streams (its fields, `__type__`, `__seq__`) as an envelope."""
    value = {k: v for k, v in event.items() if k not in (TYPE_KEY, SEQ_KEY, TYPES_KEY)}
    return EventEnvelope(value=value, type=event[TYPE_KEY], types=event.get(TYPES_KEY))


def event_from_envelope(data: Any) -> dict[str, Any]:
    """A client's event envelope (`{"type": ..., "value": {...}}`, `data` for `value`, a
    `qualified_name` for `type`, or all of it as a JSON string) as our event dict."""
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"the event is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("Event data is required: an object with type and value")
    type_name = data.get("type") or str(data.get("qualified_name") or "").rpartition(".")[2]
    if not type_name or not isinstance(type_name, str):
        raise InvalidRequestError("the event names no type: give its class name as `type`")
    return {**fields_of(data.get("value", data.get("data", {}))), TYPE_KEY: type_name}


def start_kwargs(body: dict[str, Any]) -> dict[str, Any]:
    """A run body's start event (`start_event` in any envelope form, else `kwargs`) as the
    keyword arguments of `workflow.run`, which builds the start event from them."""
    start = body.get("start_event")
    if start is None:
        return fields_of(body.get("kwargs") or {})
    if isinstance(start, str):
        try:
            start = json.loads(start)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"Validation error for 'start_event': {exc}") from None
    if isinstance(start, dict) and ({"type", "qualified_name", "value", "data"} & start.keys()):
        start = start.get("value", start.get("data", {}))
    return fields_of(start)


def fields_of(value: Any) -> dict[str, Any]:
    """An event's fields as sent: a dict-like event's undeclared fields may come nested
    under `_data`, as its `model_dump` writes them."""
    if not isinstance(value, dict):
        raise InvalidRequestError(f"an event's value must be an object, got {value!r:.100}")
    nested = value.get("_data")
    if isinstance(nested, dict):
        return {**{k: v for k, v in value.items() if k != "_data"}, **nested}
    return dict(value)


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).isoformat()
