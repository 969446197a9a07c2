"""Workflows the tests deploy."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import ray
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
from ray import serve


class EchoWorkflow(Workflow):
    """The seed's hello-world workflow."""

    @step()
    async def run_step(self, ev: StartEvent) -> StopEvent:
        return StopEvent(result=str(ev.get("arg1", "")) + "_result")


class CounterWorkflow(Workflow):
    """Counts the runs of its session in `ctx.store`."""

    @step()
    async def count(self, ctx: Context, ev: StartEvent) -> StopEvent:
        count = await ctx.store.get("count", default=0) + 1
        await ctx.store.set("count", count)
        return StopEvent(result=str(count))


class StructuredWorkflow(Workflow):
    @step()
    async def run_step(self, ev: StartEvent) -> StopEvent:
        return StopEvent(result={"items": [1, 2, 3], "nested": {"ok": True}, "n": ev.get("n")})


class OpaqueResultWorkflow(Workflow):
    @step()
    async def run_step(self, ev: StartEvent) -> StopEvent:
        return StopEvent(result=object())


class FailingWorkflow(Workflow):
    @step()
    async def run_step(self, ev: StartEvent) -> StopEvent:
        raise ValueError(f"arg1 was {ev.get('arg1')!r}, which is not allowed")


class SleepWorkflow(Workflow):
    """Sleeps `seconds` (less if the file `release` names appears first), then reports when it
    ran and which replica ran it."""

    @step()
    async def run_step(self, ctx: Context, ev: StartEvent) -> StopEvent:
        start = time.time()
        release = ev.get("release")
        if release is None:
            await asyncio.sleep(float(ev.get("seconds", 0)))
        else:
            while time.time() < start + float(ev.get("seconds", 0)) and not os.path.exists(release):
                await asyncio.sleep(0.1)
        log = await ctx.store.get("log", default=[])
        log.append(ev.get("tag"))
        await ctx.store.set("log", log)
        return StopEvent(
            result={
                "start": start,
                "end": time.time(),
                "log": log,
                "replica": serve.get_replica_context().replica_id.unique_id,
            }
        )


