"""The run engine: how a replica runs one task of its workflow, given what it needs.

It restores the session's context for this service, runs the workflow and returns the outcome
with the context's new state. While it runs, the events the workflow writes to its stream go to
the control plane with those of the replica's other runs (see `_stream_sender`); the last of
them go with the outcome, and all of them, in a run that ends sooner.

Human input: once the workflow writes an `InputRequiredEvent`, the engine reads the task's
inbox on the control plane and sends what arrives into the run. If the workflow still waits
for input after `input_hold_s`, it snapshots the context and ends the run: the outcome carries
the snapshot, the task is parked, and any replica resumes it from the snapshot when an event
arrives (time spent waiting does not count against the workflow's timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from pydantic_core import PydanticSerializationError, to_jsonable_python
from workflows import Context, Workflow
from workflows.events import Event, InputRequiredEvent, InternalDispatchEvent, StopEvent
from workflows.handler import WorkflowHandler

from .._shared.errors import InvalidRequestError
from .._shared.events import SEQ_KEY, event_from_dict, event_to_dict
from .._shared.types import StartedTask, TaskOutcome
from .._shared.workflows_internals import with_fresh_run_clock
from .actors import ControlPlaneHandle, ControlPlaneShard, OrchestratorHandle
from .message_queue import RayMessageQueue
from .nested import PARENT_RUN, ParentRun
from .state_serializer import SignedStateSerializer
from .stream_sender import RunStream, StreamSender
from .task_logging import task_logged

logger = logging.getLogger(__name__)


class RunEngine:
    def __init__(
        self,
        workflow: Workflow,
        *,
        control_plane: ControlPlaneHandle,
        orchestrator: OrchestratorHandle,
        accepted: dict[str, type[Event]],
        serializer: SignedStateSerializer,
        input_hold_s: float,
    ) -> None:
        self.workflow = workflow
        self.control_plane = control_plane
        self.orchestrator = orchestrator
        self.accepted = accepted  # the event classes clients may send into a run, by name
        self.serializer = serializer
        self.input_hold_s = input_hold_s
        # tasks whose stream a client reads from this replica (see `_live_stream`)
        self._watchers: dict[str, asyncio.Queue[dict[str, Any] | None]] = {}
        self._services = RayMessageQueue()  # where nested tasks go
        self._senders: dict[ControlPlaneShard, StreamSender] = {}

    def watch_stream(self, task_id: str) -> asyncio.Queue[dict[str, Any] | None]:
        """The events the task's runs here write to its stream, as they write them, until
        `stop_watching`; None once the stream is no longer theirs alone (a nested task's events
        join it, or the watch stopped)."""
        self._watchers[task_id] = asyncio.Queue()
        return self._watchers[task_id]

    def stop_watching(self, task_id: str) -> None:
        watcher = self._watchers.pop(task_id, None)
        if watcher is not None:
            watcher.put_nowait(None)

    async def run(
        self, started: StartedTask, recorded: asyncio.Future[None] | None = None
    ) -> TaskOutcome:
        """Run (or resume) the task from the state it starts from; its outcome. With
        `recorded`, the task may not be recorded yet: nothing of the run reaches the control
        plane before that future is done (see `LocalDriver`)."""
        task = started.task
        with task_logged(task.task_id, task.session_id or "", task.agent_id or ""):
            return await self._run(started, recorded)

    async def _run(
        self, started: StartedTask, recorded: asyncio.Future[None] | None
    ) -> TaskOutcome:
        task, state, resume = started.task, started.state, started.resume
        ctx = None
        if state and not resume:
            # A new task is a new run on the session's state: its timeout starts from zero,
            # not from the alive time the session's earlier runs spent.
            state = with_fresh_run_clock(state)
        shard = self.control_plane.for_session(task.session_id)
        sender = self._senders.get(shard)
        if sender is None:
            sender = self._senders[shard] = StreamSender(shard)
        events = sender.stream(task.task_id, recorded)

        async def before_child() -> None:
            if recorded is not None:  # a child names its parent, which must be recorded
                await recorded
            # the child's events join the stream after this run's so far
            await events.flush()
            self.stop_watching(task.task_id)

        parent = ParentRun(
            task, self.control_plane, self.orchestrator, self._services, before_child
        )
        token = PARENT_RUN.set(parent)
        try:
            if state:
                ctx = Context.from_dict(self.workflow, state, serializer=self.serializer)
            handler = self.workflow.run(ctx=ctx, **({} if resume else task.run_kwargs))
        except Exception as exc:  # its run kwargs, or the session's state, were refused
            return TaskOutcome(
                error=f"the workflow could not start the task: {exc}",
                error_type=type(exc).__name__,
            )
        finally:
            PARENT_RUN.reset(token)
        run = _TaskRun(self, shard, task.task_id, handler, started.inbox_seq, events, recorded)
        return await run.outcome(listen=resume, had_state=state is not None)


class _TaskRun:
    """One run of a workflow in a replica: its result, its stream, its inbox."""

    def __init__(
        self,
        engine: RunEngine,
        shard: ControlPlaneShard,
        task_id: str,
        handler: WorkflowHandler,
        inbox_seq: int,
        events: RunStream,
        recorded: asyncio.Future[None] | None,
    ) -> None:
        self._engine = engine
        self._shard = shard  # the one that holds the task's session
        self._task_id = task_id
        self._handler = handler
        self._inbox_seq = inbox_seq
        self._awaiting_input = 0
        self._listener: asyncio.Task[None] | None = None
        self._snapshot: dict[str, Any] | None = None
        self._events = events
        self._recorded = recorded  # see `RunEngine.run`

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
        outcome.events = await self._events.take()
        return outcome

    async def _completed(self, result: Any, had_state: bool) -> TaskOutcome:
        # a StopEvent subclass is the result itself: its fields, and its class's name
        result_type = type(result).__name__ if isinstance(result, StopEvent) else None
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
            return TaskOutcome(result=result, result_type=result_type)
        state = ctx.to_dict(serializer=self._engine.serializer)
        return TaskOutcome(result=result, result_type=result_type, state=state)

    # the stream

    async def _pump(self) -> None:
        # the context's stream, as the handler's `stream_events` reads it, but closed here:
        # the handler's leaves it to the garbage collector, whose finalizer wakes the event
        # loop and closes it in a task of its own (3% of the engine's CPU on a small run)
        async with contextlib.aclosing(self._handler.ctx.stream_events()) as stream:
            async for event in stream:
                if isinstance(event, StopEvent):
                    return
                if not isinstance(event, InternalDispatchEvent):
                    self._forward(event)

    def _forward(self, event: Event) -> None:
        data = event_to_dict(event)
        self._events.put(data)
        watcher = self._engine._watchers.get(self._task_id)
        if watcher is not None:
            watcher.put_nowait(data)
        if isinstance(event, InputRequiredEvent):
            self._awaiting_input += 1
            self._start_listener()

    # the inbox

    def _start_listener(self) -> None:
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        engine = self._engine
        if self._recorded is not None:  # the task's inbox is on its record
            await self._recorded
        while True:
            batch = await self._shard.read_inbox(
                self._task_id, self._inbox_seq, engine.input_hold_s
            )
            for data in batch.events:
                self._inbox_seq = data[SEQ_KEY]
                try:
                    event = event_from_dict(data, engine.accepted)
                except InvalidRequestError as exc:  # checked when sent: a redeploy changed it
                    logger.warning("task %s: dropped an event: %s", self._task_id, exc)
                    continue
                self._handler.ctx.send_event(event)
                self._awaiting_input = max(0, self._awaiting_input - 1)
            if not batch.events and self._awaiting_input > 0:
                await self._park()
                return

    async def _park(self) -> None:
        """Nobody answered in time: keep the run's context and end the run."""
        self._snapshot = self._handler.ctx.to_dict(serializer=self._engine.serializer)
        await self._handler.cancel_run()
