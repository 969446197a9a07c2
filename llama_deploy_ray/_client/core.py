"""What the sync and async clients share, with no I/O: each API call as a `Call` (method,
path, body, how to read the answer, whether it may be sent twice), the mapping of HTTP answers
and transport failures to our errors, and which failures are retried. The clients only send a
`Call`, within its deadline and under the retry policy of `_retry`, and hand the response back
here."""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import httpx
from pydantic import TypeAdapter
from workflows.events import Event

from .._shared.config import (
    MAX_WAIT_S,
    NEW_TASK_HEADER,
    PAGE_SIZE,
    STREAM_KEEPALIVE_S,
    workflow_route,
)
from .._shared.errors import (
    ControlPlaneUnavailableError,
    InvalidRequestError,
    LlamaDeployError,
    RequestTimeoutError,
    ServiceNotFoundError,
    ServiceOverloadedError,
    TaskCancelledError,
    TaskFailedError,
    TaskTimeoutError,
    error_from_json,
)
from .._shared.events import SEQ_KEY, STREAM_END_TYPE, TYPE_KEY, event_to_dict
from .._shared.retry import full_jitter_s
from .._shared.types import (
    ServiceDefinition,
    ServiceStatus,
    SessionDefinition,
    TaskDefinition,
    TaskResult,
    TaskStatus,
)

T = TypeVar("T")

DEFAULT_POLL_INTERVAL = 0.5  # accepted for the seed's signatures; nothing polls here


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    parse: Callable[[Any], T]
    body: Any = None
    params: dict[str, Any] = field(default_factory=dict)
    # extra seconds the server may hold the request (long polls) on top of the client timeout
    hold_s: float = 0.0
    # raised when nothing at the path answers (a 404 that is not one of ours)
    not_routed: LlamaDeployError | None = None
    # sending it twice does no harm (a run or task carries its task id), so it is sent again
    # when its fate is unknown (a cut connection, a proxy's 502); others only when it surely
    # did not arrive (refused connection, Serve's 503 for a full queue)
    idempotent: bool = True
    # a run of a task made for it: its first send says the task is new (`NEW_TASK_HEADER`)
    new_task: bool = False

    def sends(self) -> Iterator[Call[T]]:
        """The call as each attempt sends it: a resend may follow a send that arrived, so it
        no longer says its task is new."""
        yield self
        resent = dataclasses.replace(self, new_task=False)
        while True:
            yield resent


def _none(_: Any) -> None:
    return None


def _model(model: type[T]) -> Callable[[Any], T]:
    adapter = TypeAdapter(model)
    return adapter.validate_python


def _list_of(model: type[T]) -> Callable[[Any], list[T]]:
    return TypeAdapter(list[model]).validate_python  # type: ignore[valid-type]


def _optional(model: type[T]) -> Callable[[Any], T | None]:
    return TypeAdapter(model | None).validate_python


_service = _model(ServiceDefinition)
_service_status = _model(ServiceStatus)
_services = _list_of(ServiceDefinition)
_session = _model(SessionDefinition)
_sessions = _list_of(SessionDefinition)
_result = _model(TaskResult)
_results = _list_of(TaskResult)
_optional_result = _optional(TaskResult)


# control plane calls


def list_services() -> Call[list[ServiceDefinition]]:
    return Call("GET", "/services", _services)


def get_service(service_name: str) -> Call[ServiceDefinition]:
    return Call("GET", f"/services/{service_name}", _service)


def get_service_status(service_name: str) -> Call[ServiceStatus]:
    return Call("GET", f"/services/{service_name}/status", _service_status)


def register_service(service_def: ServiceDefinition) -> Call[ServiceDefinition]:
    return Call("POST", "/services/register", _service, body=service_def.model_dump(mode="json"))


def deregister_service(service_name: str) -> Call[None]:
    return Call("POST", "/services/deregister", _none, params={"service_name": service_name})


def create_session() -> Call[SessionDefinition]:
    return Call("POST", "/sessions/create", _session, idempotent=False)


