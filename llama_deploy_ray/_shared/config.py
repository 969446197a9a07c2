"""Configuration models: what the seed's scripts pass to `deploy_core`, `deploy_workflow` and
the clients.

Each config reads its defaults from the environment like llama_deploy's did
(`CONTROL_PLANE_PORT=8100` sets `ControlPlaneConfig().port`), so the same script can be pointed
elsewhere without editing it. Unknown fields are rejected, so a typo fails loudly.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_NAMESPACE = "llama_deploy_ray"
# the named actors of the core, in the namespace above
CONTROL_PLANE_ACTOR_NAME = "llama_deploy_control_plane"
ORCHESTRATOR_ACTOR_NAME = "llama_deploy_orchestrator"


def control_plane_actor_name(shard: int) -> str:
    """Shard 0 keeps the name a one-shard core has always had."""
    return CONTROL_PLANE_ACTOR_NAME if shard == 0 else f"{CONTROL_PLANE_ACTOR_NAME}_{shard}"


# A driver's watch on the control plane returns at least every DRIVER_WATCH_S, and its
# heartbeat thread beats as often; a driver not heard from for DRIVER_SILENCE_S is presumed dead
# and its unfinished tasks are driven again.
DRIVER_WATCH_S = 5.0
DRIVER_SILENCE_S = 15.0
# How long a replica keeps sending a task's outcome while the control plane is unreachable (it
# restarts within seconds).
RECORD_BUDGET_S = 60.0
# How long a stopping replica (a downscale, a redeploy) waits for its runs: a workflow's timeout
# plus this margin (its outcome still has to be sent), or the second figure for a workflow
# without a timeout; `WorkflowServiceConfig.graceful_shutdown_timeout_s` overrides both.
DRAIN_MARGIN_S = 15.0
DRAIN_WITHOUT_TIMEOUT_S = 600.0
# Calls the control plane and the orchestrator each run at once. Many of them wait (a task for
# its turn, result long polls, stream reads, runs waiting for their result), each holding a
# slot: thousands waiting must leave room for the short calls.
ACTOR_MAX_CONCURRENCY = 100_000
# The longest the API holds one long poll; a client that waits longer asks again.
MAX_WAIT_S = 300.0
# A stream with nothing new sends a keep-alive this often, so idle streams outlive timeouts.
STREAM_KEEPALIVE_S = 15.0
# A run's streamed events reach the control plane's log (which readers other than the run's
# own client read) at most this late: a run that ends sooner sends them with its outcome, in
# one call instead of two or three. The run's own client reads them live from the replica.
STREAM_LINGER_S = 0.05
# How many sessions' states a replica keeps from its own runs, to start their next run from at
# once (see `LocalDriver`); the least recently used go first.
HELD_STATES = 1024
# How many sessions or tasks one page of a listing holds, at most.
PAGE_SIZE = 1000
# How often the control plane forgets what is past its retention, besides when tasks finish.
RETENTION_SWEEP_S = 30.0
# How often the control plane hands its metrics to Ray (see `_metrics`), which exports them
# every few seconds.
METRICS_REPORT_S = 1.0
# Ray Serve's HAProxy ingress and throughput-optimized mode, read when Ray and Serve start, for
# the local Ray deploy_core starts. A stopping replica stays open 30 s by default so that cloud
# load balancers can deregister it; the local HAProxy needs far less (and it retries refused
# connections), so stopping Serve does not take half a minute.
SERVE_FAST_MODE_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}


# What a session, task or service id may hold: no path separators, no spaces, bounded.
ID_PATTERN = r"^[A-Za-z0-9_.\-]{1,128}$"
# How deeply JSON sent by a client may nest (run kwargs, events).
MAX_JSON_DEPTH = 64


# Sent by the clients with a run's first request (not with a resend): the task id is new, so
# a replica may start the run before the control plane confirmed that no task has it.
NEW_TASK_HEADER = "x-llama-deploy-new-task"


def workflow_route(service_name: str) -> str:
    """Where a service's replicas take runs over HTTP, beside the control plane's API:
    `POST {route}/sessions/{session_id}/run` (or `/run-nowait`) with a `TaskDefinition`."""
    return f"/workflows/{service_name}"


class AutoscalingConfig(BaseModel):
    """Replica autoscaling, passed to Ray Serve's `autoscaling_config`."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=4, ge=1)
    initial_replicas: int | None = Field(default=None, ge=0)
    target_ongoing_requests: float = Field(default=8.0, gt=0)
    upscale_delay_s: float = Field(default=30.0, ge=0)
    downscale_delay_s: float = Field(default=600.0, ge=0)
    look_back_period_s: float = Field(
        default=30.0, gt=0, description="The window Serve averages the load over."
    )

    @model_validator(mode="after")
    def _check_bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})"
            )
        return self


