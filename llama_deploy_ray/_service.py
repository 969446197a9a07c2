"""The workflow service: a Ray Serve deployment whose replicas run one workflow.

A replica takes a task from its request queue (the service's topic on the Ray-native message
queue), restores the session's context for this service, runs the workflow and hands back the
result with the context's new state. It keeps nothing between tasks, so any replica can take
any task, and a replica that dies loses only the tasks it was running (the orchestrator sends
those again).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticSerializationError, to_jsonable_python
from ray import serve
from workflows import Context
from workflows.context import PickleSerializer

from ._packaging import PackedWorkflow, unpack_workflow
from ._types import QueueMessage, TaskDefinition

# JSON where it can, pickle where it must: state may hold any object a step put there.
_STATE_SERIALIZER = PickleSerializer()


class TaskOutcome(BaseModel):
    """What a replica reports for one task; `state` is None when there is nothing to keep."""

    result: Any = None
    error: str | None = None
    error_type: str | None = None
    state: dict[str, Any] | None = None


@serve.deployment
class WorkflowService:
    def __init__(self, packed: PackedWorkflow) -> None:
        self._workflow = unpack_workflow(packed)

    async def process_message(self, message: QueueMessage) -> TaskOutcome:
        """Run the task in `message` from the session state it carries."""
        task: TaskDefinition = message.data["task"]
        state: dict[str, Any] | None = message.data.get("state")
        ctx = None
        if state:
            # A new task is a new run on the session's state: its timeout starts from zero,
            # instead of the alive time the session's earlier runs spent.
            fresh = {**state, "elapsed_alive": 0.0, "last_alive_stamp": None}
            ctx = Context.from_dict(self._workflow, fresh, serializer=_STATE_SERIALIZER)
        handler = self._workflow.run(ctx=ctx, **task.run_kwargs)
        try:
            result = await handler
        except Exception as exc:
            return TaskOutcome(error=str(exc) or repr(exc), error_type=type(exc).__name__)
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
        if state is None and not (await handler.ctx.store.get_state()).model_dump():
            # nothing to keep: skip serializing a context whose store was never written
            return TaskOutcome(result=result)
        return TaskOutcome(result=result, state=handler.ctx.to_dict(serializer=_STATE_SERIALIZER))
