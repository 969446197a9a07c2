"""Nested workflows: `add_workflows(outer, inner=InnerWorkflow())`.

llama_deploy's `outer.add_workflows(inner=...)` let a step declare `inner: InnerWorkflow` and
call `await inner.run(...)`; workflows 2.x removed both. `add_workflows` brings them back: it
binds, on the instance, a wrapper of every step that has a parameter of one of the given
names, which passes that parameter in. What the step receives runs the workflow as a child
task on the deployed service of the same name when there is one (the child's own timeout, in
the parent's session, its events in the parent's stream), and runs the local instance
otherwise (outside a deployment, or when no such service is registered).

A child task takes `ClusterSession.run`'s path (`_cluster_session`): straight to a replica of
its service, which records and runs it when it is first in its session's line there; one that
would wait for its turn goes through the orchestrator, which waits holding no replica (a
replica that waited would hold a request slot that the tasks ahead of it may need).
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from workflows import Workflow

from .._client.core import result_value, task_definition
from .._shared.errors import InvalidRequestError, ServiceNotFoundError
from .._shared.types import TaskDefinition
from .._shared.workflows_internals import copy_step_config, steps_of_class
from .actors import ControlPlaneHandle, OrchestratorHandle
from .cluster_session import run_task
from .message_queue import RayMessageQueue

NESTED_ATTR = "_llama_deploy_nested"


@dataclass(frozen=True)
class ParentRun:
    """The task a replica is running, and the core its child tasks go through."""

    task: TaskDefinition
    control_plane: ControlPlaneHandle
    orchestrator: OrchestratorHandle
    services: RayMessageQueue
    # awaited before a child task is asked for: what the run streamed so far is logged first
    before_child: Callable[[], Awaitable[None]]


# Set around `workflow.run` in a replica, so that the run's steps inherit it.
PARENT_RUN: ContextVar[ParentRun | None] = ContextVar("parent_run", default=None)


def add_workflows(workflow: Workflow, **workflows: Workflow) -> None:
    """Let `workflow`'s steps take the named workflows as parameters.

    outer = OuterWorkflow()
    add_workflows(outer, inner=InnerWorkflow())
    # a step `async def run_step(self, ev: StartEvent, inner: InnerWorkflow)` then gets
    # `inner`, and `await inner.run(arg1=...)` returns its result
    """
    nested: dict[str, Workflow] = {**getattr(workflow, NESTED_ATTR, {}), **workflows}
    for name, inner in workflows.items():
        if not isinstance(inner, Workflow):
            raise InvalidRequestError(
                f"{name}= must be a Workflow instance, got {type(inner).__name__}"
            )
    bound = 0
    for step_name, step_fn in steps_of_class(type(workflow)).items():
        function = getattr(step_fn, "__func__", step_fn)
        wanted = [p for p in inspect.signature(function).parameters if p in nested]
        if wanted:
            setattr(workflow, step_name, _bind(workflow, function, wanted))
            bound += 1
    if not bound:
        raise InvalidRequestError(
            f"no step of {type(workflow).__name__} has a parameter named "
            f"{' or '.join(sorted(workflows))}"
        )
    workflow.__dict__[NESTED_ATTR] = nested


def bound_step_names(workflow: Workflow) -> set[str]:
    """The instance attributes `add_workflows` set (they are rebuilt, not shipped)."""
    return {k for k, v in workflow.__dict__.items() if isinstance(v, types.MethodType)}


def _bind(workflow: Workflow, function: Any, names: list[str]) -> types.MethodType:
    async def step_with_workflows(self: Workflow, *args: Any, **kwargs: Any) -> Any:
        nested = self.__dict__[NESTED_ATTR]
        for name in names:
            kwargs[name] = NestedWorkflow(name, nested[name])
        return await function(self, *args, **kwargs)

    copy_step_config(function, step_with_workflows)
    step_with_workflows.__name__ = function.__name__
    return types.MethodType(step_with_workflows, workflow)


class NestedWorkflow:
    """What a step gets for a nested workflow: `await nested.run(**kwargs)` returns its result."""

    def __init__(self, service_name: str, local: Workflow) -> None:
        self.service_name = service_name
        self.local = local

    async def run(self, **kwargs: Any) -> Any:
        parent = PARENT_RUN.get()
        if parent is None:  # not in a replica: nothing to delegate to
            return await self.local.run(**kwargs)
        child = task_definition(self.service_name, kwargs).model_copy(
            update={"session_id": parent.task.session_id, "parent_task_id": parent.task.task_id}
        )
        await parent.before_child()
        try:
            result = await run_task(
                child, parent.services, parent.orchestrator, parent.control_plane
            )
        except ServiceNotFoundError:
            return await self.local.run(**kwargs)
        return result_value(result)