def get_session(session_id: str) -> Call[SessionDefinition]:
    return Call("GET", f"/sessions/{session_id}", _session)


def get_or_create_session(session_id: str) -> Call[SessionDefinition]:
    return Call("PUT", f"/sessions/{session_id}", _session)


def list_sessions(offset: int) -> Call[list[SessionDefinition]]:
    return Call("GET", "/sessions", _sessions, params={"offset": offset, "limit": PAGE_SIZE})


def delete_session(session_id: str) -> Call[None]:
    return Call("POST", f"/sessions/{session_id}/delete", _none)


# session calls


def task_definition(service_name: str, run_kwargs: dict[str, Any]) -> TaskDefinition:
    try:
        encoded = json.dumps(run_kwargs)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(
            f"run kwargs for {service_name!r} are not JSON-serializable ({exc}); pass str, "
            "numbers, lists and dicts, or a pydantic model's .model_dump(mode='json')"
        ) from exc
    return TaskDefinition(input=encoded, agent_id=service_name)


def run_task(session_id: str, task: TaskDefinition) -> Call[TaskResult]:
    """Straight to the service's replicas, which drive the run (see `_service`)."""
    service_name = task.agent_id or ""
    return Call(
        "POST",
        f"{workflow_route(service_name)}/sessions/{session_id}/run",
        _result,
        body=task.model_dump(),
        not_routed=ServiceNotFoundError(service_name),
        new_task=True,
    )


# How long `start_task` waits for a replica to take it (a replica that answers takes a few
# milliseconds) before the clients have the control plane record the task (`create_task`): when
# every replica's slots are taken, a start waits in Serve's queue, and `run_nowait` returns at once.
LIVE_START_S = 1.0


def start_task(session_id: str, task: TaskDefinition) -> Call[dict[str, Any] | None]:
    """Straight to the service's replicas, which answer once the task is recorded; the
    response goes on with the task's stream, NDJSON lines (see `_live_stream`)."""
    service_name = task.agent_id
    if not service_name:
        raise InvalidRequestError("the task names no service: set agent_id")
    return Call(
        "POST",
        f"{workflow_route(service_name)}/sessions/{session_id}/run-nowait",
        _event_line,
        body=task.model_dump(),
        hold_s=STREAM_KEEPALIVE_S,
        not_routed=ServiceNotFoundError(service_name),
    )


def create_task(session_id: str, task: TaskDefinition) -> Call[TaskResult]:
    """Through the control plane's API: the orchestrator records the task and runs it once a
    replica has a free slot."""
    return Call("POST", f"/sessions/{session_id}/tasks", _result, body=task.model_dump())


def get_tasks(session_id: str, offset: int) -> Call[list[TaskResult]]:
    return Call(
        "GET",
        f"/sessions/{session_id}/tasks",
        _results,
        params={"offset": offset, "limit": PAGE_SIZE},
    )


def get_current_task(session_id: str) -> Call[TaskResult | None]:
    return Call("GET", f"/sessions/{session_id}/current_task", _optional_result)


def _long_poll(path: str, parse: Callable[[Any], T], wait_s: float) -> Call[T]:
    wait_s = min(wait_s, MAX_WAIT_S)
    return Call("GET", path, parse, params={"wait_s": wait_s}, hold_s=wait_s)


def get_task(session_id: str, task_id: str, wait_s: float) -> Call[TaskResult]:
    return _long_poll(f"/sessions/{session_id}/tasks/{task_id}", _result, wait_s)


def get_task_result(session_id: str, task_id: str, wait_s: float) -> Call[TaskResult | None]:
    return _long_poll(f"/sessions/{session_id}/tasks/{task_id}/result", _optional_result, wait_s)


def wait_for_final(session_id: str, task_id: str, deadline: float) -> Call[TaskResult]:
    """The next long poll of a run that waits for its task's final result until `deadline`."""
    return get_task(session_id, task_id, max(0.0, deadline - time.monotonic()))


