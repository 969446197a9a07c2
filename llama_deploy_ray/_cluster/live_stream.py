"""A task's stream on the response that started it.

`run_nowait` reaches a replica of the task's service, which records the task, starts it (one
control-plane call when its turn has come) and answers at once with a response that goes on
carrying the task's stream: each event as the run here writes it, numbered as the control
plane's log numbers it. A client that streams the task reads that response: no second request,
no hop through the API or the control plane, so the first event arrives about as soon as the
workflow writes it.

The numbers match while the run is the only writer of its stream, which it is until it starts
a nested task (whose events join its stream). Then, and when the task stops running here
before its end (parked to wait for input, driven by another replica), the response ends, and
the reader goes on at the control plane (`GET /sessions/{id}/tasks/{task_id}/events?after=`)
from the last event it saw, as it does when the connection drops. A response that carried the
whole stream ends with a `StreamEnd` line.

Events reach this response before the control plane has logged them: if the replica dies, a
reader may have seen its last events that the control plane never logged; the task runs again
(adopted) with a stream that goes on from what was logged, and the reader, resuming after the
last number it saw, skips as many of that run's first events.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from .._shared.config import STREAM_KEEPALIVE_S
from .._shared.events import SEQ_KEY, STREAM_END_TYPE, TYPE_KEY
from .._shared.types import TaskResult

_END_LINE = json.dumps({TYPE_KEY: STREAM_END_TYPE}) + "\n"


async def live_event_lines(
    events: asyncio.Queue[dict[str, Any] | None],
    driving: asyncio.Task[TaskResult | None],
) -> AsyncIterator[str]:
    """NDJSON lines of the `events` the task's runs here write (see `RunEngine.watch_stream`)
    while `driving` (this replica's driving of a new task) goes on; blank lines keep an idle
    response alive."""
    yield "\n"  # the response starts now: proxies pass its headers on at its first bytes
    seq = 0
    while True:
        try:
            event = await asyncio.wait_for(events.get(), STREAM_KEEPALIVE_S)
        except asyncio.TimeoutError:
            yield "\n"
            continue
        if event is None:  # no more events here: the stream ends, or goes on elsewhere
            if _final(driving):
                yield _END_LINE
            return
        seq += 1
        yield json.dumps({**event, SEQ_KEY: seq}) + "\n"


def _final(driving: asyncio.Task[TaskResult | None]) -> bool:
    """Whether the driving ended with the task's final result."""
    if not driving.done() or driving.cancelled() or driving.exception() is not None:
        return False
    return driving.result() is not None
