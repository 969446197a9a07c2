"""Run the outer workflow; it runs the inner one as a child task in the same session."""

from llama_deploy_ray import ControlPlaneConfig, LlamaDeployClient

# points to deployed control plane
client = LlamaDeployClient(ControlPlaneConfig())

session = client.create_session()
result = session.run("outer", arg1="hello_world")
print(result)
# prints 'hello_world_result_result'
