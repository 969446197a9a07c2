"""`deploy_core` and `deploy_workflow`: the seed's entry points, on Ray."""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import secrets
import signal
import socket
from collections.abc import Sequence
from typing import Any

import ray
from pydantic import BaseModel
from ray import serve
from workflows import Workflow
from workflows.events import Event

from llama_deploy_ray_haproxy import ADMIN_HOST_ENV, admin_env

from .._shared.config import (
    ORCHESTRATOR_ACTOR_NAME,
    SERVE_FAST_MODE_ENV,
    ControlPlaneConfig,
    SimpleMessageQueueConfig,
    SimpleOrchestratorConfig,
    WorkflowServiceConfig,
    control_plane_actor_name,
    workflow_route,
)
from .._shared.errors import ControlPlaneUnavailableError, InvalidRequestError
from .._shared.events import accepted_events
from .._shared.types import ServiceDefinition
from .actors import ControlPlaneHandle, ControlPlaneShard, OrchestratorHandle, core_actor_options
from .api import API_APP_NAME, ControlPlaneAPI
from .control_plane import ControlPlaneActor
from .guard import publish_guard
from .orchestrator import SimpleOrchestrator
from .packaging import PackedWorkflow, pack_workflow
from .service import WorkflowService

logger = logging.getLogger(__name__)

# A log line per request per hop costs more than the hop itself on a small machine; errors and
# replica events are still logged.
_QUIET_ACCESS_LOG = {"enable_access_log": False}


class ServiceDeployment(BaseModel):
    """What the control plane stores to deploy a service again after a cluster restart."""

    workflow: PackedWorkflow
    config: WorkflowServiceConfig
    # a digest of the workflow's code, when the deployer made one: a deploy of the same code
    # and config can then leave the service as it runs (see `llama-deploy-ray deploy`)
    version: str | None = None


async def deploy_core(
    control_plane_config: ControlPlaneConfig | None = None,
    message_queue_config: SimpleMessageQueueConfig | None = None,
    orchestrator_config: SimpleOrchestratorConfig | None = None,
    *,
    blocking: bool | None = None,
) -> None:
    """Start the control plane, orchestrator and HTTP API on Ray.

    Attaches to the Ray cluster in `control_plane_config.ray_address`, `RAY_ADDRESS` or
    running on this machine; when there is none, starts a local Ray in this process. With
    `blocking=None` it then keeps running while this process hosts that Ray (as the seed's
    `deploy_core` did), until Ctrl-C or SIGTERM stops Serve and that Ray, and returns at once
    when the cluster lives elsewhere; pass `blocking=False` in a notebook or test.

        await deploy_core(ControlPlaneConfig(), SimpleMessageQueueConfig())
    """
    config = control_plane_config or ControlPlaneConfig()
    orchestrator_config = orchestrator_config or SimpleOrchestratorConfig()
    if message_queue_config is not None and not isinstance(
        message_queue_config, SimpleMessageQueueConfig
    ):
        raise InvalidRequestError(
            f"{type(message_queue_config).__name__} is not supported: llama-deploy-ray's "
            "message queue is Ray itself; pass SimpleMessageQueueConfig() or nothing"
        )
    started_ray = _connect(config, start_if_missing=True)
    await asyncio.to_thread(_start_core, config, orchestrator_config)
    # services come back before the API answers, so the first client finds them
    await _redeploy_stored_services(config)
    await asyncio.to_thread(_start_api, config)
    if started_ray:
        # Serve's HAProxy is a child process that outlives a Ray stopped from under it and
        # keeps the port: stop Serve first, at exit (Ray's own exit handler runs after this).
        atexit.register(serve.shutdown)
    logger.info("llama-deploy-ray control plane at %s", config.url)
    if blocking or (blocking is None and started_ray):
        await _until_stopped()


