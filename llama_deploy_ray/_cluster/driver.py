"""Driving a task: from its turn on the control plane to its recorded outcome.

A driver asks the control plane for the task's turn and state, has the workflow run, and records
the outcome; a task that waits for input is parked on the control plane. There are two kinds:

- `PublishingDriver` (the orchestrator) publishes each task to its service's topic and awaits
  the replica's answer, sending the task again when the replica died under it (`max_retries`);
- `LocalDriver` (each workflow replica) runs the task in its own process: a `run` that reaches a
  replica over HTTP costs one Serve hop, not two. It keeps the session states its own runs left
  (`_HeldStates`): a session's next run there starts from its state at once, while its begin is
  on its way, and the control plane checks that state was the latest.

A task's result goes back to its caller once its outcome is sent to the control plane, not
after the control plane acknowledged it (one round trip fewer per run), and outcomes that are
ready while an earlier one is on its way go in one call. Nothing is lost or reordered: the
session's next task on the service waits in its line until the outcome is recorded, and with it
the new state; outcomes not yet acknowledged are sent again if the control plane restarts, and
before a replica stops; a driver that dies with outcomes unsent is silent, and its tasks are
adopted.

Each driver keeps one call open on each control-plane shard (`watch_driver`). It returns the
driver's running tasks that a client cancelled, so the driver can stop them; the orchestrator's also
returns the tasks of drivers that went silent (a replica that died mid-run, an earlier
incarnation of the orchestrator), to drive them again. Each driver also beats a heartbeat from a
thread of its own: a workflow step that blocks the replica's event loop for a minute delays the
watch, but the replica is not taken for dead and its task is not run a second time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, Protocol

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from .._shared.config import (
    DRIVER_WATCH_S,
    HELD_STATES,
    RECORD_BUDGET_S,
    SimpleOrchestratorConfig,
)
from .._shared.errors import ControlPlaneUnavailableError
from .._shared.retry import actor_unreachable, call_retrying
from .._shared.types import (
    FinishedTasks,
    QueueMessage,
    StartedTask,
    TaskDefinition,
    TaskOutcome,
    TaskResult,
    TaskStatus,
)
from .actors import ControlPlaneHandle, ControlPlaneShard
from .message_queue import RayMessageQueue
from .outbox import Outbox

logger = logging.getLogger(__name__)

_CANCELLED = TaskOutcome(error="cancelled by a client", error_type="TaskCancelledError")


class _Cancellable(Protocol):
    def cancel(self) -> Any: ...


_Pair = tuple[str, str]  # (session id, service name)


def _pair_of(task: TaskDefinition) -> _Pair:
    return task.session_id or "", task.agent_id or ""


# a state: the task whose outcome left it ('' for none yet) and the state (None for none)
_Held = tuple[str, dict[str, Any] | None]


class _HeldStates:
    """The session states this driver's own runs left: a state is held from when the outcome
    that left it is sent until the control plane says it is not the latest (another task of
    the session and service is behind it, or was created elsewhere since), or another task of
    the session and service begins here. A run of such a session starts from it at once,
    while its begin is on its way (see `LocalDriver`); the begin says which state it started
    from, and the control plane checks it. At most `size` sessions, the least recently used
    go first."""

    def __init__(self, size: int) -> None:
        self._size = size
        # per pair: the last task begun here, and once its outcome was sent, the state it left
        self._entries: OrderedDict[_Pair, tuple[str, _Held | None]] = OrderedDict()

    def began(self, task: TaskDefinition) -> None:
        pair = _pair_of(task)
        self._entries[pair] = (task.task_id, None)
        self._entries.move_to_end(pair)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def left(self, started: StartedTask, outcome: TaskOutcome) -> None:
        """The outcome of a task begun here is sent: hold the state it leaves."""
        task = started.task
        pair = _pair_of(task)
        if self._entries.get(pair, ("",))[0] != task.task_id:
            return  # another task of the pair began here since
        if outcome.state is not None:
            self._entries[pair] = (task.task_id, (task.task_id, outcome.state))
        elif started.state_from is not None and not started.resume:
            # the state is the one it started from (a run without state, a failed run)
            self._entries[pair] = (task.task_id, (started.state_from, started.state))

    def take(self, task: TaskDefinition) -> _Held | None:
        """The state the task's session left on its service, if held; the task begins here
        (the state is held no more). None for a task that began here before (sent again)."""
        last, held = self._entries.get(_pair_of(task), ("", None))
        if held is None or last == task.task_id:
            return None
        self.began(task)
        return held

    def forget(self, pair: _Pair, task_id: str | None = None) -> None:
        """Forget the state of `pair` (only if `task_id` left it, when given)."""
        last = self._entries.get(pair)
        if last is not None and task_id in (None, last[0]):
            self._entries[pair] = (last[0], None)

    def forget_all(self) -> None:
        for pair in self._entries:
            self.forget(pair)


class TaskDriver:
    """What both kinds share: the control-plane side of driving, and cancellation."""

    def __init__(
        self, control_plane: ControlPlaneHandle, *, adopts_orphans: bool, holds_states: bool
    ) -> None:
        self.driver_id = uuid.uuid4().hex
        self._control_plane = control_plane
        self._adopts_orphans = adopts_orphans
        self._held = _HeldStates(HELD_STATES) if holds_states else None
        self._incarnations: dict[ControlPlaneShard, str] = {}  # the last each shard said
        # tasks this driver started, with their run (a replica call, a local task) once made
        self._in_flight: dict[str, _Cancellable | None] = {}
        # of those, the ones cancelled before their run was made
        self._cancelled: set[str] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._watchers: list[asyncio.Task[None]] = []
        self._stopped = threading.Event()
        # one finish_tasks call in flight; outcomes ready meanwhile go together in the next:
        # under load, one control-plane call records many tasks
        self._outcomes: Outbox[tuple[ControlPlaneShard, StartedTask, TaskOutcome]] = Outbox(
            self._send_outcomes, self.in_background
        )
        # tasks whose outcome was sent and not yet answered, each with its answer to come
        self._recording: dict[str, asyncio.Future[None]] = {}

    def start(self) -> None:
        """Open the watch on each control-plane shard (needs a running event loop) and start
        the heartbeat."""
        if not self._watchers:
            loop = asyncio.get_running_loop()
            self._watchers = [
                loop.create_task(self._watch(shard)) for shard in self._control_plane.shards
            ]
            threading.Thread(target=self._beat, name="driver-heartbeat", daemon=True).start()

    async def run(self, task: TaskDefinition, handler: bool = False) -> TaskResult:
        """Record `task`, drive it and return its result: final, or `waiting` when it was
        parked to wait for input (then it holds no replica slot, nor this call). `handler`: a
        run of a workflow-server handler (see the control plane's `create_task`).

        The driving goes on if the caller goes away (a client that disconnected), so a task
        that started is always recorded."""
        self.start()
        result = await asyncio.shield(self.in_background(self._run(task, handler, queue=True)))
        assert result is not None  # only a run that may not wait for its turn declines
        return result

    async def run_if_first(self, task: TaskDefinition) -> TaskResult | None:
        """`run`, for a task that no other task of its session is ahead of on its service;
        None, with nothing recorded, for one that would wait for its turn (or that existed):
        a driver that waits holding nothing (the orchestrator) takes those."""
        self.start()
        return await asyncio.shield(self.in_background(self._run(task, False, queue=False)))

    async def submit(
        self, task: TaskDefinition, handler: bool = False
    ) -> tuple[TaskResult, asyncio.Task[TaskResult | None]]:
        """Record `task` and drive it in the background: its pending result, and the driving,
        which returns the final result once it is recorded here, or None when the task's run
        stopped here first (parked for input, cancelled before it started, driven elsewhere)."""
        pending, driving = await self._submit(task, handler, queue=True)
        if pending is None:  # it existed: the first request's driver runs it
            shard = self._control_plane.for_session(task.session_id)
            pending = await shard.get_task(task.session_id, task.task_id)
        return pending, driving

    async def submit_if_first(
        self, task: TaskDefinition
    ) -> tuple[TaskResult, asyncio.Task[TaskResult | None]] | None:
        """`submit`, for a task that no other task of its session is ahead of on its service;
        None, with nothing recorded, for one that would wait for its turn (or that existed):
        a driver that waits holding nothing (the orchestrator) takes those."""
        pending, driving = await self._submit(task, handler=False, queue=False)
        return None if pending is None else (pending, driving)

    async def _submit(
        self, task: TaskDefinition, handler: bool, queue: bool
    ) -> tuple[TaskResult | None, asyncio.Task[TaskResult | None]]:
        self.start()
        shard = self._control_plane.for_session(task.session_id)
        begun: asyncio.Future[TaskResult | None] = asyncio.get_running_loop().create_future()
        driving = self.in_background(self._begin_and_drive(shard, task, handler, queue, begun))
        return await begun, driving

    def resume(self, started: StartedTask) -> None:
        """Drive, in the background, a task that waited for input and was given an event."""
        self.in_background(self._resume(started))

    async def drain(self) -> None:
        """Wait for what this driver does in the background (the runs it drives, the outcomes
        it sends), then stop its watch and heartbeat: its process shuts down."""
        await asyncio.gather(*self._background, return_exceptions=True)
        self._stopped.set()
        for watcher in self._watchers:
            watcher.cancel()

    def in_background(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _deliver(self, started: StartedTask) -> TaskOutcome:
        """Have the workflow run the task once (or resume it) and return its outcome."""
        raise NotImplementedError

    async def _run(self, task: TaskDefinition, handler: bool, queue: bool) -> TaskResult | None:
        shard = self._control_plane.for_session(task.session_id)
        with self._driving(task.task_id):
            begun = await self._begin(shard, task, handler, queue)
            if begun is None and not queue:
                return None
            started = await self._started(shard, task.task_id, begun)
            result = await self._drive(shard, started, task.task_id)
        if result is None:  # parked for input, cancelled before it started, or a retried run
            return await shard.get_task(task.session_id, task.task_id)
        return result

    async def _begin_and_drive(
        self,
        shard: ControlPlaneShard,
        task: TaskDefinition,
        handler: bool,
        queue: bool,
        begun: asyncio.Future[TaskResult | None],
    ) -> TaskResult | None:
        """Record the task and start it when its turn has come (one call), else once it
        comes; `begun` gets its pending or running result as soon as it is recorded (None: it
        existed, or waits for its turn and `queue` is false)."""
        with self._driving(task.task_id):
            try:
                answer = await self._begin(shard, task, handler, queue)
            except Exception as exc:
                if not begun.cancelled():
                    begun.set_exception(exc)
                return None
            # its asker may have gone (a client that gave up waiting): the driving goes on
            if not begun.cancelled():
                begun.set_result(answer.running if isinstance(answer, StartedTask) else answer)
            started = await self._started(shard, task.task_id, answer)
            result = await self._drive(shard, started, task.task_id)
        # done once the outcome is recorded: a client told the task ended (its stream, say)
        # then finds it final, and its session's next task first in line
        recording = self._recording.get(task.task_id)
        if recording is not None:
            await asyncio.shield(recording)
        return result

    async def _begin(
        self,
        shard: ControlPlaneShard,
        task: TaskDefinition,
        handler: bool,
        queue: bool,
        held: str | None = None,
    ) -> StartedTask | TaskResult | None:
        """`begin_task`; when the control plane stayed unreachable, the call may still have
        landed before it went, leaving the task this driver's and driven by nobody (the
        client's retry finds it, another driver's): then, in the background, this driver asks
        again until answered, and drives what it owns."""
        if held is None:  # a run ahead sent it before it took the state held
            self._send_last_outcome(task)
        if self._held is not None:
            self._held.began(task)
        try:
            return await shard.begin_task(task, self.driver_id, handler, queue, held=held)
        except ControlPlaneUnavailableError:
            self.in_background(self._begin_again(shard, task, handler, queue))
            raise

    def _send_last_outcome(self, task: TaskDefinition) -> None:
        """The outcome of the last task of `task`'s session and service, if it waits for the
        call on its way, leaves now: else `task`'s begin would find that task unfinished, and
        `task` would wait for its turn (and not run ahead of its begin from the state held)."""
        pair = _pair_of(task)
        self._outcomes.hurry(lambda item: _pair_of(item[1].task) == pair)

    async def _begin_again(
        self, shard: ControlPlaneShard, task: TaskDefinition, handler: bool, queue: bool
    ) -> None:
        async def begin() -> StartedTask | TaskResult | None:  # tenacity awaits these only
            return await shard.begin_task(task, self.driver_id, handler, queue, True)

        try:
            answer = await call_retrying(
                begin, lambda exc: isinstance(exc, ControlPlaneUnavailableError)
            )
        except Exception:  # refused (a task of that id is another's): nothing to drive
            return
        if answer is not None:
            with self._driving(task.task_id):
                started = await self._started(shard, task.task_id, answer)
                await self._drive(shard, started, task.task_id)

    async def _started(
        self, shard: ControlPlaneShard, task_id: str, begun: StartedTask | TaskResult | None
    ) -> StartedTask | None:
        """What `begin_task` answered, once the task has started (None: not here)."""
        if isinstance(begun, TaskResult):  # in its session's line: start it when its turn comes
            return await shard.start_task(task_id, self.driver_id)
        return begun

    async def _start_and_drive(self, shard: ControlPlaneShard, task_id: str) -> TaskResult | None:
        with self._driving(task_id):
            started = await shard.start_task(task_id, self.driver_id)
            return await self._drive(shard, started, task_id)

    async def _resume(self, started: StartedTask) -> None:
        shard = self._control_plane.for_session(started.task.session_id)
        with self._driving(started.task.task_id):
            await self._drive(shard, started, started.task.task_id)

    async def _drive(
        self,
        shard: ControlPlaneShard,
        started: StartedTask | None,
        task_id: str,
        outcome: TaskOutcome | None = None,
    ) -> TaskResult | None:
        """Run the task until it is final (its result) or waits for input (None); `outcome`:
        its first run's, when that run already happened."""
        while started is not None:
            if task_id in self._cancelled:
                outcome = _CANCELLED
            elif outcome is None:
                outcome = await self._outcome(self._deliver(started), task_id)
            if outcome.snapshot is None:
                return await self._finish(shard, started, outcome)
            started, outcome = await shard.park_task(task_id, outcome), None
        return None

    async def _outcome(self, delivered: Awaitable[TaskOutcome], task_id: str) -> TaskOutcome:
        try:
            return await delivered
        except Exception as exc:  # whatever went wrong, the task ends and its line moves
            logger.exception("task %s could not run", task_id)
            return TaskOutcome(
                error=f"the task could not run: {type(exc).__name__}: {exc}",
                error_type=type(exc).__name__,
            )

    async def _finish(
        self, shard: ControlPlaneShard, started: StartedTask, outcome: TaskOutcome
    ) -> TaskResult:
        """Send the task's final outcome to the control plane and return its result."""
        if outcome is _CANCELLED:  # the control plane's record says how it ended
            return await shard.finish_task(started.task.task_id, outcome)
        # sent now, before the answer leaves this driver (else with the outcomes that follow
        # it, once the call on its way is acknowledged)
        self._recording[started.task.task_id] = asyncio.get_running_loop().create_future()
        self._outcomes.put((shard, started, outcome))
        return started.running.model_copy(
            update={**outcome.final_fields(), "finished_at": time.time()}
        )

    def _send_outcomes(
        self, batch: list[tuple[ControlPlaneShard, StartedTask, TaskOutcome]]
    ) -> Awaitable[Any]:
        by_shard: dict[ControlPlaneShard, dict[str, TaskOutcome]] = {}
        pairs: dict[str, _Pair] = {}
        for shard, started, outcome in batch:
            task = started.task
            by_shard.setdefault(shard, {})[task.task_id] = outcome
            pairs[task.task_id] = _pair_of(task)
            if self._held is not None:  # sent before any begin after it: held from now
                self._held.left(started, outcome)
        hold = self._held is not None
        return asyncio.gather(
            *(
                self._record(shard, o, shard.finish_tasks_sent(o, hold), pairs)
                for shard, o in by_shard.items()
            )
        )

    async def _record(
        self,
        shard: ControlPlaneShard,
        batch: dict[str, TaskOutcome],
        sent: Awaitable[FinishedTasks],
        pairs: dict[str, _Pair],
    ) -> None:
        first: Awaitable[FinishedTasks] | None = sent

        async def record() -> FinishedTasks:
            nonlocal first
            call, first = first or shard.finish_tasks_sent(batch, self._held is not None), None
            return await call  # unreachable (it restarts): the policy sends it again

        try:
            answer = await call_retrying(record, actor_unreachable, budget_s=RECORD_BUDGET_S)
        except Exception as exc:  # refused, or unreachable for the whole budget
            logger.error("the control plane did not record %d outcomes: %s", len(batch), exc)
            return
        finally:
            for task_id in batch:
                recording = self._recording.pop(task_id, None)
                if recording is not None:
                    recording.set_result(None)
        for problem in answer.problems:  # tasks a restarted control plane forgot
            logger.error("the control plane did not record an outcome: %s", problem)
        if self._held is not None:
            self._heard_from_incarnation(shard, answer.incarnation)
            for task_id in answer.not_latest:
                self._held.forget(pairs[task_id], task_id)

    def _heard_from_incarnation(self, shard: ControlPlaneShard, incarnation: str) -> None:
        """A shard that restarted forgot which states this driver holds: forget them too."""
        assert self._held is not None
        known = self._incarnations.setdefault(shard, incarnation)
        if known != incarnation:
            self._incarnations[shard] = incarnation
            self._held.forget_all()

    @contextlib.contextmanager
    def _driving(self, task_id: str) -> Iterator[None]:
        # registered before the control plane answers: a cancel may overtake its answer
        self._in_flight[task_id] = None
        try:
            yield
        finally:
            self._in_flight.pop(task_id, None)
            self._cancelled.discard(task_id)

    def _beat(self) -> None:
        while not self._stopped.wait(DRIVER_WATCH_S):
            try:
                ray.get(self._control_plane.heartbeat_refs(self.driver_id), timeout=DRIVER_WATCH_S)
            except Exception as exc:  # the control plane restarts: beat again next time
                logger.warning("driver %s: heartbeat failed: %s", self.driver_id, exc)

    async def _watch(self, shard: ControlPlaneShard) -> None:
        while True:
            try:  # the handle watches again while the shard restarts
                notice = await shard.watch_driver(
                    self.driver_id,
                    DRIVER_WATCH_S,
                    self._adopts_orphans,
                    self._incarnations.get(shard, ""),
                )
            except Exception:  # a watch that stops would strand cancels and orphans
                logger.exception("driver %s: the watch failed; watching again", self.driver_id)
                await asyncio.sleep(DRIVER_WATCH_S)
                continue
            for task_id in notice.cancelled:
                self._cancel(task_id)
            if self._held is not None:
                self._heard_from_incarnation(shard, notice.incarnation)
                for pair in notice.stale_states:
                    self._held.forget(pair)
            for task_id in notice.orphaned:
                logger.warning("task %s: its driver went silent, driving it again", task_id)
                self.in_background(self._start_and_drive(shard, task_id))

    def _cancel(self, task_id: str) -> None:
        if task_id not in self._in_flight:
            return  # already done here
        self._cancelled.add(task_id)
        running = self._in_flight[task_id]
        if running is not None:
            running.cancel()


