"""Wire types: what crosses the HTTP API and the Ray actors.

The names and the fields the seed documents are kept (`TaskDefinition(input=..., agent_id=...)`,
`ServiceDefinition(service_name=..., host=..., port=...)`); `TaskResult` also says where the
task is in its life (`status`) and why it failed (`error`).
"""

from __future__ import annotations

import json
import time
import uuid
from enum import Enum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .config import ID_PATTERN, MAX_JSON_DEPTH
from .errors import InvalidRequestError


def _new_id() -> str:
    return uuid.uuid4().hex


def json_depth(value: Any) -> int:
    """How deeply `value` nests lists and dicts (without recursing, so any depth is safe)."""
    depth, level = 0, [value]
    while level:
        containers = [v for v in level if isinstance(v, (dict, list))]
        if not containers:
            return depth
        depth += 1
        if depth > MAX_JSON_DEPTH:
            return depth
        level = [x for c in containers for x in (c.values() if isinstance(c, dict) else c)]
    return depth


def check_json_depth(value: Any, what: str) -> None:
    if json_depth(value) > MAX_JSON_DEPTH:
        raise ValueError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")


Id = Annotated[str, Field(pattern=ID_PATTERN)]


class TaskStatus(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"  # for an event sent into it (human input); holds no replica slot
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})


class TaskDefinition(BaseModel):
    """A task to run: `input` is the JSON object of the workflow's run kwargs and `agent_id`
    names the service (the seed's word for it)."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(description="JSON object of keyword arguments for `workflow.run`.")
    task_id: Id = Field(default_factory=_new_id)
    session_id: Id | None = None
    agent_id: Id | None = Field(default=None, description="The service that runs the task.")
    parent_task_id: Id | None = Field(
        default=None, description="The task whose workflow started this one (nested workflows)."
    )

    @field_validator("input")
    @classmethod
    def _input_is_json_object(cls, value: str) -> str:
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"input is not valid JSON: {exc}") from None
        except RecursionError:  # deeper than the parser goes
            raise ValueError(f"input nests deeper than {MAX_JSON_DEPTH} levels") from None
        if not isinstance(decoded, dict):
            raise ValueError(
                f"input must be a JSON object of run kwargs, got {type(decoded).__name__}"
            )
        check_json_depth(decoded, "input")
        return value

    @property
    def run_kwargs(self) -> dict[str, Any]:
        return json.loads(self.input)

    @property
    def is_new(self) -> bool:
        """Its id was made with it, not named by its sender: it was never sent before (one
        whose id was named may have run already, and its steps must not run twice)."""
        return "task_id" not in self.model_fields_set

    def id_named(self) -> TaskDefinition:
        """This task, its id named: whoever takes it next treats it as possibly sent before."""
        return self.model_copy(update={"task_id": self.task_id})

    def sent_to(self, session_id: str, service_name: str | None = None) -> TaskDefinition:
        """This task in the session (and for the service) its request was sent to; a task
        that names another is refused."""
        if self.session_id not in (None, session_id):
            raise InvalidRequestError(
                f"the task names session {self.session_id!r} but was sent to session {session_id!r}"
            )
        if service_name is not None and self.agent_id not in (None, service_name):
            raise InvalidRequestError(
                f"the task names service {self.agent_id!r} but was sent to service {service_name!r}"
            )
        return self.model_copy(
            update={"session_id": session_id, "agent_id": service_name or self.agent_id}
        )


class TaskResult(BaseModel):
    """Where a task is and, once it is final, its result or error."""

    task_id: str
    session_id: str | None = None
    service_name: str | None = None
    parent_task_id: str | None = None
    status: TaskStatus
    result: Any = None
    result_type: str | None = Field(
        default=None,
        description="The class of the workflow's StopEvent when it is a subclass (then "
        "`result` holds its fields); None for a plain StopEvent's result.",
    )
    error: str | None = Field(default=None, description="Why the task failed, if it did.")
    error_type: str | None = Field(
        default=None, description="The class name of the workflow's exception, if any."
    )
    attempts: int = 0
    created_at: float = Field(default_factory=time.time)
    finished_at: float | None = None


class SessionDefinition(BaseModel):
    """A session: the tasks run in it and, per service, the workflow state they left."""

    session_id: Id = Field(default_factory=_new_id)
    task_ids: list[str] = Field(default_factory=list)
    state: dict[str, Any] = Field(
        default_factory=dict, description="Workflow context state, keyed by service name."
    )
    created_at: float = Field(default_factory=time.time)


class ServiceDefinition(BaseModel):
    """A registered service: one deployed workflow."""

    model_config = ConfigDict(extra="forbid")

    service_name: Id
    description: str = "A service that wraps a llama-index workflow."
    prompt: list[dict[str, Any]] = Field(default_factory=list)
    host: str | None = None
    port: int | None = None


class ServiceStatus(BaseModel):
    """A service as it runs now: its replicas, as Ray Serve reports them, and its unfinished
    tasks, as the control plane records them."""

    service_name: str
    status: str = Field(
        description="Serve's status of the service's application (RUNNING, DEPLOYING, "
        "UNHEALTHY, ...), or NOT_DEPLOYED when it runs no replicas."
    )
    message: str = ""
    replicas: dict[str, int] = Field(
        default_factory=dict, description="Replicas by Serve state: RUNNING, STARTING, ..."
    )
    tasks: dict[str, int] = Field(
        default_factory=dict,
        description="Unfinished tasks by status: pending (queued for their turn or a replica), "
        "running, waiting (parked for input).",
    )


class QueueMessage(BaseModel):
    """A message on the Ray-native queue: a task published to a service's topic."""

    id_: str = Field(default_factory=_new_id)
    publisher_id: str = "default"
    type: str = Field(description="The topic: the service's name.")
    action: str = "new_task"
    data: dict[str, Any] = Field(default_factory=dict)
    stats: dict[str, float] = Field(default_factory=dict)


