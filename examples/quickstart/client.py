"""Terminal 3: run the workflow through the control plane's HTTP API."""

from llama_deploy_ray import ControlPlaneConfig, LlamaDeployClient

# points to deployed control plane
client = LlamaDeployClient(ControlPlaneConfig())

session = client.create_session()
result = session.run("my_workflow", arg1="hello_world")
print(result)
# prints 'hello_world_result'
