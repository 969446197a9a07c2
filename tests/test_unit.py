"""Pure logic: configs, wire types, errors, the client's shared core, the public surface."""

from __future__ import annotations

import asyncio
import inspect
import json
import pickle
import re
import time

import pytest
import ray
from pydantic import ValidationError
from workflows import Workflow
from workflows.events import HumanResponseEvent

import llama_deploy_ray
from llama_deploy_ray import (
    AsyncLlamaDeployClient,
    AsyncSessionClient,
    AutoscalingConfig,
    ControlPlaneConfig,
    ControlPlaneUnavailableError,
    ForbiddenError,
    InvalidRequestError,
    LlamaDeployClient,
    LlamaDeployError,
    NotFoundError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ServiceConflictError,
    ServiceNotFoundError,
    ServiceOverloadedError,
    SessionClient,
    SessionNotFoundError,
    TaskCancelledError,
    TaskDefinition,
    TaskFailedError,
    TaskNotFoundError,
    TaskStateError,
    TaskTimeoutError,
    UnauthorizedError,
    WorkflowServiceConfig,
)
from llama_deploy_ray._errors import error_from_json, error_to_json
from llama_deploy_ray._packaging import pack_workflow, unpack_workflow

from .workflows import DiesOnceWorkflow, EchoWorkflow

SECRET = b"0123456789abcdef0123456789abcdef"

