"""The workflow service: a Ray Serve deployment whose replicas run one workflow.

A replica takes a task from its request queue (the service's topic on the Ray-native message
queue), restores the session's context for this service, runs the workflow and hands back the
result with the context's new state. While it runs, the events the workflow writes to its
stream are pushed to the control plane in batches. It keeps nothing between tasks, so any
replica can take any task, and a replica that dies loses only the tasks it was running (the
orchestrator sends those again, or adopts them).

A replica also takes runs over HTTP at `workflow_route(name)`, from the clients, and drives
those itself (`LocalDriver`): the control plane's turn and state before the run, the outcome
recorded after it, one Serve hop in all.

Human input: once the workflow writes an `InputRequiredEvent`, the replica reads the task's
inbox on the control plane and sends what arrives into the run. If the workflow still waits
for input after `input_hold_s`, the replica snapshots the context, ends the run and reports the
task as waiting: it holds no replica slot until an event arrives, and then any replica resumes
it from the snapshot (time spent waiting does not count against the workflow's timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from typing import Any, cast

import ray
from pydantic import ValidationError
from pydantic_core import PydanticSerializationError, to_jsonable_python
from ray import serve
from ray.exceptions import RayActorError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from workflows import Context
from workflows.events import InputRequiredEvent, StopEvent
from workflows.handler import WorkflowHandler

from . import _nested
from ._config import CONTROL_PLANE_ACTOR_NAME, ID_PATTERN, ORCHESTRATOR_ACTOR_NAME
from ._driver import LocalDriver
from ._errors import (
    InvalidRequestError,
    LlamaDeployError,
    NotFoundError,
    error_to_answer,
    error_to_json,
)
from ._events import SEQ_KEY, accepted_events, event_from_dict, event_to_dict
from ._guard import RequestGuard
from ._packaging import PackedWorkflow, unpack_workflow
from ._retry import call_actor
from ._state_serializer import SignedStateSerializer
from ._types import QueueMessage, StartedTask, TaskDefinition, TaskOutcome
from ._workflows_internals import with_fresh_run_clock

logger = logging.getLogger(__name__)

_ID = re.compile(ID_PATTERN)


@serve.deployment
class WorkflowService:
    def __init__(
        self, packed: PackedWorkflow, service_name: str, namespace: str, input_hold_s: float
    ) -> None:
        self._workflow = unpack_workflow(packed)
        self._service_name = service_name
        self._accepted = accepted_events(self._workflow)
        self._control_plane = ray.get_actor(CONTROL_PLANE_ACTOR_NAME, namespace=namespace)
        # JSON where it can, a signed pickle where it must: state may hold any object a step
        # put there, and may also hold what a client sent
        secret = cast(bytes, ray.get(self._control_plane.state_secret.remote()))
        self._serializer: SignedStateSerializer = SignedStateSerializer(secret)
        self._input_hold_s = input_hold_s
        self._driver: LocalDriver = LocalDriver(self._control_plane, self._run)
        self._guard: RequestGuard = RequestGuard(namespace)
        _nested.attach_actors(self._control_plane, ORCHESTRATOR_ACTOR_NAME, namespace)

    async def __call__(self, request: Request) -> Response:
        """`POST .../sessions/{session_id}/run` with a `TaskDefinition`: run the task here and
        answer with its `TaskResult`, final or `waiting` (parked for input); errors as the
        control plane's API sends them."""
        preflight = self._guard.preflight(request.method, request.headers)
        if preflight is not None:
            return preflight
        response = await self._answer(request)
        response.headers.update(self._guard.cors_headers(request.headers))
        return response

    async def _answer(self, request: Request) -> Response:
        refusal = self._guard.refusal(request.method, request.url.path, request.headers)
        if refusal is not None:
            return _error_response(refusal)
        path = request.url.path.rstrip("/").split("/")
        is_run = len(path) >= 3 and path[-3] == "sessions" and path[-1] == "run"
        session_id = path[-2] if is_run else ""
        if request.method != "POST" or not _ID.match(session_id):
            return _error_response(
                NotFoundError(
                    f"no route {request.method} {request.url.path}: a service takes "
                    f"POST .../sessions/{{session_id}}/run, the id matching {ID_PATTERN}"
                )
            )
        try:
            body = await self._guard.read_body(request.stream())
            task = TaskDefinition.model_validate_json(body)
            result = await self._driver.run(task.sent_to(session_id, self._service_name))
        except ValidationError as exc:
            return _error_response(InvalidRequestError(f"invalid task: {exc}"))
        except (LlamaDeployError, RayActorError) as exc:  # ours, or from the control plane
            return _error_response(exc)
        return Response(result.model_dump_json(), media_type="application/json")

    async def __del__(self) -> None:
        # Serve stops a replica gracefully: what it ran is recorded before it goes
        await self._driver.drain()

    async def check_event(self, event: dict[str, Any]) -> None:
        """Raise `InvalidRequestError` unless this workflow can take `event` from a client."""
        event_from_dict(event, self._accepted)

    async def process_message(self, message: QueueMessage) -> TaskOutcome:
        """Run (or resume) the task in `message` from the state it carries."""
        return await self._run(message.data["started"])

    async def _run(self, started: StartedTask) -> TaskOutcome:
        task, state, resume = started.task, started.state, started.resume
        ctx = None
        if state and not resume:
            # A new task is a new run on the session's state: its timeout starts from zero,
            # not from the alive time the session's earlier runs spent.
            state = with_fresh_run_clock(state)
        token = _nested.CURRENT_TASK.set(task)
        try:
            if state:
                ctx = Context.from_dict(self._workflow, state, serializer=self._serializer)
            handler = self._workflow.run(ctx=ctx, **({} if resume else task.run_kwargs))
        except Exception as exc:  # its run kwargs, or the session's state, were refused
            return TaskOutcome(
                error=f"the workflow could not start the task: {exc}",
                error_type=type(exc).__name__,
            )
        finally:
            _nested.CURRENT_TASK.reset(token)
        run = _TaskRun(self, task.task_id, handler, started.inbox_seq)
        return await run.outcome(listen=resume, had_state=state is not None)


