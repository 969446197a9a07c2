"""Task event streams and inboxes.

A task has two logs of events, both kept by the control plane with sequence numbers from 1:
its stream (what the workflow writes with `ctx.write_event_to_stream`, pushed by the replica in
batches) and its inbox (what clients send into it, e.g. a `HumanResponseEvent`). Readers ask
for what follows the last sequence number they saw and wait when there is nothing yet, so a log
can be read any number of times, by several readers at once, and resumed after a dropped
connection.

On the wire an event is a dict of its fields with two reserved keys beside them, which no
pydantic field can take (field names cannot start with an underscore): `__type__`, the event
class's name, and `__seq__`, its place in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python
from workflows.events import Event

from ._errors import InvalidRequestError

TYPE_KEY = "__type__"
SEQ_KEY = "__seq__"


def event_to_dict(event: Event) -> dict[str, Any]:
    """The event's fields (declared ones and those given as keyword data) and its type."""
    fields = event.model_dump()
    fields.update(fields.pop("_data", None) or {})
    fields = to_jsonable_python(fields, fallback=repr)
    fields[TYPE_KEY] = type(event).__name__
    return fields


def event_from_dict(data: dict[str, Any], accepted: dict[str, type[Event]]) -> Event:
    """Rebuild an event sent by a client, as one of the classes the workflow accepts."""
    type_name = data.get(TYPE_KEY)
    cls = accepted.get(str(type_name))
    if cls is None:
        raise InvalidRequestError(
            f"the workflow accepts no event of type {type_name!r}; it accepts {sorted(accepted)}"
        )
    fields = {k: v for k, v in data.items() if k not in (TYPE_KEY, SEQ_KEY)}
    return cls(**fields)


class EventBatch(BaseModel):
    """Events after a sequence number, and whether the log can still grow."""

    events: list[dict[str, Any]]
    closed: bool


class EventLog:
    """An append-only log of event dicts that readers can wait on."""

    def __init__(self) -> None:
        self._events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self.closed = False

    def __len__(self) -> int:
        return len(self._events)

    def extend(self, events: Iterable[dict[str, Any]]) -> None:
        for event in events:
            self._events.append({**event, SEQ_KEY: len(self._events) + 1})
        self._notify()

    def close(self) -> None:
        self.closed = True
        self._notify()

    async def read(self, after: int, wait_s: float) -> EventBatch:
        """The events after sequence number `after`; if there are none yet and the log is
        open, wait up to `wait_s` for some."""
        if after >= len(self._events) and not self.closed and wait_s > 0:
            changed = self._changed
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=wait_s)
        return EventBatch(events=self._events[after:], closed=self.closed)

    def _notify(self) -> None:
        # wake every waiting reader once; later readers wait on a fresh event
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
