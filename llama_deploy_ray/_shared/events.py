"""Task event streams and inboxes.

A task has two logs of events, both kept by the control plane with sequence numbers from 1:
its stream (what the workflow writes with `ctx.write_event_to_stream`, pushed by the replica in
batches) and its inbox (what clients send into it, e.g. a `HumanResponseEvent`). Readers ask
for what follows the last sequence number they saw and wait when there is nothing yet, so a log
can be read any number of times, by several readers at once, and resumed after a dropped
connection.

On the wire an event is a dict of its fields with reserved keys beside them, which no
pydantic field can take (field names cannot start with an underscore): `__type__`, the event
class's name, `__seq__`, its place in the log, and, for a class that derives from another
event class (an `InputRequiredEvent`, say), `__types__`: those classes' names.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from pydantic_core import to_jsonable_python
from workflows import Workflow
from workflows.events import Event, HumanResponseEvent

from .errors import InvalidRequestError
from .workflows_internals import event_fields, events_taken_by, steps_of

TYPE_KEY = "__type__"
SEQ_KEY = "__seq__"
TYPES_KEY = "__types__"
DROPPED_TYPE = "EventsDropped"
# The last line of a stream read live from the replica that runs the task (see `_live_stream`):
# the log closed, nothing follows. A live stream that ends without it goes on at the control
# plane.
STREAM_END_TYPE = "StreamEnd"


def accepted_events(
    workflow: Workflow, additional: Iterable[type[Event]] = ()
) -> dict[str, type[Event]]:
    """The event classes a client may send into a run of `workflow`, by name: those its steps
    take, and `additional` ones it waits for with `ctx.wait_for_event`."""
    classes: dict[str, type[Event]] = {HumanResponseEvent.__name__: HumanResponseEvent}
    for step_fn in steps_of(workflow).values():
        for cls in events_taken_by(step_fn):
            classes[cls.__name__] = cls
    for cls in additional:
        classes[cls.__name__] = cls
    return classes


def event_to_dict(event: Event) -> dict[str, Any]:
    """The event's fields (declared ones and those given as keyword data) and its type."""
    fields = to_jsonable_python(event_fields(event), fallback=repr)
    fields[TYPE_KEY] = type(event).__name__
    bases = [c.__name__ for c in type(event).__mro__[1:] if issubclass(c, Event) and c is not Event]
    if bases:
        fields[TYPES_KEY] = bases
    return fields


def event_from_dict(data: dict[str, Any], accepted: dict[str, type[Event]]) -> Event:
    """Rebuild an event sent by a client, as one of the classes the workflow accepts."""
    type_name = data.get(TYPE_KEY)
    cls = accepted.get(str(type_name))
    if cls is None:
        raise InvalidRequestError(
            f"the workflow accepts no event of type {type_name!r}; it accepts {sorted(accepted)}"
        )
    fields = {k: v for k, v in data.items() if k not in (TYPE_KEY, SEQ_KEY, TYPES_KEY)}
    try:
        return cls(**fields)
    except (ValidationError, TypeError) as exc:
        raise InvalidRequestError(f"the fields do not fit a {type_name}: {exc}") from None


class EventBatch(BaseModel):
    """Events after a sequence number, and whether the log can still grow."""

    events: list[dict[str, Any]]
    closed: bool
    last_seq: int = 0  # the log's last sequence number when it was read


class EventLog:
    """An append-only log of event dicts that readers can wait on; when it holds
    `max_events`, it drops its oldest (`full="drop"`) or refuses more (`full="refuse"`)."""

    def __init__(self, max_events: int, full: Literal["drop", "refuse"] = "drop") -> None:
        # a deque from the first event on: most logs (a hello-world's stream, most inboxes)
        # stay empty, and a task keeps two for `task_retention_s`
        self._events: deque[dict[str, Any]] | tuple[()] = ()
        self._dropped = 0  # sequence numbers 1.._dropped are gone
        self._max_events = max_events
        self._full = full
        # what waiting readers wait on, made by the first of them: most logs (a finished
        # task's, an inbox no event comes to) never have one
        self._changed: asyncio.Event | None = None
        self.closed = False

    def __len__(self) -> int:
        """The sequence number of the last event."""
        return self._dropped + len(self._events)

    @property
    def first_kept(self) -> int:
        """The sequence number of the oldest event still kept."""
        return self._dropped + 1

    def restore(self, events: list[dict[str, Any]], closed: bool) -> None:
        """Take back the events (sequence numbers included) that a log kept before."""
        self._events = deque(events[-self._max_events :]) if events else ()
        self._dropped = self._events[0][SEQ_KEY] - 1 if self._events else 0
        self.closed = closed

    def extend(self, events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Add `events`; returns them as kept, with their sequence numbers."""
        events = list(events)
        if self._full == "refuse" and len(self._events) + len(events) > self._max_events:
            raise InvalidRequestError(
                f"the task was already sent {len(self._events)} events, the most one task "
                f"takes ({self._max_events}); cancel it and start another"
            )
        kept = self._events if isinstance(self._events, deque) else deque()
        added = []
        for event in events:
            added.append({**event, SEQ_KEY: self._dropped + len(kept) + 1})
            kept.append(added[-1])
        while len(kept) > self._max_events:
            kept.popleft()
            self._dropped += 1
        self._events = kept
        self._notify()
        return added

    def close(self) -> None:
        self.closed = True
        self._notify()

    async def read(self, after: int, wait_s: float) -> EventBatch:
        """The events after sequence number `after`; if there are none yet and the log is
        open, wait up to `wait_s` for some."""
        if after >= len(self) and not self.closed and wait_s > 0:
            changed = self._changed = self._changed or asyncio.Event()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=wait_s)
        if after >= self._dropped:
            kept = list(itertools.islice(self._events, after - self._dropped, None))
            return EventBatch(events=kept, closed=self.closed, last_seq=len(self))
        marker = {TYPE_KEY: DROPPED_TYPE, "dropped": self._dropped - after, SEQ_KEY: self._dropped}
        return EventBatch(events=[marker, *self._events], closed=self.closed, last_seq=len(self))

    def _notify(self) -> None:
        # wake every waiting reader once; later readers wait on a fresh event
        if self._changed is not None:
            self._changed.set()
            self._changed = None