async def _until_stopped() -> None:
    """Wait for Ctrl-C (KeyboardInterrupt, as ever) or SIGTERM, which `kill`, systemd and
    `docker stop` send, and which is the way to stop a core run in the background (a shell
    starts background jobs with SIGINT ignored): SIGTERM would otherwise end the process
    without its exit handlers, and Serve's HAProxy would outlive it, holding its port."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    except (NotImplementedError, RuntimeError, ValueError):  # Windows, or not the main thread
        await asyncio.Event().wait()
    try:
        await stop.wait()
        logger.info("SIGTERM: stopping Serve and the local Ray")
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def deploy_workflow(
    workflow: Workflow | str,
    workflow_config: WorkflowServiceConfig,
    control_plane_config: ControlPlaneConfig | None = None,
    *,
    additional_events: Sequence[type[Event]] = (),
    version: str | None = None,
) -> ServiceDefinition:
    """Deploy `workflow` as a Ray Serve application and register it as a service.

    `workflow` is an instance (rebuilt in each replica from its class and attributes) or an
    import path `"package.module:attribute"`. Returns once the replicas are running; they live
    in the cluster, not in this process. `additional_events` are event classes the workflow
    waits for with `ctx.wait_for_event` (in no step's signature), so clients may send them,
    as `WorkflowServer.add_workflow` takes them. `version`, a digest of the workflow's code,
    is recorded with the service: a later deploy can tell that nothing changed.

        await deploy_workflow(MyWorkflow(), WorkflowServiceConfig(service_name="my_workflow"))
    """
    config = control_plane_config or ControlPlaneConfig()
    packed = pack_workflow(workflow, additional_events)
    _connect(config, start_if_missing=False)
    control_plane = ControlPlaneHandle.lookup(config.namespace)
    definition = ServiceDefinition(
        service_name=workflow_config.service_name,
        description=workflow_config.description,
        host=workflow_config.host,
        port=workflow_config.port,
    )
    # Refuse a name taken by another service before touching its running deployment.
    existing = {s.service_name: s for s in await control_plane.list_services()}
    if existing.get(definition.service_name, definition) != definition:
        await control_plane.register_service(definition)  # raises ServiceConflictError
    service = ServiceDeployment(workflow=packed, config=workflow_config, version=version)
    await _run_service(service, config)
    events = (
        None if isinstance(workflow, str) else sorted(accepted_events(workflow, additional_events))
    )
    return await control_plane.register_service(definition, events, service.model_dump_json())


async def _run_service(service: ServiceDeployment, config: ControlPlaneConfig) -> None:
    """Run the service's Serve application; returns once its replicas run."""
    workflow_config = service.config
    _warn_if_it_cannot_fit(workflow_config)
    # serve.deployment made the class a Deployment (Ray's type hints keep the class)
    deployment: Any = WorkflowService
    options = workflow_config.deployment_options(service.workflow.timeout)
    application = deployment.options(**options).bind(
        service.workflow,
        workflow_config.service_name,
        config.namespace,
        workflow_config.input_hold_s,
        workflow_config.logging_config.encoding,
    )
    await asyncio.to_thread(
        serve.run,
        application,
        name=workflow_config.service_name,
        route_prefix=workflow_route(workflow_config.service_name),
    )


async def _redeploy_stored_services(config: ControlPlaneConfig) -> None:
    """After a cluster restart the store still lists services that no longer run: run them
    again from what was stored, so their sessions go on without a redeploy by hand."""
    stored = await ControlPlaneHandle.lookup(config.namespace).deployments()
    running = set((await asyncio.to_thread(serve.status)).applications)
    for name in sorted(stored.keys() - running):
        logger.info("redeploying service %r from the state store", name)
        try:
            await _run_service(ServiceDeployment.model_validate_json(stored[name]), config)
        except Exception:
            # one service that cannot come back (a workflow module gone) must not keep the
            # core and the other services down
            logger.exception(
                "service %r could not be redeployed from the state store; deploy it again "
                "with deploy_workflow, or deregister it",
                name,
            )


def _warn_if_it_cannot_fit(config: WorkflowServiceConfig) -> None:
    """serve.run waits until the replicas run; say why when they cannot be placed."""
    replicas = config.autoscaling.min_replicas if config.autoscaling else config.num_replicas or 1
    wanted = replicas * config.ray_actor_options.num_cpus
    free = ray.available_resources().get("CPU", 0.0)
    if wanted > free:
        logger.warning(
            "service %r asks for %.2f CPU (%d replicas x %.2f) but the cluster has %.2f free; "
            "deploy_workflow waits until it can place them (an autoscaling cluster adds "
            "nodes, a fixed one never will): lower ray_actor_options.num_cpus or free CPUs",
            config.service_name,
            wanted,
            replicas,
            config.ray_actor_options.num_cpus,
            free,
        )


def _connect(config: ControlPlaneConfig, *, start_if_missing: bool) -> bool:
    """Attach to Ray, or start a local one if allowed; True when this process started it."""
    if ray.is_initialized():
        return False
    address = config.ray_address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        ray.init(address=address, namespace=config.namespace, logging_level=logging.WARNING)
        return False
    except ConnectionError as exc:
        if not start_if_missing or address != "auto":
            raise ControlPlaneUnavailableError(
                f"no Ray cluster at {address!r} ({exc}); start the core first with "
                "deploy_core(...), or set RAY_ADDRESS to the cluster's address"
            ) from exc
    if config.serve_fast_mode:
        # Ray's processes inherit this process's environment; a variable set by the user wins.
        for name, value in (SERVE_FAST_MODE_ENV | admin_env(config.haproxy_admin_host)).items():
            os.environ.setdefault(name, value)
    _check_ports_are_free(config)
    ray.init(namespace=config.namespace, include_dashboard=False, logging_level=logging.WARNING)
    return True


def _check_ports_are_free(config: ControlPlaneConfig) -> None:
    """Serve fails late and obscurely on a taken port: say which one up front."""
    ports = {config.port: (config.host, f"the control plane's API at {config.url}")}
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        for name, default, use in (
            ("RAY_SERVE_HAPROXY_STATS_PORT", 8404, "HAProxy's stats page"),
            ("RAY_SERVE_HAPROXY_METRICS_PORT", 9101, "HAProxy's metrics"),
        ):
            ports[int(os.environ.get(name, default))] = (
                os.environ.get(ADMIN_HOST_ENV, "0.0.0.0"),
                f"{use} ({name})",
            )
    for port, (host, use) in ports.items():
        with socket.socket() as sock:
            # only a listener makes it fail, not the closed connections of an earlier run
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise ControlPlaneUnavailableError(
                    f"port {port}, for {use}, is taken ({exc}): another program listens there "
                    "(an HAProxy left by a Ray that was killed? `pkill haproxy`); stop it or "
                    "pick another port"
                ) from exc


def _start_core(config: ControlPlaneConfig, orchestrator_config: SimpleOrchestratorConfig) -> None:
    publish_guard(config)
    serve.start(
        proxy_location=config.proxy_location,
        http_options={"host": config.host, "port": config.port},
    )
    # shard 0 first: its secret (new, or the one its store holds) is every shard's
    secret = _start_shard(config, 0, secrets.token_bytes(32)).state_secret_blocking()
    for shard in range(1, config.shards):
        _start_shard(config, shard, secret)
    orchestrator: Any = (
        ray.remote(SimpleOrchestrator)
        .options(
            **core_actor_options(ORCHESTRATOR_ACTOR_NAME, config.namespace),
            max_task_retries=0,
            # route Serve handle calls on the orchestrator's own event loop rather than a
            # router thread: one cross-thread hop less per task
            runtime_env={"env_vars": {"RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}},
        )
        .remote(orchestrator_config, config.namespace)
    )
    OrchestratorHandle(orchestrator).wait_ready()


def _start_shard(config: ControlPlaneConfig, shard: int, secret: bytes) -> ControlPlaneShard:
    # Ray's type hints take `.remote()` of an actor class for the class itself
    actor: Any = (
        ray.remote(ControlPlaneActor)
        .options(**core_actor_options(control_plane_actor_name(shard), config.namespace))
        .remote(
            config.task_retention_s,
            config.session_retention_s,
            secret,  # used unless the state store already holds one, and stored
            config.max_events_per_task,
            config.state_store_url,
            config.namespace,
            shard,
            config.shards,
        )
    )
    handle = ControlPlaneShard(actor, shard)
    handle.wait_ready()
    running = handle.shard_count_blocking()
    if running != config.shards:
        raise InvalidRequestError(
            f"a core with {running} control-plane shards already runs in namespace "
            f"{config.namespace!r}; deploy it with ControlPlaneConfig(shards={running}), or stop "
            "it first (serve.shutdown() and ray.kill its actors, or restart Ray)"
        )
    return handle


def _start_api(config: ControlPlaneConfig) -> None:
    api: Any = ControlPlaneAPI
    serve.run(
        api.options(**config.api_deployment_options()).bind(config.namespace),
        name=API_APP_NAME,
        route_prefix="/",
        logging_config=_QUIET_ACCESS_LOG,
    )