def _error_response(exc: Exception) -> JSONResponse:
    error = error_to_answer(exc)
    return JSONResponse(status_code=error.status_code, content=error_to_json(error))


class _TaskRun:
    """One run of a workflow in a replica: its result, its stream, its inbox."""

    def __init__(
        self, service: WorkflowService, task_id: str, handler: WorkflowHandler, inbox_seq: int
    ) -> None:
        self._service = service
        self._task_id = task_id
        self._handler = handler
        self._inbox_seq = inbox_seq
        self._awaiting_input = 0
        self._listener: asyncio.Task[None] | None = None
        self._snapshot: dict[str, Any] | None = None
        self._buffer: list[dict[str, Any]] = []
        self._sender: asyncio.Task[None] | None = None
        self._ending = False

    async def outcome(self, *, listen: bool, had_state: bool) -> TaskOutcome:
        if listen:
            self._awaiting_input = 1
            self._start_listener()
        pump = asyncio.create_task(self._pump())
        try:
            result = await self._handler
        except asyncio.CancelledError:  # the orchestrator cancelled the task
            await self._handler.cancel_run()
            raise
        except Exception as exc:
            if self._snapshot is not None:  # parked: ended on purpose, to wait for input
                outcome = TaskOutcome(snapshot=self._snapshot, inbox_seq=self._inbox_seq)
            else:
                outcome = TaskOutcome(error=str(exc) or repr(exc), error_type=type(exc).__name__)
        else:
            outcome = await self._completed(result, had_state)
        finally:
            if self._listener is not None:
                self._listener.cancel()
        # the stream is complete when the task is reported, so readers see it all: the batch
        # in flight lands first, and what is left goes with the outcome (one call fewer)
        with contextlib.suppress(Exception):
            await pump
        self._ending = True
        if self._sender is not None:
            await self._sender
        outcome.events, self._buffer = self._buffer, []
        return outcome

    async def _completed(self, result: Any, had_state: bool) -> TaskOutcome:
        try:
            result = to_jsonable_python(result)
        except PydanticSerializationError as exc:
            return TaskOutcome(
                error=(
                    f"the workflow returned a {type(result).__name__}, which is not "
                    f"JSON-serializable ({exc}); return a str, number, list, dict or "
                    "pydantic model"
                ),
                error_type="ResultNotSerializableError",
            )
        ctx = self._handler.ctx
        if not had_state and not (await ctx.store.get_state()).model_dump():
            # nothing to keep: skip serializing a context whose store was never written
            return TaskOutcome(result=result)
        return TaskOutcome(result=result, state=ctx.to_dict(serializer=self._service._serializer))

    # the stream

    async def _pump(self) -> None:
        async for event in self._handler.stream_events():
            if isinstance(event, StopEvent):
                continue
            self._buffer.append(event_to_dict(event))
            if self._sender is None or self._sender.done():
                self._sender = asyncio.create_task(self._send())
            if isinstance(event, InputRequiredEvent):
                self._awaiting_input += 1
                self._start_listener()

    async def _send(self) -> None:
        # one batch in flight at a time: what arrives meanwhile goes in the next batch
        while self._buffer and not self._ending:
            batch, self._buffer = self._buffer, []
            await call_actor(
                functools.partial(
                    self._service._control_plane.append_events.remote, self._task_id, batch
                )
            )

    # the inbox

    def _start_listener(self) -> None:
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        service = self._service
        while True:
            batch = await call_actor(
                functools.partial(
                    service._control_plane.read_inbox.remote,
                    self._task_id,
                    self._inbox_seq,
                    service._input_hold_s,
                )
            )
            for data in batch.events:
                self._inbox_seq = data[SEQ_KEY]
                try:
                    event = event_from_dict(data, service._accepted)
                except (
                    InvalidRequestError
                ) as exc:  # checked when sent: a redeploy changed the workflow
                    logger.warning("task %s: dropped an event: %s", self._task_id, exc)
                    continue
                self._handler.ctx.send_event(event)
                self._awaiting_input = max(0, self._awaiting_input - 1)
            if not batch.events and self._awaiting_input > 0:
                await self._park()
                return

    async def _park(self) -> None:
        """Nobody answered in time: keep the run's context and end the run."""
        self._snapshot = self._handler.ctx.to_dict(serializer=self._service._serializer)
        await self._handler.cancel_run()
