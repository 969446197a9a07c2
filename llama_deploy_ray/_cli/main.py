"""The `llama-deploy-ray` command: a core, its services, sessions and tasks, from a terminal.

    llama-deploy-ray up                           # a local Ray and the core on it
    llama-deploy-ray deploy deployment.yaml       # every service the file lists
    llama-deploy-ray run my_workflow -a arg1=hello
    llama-deploy-ray status
    llama-deploy-ray logs TASK                    # what the replicas logged running it

Commands that talk to the core's HTTP API (`run`, `status`, `sessions`, ...) find it where
`ControlPlaneConfig` says (the `CONTROL_PLANE_*` environment variables, or `--url` and
`--api-key`); commands that start things (`up`, `down`, `deploy`) and `logs` attach to the Ray
cluster in `RAY_ADDRESS`, or the one running on this machine. Listings print as tables, or as
JSON with `--json`. Exit status: 0 on success; 1 with a one-line reason on stderr when the
core refuses or a task fails; 2 for a command line that does not parse.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlparse

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.live import Live
from rich.table import Table
from workflows import Workflow

from .._client.clients import LlamaDeployClient
from .._shared.config import (
    SERVE_FAST_MODE_ENV,
    AutoscalingConfig,
    ControlPlaneConfig,
    WorkflowServiceConfig,
)
from .._shared.errors import LlamaDeployError
from .._shared.types import TaskResult, TaskStatus

app = typer.Typer(
    name="llama-deploy-ray",
    help="Deploy llama-index workflows on Ray Serve, and run them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True, soft_wrap=True)  # a reason on one line, for scripts

# what `up` started, so that `down` stops that and nothing else
UP_RECORD = Path("~/.llama-deploy-ray/up.json").expanduser()


class _Options(BaseModel):
    url: str | None = None
    api_key: str | None = None
    timeout: float | None = None
    json_output: bool = False

    def config(self, **overrides: Any) -> ControlPlaneConfig:
        fields: dict[str, Any] = dict(overrides)
        if self.url:
            parsed = urlparse(self.url if "://" in self.url else f"http://{self.url}")
            try:
                fields |= {"host": parsed.hostname or "127.0.0.1", "port": parsed.port or 8000}
            except ValueError as exc:  # a port that is not one
                raise typer.BadParameter(
                    f"{self.url!r} is not an address like http://host:8000 ({exc})",
                    param_hint="--url",
                ) from None
        if self.api_key:
            fields["api_key"] = self.api_key
        if self.timeout is not None:
            fields["request_timeout_s"] = self.timeout
        return ControlPlaneConfig(**fields)


_options = _Options()


@app.callback()
def _global(
    url: Annotated[
        str | None,
        typer.Option(help="The core's HTTP address (default: CONTROL_PLANE_HOST and _PORT)."),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(help="The API key (default: CONTROL_PLANE_API_KEY).")
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(help="Seconds a request may take, retries included [default: 60]."),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of tables, for scripts.")
    ] = False,
) -> None:
    global _options
    _options = _Options(url=url, api_key=api_key, timeout=timeout, json_output=json_output)


def main() -> None:
    """The console script: our errors, and settings that do not validate, become one line on
    stderr and exit status 1."""
    try:
        app()
    except (LlamaDeployError, ValidationError) as exc:
        reason = str(exc).replace("\n", "; ")
        err.print(f"error: {reason}", markup=False, highlight=False)
        sys.exit(1)


def _keep_stdout_for_results() -> None:
    """Ray also prints to its driver's stdout, from threads and from C++ (its raylets'
    warnings, say): from here on file descriptor 1 is stderr's, and what the command prints
    goes to the stdout it was given, so `--json` output stays JSON."""
    sys.stdout.flush()
    out.file = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)


def _attach_ray(namespace: str) -> None:
    """Join the Ray cluster in RAY_ADDRESS, or the one running here, as a quiet driver: the
    cluster's own logs must not mix into what this command prints (JSON, tables)."""
    import ray

    _keep_stdout_for_results()
    address = os.environ.get("RAY_ADDRESS", "auto")
    try:
        ray.init(
            address=address, namespace=namespace, log_to_driver=False, logging_level=logging.ERROR
        )
    except ConnectionError as exc:
        raise LlamaDeployError(
            f"no Ray cluster at {address!r} ({exc}); start one with `llama-deploy-ray up`, or set "
            "RAY_ADDRESS"
        ) from exc