class PublishingDriver(TaskDriver):
    """Publishes each task to a replica of its service (on `services`), and retries when the
    replica died."""

    def __init__(
        self,
        control_plane: ControlPlaneHandle,
        config: SimpleOrchestratorConfig,
        services: RayMessageQueue,
    ) -> None:
        super().__init__(control_plane, adopts_orphans=True, holds_states=False)
        self._config = config
        self._services = services

    async def _deliver(self, started: StartedTask) -> TaskOutcome:
        task_id = started.task.task_id
        message = QueueMessage(type=started.task.agent_id or "", data={"started": started})
        retries = self._config.max_retries
        sent = 0
        dead: set[str] = set()  # the replicas that died under it

        async def publish() -> TaskOutcome:
            nonlocal sent
            if sent:
                logger.warning("task %s: its replica died, sending it again", task_id)
                shard = self._control_plane.for_session(started.task.session_id)
                await shard.record_retry(task_id)
                # the result it answers with says so too, as its record does
                attempts = started.running.attempts + 1
                started.running = started.running.model_copy(update={"attempts": attempts})
                if task_id in self._cancelled:
                    return _CANCELLED
            sent += 1
            return await self._publish(task_id, message)

        def another_died(exc: BaseException) -> bool:
            # Serve routes to a dead replica until it notices the death (seconds, on a busy
            # machine): only a replica not seen dead yet counts against max_retries
            if not actor_unreachable(exc):
                return False
            dead.add(getattr(exc, "actor_id", None) or f"unnamed-{len(dead)}")
            return len(dead) <= retries

        try:
            return await call_retrying(
                publish,
                another_died,
                budget_s=RECORD_BUDGET_S,
                first_wait_s=self._config.retry_backoff_s,
            )
        except (RayActorError, ActorUnavailableError) as exc:  # other errors: see _drive
            return TaskOutcome(
                error=f"the replicas running the task died {len(dead)} times "
                f"(max_retries={retries}): {exc}",
                error_type="ReplicaDiedError",
            )

    async def _publish(self, task_id: str, message: QueueMessage) -> TaskOutcome:
        response = self._services.publish(message)
        self._in_flight[task_id] = response
        try:
            return await response
        finally:
            self._in_flight[task_id] = None


