"""Every use of llama-index workflows' private internals, in one place.

llama-index-workflows 2.x has no public API for what a deployment needs to know about a
workflow: which events its steps take, which attributes its `__init__` sets, how a step's
configuration travels with a wrapper, which context keys time a run, where an event keeps its
extra fields. Each is read here and nowhere else, and `tests/test_unit.py` checks each against
the installed version, so an upgrade that moves one fails there, loudly, in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from workflows import Workflow, step
from workflows.events import Event, StartEvent, StopEvent


def steps_of(workflow: Workflow) -> Mapping[str, Callable[..., Any]]:
    """The workflow's steps by name, as bound on this instance."""
    return workflow._get_steps()


def look_up_steps_once(workflow: Workflow) -> None:
    """Have the instance answer its step lookups from what it has now. `workflows` finds a
    workflow's steps with `inspect.getmembers` several times per run (4% of a replica's time
    on hello-world); a replica's instance never gains a step. Call it once the instance is
    complete (its nested workflows bound)."""
    steps = dict(workflow._get_steps())
    workflow._get_steps = lambda: dict(steps)  # type: ignore[method-assign]


def steps_of_class(cls: type[Workflow]) -> Mapping[str, Callable[..., Any]]:
    """The steps a workflow class declares, by name."""
    return cls._get_steps_from_class()


def events_taken_by(step_fn: Callable[..., Any]) -> list[type[Event]]:
    """The event classes a step accepts."""
    return list(step_fn._step_config.accepted_events)  # type: ignore[attr-defined]


def copy_step_config(source: Callable[..., Any], target: Callable[..., Any]) -> None:
    """Make `target` (a wrapper of step `source`) a step with the same configuration."""
    target._step_config = source._step_config  # type: ignore[attr-defined]


# The context keys that time a run against the workflow's timeout.
RUN_CLOCK_KEYS = ("elapsed_alive", "last_alive_stamp")


def with_fresh_run_clock(state: dict[str, Any]) -> dict[str, Any]:
    """A saved context whose next run starts its timeout from zero."""
    return {**state, RUN_CLOCK_KEYS[0]: 0.0, RUN_CLOCK_KEYS[1]: None}


# `Workflow.__init__`'s options and the attributes it keeps them in.
_INIT_OPTIONS = {
    "timeout": "_timeout",
    "verbose": "_verbose",
    "disable_validation": "_disable_validation",
    "num_concurrent_runs": "_num_concurrent_runs",
    "workflow_name": "_workflow_name",
    "serializer": "_serializer",
}


def init_options(workflow: Workflow) -> dict[str, Any]:
    """The options to pass `Workflow.__init__` again to rebuild `workflow`."""
    return {option: getattr(workflow, attr) for option, attr in _INIT_OPTIONS.items()}


class _Probe(Workflow):
    @step
    async def only(self, ev: StartEvent) -> StopEvent:
        return StopEvent()


# What `Workflow.__init__` sets on an instance; everything else there is the user's.
FRAMEWORK_ATTRS = frozenset(_Probe().__dict__)


def event_fields(event: Event) -> dict[str, Any]:
    """An event's fields: those declared, and those given as keyword data."""
    fields = event.model_dump()
    fields.update(fields.pop("_data", None) or {})
    return fields
