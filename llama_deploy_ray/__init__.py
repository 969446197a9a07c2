"""llama-deploy-ray: llama-index workflows deployed on Ray Serve, with llama_deploy's API.

from llama_deploy_ray import deploy_core, deploy_workflow, LlamaDeployClient
"""

from ._client import AsyncLlamaDeployClient, AsyncSessionClient, LlamaDeployClient, SessionClient
from ._config import (
    AutoscalingConfig,
    ControlPlaneConfig,
    RayActorOptions,
    SimpleMessageQueueConfig,
    SimpleOrchestratorConfig,
    WorkflowServiceConfig,
)
from ._deploy import deploy_core, deploy_workflow
from ._errors import (
    ControlPlaneUnavailableError,
    InvalidRequestError,
    LlamaDeployError,
    NotFoundError,
    ServiceConflictError,
    ServiceNotFoundError,
    SessionNotFoundError,
    TaskCancelledError,
    TaskFailedError,
    TaskNotFoundError,
    TaskStateError,
    TaskTimeoutError,
)
from ._nested import add_workflows
from ._types import (
    QueueMessage,
    ServiceDefinition,
    SessionDefinition,
    TaskDefinition,
    TaskResult,
    TaskStatus,
)

__all__ = [
    "AsyncLlamaDeployClient",
    "AsyncSessionClient",
    "AutoscalingConfig",
    "ControlPlaneConfig",
    "ControlPlaneUnavailableError",
    "InvalidRequestError",
    "LlamaDeployClient",
    "LlamaDeployError",
    "NotFoundError",
    "QueueMessage",
    "RayActorOptions",
    "ServiceConflictError",
    "ServiceDefinition",
    "ServiceNotFoundError",
    "SessionClient",
    "SessionDefinition",
    "SessionNotFoundError",
    "SimpleMessageQueueConfig",
    "SimpleOrchestratorConfig",
    "TaskCancelledError",
    "TaskDefinition",
    "TaskFailedError",
    "TaskNotFoundError",
    "TaskResult",
    "TaskStateError",
    "TaskStatus",
    "TaskTimeoutError",
    "WorkflowServiceConfig",
    "add_workflows",
    "deploy_core",
    "deploy_workflow",
]
