"""llama-deploy-ray: llama-index workflows deployed on Ray Serve, with llama_deploy's API.

from llama_deploy_ray import deploy_core, deploy_workflow, LlamaDeployClient
"""

from ._client.clients import (
    AsyncLlamaDeployClient,
    AsyncSessionClient,
    LlamaDeployClient,
    SessionClient,
)
from ._cluster.cluster_session import ClusterSession
from ._cluster.deploy import deploy_core, deploy_workflow
from ._cluster.nested import add_workflows
from ._shared.config import (
    AutoscalingConfig,
    ControlPlaneConfig,
    RayActorOptions,
    ServiceLoggingConfig,
    SimpleMessageQueueConfig,
    SimpleOrchestratorConfig,
    WorkflowServiceConfig,
)
from ._shared.errors import (
    ControlPlaneUnavailableError,
    ForbiddenError,
    InvalidRequestError,
    LlamaDeployError,
    NotFoundError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ServiceConflictError,
    ServiceNotFoundError,
    ServiceOverloadedError,
    SessionNotFoundError,
    TaskCancelledError,
    TaskFailedError,
    TaskNotFoundError,
    TaskStateError,
    TaskTimeoutError,
    UnauthorizedError,
)
from ._shared.types import (
    QueueMessage,
    ServiceDefinition,
    ServiceStatus,
    SessionDefinition,
    TaskDefinition,
    TaskResult,
    TaskStatus,
)

__all__ = [
    "AsyncLlamaDeployClient",
    "AsyncSessionClient",
    "AutoscalingConfig",
    "ClusterSession",
    "ControlPlaneConfig",
    "ControlPlaneUnavailableError",
    "ForbiddenError",
    "InvalidRequestError",
    "LlamaDeployClient",
    "LlamaDeployError",
    "NotFoundError",
    "PayloadTooLargeError",
    "QueueMessage",
    "RayActorOptions",
    "RequestTimeoutError",
    "ServiceConflictError",
    "ServiceDefinition",
    "ServiceLoggingConfig",
    "ServiceNotFoundError",
    "ServiceOverloadedError",
    "ServiceStatus",
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
    "UnauthorizedError",
    "WorkflowServiceConfig",
    "add_workflows",
    "deploy_core",
    "deploy_workflow",
]
