"""A workflow that streams its progress and asks a human for a number."""

import asyncio

from llama_index.core.workflow import (
    Context,
    Event,
    HumanResponseEvent,
    InputRequiredEvent,
    StartEvent,
    StopEvent,
    Workflow,
    step,
)


class Progress(Event):
    message: str


class GuessWorkflow(Workflow):
    @step()
    async def think(self, ctx: Context, ev: StartEvent) -> InputRequiredEvent:
        for message in ("warming up", "thinking hard", "almost there"):
            ctx.write_event_to_stream(Progress(message=message))
            await asyncio.sleep(0.5)
        return InputRequiredEvent(prefix="Enter a number: ")

    @step()
    async def finish(self, ctx: Context, ev: HumanResponseEvent) -> StopEvent:
        ctx.write_event_to_stream(Progress(message=f"got {ev.response}"))
        return StopEvent(result=f"you said {ev.response}")
