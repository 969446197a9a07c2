"""The errors of llama-deploy-ray, one tree for every path (in-process, through a Ray actor,
over HTTP):

    LlamaDeployError
    ├── NotFoundError                    404 (also a ValueError, as the seed's client raised)
    │   ├── ServiceNotFoundError
    │   ├── SessionNotFoundError
    │   └── TaskNotFoundError
    ├── InvalidRequestError              422
    ├── UnauthorizedError                401 (no API key, or not one of the core's)
    ├── ForbiddenError                   403 (a cross-site request)
    ├── PayloadTooLargeError             413
    ├── ServiceConflictError             409
    ├── TaskStateError                   409 (e.g. an event sent to a finished task)
    ├── ControlPlaneUnavailableError     503
    │   └── ServiceOverloadedError       503 (Serve refused a run: the service's queue is full)
    ├── RequestTimeoutError              504 (also a TimeoutError: the client's timeout ran out)
    └── TaskFailedError                  500 (on the task's result, not on the request)
        ├── TaskTimeoutError
        └── TaskCancelledError

Every constructor argument is a string passed on to `Exception.__init__`, so each class pickles
and survives a Ray actor boundary (it arrives wrapped as `RayTaskError(cls)`, still an instance
of `cls`). The HTTP API sends `{"error": class name, "message": ..., "detail": {...}}` and the
clients raise the same class again, so a caller catches one type wherever it runs.
"""

from __future__ import annotations

from typing import Any


class LlamaDeployError(Exception):
    """Base of every error raised by llama-deploy-ray."""

    status_code = 500

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def detail(self) -> dict[str, Any]:
        """Fields besides the message that let a client rebuild this error."""
        return {}


class NotFoundError(LlamaDeployError, ValueError):
    status_code = 404


class ServiceNotFoundError(NotFoundError):
    def __init__(self, service_name: str, message: str | None = None) -> None:
        self.service_name = service_name
        super().__init__(
            message
            or f"no service named {service_name!r} is registered: deploy it with "
            "deploy_workflow(...) or check the name with list_services()",
        )

    def detail(self) -> dict[str, Any]:
        return {"service_name": self.service_name}

    def __reduce__(self) -> Any:
        return (type(self), (self.service_name, self.message))


class SessionNotFoundError(NotFoundError):
    def __init__(self, session_id: str, message: str | None = None) -> None:
        self.session_id = session_id
        super().__init__(
            message
            or f"no session with id {session_id!r}: create one with create_session() "
            "or get_or_create_session(id)",
        )

    def detail(self) -> dict[str, Any]:
        return {"session_id": self.session_id}

    def __reduce__(self) -> Any:
        return (type(self), (self.session_id, self.message))


class TaskNotFoundError(NotFoundError):
    def __init__(self, task_id: str, message: str | None = None) -> None:
        self.task_id = task_id
        super().__init__(
            message or f"no task with id {task_id!r} in this session: list them with get_tasks()",
        )

    def detail(self) -> dict[str, Any]:
        return {"task_id": self.task_id}

    def __reduce__(self) -> Any:
        return (type(self), (self.task_id, self.message))


class InvalidRequestError(LlamaDeployError):
    status_code = 422


class UnauthorizedError(LlamaDeployError):
    status_code = 401


class ForbiddenError(LlamaDeployError):
    status_code = 403


class PayloadTooLargeError(LlamaDeployError):
    status_code = 413


class ServiceConflictError(LlamaDeployError):
    status_code = 409


class TaskStateError(LlamaDeployError):
    """The task's status does not allow the request (it is already final, say)."""

    status_code = 409


class ControlPlaneUnavailableError(LlamaDeployError):
    status_code = 503


class ServiceOverloadedError(ControlPlaneUnavailableError):
    """Ray Serve refused the request before it reached a replica (the service's queue is full,
    or no replica runs yet); the clients send it again with backoff within their timeout."""


class RequestTimeoutError(LlamaDeployError, TimeoutError):
    """The client's timeout ran out before the answer came; what was asked may still happen
    (a run goes on: read its result with `get_task(task_id, wait_s=...)`)."""

    status_code = 504


class TaskFailedError(LlamaDeployError):
    """The workflow raised, or the task could not run; `error` is the workflow's own message."""

    def __init__(
        self, task_id: str, error: str, error_type: str | None = None, message: str | None = None
    ) -> None:
        self.task_id = task_id
        self.error = error
        self.error_type = error_type
        kind = f"{error_type}: " if error_type else ""
        super().__init__(message or f"task {task_id} failed: {kind}{error}")

    def detail(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "error": self.error, "error_type": self.error_type}

    def __reduce__(self) -> Any:
        return (type(self), (self.task_id, self.error, self.error_type, self.message))


class TaskTimeoutError(TaskFailedError):
    """The workflow ran past its own timeout."""


class TaskCancelledError(TaskFailedError):
    """A client cancelled the task (or the task that started it)."""


_BY_NAME: dict[str, type[LlamaDeployError]] = {
    cls.__name__: cls
    for cls in (
        LlamaDeployError,
        NotFoundError,
        ServiceNotFoundError,
        SessionNotFoundError,
        TaskNotFoundError,
        InvalidRequestError,
        UnauthorizedError,
        ForbiddenError,
        PayloadTooLargeError,
        ServiceConflictError,
        TaskStateError,
        ControlPlaneUnavailableError,
        ServiceOverloadedError,
        RequestTimeoutError,
        TaskFailedError,
        TaskTimeoutError,
        TaskCancelledError,
    )
}


def error_to_json(exc: LlamaDeployError) -> dict[str, Any]:
    return {"error": type(exc).__name__, "message": exc.message, "detail": exc.detail()}


def error_to_answer(exc: Exception) -> LlamaDeployError:
    """What an HTTP answer reports for `exc`: ours as raised (an error raised in an actor
    arrives as `RayTaskError(ours)` and carries ours as its `cause`); anything else means the
    control plane's actors could not be reached."""
    cause: BaseException = exc
    # an error that crossed several actors is wrapped once per hop
    while type(cause).__name__ not in _BY_NAME and isinstance(
        getattr(cause, "cause", None), BaseException
    ):
        cause = cause.cause  # type: ignore[attr-defined]
    if isinstance(cause, LlamaDeployError) and type(cause).__name__ in _BY_NAME:
        return cause
    return ControlPlaneUnavailableError(
        f"the control plane actors are not reachable ({type(exc).__name__}); "
        "they restart on their own, retry shortly or run deploy_core again"
    )


def error_from_json(body: dict[str, Any], status_code: int) -> LlamaDeployError:
    """Rebuild the error the API sent; an unknown body becomes the base class."""
    cls = _BY_NAME.get(str(body.get("error")))
    message = str(body.get("message") or body.get("detail") or f"HTTP {status_code}")
    detail: dict[str, Any] = body["detail"] if isinstance(body.get("detail"), dict) else {}
    if cls is None:
        # FastAPI's own 422 body: {"detail": [...validation errors...]}
        if status_code == 422:
            return InvalidRequestError(f"invalid request: {body.get('detail')}")
        return LlamaDeployError(f"HTTP {status_code}: {message}")
    if cls is ServiceNotFoundError:
        return cls(detail.get("service_name", ""), message)
    if cls is SessionNotFoundError:
        return cls(detail.get("session_id", ""), message)
    if cls is TaskNotFoundError:
        return cls(detail.get("task_id", ""), message)
    if issubclass(cls, TaskFailedError):
        return cls(
            detail.get("task_id", ""), detail.get("error", ""), detail.get("error_type"), message
        )
    return cls(message)
