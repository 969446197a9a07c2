"""Serve the hello-world workflow with LlamaIndex's own single-process server,
`llama-agents-server` 0.8.0, the way its users run it. Runs inside the virtual environment
`bench/run.py` makes for it; the harness drives it with the same HTTP calls as ours.

    python agents_server.py PORT memory             # its in-memory store
    python agents_server.py PORT /path/db.sqlite3   # its SQLite store (durable)
"""

import asyncio
import sys

from llama_agents.server import MemoryWorkflowStore, SqliteWorkflowStore, WorkflowServer
from workflows import Workflow, step
from workflows.events import StartEvent, StopEvent


class HelloWorkflow(Workflow):
    """bench/workloads.py's, with the imports this environment has."""

    @step()
    async def run_step(self, ev: StartEvent) -> StopEvent:
        return StopEvent(result=str(ev.get("arg1", "")) + "_result")


def main(port: int, store: str) -> None:
    server = WorkflowServer(
        workflow_store=MemoryWorkflowStore() if store == "memory" else SqliteWorkflowStore(store)
    )
    server.add_workflow("hello", HelloWorkflow())
    asyncio.run(server.serve(host="127.0.0.1", port=port))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