def stream_events(session_id: str, task_id: str, after: int) -> Call[dict[str, Any] | None]:
    # the server sends a keep-alive line at least this often; allow for it on each read
    return Call(
        "GET",
        f"/sessions/{session_id}/tasks/{task_id}/events",
        _event_line,
        params={"after": after},
        hold_s=STREAM_KEEPALIVE_S,
    )


R = TypeVar("R")


class LiveStreams(Generic[R]):
    """The responses of the tasks a client started (`start_task`), kept open for a read of the
    task's stream: the most recent `limit`, so that starting many tasks and streaming none
    holds few connections (a task whose response was let go streams from the control plane)."""

    def __init__(self, limit: int = 16) -> None:
        self._limit = limit
        self._responses: OrderedDict[str, R] = OrderedDict()
        self._lock = threading.Lock()  # the sync client may be shared by threads

    def keep(self, task_id: str, response: R) -> list[R]:
        """Keep `response`; returns those let go to make room, to be closed."""
        with self._lock:
            self._responses[task_id] = response
            let_go = []
            while len(self._responses) > self._limit:
                let_go.append(self._responses.popitem(last=False)[1])
            return let_go

    def take(self, task_id: str) -> R | None:
        with self._lock:
            return self._responses.pop(task_id, None)

    def take_all(self) -> list[R]:
        with self._lock:
            responses = list(self._responses.values())
            self._responses.clear()
            return responses


class StreamCursor:
    """Where a reader is in a task's stream: it reconnects from the last event it saw when the
    connection drops or the core restarts (503), so no event is lost or repeated, and gives
    up once it has failed without progress for `timeout_s`."""

    def __init__(self, session_id: str, task_id: str, after: int, timeout_s: float) -> None:
        self.session_id, self.task_id, self.after = session_id, task_id, after
        self.ended = False  # the log closed and every event was read
        self._timeout_s = timeout_s
        self._failures = 0
        self._failing_since = 0.0

    def call(self) -> Call[dict[str, Any] | None]:
        return stream_events(self.session_id, self.task_id, self.after)

    def seen(self, event: dict[str, Any]) -> None:
        self.after = event.get(SEQ_KEY, self.after)
        self._failures = 0

    def live_event(self, line: str) -> dict[str, Any] | None:
        """A line of a live stream (see `start_task`): the event it holds when it is past
        `after` (and noted as seen), else None; its end line sets `ended`."""
        event = _event_line(line)
        if event is None:
            return None
        if event.get(TYPE_KEY) == STREAM_END_TYPE:
            self.ended = True
            return None
        if event[SEQ_KEY] <= self.after:  # seen before this read began
            return None
        self.seen(event)
        return event

    def wait_before_reconnecting_s(self, exc: BaseException) -> float:
        """How long to wait before reading on from `after`; raises `exc` when it should not."""
        now = time.monotonic()
        if self._failures == 0:
            self._failing_since = now
        self._failures += 1
        if not is_retryable(self.call(), exc) or now - self._failing_since > self._timeout_s:
            raise exc
        return full_jitter_s(self._failures)


def _event_line(line: str) -> dict[str, Any] | None:
    """One NDJSON line of a stream: an event dict, or None for a keep-alive."""
    return json.loads(line) if line.strip() else None


def send_event(
    session_id: str, service_name: str, task_id: str, ev: Event | dict[str, Any]
) -> Call[None]:
    if isinstance(ev, dict) and not isinstance(ev.get(TYPE_KEY), str):
        raise InvalidRequestError(
            f"an event given as a dict names its class in {TYPE_KEY!r}, e.g. "
            f'{{"{TYPE_KEY}": "HumanResponseEvent", "response": "yes"}}; got keys {sorted(ev)}'
        )
    return Call(
        "POST",
        f"/sessions/{session_id}/tasks/{task_id}/events",
        _none,
        body={
            "service_name": service_name,
            "event": ev if isinstance(ev, dict) else event_to_dict(ev),
        },
        idempotent=False,  # exactly once: an event is sent again only if it surely did not arrive
    )


