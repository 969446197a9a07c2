"""Pure logic: configs, wire types, errors, the client's shared core, the public surface."""

from __future__ import annotations

import asyncio
import inspect
import pickle
import time

import pytest
import ray
from pydantic import ValidationError

import llama_deploy_ray
from llama_deploy_ray import (
    AsyncLlamaDeployClient,
    AsyncSessionClient,
    AutoscalingConfig,
    ControlPlaneConfig,
    ControlPlaneUnavailableError,
    InvalidRequestError,
    LlamaDeployClient,
    LlamaDeployError,
    NotFoundError,
    ServiceConflictError,
    ServiceNotFoundError,
    SessionClient,
    SessionNotFoundError,
    TaskCancelledError,
    TaskDefinition,
    TaskFailedError,
    TaskNotFoundError,
    TaskStateError,
    TaskTimeoutError,
    WorkflowServiceConfig,
)
from llama_deploy_ray._errors import error_from_json, error_to_json
from llama_deploy_ray._packaging import pack_workflow, unpack_workflow

from .workflows import DiesOnceWorkflow, EchoWorkflow

ERRORS = [
    ServiceNotFoundError("svc"),
    SessionNotFoundError("sid"),
    TaskNotFoundError("tid"),
    InvalidRequestError("bad input"),
    ServiceConflictError("taken"),
    ControlPlaneUnavailableError("down"),
    TaskFailedError("tid", "boom", "ValueError"),
    TaskTimeoutError("tid", "timed out", "WorkflowTimeoutError"),
    TaskCancelledError("tid", "cancelled by a client"),
    TaskStateError("already completed"),
]


def test_public_names() -> None:
    seed_names = {
        "ControlPlaneConfig",
        "SimpleMessageQueueConfig",
        "SimpleOrchestratorConfig",
        "WorkflowServiceConfig",
        "deploy_core",
        "deploy_workflow",
        "LlamaDeployClient",
        "AsyncLlamaDeployClient",
        "TaskDefinition",
        "TaskResult",
        "SessionDefinition",
        "ServiceDefinition",
        "QueueMessage",
    }
    assert seed_names <= set(llama_deploy_ray.__all__)
    assert all(hasattr(llama_deploy_ray, name) for name in llama_deploy_ray.__all__)


@pytest.mark.parametrize(
    ("sync_cls", "async_cls"),
    [(LlamaDeployClient, AsyncLlamaDeployClient), (SessionClient, AsyncSessionClient)],
)
def test_sync_and_async_clients_have_the_same_methods(sync_cls, async_cls) -> None:
    def public(cls) -> dict[str, inspect.Signature]:
        return {
            name: inspect.signature(member)
            for name, member in vars(cls).items()
            if callable(member) and not name.startswith("_") and name not in ("close", "aclose")
        }

    sync_methods, async_methods = public(sync_cls), public(async_cls)
    assert sync_methods.keys() == async_methods.keys()
    for name, signature in sync_methods.items():
        assert list(signature.parameters) == list(async_methods[name].parameters), name
        method = getattr(async_cls, name)
        if name.endswith("_stream"):  # an async iterator, consumed with `async for`
            assert "AsyncIterator" in str(inspect.signature(method).return_annotation), name
        else:
            assert inspect.iscoroutinefunction(method), name


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_errors_pickle_and_survive_http(error: LlamaDeployError) -> None:
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error) and again.detail() == error.detail()
    assert str(again) == str(error)
    rebuilt = error_from_json(error_to_json(error), error.status_code)
    assert type(rebuilt) is type(error) and rebuilt.detail() == error.detail()
    assert rebuilt.message == error.message


def test_not_found_errors_share_a_parent() -> None:
    for error in ERRORS[:3]:
        assert isinstance(error, NotFoundError) and error.status_code == 404


def test_errors_cross_a_ray_actor(control_plane_config) -> None:
    @ray.remote(num_cpus=0)
    class Raiser:
        def raise_(self, error: LlamaDeployError) -> None:
            raise error

    raiser = Raiser.remote()
    for error in ERRORS:
        with pytest.raises(type(error)) as info:
            ray.get(raiser.raise_.remote(error))
        assert isinstance(info.value, LlamaDeployError)
        assert info.value.detail() == error.detail()


def test_configs_refuse_nonsense() -> None:
    with pytest.raises(ValidationError, match="not both"):
        WorkflowServiceConfig(
            service_name="x", num_replicas=2, autoscaling=AutoscalingConfig(max_replicas=3)
        )
    with pytest.raises(ValidationError, match=r"min_replicas \(5\) is above max_replicas \(2\)"):
        AutoscalingConfig(min_replicas=5, max_replicas=2)
    with pytest.raises(ValidationError):
        WorkflowServiceConfig(service_name="x", num_replica=2)  # typo
    with pytest.raises(ValidationError):
        WorkflowServiceConfig(service_name="has space")
    with pytest.raises(ValidationError):
        ControlPlaneConfig(port=70000)