class DiesOnceWorkflow(Workflow):
    """Kills its replica's process the first time it runs (a marker file remembers)."""

    def __init__(self, marker: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.marker = marker

    @step()
    async def run_step(self, ev: StartEvent) -> StopEvent:
        marker = Path(self.marker)
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(1)
        return StopEvent(result=f"survived, first replica was pid {marker.read_text()}")


class Progress(Event):
    step: int


class StreamingWorkflow(Workflow):
    """Writes `n` events (three by default), `pause` seconds apart."""

    @step()
    async def run_step(self, ctx: Context, ev: StartEvent) -> StopEvent:
        for i in range(int(ev.get("n", 3))):
            ctx.write_event_to_stream(Progress(step=i))
            await asyncio.sleep(float(ev.get("pause", 0.7)))
        return StopEvent(result="streamed")


class HumanWorkflow(Workflow):
    """The classic human-in-the-loop pattern."""

    @step()
    async def ask(self, ev: StartEvent) -> InputRequiredEvent:
        return InputRequiredEvent(prefix="Enter a number: ")

    @step()
    async def answer(self, ev: HumanResponseEvent) -> StopEvent:
        return StopEvent(result=ev.response)


class PidCounterWorkflow(Workflow):
    """Counts its session's runs in `ctx.store`; says which process ran it."""

    @step()
    async def count(self, ctx: Context, ev: StartEvent) -> StopEvent:
        count = await ctx.store.get("count", default=0) + 1
        await ctx.store.set("count", count)
        await asyncio.sleep(float(ev.get("seconds", 0)))
        return StopEvent(result={"count": count, "pid": os.getpid()})


class NodeLogWorkflow(Workflow):
    """Sleeps `seconds`, logs `tag` in `ctx.store`; says which Ray node ran it."""

    @step()
    async def run_step(self, ctx: Context, ev: StartEvent) -> StopEvent:
        await asyncio.sleep(float(ev.get("seconds", 0)))
        log = await ctx.store.get("log", default=[])
        log.append(ev.get("tag"))
        await ctx.store.set("log", log)
        return StopEvent(result={"log": log, "node": ray.get_runtime_context().get_node_id()})


class PidHumanWorkflow(Workflow):
    """Asks for input, saying which process asks; answers with the input and its process."""

    @step()
    async def ask(self, ev: StartEvent) -> InputRequiredEvent:
        return InputRequiredEvent(prefix=str(os.getpid()))

    @step()
    async def answer(self, ev: HumanResponseEvent) -> StopEvent:
        return StopEvent(result={"response": ev.response, "pid": os.getpid()})


class InnerWorkflow(Workflow):
    """The seed's inner workflow; it also streams an event."""

    @step()
    async def run_step(self, ctx: Context, ev: StartEvent) -> StopEvent:
        arg1 = ev.get("arg1")
        if not arg1:
            raise ValueError("arg1 is required.")
        ctx.write_event_to_stream(Progress(step=100))
        await asyncio.sleep(float(ev.get("seconds", 0)))
        return StopEvent(result=str(arg1) + "_result")


class LocalInnerWorkflow(Workflow):
    """A local fallback whose result differs from the deployed inner service's."""

    @step()
    async def run_step(self, ev: StartEvent) -> StopEvent:
        return StopEvent(result=str(ev.get("arg1")) + "_local")


class OuterWorkflow(Workflow):
    """The seed's outer workflow, nesting a workflow named `child`; it streams an event before
    the child runs and one after."""

    @step()
    async def run_step(self, ctx: Context, ev: StartEvent, child: InnerWorkflow) -> StopEvent:
        arg1 = ev.get("arg1")
        if not arg1:
            raise ValueError("arg1 is required.")
        ctx.write_event_to_stream(Progress(step=1))
        arg1 = await child.run(arg1=arg1, seconds=ev.get("seconds", 0))
        ctx.write_event_to_stream(Progress(step=2))
        return StopEvent(result=str(arg1) + "_result")


class HelperOuterWorkflow(Workflow):
    """Nests a workflow under a name no service has: it always runs locally."""

    @step()
    async def run_step(self, ev: StartEvent, helper: Workflow) -> StopEvent:
        return StopEvent(result=str(await helper.run(arg1=ev.get("arg1"))) + "_result")


class Greeting(StartEvent):
    name: str


class TypedStartWorkflow(Workflow):
    """Its start event has a required field."""

    @step()
    async def greet(self, ev: Greeting) -> StopEvent:
        return StopEvent(result=f"hello {ev.name}")


def _refuse_to_be_restored() -> None:
    raise RuntimeError("this object refuses to be restored")


class Fragile:
    """Saves fine, but cannot be loaded again."""

    def __reduce__(self):
        return (_refuse_to_be_restored, ())


class UnrestorableWorkflow(Workflow):
    """Keeps an object in the session's state that cannot be restored."""

    @step()
    async def keep(self, ctx: Context, ev: StartEvent) -> StopEvent:
        await ctx.store.set("fragile", Fragile())
        return StopEvent(result="kept")


class BlockingWorkflow(Workflow):
    """Blocks its replica's event loop for `seconds` (a synchronous step), and notes each run
    in the file `log`."""

    @step()
    async def block(self, ev: StartEvent) -> StopEvent:
        with open(ev.get("log"), "a") as log:
            log.write("ran\n")
        time.sleep(float(ev.get("seconds")))
        return StopEvent(result="done")


class ManyEventsWorkflow(Workflow):
    """Streams `n` events."""

    @step()
    async def stream(self, ctx: Context, ev: StartEvent) -> StopEvent:
        for i in range(int(ev.get("n"))):
            ctx.write_event_to_stream(Progress(step=i))
        return StopEvent(result="streamed")


class ChatWorkflow(Workflow):
    """Keeps the client's last message in `ctx.store` and answers with the one before."""

    @step()
    async def chat(self, ctx: Context, ev: StartEvent) -> StopEvent:
        previous = await ctx.store.get("last", default=None)
        await ctx.store.set("last", ev.get("message"))
        return StopEvent(result=previous)


class Answer(HumanResponseEvent):
    number: int


class TypedHumanWorkflow(Workflow):
    """Waits for a human's answer that must be a number."""

    @step()
    async def ask(self, ev: StartEvent) -> InputRequiredEvent:
        return InputRequiredEvent(prefix="Enter a number: ")

    @step()
    async def answer(self, ev: Answer) -> StopEvent:
        return StopEvent(result=ev.number * 2)