class ControlPlaneConfig(BaseSettings):
    """Where the control plane's HTTP API listens and which Ray cluster holds it.

    `host`/`port` are the Serve HTTP address of the control plane's API (the clients' target).
    `ray_address` is the cluster to attach to; unset, `RAY_ADDRESS` or a cluster already
    running on this machine is used, and `deploy_core` starts a local Ray when there is none.
    """

    model_config = SettingsConfigDict(env_prefix="CONTROL_PLANE_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    ray_address: str | None = None
    namespace: str = DEFAULT_NAMESPACE
    request_timeout_s: float = Field(
        default=60.0, gt=0, description="Default client timeout for one request."
    )
    task_retention_s: float = Field(
        default=3600.0,
        ge=0,
        description="How long a finished task's record, result and events are kept.",
    )
    session_retention_s: float = Field(
        default=86400.0,
        gt=0,
        description="How long a session with no tasks left and no new task is kept.",
    )
    max_events_per_task: int = Field(
        default=10_000,
        ge=1,
        description=(
            "Events kept per task stream (past it the oldest are dropped and readers get an "
            "EventsDropped marker) and events a task's inbox takes."
        ),
    )
    api_key: SecretStr | None = Field(
        default=None,
        description=(
            "When set, every HTTP route but GET /health requires 'Authorization: Bearer "
            "<key>'. Several keys separated by commas are all accepted (to rotate one without "
            "downtime); the clients send the first. Read from CONTROL_PLANE_API_KEY."
        ),
    )
    allowed_origins: list[str] = Field(
        default_factory=list,
        description=(
            "Web origins (scheme://host:port) whose browser requests may change things; any "
            "other site's are refused with 403."
        ),
    )
    max_request_bytes: int = Field(
        default=10 * 1024 * 1024, ge=1024, description="Larger request bodies get 413."
    )
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        default="EveryNode",
        description=(
            "Where Serve runs its HTTP proxies: on every node (any node's host:port answers), "
            "or on the head node only (several Ray nodes on one machine, which would all want "
            "the same port)."
        ),
    )
    api_replicas: int = Field(
        default=1, ge=1, description="Replicas of the HTTP API (it is stateless)."
    )
    api_autoscaling: AutoscalingConfig | None = Field(
        default=None, description="Autoscale the HTTP API's replicas instead (see api_replicas)."
    )
    shards: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "Control-plane actors the sessions are spread over (hashed by session id), each "
            "with its own store; the registry of services is kept on every one. One sequences "
            "about 700 tasks/s on a core: add shards when a cluster runs more. Fixed for the "
            "life of a state store."
        ),
    )
    state_store: str | None = Field(
        default=None,
        description=(
            "Where the control plane keeps its records so they outlive its actor and the Ray "
            "cluster: a SQLite file path or 'sqlite:///path' (default "
            "~/.llama-deploy-ray/<namespace>.sqlite3, on the head node), 'redis://host:port/db' "
            "for a cluster that must outlive its head node (pip install "
            "'llama-deploy-ray[redis]'), or 'memory' to keep nothing past the actor."
        ),
    )
    serve_fast_mode: bool = Field(
        default=True,
        description=(
            "When deploy_core starts a local Ray: run Serve with its HAProxy ingress and "
            "throughput-optimized mode (about half the latency, twice the throughput). "
            "Costs: HAProxy opens a stats page and Prometheus metrics (on "
            "`haproxy_admin_host`), and workflow steps run on the replica's event loop, so a "
            "step that blocks stalls its replica. No effect on a Ray started elsewhere "
            "(cluster.yaml sets the same variables)."
        ),
    )
    haproxy_admin_host: str = Field(
        default="127.0.0.1",
        description=(
            "Where HAProxy's stats page (RAY_SERVE_HAPROXY_STATS_PORT, 8404) and Prometheus "
            "metrics (RAY_SERVE_HAPROXY_METRICS_PORT, 9101) listen in Serve's fast mode; Serve "
            "itself would bind them to every interface. 0.0.0.0 to scrape them from elsewhere."
        ),
    )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def api_deployment_options(self) -> dict[str, Any]:
        """The keyword arguments for the HTTP API's `Deployment.options`."""
        if self.api_autoscaling is not None:
            return {"autoscaling_config": self.api_autoscaling.model_dump(exclude_none=True)}
        return {"num_replicas": self.api_replicas}

    @property
    def state_store_url(self) -> str:
        return self.state_store or f"~/.llama-deploy-ray/{self.namespace}.sqlite3"

    def api_keys(self) -> list[str]:
        """The keys the core accepts, the one the clients send first."""
        raw = self.api_key.get_secret_value() if self.api_key else ""
        return [key.strip() for key in raw.split(",") if key.strip()]

    def auth_headers(self) -> dict[str, str]:
        """What the clients send with every request."""
        keys = self.api_keys()
        return {"Authorization": f"Bearer {keys[0]}"} if keys else {}