def test_configs_read_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("CONTROL_PLANE_PORT", "8123")
    assert ControlPlaneConfig().url == "http://127.0.0.1:8123"


def test_deployment_options_reach_serve() -> None:
    config = WorkflowServiceConfig(
        service_name="svc",
        autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=3, upscale_delay_s=2),
        max_ongoing_requests=7,
        ray_actor_options={"num_cpus": 0.5, "memory": 2**20, "resources": {"tpu": 1}},
        runtime_env={"env_vars": {"A": "1"}},
    )
    options = config.deployment_options()
    assert options["max_ongoing_requests"] == 7
    assert options["autoscaling_config"]["max_replicas"] == 3
    assert options["autoscaling_config"]["upscale_delay_s"] == 2
    assert "num_replicas" not in options
    assert options["ray_actor_options"] == {
        "num_cpus": 0.5,
        "num_gpus": 0.0,
        "memory": 2**20,
        "resources": {"tpu": 1},
        "runtime_env": {"env_vars": {"A": "1"}},
    }
    default = WorkflowServiceConfig(service_name="s").deployment_options()
    assert default["num_replicas"] == 1
    assert default["ray_actor_options"]["num_cpus"] == 0.25


def test_task_definition_input_must_be_a_json_object() -> None:
    assert TaskDefinition(input='{"a": 1}').run_kwargs == {"a": 1}
    for bad in ("not json", "[1, 2]"):
        with pytest.raises(ValidationError):
            TaskDefinition(input=bad)


def test_a_task_takes_the_session_and_service_it_was_sent_to() -> None:
    task = TaskDefinition(input="{}").sent_to("s1", "svc")
    assert (task.session_id, task.agent_id) == ("s1", "svc")
    assert task.sent_to("s1", "svc") == task
    with pytest.raises(InvalidRequestError, match="names session 's1'"):
        task.sent_to("s2")
    with pytest.raises(InvalidRequestError, match="names service 'svc'"):
        task.sent_to("s1", "other")


def test_only_a_cut_run_request_is_waited_out() -> None:
    import httpx

    from llama_deploy_ray import _client_core as core

    def cut(exc: httpx.TransportError) -> LlamaDeployError:
        try:
            raise core.transport_error(exc, "http://x", 1.0) from exc
        except LlamaDeployError as error:
            return error

    assert core.run_interrupted(cut(httpx.RemoteProtocolError("peer closed")))
    assert core.run_interrupted(LlamaDeployError("HTTP 502: Bad Gateway"))
    assert not core.run_interrupted(cut(httpx.ReadTimeout("slow")))  # the caller's own bound
    assert not core.run_interrupted(ServiceNotFoundError("svc"))
    assert not core.run_interrupted(InvalidRequestError("bad"))

    cut_off = LlamaDeployError("HTTP 502: Bad Gateway")
    later, past = time.monotonic() + 60, time.monotonic() - 1
    down = ControlPlaneUnavailableError("down")
    assert core.pause_before_waiting_again(down, cut_off, later) > 0
    with pytest.raises(ControlPlaneUnavailableError):
        core.pause_before_waiting_again(down, cut_off, past)
    with pytest.raises(LlamaDeployError, match="Bad Gateway"):  # it never started
        core.pause_before_waiting_again(TaskNotFoundError("t"), cut_off, later)
    with pytest.raises(TaskNotFoundError):  # not cut off: not found is the answer
        core.pause_before_waiting_again(TaskNotFoundError("t"), None, later)


def test_workflow_instances_travel_with_their_attributes() -> None:
    original = DiesOnceWorkflow("/tmp/marker", timeout=12)
    rebuilt = unpack_workflow(pickle.loads(pickle.dumps(pack_workflow(original))))
    assert type(rebuilt).__name__ == "DiesOnceWorkflow"
    assert rebuilt.marker == "/tmp/marker"
    assert rebuilt._timeout == 12


def test_workflows_by_import_path() -> None:
    packed = pack_workflow("tests.workflows:EchoWorkflow")
    assert isinstance(unpack_workflow(packed), EchoWorkflow)
    with pytest.raises(InvalidRequestError, match="module:attribute"):
        pack_workflow("tests.workflows.EchoWorkflow")
    with pytest.raises(InvalidRequestError, match="not a Workflow"):
        unpack_workflow(pack_workflow("tests.workflows:Path"))
    with pytest.raises(InvalidRequestError, match="Workflow instance"):
        pack_workflow(42)  # type: ignore[arg-type]


def test_unpicklable_workflow_attributes_are_named() -> None:
    import threading

    workflow = EchoWorkflow()
    workflow.lock = threading.Lock()
    with pytest.raises(InvalidRequestError, match="import path"):
        pack_workflow(workflow)