# the core


@app.command()
def up(
    port: Annotated[int | None, typer.Option(help="The HTTP API's port [default: 8000].")] = None,
    host: Annotated[
        str | None, typer.Option(help="The interface it listens on [default: 127.0.0.1].")
    ] = None,
    shards: Annotated[int | None, typer.Option(help="Control-plane shards [default: 1].")] = None,
) -> None:
    """Start the core (control plane, orchestrator, HTTP API).

    It goes on the Ray cluster in RAY_ADDRESS, or the one running on this machine; with
    neither, on a local Ray started for it (`down` stops that one too). Options not given
    come from the CONTROL_PLANE_* environment variables."""
    from .._cluster.deploy import deploy_core

    given = {"port": port, "host": host, "shards": shards}
    config = _options.config(**{k: v for k, v in given.items() if v is not None})
    started_ray = False
    if not os.environ.get("RAY_ADDRESS") and not _ray_running_here():
        _start_local_ray(config)
        started_ray = True
    with out.status("starting the core (control plane, orchestrator, HTTP API)..."):
        asyncio.run(deploy_core(config, blocking=False))
    UP_RECORD.parent.mkdir(parents=True, exist_ok=True)
    UP_RECORD.write_text(json.dumps({"started_ray": started_ray, "namespace": config.namespace}))
    out.print(f"the core is up: its API is at {config.url}")


@app.command()
def down() -> None:
    """Stop what `up` started.

    The core's services, API and actors go (their state store stays, for the next `up`), and
    the local Ray if `up` started it."""
    import ray
    from ray import serve

    from .._cluster.actors import ControlPlaneHandle, OrchestratorHandle
    from .._cluster.api import API_APP_NAME

    record = json.loads(UP_RECORD.read_text()) if UP_RECORD.exists() else {}
    namespace = record.get("namespace", _options.config().namespace)
    _attach_ray(namespace)
    with out.status("stopping the core..."):
        control_plane = ControlPlaneHandle.lookup(namespace)
        services = asyncio.run(control_plane.list_services())
        for name in [s.service_name for s in services] + [API_APP_NAME]:
            serve.delete(name)  # other Serve applications on the cluster are left alone
        control_plane.kill()
        OrchestratorHandle.lookup(namespace).kill()
    ray.shutdown()
    if record.get("started_ray"):
        subprocess.run([_ray_cli(), "stop"], check=True, capture_output=True)
    UP_RECORD.unlink(missing_ok=True)
    also = ", and the local Ray `up` started" if record.get("started_ray") else ""
    out.print(f"the core is down{also}")


def _ray_cli() -> str:
    return shutil.which("ray") or str(Path(sys.executable).parent / "ray")


def _ray_running_here() -> bool:
    done = subprocess.run([_ray_cli(), "status"], capture_output=True, text=True)
    return done.returncode == 0


def _start_local_ray(config: ControlPlaneConfig) -> None:
    from llama_deploy_ray_haproxy import admin_env

    # as deploy_core starts one; a variable the user set wins
    env = {**SERVE_FAST_MODE_ENV, **admin_env(config.haproxy_admin_host), **os.environ}
    with out.status("starting a local Ray..."):
        started = subprocess.run(
            [_ray_cli(), "start", "--head", "--include-dashboard=false", "--disable-usage-stats"],
            env=env,
            capture_output=True,
            text=True,
        )
    if started.returncode != 0:
        said = (started.stderr or started.stdout).strip().splitlines()
        raise LlamaDeployError(f"`ray start --head` failed: {said[-1] if said else 'no output'}")


