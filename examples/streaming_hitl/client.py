"""Start a task, print its events as they stream, answer its question.

python client.py        # asks you
python client.py 42     # answers 42
"""

import sys

from llama_index.core.workflow import HumanResponseEvent

from llama_deploy_ray import ControlPlaneConfig, LlamaDeployClient

client = LlamaDeployClient(ControlPlaneConfig())
session = client.create_session()
task_id = session.run_nowait("guess")

for event in session.get_task_result_stream(task_id):
    if event["__type__"] == "InputRequiredEvent":
        answer = sys.argv[1] if len(sys.argv) > 1 else input(event["prefix"])
        session.send_event("guess", task_id, HumanResponseEvent(response=answer))
    else:
        print(f"[{event['__seq__']}] {event['__type__']}: {event['message']}")

print(session.get_task_result(task_id, wait_s=60).result)