async def test_finished_tasks_and_idle_sessions_are_dropped_after_their_retention() -> None:
    from llama_deploy_ray._control_plane import ControlPlane
    from llama_deploy_ray._types import ServiceDefinition, TaskOutcome

    control_plane = ControlPlane(task_retention_s=0.2, session_retention_s=0.4)
    await control_plane.register_service(ServiceDefinition(service_name="svc"))
    session = await control_plane.create_session()

    async def run_one() -> str:
        task = TaskDefinition(input="{}", agent_id="svc", session_id=session.session_id)
        await control_plane.begin_task(task, "driver")
        await control_plane.finish_task(task.task_id, TaskOutcome(result="ok"))
        return task.task_id

    old = [await run_one() for _ in range(5)]
    assert (await control_plane.sizes())["tasks"] == 5
    await asyncio.sleep(0.3)
    recent = await run_one()  # finishing a task drops what is past its retention
    assert [t.task_id for t in await control_plane.list_tasks(session.session_id)] == [recent]
    with pytest.raises(TaskNotFoundError):
        await control_plane.get_task_result(session.session_id, old[0])
    await asyncio.sleep(0.5)
    other = await control_plane.create_session()
    await control_plane.register_service(ServiceDefinition(service_name="svc"))
    task = TaskDefinition(input="{}", agent_id="svc", session_id=other.session_id)
    await control_plane.begin_task(task, "driver")
    await control_plane.finish_task(task.task_id, TaskOutcome(result="ok"))
    assert session.session_id not in {s.session_id for s in await control_plane.list_sessions()}
    assert (await control_plane.sizes())["sessions"] == 1


async def test_outcomes_recorded_together_move_each_line_on_and_name_unknown_tasks() -> None:
    from llama_deploy_ray._control_plane import ControlPlane
    from llama_deploy_ray._types import ServiceDefinition, TaskOutcome, TaskStatus

    control_plane = ControlPlane(task_retention_s=60, session_retention_s=60)
    await control_plane.register_service(ServiceDefinition(service_name="svc"))
    sessions = [await control_plane.create_session() for _ in range(2)]
    tasks = [TaskDefinition(input="{}", agent_id="svc", session_id=s.session_id) for s in sessions]
    for task in tasks:
        await control_plane.begin_task(task, "driver")
    later = TaskDefinition(input="{}", agent_id="svc", session_id=sessions[0].session_id)
    waiting = asyncio.create_task(control_plane.begin_task(later, "driver"))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # in its session's line behind tasks[0]

    outcomes = {t.task_id: TaskOutcome(result=i, state={"n": i}) for i, t in enumerate(tasks)}
    problems = await control_plane.finish_tasks({**outcomes, "gone": TaskOutcome(result=0)})

    assert len(problems) == 1 and "gone" in problems[0]
    for i, task in enumerate(tasks):
        result = await control_plane.get_task_result(task.session_id, task.task_id)
        assert (result.status, result.result) == (TaskStatus.COMPLETED, i)
    started = await asyncio.wait_for(waiting, 5)
    assert started is not None and started.state == {"n": 0}


async def test_a_driver_hears_of_its_cancelled_tasks_and_a_silent_drivers_tasks_are_adopted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from llama_deploy_ray import _control_plane
    from llama_deploy_ray._types import ServiceDefinition

    monkeypatch.setattr(_control_plane, "DRIVER_SILENCE_S", 0.2)
    control_plane = _control_plane.ControlPlane(task_retention_s=60, session_retention_s=60)
    await control_plane.register_service(ServiceDefinition(service_name="svc"))
    session = await control_plane.create_session()

    def new_task() -> TaskDefinition:
        return TaskDefinition(input="{}", agent_id="svc", session_id=session.session_id)

    cancelled, orphan, other_session_task = new_task(), new_task(), new_task()
    await control_plane.begin_task(cancelled, "api")
    watch = asyncio.ensure_future(control_plane.watch_driver("api", wait_s=5))
    await asyncio.sleep(0.05)
    assert not watch.done()  # nothing to say: the watch waits
    await control_plane.cancel_task(session.session_id, cancelled.task_id)
    notice = await asyncio.wait_for(watch, timeout=1)
    assert notice.cancelled == [cancelled.task_id]

    await control_plane.create_task(orphan, "dead")  # a driver that never watches again
    other = await control_plane.create_session()
    other_session_task = other_session_task.model_copy(update={"session_id": other.session_id})
    await control_plane.create_task(other_session_task, "api")
    await asyncio.sleep(0.3)
    await control_plane.watch_driver("api", wait_s=0)  # "api" is alive: it keeps watching
    notice = await control_plane.watch_driver("orchestrator", wait_s=0, adopt_orphans=True)
    assert notice.orphaned == [orphan.task_id]
    # adopted once: a later watch finds nothing more
    notice = await control_plane.watch_driver("orchestrator", wait_s=0, adopt_orphans=True)
    assert notice.orphaned == []
    started = await control_plane.start_task(orphan.task_id, "orchestrator")
    assert started is not None and started.task.task_id == orphan.task_id