ERRORS = [
    ServiceNotFoundError("svc"),
    SessionNotFoundError("sid"),
    TaskNotFoundError("tid"),
    InvalidRequestError("bad input"),
    ServiceConflictError("taken"),
    ControlPlaneUnavailableError("down"),
    ServiceOverloadedError("full"),
    RequestTimeoutError("slow"),
    TaskFailedError("tid", "boom", "ValueError"),
    TaskTimeoutError("tid", "timed out", "WorkflowTimeoutError"),
    TaskCancelledError("tid", "cancelled by a client"),
    TaskStateError("already completed"),
    UnauthorizedError("no key"),
    ForbiddenError("cross-site"),
    PayloadTooLargeError("too big"),
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
    # the root is the one curated surface: everything public there is listed, and only that
    public = {name for name in vars(llama_deploy_ray) if not name.startswith("_")}
    assert public == set(llama_deploy_ray.__all__)


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


def test_not_found_errors_share_a_parent_and_are_value_errors_as_in_the_seed() -> None:
    for error in ERRORS[:3]:
        assert isinstance(error, NotFoundError) and error.status_code == 404
        assert isinstance(error, ValueError)  # what llama_deploy's client raised


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


def test_what_the_clients_send_again() -> None:
    import httpx

    from llama_deploy_ray import _client_core as core

    run = core.run_task("s", TaskDefinition(input="{}", agent_id="svc"))
    event = core.send_event("s", "svc", "t", HumanResponseEvent(response="x"))

    def failed(call: core.Call, exc: httpx.TransportError) -> LlamaDeployError:
        try:
            raise core.transport_error(exc, call, "http://x", 1.0) from exc
        except LlamaDeployError as error:
            return error

    def answered(call: core.Call, status: int, body: object) -> LlamaDeployError:
        response = httpx.Response(status, json=body) if body else httpx.Response(status)
        with pytest.raises(LlamaDeployError) as info:
            core.read_response(call, response)
        return info.value

    for call in (run, event):  # never arrived: safe to send again, whatever it is
        assert core.is_retryable(call, failed(call, httpx.ConnectError("refused")))
        overloaded = answered(call, 503, None)
        assert isinstance(overloaded, ServiceOverloadedError)
        assert core.is_retryable(call, overloaded)
    # fate unknown: only a call that carries its own id is sent again
    cut = httpx.RemoteProtocolError("peer closed")
    assert core.is_retryable(run, failed(run, cut))
    assert not core.is_retryable(event, failed(event, cut))
    assert core.is_retryable(run, answered(run, 502, None))
    # the caller's own bound, and answers that are final, are never retried
    timed_out = failed(run, httpx.ReadTimeout("slow"))
    assert isinstance(timed_out, RequestTimeoutError) and isinstance(timed_out, TimeoutError)
    assert not core.is_retryable(run, timed_out)
    not_found = answered(run, 404, error_to_json(ServiceNotFoundError("svc")))
    assert not core.is_retryable(run, not_found)
    assert not core.is_retryable(run, answered(run, 422, error_to_json(InvalidRequestError("x"))))
    with pytest.raises(RequestTimeoutError, match="client's timeout"):
        core.request_kwargs(run, deadline=time.monotonic() - 1, timeout_s=5)


def test_the_retry_policy_backs_off_within_its_budget() -> None:
    from llama_deploy_ray._retry import retrying_sync

    calls: list[float] = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionError("down")
        return "up"

    assert retrying_sync(lambda e: isinstance(e, ConnectionError))(flaky) == "up"
    assert len(calls) == 3

    calls.clear()
    start = time.monotonic()
    with pytest.raises(ConnectionError):
        retrying_sync(lambda e: isinstance(e, ConnectionError), budget_s=0.5)(
            lambda: flaky() if False else (_ for _ in ()).throw(ConnectionError("down"))
        )
    assert time.monotonic() - start < 2.5
    with pytest.raises(KeyError):  # not retryable: raised at once
        retrying_sync(lambda e: isinstance(e, ConnectionError))(lambda: {}["x"])


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

    control_plane = ControlPlane(task_retention_s=0.2, session_retention_s=0.4, state_secret=SECRET)
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
        await control_plane.get_task(session.session_id, old[0])
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

    control_plane = ControlPlane(task_retention_s=60, session_retention_s=60, state_secret=SECRET)
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
        result = await control_plane.get_task(task.session_id, task.task_id)
        assert (result.status, result.result) == (TaskStatus.COMPLETED, i)
    started = await asyncio.wait_for(waiting, 5)
    assert started is not None and started.state == {"n": 0}


async def test_a_driver_hears_of_its_cancelled_tasks_and_a_silent_drivers_tasks_are_adopted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from llama_deploy_ray import _control_plane
    from llama_deploy_ray._types import ServiceDefinition

    monkeypatch.setattr(_control_plane, "DRIVER_SILENCE_S", 0.2)
    control_plane = _control_plane.ControlPlane(
        task_retention_s=60, session_retention_s=60, state_secret=SECRET
    )
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


async def test_a_stream_drops_its_oldest_events_past_its_cap_and_an_inbox_refuses() -> None:
    from llama_deploy_ray._events import DROPPED_TYPE, SEQ_KEY, TYPE_KEY, EventLog

    stream = EventLog(max_events=3)
    stream.extend({"n": i} for i in range(5))
    batch = await stream.read(after=0, wait_s=0)
    assert batch.events[0] == {TYPE_KEY: DROPPED_TYPE, "dropped": 2, SEQ_KEY: 2}
    assert [(e["n"], e[SEQ_KEY]) for e in batch.events[1:]] == [(2, 3), (3, 4), (4, 5)]
    assert [e["n"] for e in (await stream.read(after=3, wait_s=0)).events] == [3, 4]
    assert (await stream.read(after=1, wait_s=0)).events[0]["dropped"] == 1
    assert len(stream) == 5

    inbox = EventLog(max_events=2, full="refuse")
    inbox.extend([{"n": 0}, {"n": 1}])
    with pytest.raises(InvalidRequestError, match="the most one task takes"):
        inbox.extend([{"n": 2}])
    assert len(inbox) == 2


async def test_a_task_is_created_once_runs_under_one_owner_and_stays_in_its_session() -> None:
    from llama_deploy_ray._control_plane import ControlPlane
    from llama_deploy_ray._types import ServiceDefinition

    control_plane = ControlPlane(task_retention_s=60, session_retention_s=60, state_secret=SECRET)
    await control_plane.register_service(ServiceDefinition(service_name="svc"))
    session, other = await control_plane.create_session(), await control_plane.create_session()
    task = TaskDefinition(input="{}", agent_id="svc", session_id=session.session_id)
    first = await control_plane.create_task(task, "driver")
    assert await control_plane.create_task(task, "another") == first  # a retry: the same task
    assert await control_plane.begin_task(task, "another") is None  # not started a second time
    with pytest.raises(InvalidRequestError, match="already exists"):
        await control_plane.create_task(task.model_copy(update={"input": '{"a": 1}'}), "driver")
    assert len(await control_plane.list_tasks(session.session_id)) == 1

    assert await control_plane.start_task(task.task_id, "another") is None  # not its owner
    started = await control_plane.start_task(task.task_id, "driver")
    assert started is not None and started.running.status.value == "running"

    foreign_child = TaskDefinition(
        input="{}", agent_id="svc", session_id=other.session_id, parent_task_id=task.task_id
    )
    with pytest.raises(InvalidRequestError, match="is not a task of session"):
        await control_plane.create_task(foreign_child, "driver")


async def test_retention_runs_on_a_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    from llama_deploy_ray import _control_plane

    monkeypatch.setattr(_control_plane, "RETENTION_SWEEP_S", 0.1)
    control_plane = _control_plane.ControlPlane(
        task_retention_s=0.1, session_retention_s=0.2, state_secret=SECRET
    )
    await control_plane.ready()
    for _ in range(10):
        await control_plane.create_session()
    assert (await control_plane.sizes())["sessions"] == 10
    await asyncio.sleep(0.6)  # no task ends: only the timer can forget them
    assert (await control_plane.sizes())["sessions"] == 0


def test_state_is_json_or_a_signed_pickle_and_client_data_is_never_unpickled(
    tmp_path,
) -> None:
    import base64
    import json

    from llama_deploy_ray._state_serializer import SignedStateSerializer, StateIntegrityError

    serializer = SignedStateSerializer(SECRET)
    mark = tmp_path / "mark"

    class LeavesAMark:
        def __reduce__(self):
            return (open, (str(mark), "w"))

    attack = base64.b64encode(pickle.dumps(LeavesAMark())).decode()
    for value in ("plain", attack, {"__is_pydantic": True, "qualified_name": "os.system"}, [1]):
        assert serializer.deserialize(serializer.serialize(value)) == value
    assert not mark.exists()

    kept = serializer.serialize({1, 2, 3})  # not JSON: pickled by the replica, and signed
    assert serializer.deserialize(kept) == {1, 2, 3}
    forged = json.loads(kept)
    forged["pickle"] = base64.b64encode(pickle.dumps(LeavesAMark())).decode()
    with pytest.raises(StateIntegrityError, match="bad signature"):
        serializer.deserialize(json.dumps(forged))
    with pytest.raises(StateIntegrityError, match="bad signature"):
        SignedStateSerializer(b"another secret, 32 bytes long!!!").deserialize(kept)
    with pytest.raises(StateIntegrityError, match="not one of ours"):
        serializer.deserialize(json.dumps(attack))
    assert not mark.exists()


class _ActorLike:
    """The in-memory `ControlPlane` behind what a driver expects of its actor handle: each
    method's `.remote(...)` returns something to await."""

    def __init__(self, control_plane: object) -> None:
        self._control_plane = control_plane

    def __getattr__(self, name: str) -> object:
        method = getattr(self._control_plane, name)

        class _Method:
            @staticmethod
            def remote(*args: object, **kwargs: object) -> asyncio.Future:
                return asyncio.ensure_future(method(*args, **kwargs))

        return _Method


async def test_a_replica_driver_hears_of_a_cancel_and_a_task_that_cannot_run_fails() -> None:
    from llama_deploy_ray._actors import ControlPlaneHandle
    from llama_deploy_ray._control_plane import ControlPlane
    from llama_deploy_ray._driver import LocalDriver
    from llama_deploy_ray._types import ServiceDefinition, StartedTask, TaskOutcome, TaskStatus

    control_plane = ControlPlane(task_retention_s=60, session_retention_s=60, state_secret=SECRET)
    await control_plane.register_service(ServiceDefinition(service_name="svc"))
    session = await control_plane.create_session()
    started_runs: list[str] = []

    async def run_here(started: StartedTask) -> TaskOutcome:
        started_runs.append(started.task.task_id)
        if started.task.run_kwargs.get("fail"):
            raise RuntimeError("the replica broke")
        await asyncio.sleep(60)
        return TaskOutcome(result="never")

    driver = LocalDriver(ControlPlaneHandle(_ActorLike(control_plane)), run_here)  # type: ignore[arg-type]

    def task(**kwargs: object) -> TaskDefinition:
        return TaskDefinition(
            input=json.dumps(kwargs), agent_id="svc", session_id=session.session_id
        )

    long_task, broken, after = task(), task(fail=True), task()
    running = asyncio.ensure_future(driver.run(long_task))
    await asyncio.sleep(0.2)
    assert started_runs == [long_task.task_id]
    await control_plane.cancel_task(session.session_id, long_task.task_id)
    result = await asyncio.wait_for(running, timeout=5)  # the watch told the driver
    assert result.status is TaskStatus.CANCELLED

    failed = await asyncio.wait_for(driver.run(broken), timeout=5)
    assert failed.status is TaskStatus.FAILED and "the replica broke" in (failed.error or "")
    # the session's line moved on: the next task starts (and is cancelled in its turn)
    nxt = asyncio.ensure_future(driver.run(after))
    await asyncio.sleep(0.2)
    assert started_runs[-1] == after.task_id
    await control_plane.cancel_task(session.session_id, after.task_id)
    assert (await asyncio.wait_for(nxt, timeout=5)).status is TaskStatus.CANCELLED
    await driver.drain()


def test_each_use_of_the_workflows_internals_still_holds() -> None:
    # one check per touch point in _workflows_internals: an upgrade that moves one fails here
    from workflows import Context
    from workflows.events import HumanResponseEvent as Human
    from workflows.events import StartEvent

    from llama_deploy_ray import _workflows_internals as internals
    from llama_deploy_ray._events import accepted_events

    from .workflows import Answer, EchoWorkflow, TypedHumanWorkflow

    workflow = TypedHumanWorkflow(timeout=12, verbose=False)
    assert set(internals.steps_of(workflow)) == {"ask", "answer"}
    assert set(internals.steps_of_class(TypedHumanWorkflow)) == {"ask", "answer"}
    answer = internals.steps_of(workflow)["answer"]
    assert internals.events_taken_by(answer) == [Answer]
    assert accepted_events(workflow) == {
        "HumanResponseEvent": Human,
        "StartEvent": StartEvent,
        "Answer": Answer,
    }

    async def wrapper(*args: object) -> None: ...

    internals.copy_step_config(answer, wrapper)
    assert internals.events_taken_by(wrapper) == [Answer]

    options = internals.init_options(workflow)
    assert options["timeout"] == 12 and options["verbose"] is False
    rebuilt = EchoWorkflow.__new__(EchoWorkflow)
    Workflow.__init__(rebuilt, **options)  # every option is one __init__ takes
    assert "_timeout" in internals.FRAMEWORK_ATTRS and "marker" not in internals.FRAMEWORK_ATTRS

    async def saved_state() -> dict:
        handler = EchoWorkflow().run(arg1="x")
        await handler
        return handler.ctx.to_dict()

    state = asyncio.run(saved_state())
    assert set(internals.RUN_CLOCK_KEYS) <= set(state)  # the keys that time a run
    Context.from_dict(EchoWorkflow(), internals.with_fresh_run_clock(state))

    assert internals.event_fields(Human(response="r", extra=1)) == {"response": "r", "extra": 1}


def test_a_stopping_replica_waits_as_long_as_its_workflow_may_run() -> None:
    from llama_deploy_ray._config import DRAIN_MARGIN_S, DRAIN_WITHOUT_TIMEOUT_S

    config = WorkflowServiceConfig(service_name="svc")
    assert config.deployment_options(45.0)["graceful_shutdown_timeout_s"] == 45.0 + DRAIN_MARGIN_S
    assert config.deployment_options(None)["graceful_shutdown_timeout_s"] == DRAIN_WITHOUT_TIMEOUT_S
    chosen = WorkflowServiceConfig(service_name="svc", graceful_shutdown_timeout_s=5)
    assert chosen.deployment_options(45.0)["graceful_shutdown_timeout_s"] == 5
    assert pack_workflow(EchoWorkflow(timeout=12)).timeout == 12.0
    assert pack_workflow("tests.workflows:EchoWorkflow").timeout is None


def test_the_core_actors_are_called_through_their_typed_handles_only() -> None:
    from pathlib import Path

    package = Path(llama_deploy_ray.__file__).parent
    for path in package.glob("*.py"):
        if path.name == "_actors.py":
            continue
        source = path.read_text()
        assert "get_actor(" not in source, f"{path.name} looks an actor up by name"
        call = re.search(r"(control_plane|orchestrator)\w*\.\w+\.remote\(", source)
        assert call is None, f"{path.name} calls a core actor without its handle: {call}"