class TaskOutcome(BaseModel):
    """What a replica reports for one task; `state` is None when there is nothing to keep.
    A task that waits for input has `snapshot` (its context) and `inbox_seq` (the last inbox
    event it took) instead of a result."""

    result: Any = None
    result_type: str | None = None
    error: str | None = None
    error_type: str | None = None
    state: dict[str, Any] | None = None
    snapshot: dict[str, Any] | None = None
    inbox_seq: int = 0
    # the last events the workflow streamed, recorded with the outcome
    events: list[dict[str, Any]] = Field(default_factory=list)

    def final_fields(self) -> dict[str, Any]:
        """What this outcome, once final, sets on the task's `TaskResult`."""
        failed = self.error is not None
        return {
            "status": TaskStatus.FAILED if failed else TaskStatus.COMPLETED,
            "result": self.result,
            "result_type": self.result_type,
            "error": self.error,
            "error_type": self.error_type,
        }


class StartedTask(BaseModel):
    """A task whose turn has come, with the state its session left on its service; or a task
    that waited for input, to `resume` from its snapshot after inbox event `inbox_seq`."""

    task: TaskDefinition
    running: TaskResult = Field(description="The task's result as it started running.")
    state: dict[str, Any] | None = None
    state_from: str | None = Field(
        default=None,
        description=(
            "The id of the task whose outcome left `state` ('' for no state yet); `state` is "
            "left out when the driver said it already holds that state (see `LocalDriver`)."
        ),
    )
    resume: bool = False
    inbox_seq: int = 0


class DriverNotice(BaseModel):
    """What the control plane tells a task driver: its running tasks that were cancelled,
    (to the orchestrator) tasks whose driver went silent, now its own, and (to a replica) the
    session states it holds that are no longer the latest, `(session_id, service_name)` each.
    `incarnation` names this run of the control plane actor: what an earlier one said of the
    states a driver holds, a restarted one does not know."""

    incarnation: str
    cancelled: list[str] = Field(default_factory=list)
    orphaned: list[str] = Field(default_factory=list)
    stale_states: list[tuple[str, str]] = Field(default_factory=list)


class FinishedTasks(BaseModel):
    """The control plane's answer to outcomes sent together: what it could not record, and
    (when the driver holds the states they leave: see `LocalDriver`) the tasks whose state is
    not its session's latest on the service: another task of it is behind them, or the task
    had ended before its outcome came. `incarnation` as in `DriverNotice`."""

    incarnation: str
    problems: list[str] = Field(default_factory=list)
    not_latest: list[str] = Field(default_factory=list)
