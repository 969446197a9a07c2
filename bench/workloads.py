"""The workflows the benchmarks run."""

from llama_index.core.workflow import StartEvent, StopEvent, Workflow, step


class HelloWorkflow(Workflow):
    """The seed's hello-world workflow: pure framework overhead."""

    @step()
    async def run_step(self, ev: StartEvent) -> StopEvent:
        return StopEvent(result=str(ev.get("arg1", "")) + "_result")