def cancel_task(session_id: str, task_id: str) -> Call[TaskResult]:
    return Call("POST", f"/sessions/{session_id}/tasks/{task_id}/cancel", _result, idempotent=False)


def result_value(result: TaskResult) -> Any:
    """The workflow's result, or the task's failure raised as an error."""
    if result.status is TaskStatus.CANCELLED:
        raise TaskCancelledError(result.task_id, result.error or "cancelled")
    if result.status is TaskStatus.FAILED:
        error_cls = TaskTimeoutError if result.error_type == "WorkflowTimeoutError" else None
        raise (error_cls or TaskFailedError)(
            result.task_id, result.error or "unknown error", result.error_type
        )
    return result.result


# transport


def deadline_after(timeout_s: float) -> float:
    return time.monotonic() + timeout_s


def request_kwargs(
    call: Call[Any], base_url: str, deadline: float, timeout_s: float
) -> dict[str, Any]:
    """httpx's arguments for `call` to the control plane at `base_url`, which must be answered
    by `deadline`."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise timed_out(call, timeout_s)
    kwargs: dict[str, Any] = {
        "method": call.method,
        "url": _url(base_url, call.path),
        "timeout": remaining + call.hold_s,
    }
    if call.params:  # httpx parses the URL again for any params, even none
        kwargs["params"] = call.params
    if call.body is not None:
        kwargs["json"] = call.body
    if call.new_task:
        kwargs["headers"] = {NEW_TASK_HEADER: "1"}
    return kwargs


@functools.lru_cache(maxsize=1024)
def _url(base_url: str, path: str) -> httpx.URL:
    """The absolute URL of `path`, parsed once: httpx parses a path relative to its client's
    base URL twice on every request, a tenth of the client's CPU for a small run."""
    return httpx.URL(base_url + path)


def read_response(call: Call[T], response: httpx.Response) -> T:
    if response.is_success:
        return call.parse(response.json() if response.content else None)
    try:
        body = response.json()
    except ValueError:
        body = {"message": response.text}
    if not isinstance(body, dict):
        body = {"message": body}
    if "error" not in body:  # not our API's answer: Serve's proxy, HAProxy, or no route
        if response.status_code == 404 and call.not_routed is not None:
            raise call.not_routed
        if response.status_code == 503:
            raise ServiceOverloadedError(
                f"{call.method} {call.path} was refused by Ray Serve (503): the service's "
                "queue is full (max_queued_requests) or it has no replica running yet"
            )
        if response.status_code in (500, 502, 504):
            raise ControlPlaneUnavailableError(
                f"{call.method} {call.path}: the proxy lost the replica that held the request "
                f"(HTTP {response.status_code}: {response.text[:200]}); it restarts, retry shortly"
            )
    raise error_from_json(body, response.status_code)


def is_retryable(call: Call[Any], exc: BaseException) -> bool:
    """Whether the clients send `call` again after `exc` (within the call's deadline)."""
    never_arrived = (httpx.ConnectError, httpx.ConnectTimeout)
    if isinstance(exc, ServiceOverloadedError) or isinstance(exc.__cause__, never_arrived):
        return True
    return (
        call.idempotent
        and isinstance(exc, ControlPlaneUnavailableError)
        and not isinstance(exc.__cause__, httpx.TimeoutException)
    )


def timed_out(call: Call[Any], timeout_s: float) -> RequestTimeoutError:
    return RequestTimeoutError(
        f"{call.method} {call.path} got no answer within the client's timeout ({timeout_s} s). "
        "What it asked may still happen: a run goes on in the cluster (wait for it with "
        "get_task(task_id, wait_s=...)); for long tasks raise the client's timeout, or use "
        "run_nowait()"
    )


def transport_error(
    exc: httpx.TransportError, call: Call[Any], base_url: str, timeout_s: float
) -> LlamaDeployError:
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
        return timed_out(call, timeout_s)
    return ControlPlaneUnavailableError(
        f"could not reach the control plane at {base_url} ({type(exc).__name__}: {exc}); "
        "is deploy_core running, and does ControlPlaneConfig(host, port) point at it?"
    )