# deploying


@app.command()
def deploy(
    target: Annotated[
        str, typer.Argument(help="A deployment file (YAML), or a workflow as module:attribute.")
    ],
    name: Annotated[
        str | None, typer.Option(help="The service's name (with module:attribute).")
    ] = None,
    replicas: Annotated[int | None, typer.Option(help="Replicas (with module:attribute).")] = None,
    min_replicas: Annotated[
        int | None, typer.Option("--min", help="Autoscale from this many.")
    ] = None,
    max_replicas: Annotated[
        int | None, typer.Option("--max", help="Autoscale up to this many.")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the replicas.")] = 600.0,
) -> None:
    """Deploy the services a deployment file lists, or one workflow.

    Waits for their replicas, showing them start; fails with Serve's reason when they cannot
    (a replica that cannot be placed, a constructor that raised)."""
    from .._cluster.deployment_file import Deployment, import_workflow

    path = Path(target)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if name or replicas or min_replicas or max_replicas:
            raise typer.BadParameter(
                "--name, --replicas, --min and --max go with module:attribute; a deployment "
                "file says how to deploy its services"
            )
        deployment = Deployment(path)
        config = deployment.control_plane.model_copy(
            update=_options.config().model_dump(exclude_unset=True)
        )
        jobs = [
            (service, functools.partial(deployment.workflow, i))
            for i, service in enumerate(deployment.services)
        ]
    else:
        if name is None:
            raise typer.BadParameter("give the service a --name", param_hint="--name")
        autoscaling = None
        if min_replicas is not None or max_replicas is not None:
            autoscaling = AutoscalingConfig(
                min_replicas=min_replicas or 1,
                max_replicas=max_replicas or max(min_replicas or 1, 1),
            )
        service = WorkflowServiceConfig(
            service_name=name, num_replicas=replicas, autoscaling=autoscaling
        )
        config = _options.config()
        jobs = [(service, functools.partial(import_workflow, target))]
    _deploy_with_progress(config, jobs, timeout)


def _deploy_with_progress(
    config: ControlPlaneConfig,
    jobs: Sequence[tuple[WorkflowServiceConfig, Callable[[], Workflow]]],
    timeout_s: float,
) -> None:
    """Deploy one service after another, each returning once its replicas run, with a live
    table of every service's replicas as Serve reports them."""
    from ray import serve

    from .._cluster.actors import ControlPlaneHandle
    from .._cluster.api import serve_status
    from .._cluster.deploy import ServiceDeployment, deploy_workflow
    from .._cluster.deployment_file import code_version

    _attach_ray(config.namespace)
    services = [service for service, _ in jobs]
    done: dict[str, str] = {}

    def render() -> Table:
        table = Table("service", "status", "replicas running / starting / wanted", "message")
        applications = serve.status().applications
        for service in services:
            now = serve_status(service.service_name, applications)
            table.add_row(
                service.service_name,
                done.get(service.service_name) or now.status,
                f"{now.replicas.get('RUNNING', 0)} / {now.replicas.get('STARTING', 0)} / "
                f"{_wanted(service)}",
                now.message[:160],
            )
        return table

    async def deploy_all() -> None:
        stored = await ControlPlaneHandle.lookup(config.namespace).deployments()
        running = serve.status().applications
        for service, make_workflow in jobs:
            name = service.service_name
            workflow = make_workflow()
            version = code_version(workflow)
            before = ServiceDeployment.model_validate_json(stored[name]) if name in stored else None
            if (
                before is not None
                and (before.version, before.config) == (version, service)
                and name in running
            ):
                done[name] = "UNCHANGED"
                continue
            try:
                await asyncio.wait_for(
                    deploy_workflow(workflow, service, config, version=version), timeout=timeout_s
                )
            except TimeoutError:
                now = serve_status(name, serve.status().applications)
                raise LlamaDeployError(
                    f"service {name!r}: its replicas did not all run within "
                    f"{timeout_s:.0f} s: {now.message or 'Serve gives no reason'}"
                ) from None
            except LlamaDeployError:
                raise
            except Exception as exc:  # Serve's own: a replica's constructor raised, ...
                first_line = (str(exc).strip().splitlines() or [""])[0]
                raise LlamaDeployError(
                    f"service {name!r} could not be deployed: {type(exc).__name__}: {first_line}"
                ) from exc
            done[name] = "DEPLOYED"

    if _options.json_output:
        asyncio.run(deploy_all())
        _print_json([{"service_name": n, "status": status} for n, status in done.items()])
        return
    stop = threading.Event()
    with Live(render(), console=out, refresh_per_second=4) as live:

        def refresh() -> None:
            while not stop.wait(0.5):
                live.update(render())

        threading.Thread(target=refresh, daemon=True).start()
        try:
            asyncio.run(deploy_all())
        finally:
            stop.set()
            live.update(render())


def _wanted(service: WorkflowServiceConfig) -> str:
    if service.autoscaling is not None:
        return f"{service.autoscaling.min_replicas}-{service.autoscaling.max_replicas}"
    return str(service.num_replicas or 1)


# running


def _run_kwargs(args: list[str], json_args: str | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if json_args:
        try:
            kwargs = json.loads(json_args)
        except json.JSONDecodeError as exc:
            raise typer.BadParameter(f"not JSON: {exc}", param_hint="--json-args") from None
        if not isinstance(kwargs, dict):
            raise typer.BadParameter("must be a JSON object", param_hint="--json-args")
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{arg!r} is not key=value", param_hint="-a")
        kwargs[key] = value
    return kwargs


@app.command()
def run(
    service: Annotated[str, typer.Argument(help="The service to run.")],
    session: Annotated[str | None, typer.Option(help="A session to run in (made if new).")] = None,
    arg: Annotated[
        list[str] | None, typer.Option("-a", "--arg", help="A run argument, key=value (a string).")
    ] = None,
    json_args: Annotated[str | None, typer.Option(help="Run arguments as a JSON object.")] = None,
    stream: Annotated[bool, typer.Option(help="Print the task's events as they happen.")] = False,
) -> None:
    """Run a task and print its result (exit status 1 if it fails)."""
    kwargs = _run_kwargs(arg or [], json_args)
    with _client() as client:
        session_client = (
            client.get_or_create_session(session) if session else client.create_session()
        )
        if not stream:
            _print_value(session_client.run(service, **kwargs))
            return
        task_id = session_client.run_nowait(service, **kwargs)
        if not _options.json_output:
            err.print(f"session {session_client.session_id}, task {task_id}", highlight=False)
        for event in session_client.get_task_result_stream(task_id):
            if _options.json_output:
                _print_json(event)
            else:
                out.print_json(data=event)
        result = session_client.get_task_result(task_id, wait_s=client.timeout)
        if result is None:
            raise LlamaDeployError(f"task {task_id} did not finish within {client.timeout:.0f} s")
        _print_value(_value(result))


@app.command("send-event")
def send_event(
    service: Annotated[str, typer.Argument(help="The service the task runs on.")],
    task: Annotated[str, typer.Argument(help="The task's id.")],
    event: Annotated[
        str,
        typer.Argument(
            help='The event as JSON, e.g. \'{"__type__": "HumanResponseEvent", "response": "yes"}\''
        ),
    ],
    session: Annotated[str, typer.Option(help="The task's session.")],
) -> None:
    """Send an event (human input) into a running task."""
    try:
        data = json.loads(event)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint="EVENT") from None
    if not isinstance(data, dict):
        raise typer.BadParameter("must be a JSON object", param_hint="EVENT")
    with _client() as client:
        client.get_session(session).send_event(service, task, data)
    if not _options.json_output:
        out.print(f"sent to task {task}")


@app.command()
def cancel(
    task: Annotated[str, typer.Argument(help="The task's id.")],
    session: Annotated[str, typer.Option(help="The task's session.")],
) -> None:
    """Cancel a task (and the tasks it started)."""
    with _client() as client:
        _print_tasks([client.get_session(session).cancel_task(task)])


# looking


@app.command()
def status() -> None:
    """Each service's replicas and unfinished tasks."""
    with _client() as client:
        statuses = [client.get_service_status(s.service_name) for s in client.list_services()]
    if _options.json_output:
        _print_json([s.model_dump(mode="json") for s in statuses])
        return
    table = Table(
        "service",
        "status",
        "replicas running",
        "starting",
        "tasks running",
        "queued",
        "waiting for input",
    )
    for s in statuses:
        table.add_row(
            s.service_name,
            s.status,
            str(s.replicas.get("RUNNING", 0)),
            str(s.replicas.get("STARTING", 0)),
            str(s.tasks.get("running", 0)),
            str(s.tasks.get("pending", 0)),
            str(s.tasks.get("waiting", 0)),
        )
    out.print(table)
    out.print(f"the core at {_options.config().url} is healthy")


@app.command()
def sessions() -> None:
    """The sessions the core holds."""
    with _client() as client:
        found = client.list_sessions()
    if _options.json_output:
        _print_json([s.model_dump(mode="json") for s in found])
        return
    table = Table("session", "tasks", "services with state")
    for s in found:
        table.add_row(s.session_id, str(len(s.task_ids)), ", ".join(sorted(s.state)))
    out.print(table)


@app.command()
def tasks(session: Annotated[str, typer.Argument(help="The session.")]) -> None:
    """A session's tasks, in the order they were created."""
    with _client() as client:
        _print_tasks(client.get_session(session).get_tasks())


@app.command()
def result(
    task: Annotated[str, typer.Argument(help="The task's id.")],
    session: Annotated[str, typer.Option(help="The task's session.")],
    wait: Annotated[float, typer.Option(help="Seconds to wait for it to finish.")] = 0.0,
) -> None:
    """A task's result (exit status 1 if it failed or is not finished)."""
    with _client() as client:
        found = client.get_session(session).get_task(task, wait_s=wait)
    if not found.status.is_final:
        raise LlamaDeployError(f"task {task} is {found.status.value}: no result yet (try --wait)")
    _print_value(_value(found))


@app.command()
def logs(task: Annotated[str, typer.Argument(help="The task's id.")]) -> None:
    """The lines the replicas logged while they ran a task, from every node's Serve logs,
    oldest first (exit status 1 if there are none)."""
    from .._cluster.task_logging import find_task_log_lines

    _attach_ray(_options.config().namespace)
    found = find_task_log_lines(task)
    if not found:
        raise LlamaDeployError(
            f"no replica's log names task {task}: check the id (`llama-deploy-ray tasks "
            "SESSION`); a workflow logs through logging.getLogger('ray.serve') or print"
        )
    if _options.json_output:
        _print_json([line.model_dump() for line in found])
        return
    for line in found:
        out.print(line.line, markup=False, highlight=False, soft_wrap=True)


# printing


def _client() -> LlamaDeployClient:
    return LlamaDeployClient(_options.config())


def _value(found: TaskResult) -> Any:
    from .._client.core import result_value

    return result_value(found)  # a failed or cancelled task raises: exit status 1


def _print_value(value: Any) -> None:
    if _options.json_output:
        _print_json(value)
    elif isinstance(value, str):
        out.print(value, markup=False, highlight=False)
    else:
        out.print_json(data=value)


def _print_tasks(found: list[TaskResult]) -> None:
    if _options.json_output:
        _print_json([t.model_dump(mode="json") for t in found])
        return
    table = Table("task", "service", "status", "result or error")
    for t in found:
        shown = t.error if t.status is not TaskStatus.COMPLETED else json.dumps(t.result)
        table.add_row(t.task_id, t.service_name or "", t.status.value, (shown or "")[:80])
    out.print(table)


def _print_json(value: Any) -> None:
    out.file.write(json.dumps(value, default=str) + "\n")
    out.file.flush()