class LocalDriver(TaskDriver):
    """Runs each task in this process with `run_here(started, recorded)`; if the process dies,
    the orchestrator adopts the task once this driver is silent. `recorded`, when not None,
    is a future the run awaits before anything of it reaches the control plane (its events,
    its child tasks, its inbox reads): it runs before its begin is answered (see
    `_run_ahead`); cancelled, the run is too."""

    def __init__(
        self,
        control_plane: ControlPlaneHandle,
        run_here: Callable[[StartedTask, asyncio.Future[None] | None], Awaitable[TaskOutcome]],
    ) -> None:
        super().__init__(control_plane, adopts_orphans=False, holds_states=True)
        self._run_here = run_here

    async def run(
        self, task: TaskDefinition, handler: bool = False, new: bool = False
    ) -> TaskResult:
        """`TaskDriver.run`; when this driver holds its session's latest state on the service
        (its own last run there left it, and no task of that session and service began
        elsewhere since), the task runs at once from it, while its begin is on its way. Only
        a `new` task does (its id made for this request, or sent for the first time): one
        sent again may have run already, and its steps must not run before the control plane
        said whether it did."""
        held = self._take_held(task) if new else None
        if held is None:
            return await super().run(task, handler)
        result = await self._in_background_ahead(task, handler, True, held)
        assert result is not None  # only a run that may not wait for its turn declines
        return result

    async def run_if_first(self, task: TaskDefinition) -> TaskResult | None:
        """`TaskDriver.run_if_first`, run ahead of its begin as a new task's `run` is: it
        takes nested calls' children, new tasks made by their parent's step."""
        held = self._take_held(task)
        if held is None:
            return await super().run_if_first(task)
        return await self._in_background_ahead(task, False, False, held)

    def _take_held(self, task: TaskDefinition) -> _Held | None:
        """The state `task`'s session left on its service here, if held (see `_HeldStates`);
        the outcome that leaves it goes first, if it waits: it is held once sent."""
        self._send_last_outcome(task)
        return self._held.take(task) if self._held is not None else None

    async def run_new(self, task: TaskDefinition) -> TaskResult:
        """`run(task, handler=True)`, for the first task of a session that did not exist
        before it (a workflow-server handler whose id was made here): nothing can be ahead of
        it in its line, nor any state, so it runs at once, from no state, while its begin is
        on its way."""
        result = await self._in_background_ahead(task, True, True, ("", None))
        assert result is not None  # it may wait for its turn
        return result

    async def _in_background_ahead(
        self, task: TaskDefinition, handler: bool, queue: bool, held: _Held
    ) -> TaskResult | None:
        # driven in the background: a caller that goes away leaves the task recorded
        self.start()
        return await asyncio.shield(
            self.in_background(self._run_ahead(task, handler, queue, *held))
        )

    async def _run_ahead(
        self,
        task: TaskDefinition,
        handler: bool,
        queue: bool,
        held: str,
        state: dict[str, Any] | None,
    ) -> TaskResult | None:
        """Run `task` from `state`, the state task `held` left ('' for none), while its begin
        is on its way: its latency is the longer of the two, not their sum. Its result and
        outcome wait for the begin's answer. Started from that same state, the run goes on;
        otherwise (a task of its session began elsewhere meanwhile, the control plane restarted
        and forgot, the begin failed) it is cancelled, and the task goes the ordinary way:
        then the steps it ran will run again (or, when it would wait for its turn and `queue`
        is false, not here: None, as `run_if_first` answers)."""
        shard = self._control_plane.for_session(task.session_id)
        recorded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        running = TaskResult(
            task_id=task.task_id,
            session_id=task.session_id,
            service_name=task.agent_id,
            status=TaskStatus.RUNNING,
            attempts=1,
        )
        task_id = task.task_id
        with self._driving(task_id):
            ahead = StartedTask(task=task, running=running, state=state, state_from=held)
            delivered = asyncio.ensure_future(
                self._outcome(self._deliver(ahead, recorded), task_id)
            )
            begun: StartedTask | TaskResult | None = None
            try:
                begun = await self._begin(shard, task, handler, queue, held)
            finally:
                from_held = isinstance(begun, StartedTask) and begun.state_from == held
                if from_held:
                    recorded.set_result(None)
                else:
                    recorded.cancel()
                    delivered.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await delivered
            if from_held:
                assert isinstance(begun, StartedTask)
                begun.state = state  # left out of the answer: this driver holds it
                result = await self._drive(shard, begun, task_id, await delivered)
            else:  # it runs as the control plane says
                if begun is None and not queue:
                    return None  # not recorded: it would wait for its turn
                if begun is not None:
                    logger.info(
                        "task %s: its session changed elsewhere; it runs again, from its state",
                        task_id,
                    )
                started = await self._started(shard, task_id, begun)
                result = await self._drive(shard, started, task_id)
        return result or await shard.get_task(task.session_id, task_id)

    async def _deliver(
        self, started: StartedTask, recorded: asyncio.Future[None] | None = None
    ) -> TaskOutcome:
        task_id = started.task.task_id
        running = asyncio.ensure_future(self._run_here(started, recorded))
        self._in_flight[task_id] = running
        try:
            return await running
        except asyncio.CancelledError:
            if task_id in self._cancelled:  # our own cancel: the driving itself goes on
                return _CANCELLED
            raise
        finally:
            self._in_flight[task_id] = None
