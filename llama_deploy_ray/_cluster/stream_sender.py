"""The events a replica's runs stream, on their way to the control plane's log.

A run's own client reads its stream live from the replica (see `_live_stream`); every other
reader reads the control plane's log, which each event reaches within `STREAM_LINGER_S`. One
call per run for that would cost a replica under load nearly as much as the run: the events of
all its runs wait out the same linger and leave together, one call in flight per shard, so a
busy replica makes a few such calls a second whatever its runs. A run that ends takes its
events not sent yet, to go with its outcome (a short run's all do), once the call that carried
the others has landed: the stream is complete before the task is reported.

    sender = StreamSender(shard)
    stream = sender.stream(task_id, recorded)
    stream.put(event)          # sent with the next batch (once the task is recorded)
    left = await stream.take()  # the run ended: what goes with its outcome
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from .._shared.config import STREAM_LINGER_S
from .actors import ControlPlaneShard

logger = logging.getLogger(__name__)


class StreamSender:
    def __init__(self, shard: ControlPlaneShard) -> None:
        self._shard = shard
        self._waiting: dict[str, list[dict[str, Any]]] = {}  # per task, not sent yet
        # per task, the call its latest sent events are in, until it lands
        self._carrying: dict[str, asyncio.Future[None]] = {}
        self._sending: asyncio.Task[None] | None = None

    def stream(self, task_id: str, recorded: asyncio.Future[None] | None) -> RunStream:
        """The stream of one run of the task; with `recorded`, the task may not be recorded
        yet, and its events leave only once that future is done."""
        return RunStream(self, task_id, recorded)

    def _put(self, task_id: str, events: list[dict[str, Any]]) -> None:
        self._waiting.setdefault(task_id, []).extend(events)
        if self._sending is None or self._sending.done():
            self._sending = asyncio.ensure_future(self._send())

    async def _take(self, task_id: str) -> list[dict[str, Any]]:
        carrying = self._carrying.get(task_id)
        if carrying is not None:
            with contextlib.suppress(Exception):  # logged by the sender
                await asyncio.shield(carrying)
        return self._waiting.pop(task_id, [])

    async def _send(self) -> None:
        while self._waiting:
            await asyncio.sleep(STREAM_LINGER_S)
            batch, self._waiting = self._waiting, {}
            if not batch:  # every run took its own meanwhile
                continue
            call = asyncio.ensure_future(self._shard.append_events(batch))
            for task_id in batch:
                self._carrying[task_id] = call
            try:
                await call
            except Exception as exc:  # unreachable past the budget: the runs go on
                logger.error(
                    "the control plane did not log events of %d tasks: %s", len(batch), exc
                )
            finally:
                for task_id in batch:
                    if self._carrying.get(task_id) is call:
                        del self._carrying[task_id]


class RunStream:
    """What one run streams, through its replica's `StreamSender`."""

    def __init__(
        self, sender: StreamSender, task_id: str, recorded: asyncio.Future[None] | None
    ) -> None:
        self._sender = sender
        self._task_id = task_id
        self._recorded = recorded
        self._unrecorded: list[dict[str, Any]] = []  # put before the task was recorded

    def put(self, event: dict[str, Any]) -> None:
        recorded = self._recorded
        if recorded is not None and (not recorded.done() or recorded.cancelled()):
            self._unrecorded.append(event)  # a refused run's (cancelled) are never sent
            return
        events, self._unrecorded = [*self._unrecorded, event], []
        self._sender._put(self._task_id, events)

    async def take(self) -> list[dict[str, Any]]:
        """The run's events not sent yet, once those sent have landed."""
        unrecorded, self._unrecorded = self._unrecorded, []
        return [*unrecorded, *await self._sender._take(self._task_id)]

    async def flush(self) -> None:
        """Log what the run streamed so far before anything else (its child's events); the
        task is recorded."""
        events = await self.take()
        if events:
            await self._sender._shard.append_events({self._task_id: events})