class SimpleMessageQueueConfig(BaseSettings):
    """Selects the Ray-native message queue (the only one; kept for the seed's code).

    Publishing to a service is a call on its Serve `DeploymentHandle`: the replicas' request
    queues are the mailboxes and Serve's router hands each task to exactly one replica.
    """

    model_config = SettingsConfigDict(env_prefix="MESSAGE_QUEUE_", extra="forbid")

    type: Literal["ray"] = "ray"


class SimpleOrchestratorConfig(BaseSettings):
    """How the orchestrator drives tasks."""

    model_config = SettingsConfigDict(env_prefix="ORCHESTRATOR_", extra="forbid")

    max_retries: int = Field(
        default=3,
        ge=0,
        description=(
            "Times a task is sent again after the replica running it died (each time a replica "
            "not seen dead before: one Serve still routes to until it notices does not count)."
        ),
    )
    retry_backoff_s: float = Field(default=0.5, ge=0, description="Wait before a retry.")


class RayActorOptions(BaseModel):
    """Resources each replica asks Ray for (Serve's `ray_actor_options`).

    A replica asks for a quarter CPU by default, not Serve's whole one: workflows mostly await
    LLMs and tools, and a laptop with 2 cores can then hold 8 replicas. Give CPU-bound
    workflows `num_cpus=1` or more.
    """

    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(default=0.25, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    memory: int | None = Field(default=None, ge=0, description="Bytes.")
    resources: dict[str, float] = Field(default_factory=dict)


class ServiceLoggingConfig(BaseModel):
    """How a service's replicas log (Serve's `logging_config`), to Serve's replica log files
    (`/tmp/ray/session_latest/logs/serve/replica_<service>_*.log` on each node).

    What a workflow logs with `logging.getLogger("ray.serve")` (Serve's logger) or prints
    while it runs a task is tagged with the task: `llama_task_id`, `llama_session_id` and
    `llama_service`, as fields of each JSON record with `encoding="JSON"`, appended as
    `key=value` to each line with `TEXT`. `llama-deploy-ray logs TASK` finds a task's lines.
    """

    model_config = ConfigDict(extra="forbid")

    encoding: Literal["TEXT", "JSON"] = "TEXT"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    enable_access_log: bool = Field(
        default=False,
        description="A line per HTTP request: off by default, it costs more than the request "
        "on a small machine.",
    )
    buffer_records: int = Field(
        default=1,
        ge=1,
        description="Records a replica holds before it writes them to its file (errors are "
        "written at once). Serve's fast mode holds 1,000, so a quiet replica's lines would "
        "show late; 1 writes each as it comes.",
    )

    def serve_logging_config(self) -> dict[str, Any]:
        return self.model_dump(exclude={"buffer_records"})


class WorkflowServiceConfig(BaseSettings):
    """How one workflow is served: its name and its Ray Serve deployment.

    `host` and `port` are kept from the seed and recorded in the service's definition; tasks
    reach replicas through Ray, not through that address. Give either `num_replicas` or
    `autoscaling`, not both; with neither, one replica.
    """

    model_config = SettingsConfigDict(env_prefix="WORKFLOW_SERVICE_", extra="forbid")

    service_name: str = Field(pattern=ID_PATTERN)
    host: str = "127.0.0.1"
    port: int | None = Field(default=None, ge=1, le=65535)
    description: str = "A service that wraps a llama-index workflow."
    num_replicas: int | None = Field(default=None, ge=1)
    autoscaling: AutoscalingConfig | None = None
    max_ongoing_requests: int = Field(
        default=100, ge=1, description="Tasks one replica runs at once."
    )
    max_queued_requests: int = Field(
        default=1000,
        ge=-1,
        description=(
            "Runs waiting for a replica slot, across the service, before new ones are answered "
            "503 (the clients retry those with backoff); -1 for no bound."
        ),
    )
    retry_after_s: float = Field(
        default=1.0,
        gt=0,
        description="The Retry-After a run refused for a full queue is answered with.",
    )
    ray_actor_options: RayActorOptions = Field(default_factory=RayActorOptions)
    runtime_env: dict[str, Any] | None = None
    input_hold_s: float = Field(
        default=10.0,
        ge=0,
        description=(
            "How long a task waiting for human input keeps its replica slot before it is "
            "parked (snapshotted, replica freed) until an event is sent to it."
        ),
    )
    logging_config: ServiceLoggingConfig = Field(default_factory=ServiceLoggingConfig)
    graceful_shutdown_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description=(
            "How long a replica being stopped (scaled down, redeployed) waits for the runs it "
            "has before it is killed. Default: the workflow's timeout plus "
            f"{DRAIN_MARGIN_S:.0f} s ({DRAIN_WITHOUT_TIMEOUT_S:.0f} s for a workflow without "
            "one), so a downscale never kills a run in flight."
        ),
    )

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> WorkflowServiceConfig:
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError(f"give num_replicas ({self.num_replicas}) or autoscaling, not both")
        return self

    def drain_s(self, workflow_timeout: float | None) -> float:
        """How long a stopping replica waits for its runs: the configured time, else the
        workflow's timeout and a margin, so a downscale never cuts a run short."""
        if self.graceful_shutdown_timeout_s is not None:
            return self.graceful_shutdown_timeout_s
        if workflow_timeout is None:
            return DRAIN_WITHOUT_TIMEOUT_S
        return workflow_timeout + DRAIN_MARGIN_S

    def deployment_options(self, workflow_timeout: float | None = None) -> dict[str, Any]:
        """The keyword arguments for Ray Serve's `Deployment.options`, for a workflow whose
        timeout is `workflow_timeout` (None: it has none, or it is not known here)."""
        actor_options: dict[str, Any] = self.ray_actor_options.model_dump(exclude_none=True)
        runtime_env = dict(self.runtime_env or {})
        # read by Serve when the replica starts
        buffer = {"RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": str(self.logging_config.buffer_records)}
        runtime_env["env_vars"] = buffer | runtime_env.get("env_vars", {})
        actor_options["runtime_env"] = runtime_env
        options: dict[str, Any] = {
            "name": self.service_name,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "backpressure_config": {"retry_after_s": self.retry_after_s},
            "ray_actor_options": actor_options,
            "graceful_shutdown_timeout_s": self.drain_s(workflow_timeout),
            "logging_config": self.logging_config.serve_logging_config(),
        }
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.model_dump(exclude_none=True)
        else:
            options["num_replicas"] = self.num_replicas or 1
        return options
