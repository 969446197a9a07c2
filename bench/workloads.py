"""The workflows the benchmarks run, the same code on every system."""

import asyncio
import hashlib

from llama_index.core.workflow import Context, Event, StartEvent, StopEvent, Workflow, step


class HelloWorkflow(Workflow):
    """The seed's hello-world workflow: pure framework overhead."""

    @step()
    async def run_step(self, ev: StartEvent) -> StopEvent:
        return StopEvent(result=str(ev.get("arg1", "")) + "_result")


class WaitWorkflow(Workflow):
    """A step that awaits 100 ms, standing in for an LLM call."""

    @step()
    async def run_step(self, ev: StartEvent) -> StopEvent:
        await asyncio.sleep(0.1)
        return StopEvent(result=str(ev.get("arg1", "")) + "_result")


class CpuWorkflow(Workflow):
    """A CPU-bound step: 20,000 rounds of SHA-256 (a few milliseconds)."""

    @step()
    async def run_step(self, ev: StartEvent) -> StopEvent:
        digest = str(ev.get("arg1", "")).encode()
        for _ in range(20_000):
            digest = hashlib.sha256(digest).digest()
        return StopEvent(result=digest.hex()[:8])


class Tick(Event):
    n: int


class First(Event):
    pass


class Second(Event):
    pass


class StreamWorkflow(Workflow):
    """Three steps, each writing an event to the stream."""

    @step()
    async def one(self, ctx: Context, ev: StartEvent) -> First:
        ctx.write_event_to_stream(Tick(n=1))
        return First()

    @step()
    async def two(self, ctx: Context, ev: First) -> Second:
        ctx.write_event_to_stream(Tick(n=2))
        return Second()

    @step()
    async def three(self, ctx: Context, ev: Second) -> StopEvent:
        ctx.write_event_to_stream(Tick(n=3))
        return StopEvent(result="streamed")


WORKLOADS: dict[str, type[Workflow]] = {
    "hello": HelloWorkflow,
    "wait100ms": WaitWorkflow,
    "cpu": CpuWorkflow,
    "stream3": StreamWorkflow,
}
