"""The seed's nested workflows. One change from llama_deploy: workflows 2.x removed
`Workflow.add_workflows`, so `outer.add_workflows(inner=...)` is `add_workflows(outer, inner=...)`.
"""

from llama_index.core.workflow import StartEvent, StopEvent, Workflow, step

from llama_deploy_ray import add_workflows


class InnerWorkflow(Workflow):
    @step()
    async def run_step(self, ev: StartEvent) -> StopEvent:
        arg1 = ev.get("arg1")
        if not arg1:
            raise ValueError("arg1 is required.")

        return StopEvent(result=str(arg1) + "_result")


class OuterWorkflow(Workflow):
    @step()
    async def run_step(self, ev: StartEvent, inner: InnerWorkflow) -> StopEvent:
        arg1 = ev.get("arg1")
        if not arg1:
            raise ValueError("arg1 is required.")

        arg1 = await inner.run(arg1=arg1)

        return StopEvent(result=str(arg1) + "_result")


inner = InnerWorkflow()
outer = OuterWorkflow()
add_workflows(outer, inner=InnerWorkflow())
