"""Deployed workflows on a real local Ray: services, sessions, state, ordering, failures."""

from __future__ import annotations

import asyncio
import itertools
import os
import time

import httpx
import pytest
import pytest_asyncio
import ray

from llama_deploy_ray import (
    AsyncLlamaDeployClient,
    ControlPlaneConfig,
    ControlPlaneUnavailableError,
    InvalidRequestError,
    LlamaDeployClient,
    RequestTimeoutError,
    ServiceConflictError,
    ServiceDefinition,
    ServiceNotFoundError,
    SessionNotFoundError,
    TaskDefinition,
    TaskFailedError,
    TaskNotFoundError,
    TaskResult,
    TaskStatus,
    TaskTimeoutError,
    deploy_workflow,
)
from llama_deploy_ray._shared.config import (
    CONTROL_PLANE_ACTOR_NAME,
    ORCHESTRATOR_ACTOR_NAME,
    workflow_route,
)

from .conftest import service, wait_for
from .workflows import (
    CounterWorkflow,
    DiesOnceWorkflow,
    EchoWorkflow,
    FailingWorkflow,
    OpaqueResultWorkflow,
    SleepWorkflow,
    StructuredWorkflow,
)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def deployed(control_plane_config: ControlPlaneConfig) -> ControlPlaneConfig:
    await asyncio.gather(
        deploy_workflow(EchoWorkflow(), service("echo"), control_plane_config),
        deploy_workflow(CounterWorkflow(), service("counter"), control_plane_config),
        deploy_workflow(StructuredWorkflow(), service("structured"), control_plane_config),
        deploy_workflow(FailingWorkflow(), service("failing"), control_plane_config),
        deploy_workflow(OpaqueResultWorkflow(), service("opaque"), control_plane_config),
        deploy_workflow(SleepWorkflow(timeout=30), service("sleep"), control_plane_config),
        deploy_workflow(
            SleepWorkflow(timeout=0.5), service("sleep_short_timeout"), control_plane_config
        ),
        deploy_workflow(
            SleepWorkflow(timeout=30), service("sleep_x2", num_replicas=2), control_plane_config
        ),
    )
    return control_plane_config


# services


def test_each_workflow_is_a_registered_service(client: LlamaDeployClient) -> None:
    names = {s.service_name for s in client.list_services()}
    assert {"echo", "counter", "failing", "sleep", "sleep_x2"} <= names
    assert client.get_service("echo").service_name == "echo"
    with pytest.raises(ServiceNotFoundError) as info:
        client.get_service("nope")
    assert info.value.service_name == "nope"


def test_register_and_deregister_service(client: LlamaDeployClient) -> None:
    definition = ServiceDefinition(service_name="external", host="10.0.0.1", port=9000)
    assert client.register_service(definition) == definition
    assert client.register_service(definition) == definition  # the same again is fine
    with pytest.raises(ServiceConflictError):
        client.register_service(definition.model_copy(update={"port": 9001}))
    client.deregister_service("external")
    assert "external" not in {s.service_name for s in client.list_services()}
    with pytest.raises(ServiceNotFoundError):
        client.deregister_service("external")


async def test_two_services_under_one_name_are_refused(deployed: ControlPlaneConfig) -> None:
    config = service("echo", description="something else entirely")
    with pytest.raises(ServiceConflictError):
        await deploy_workflow(CounterWorkflow(), config, deployed)
    # the running service is untouched
    assert LlamaDeployClient(deployed).create_session().run("echo", arg1="a") == "a_result"


async def test_deploy_workflow_without_a_control_plane(deployed: ControlPlaneConfig) -> None:
    nowhere = deployed.model_copy(update={"namespace": "no_control_plane_here"})
    with pytest.raises(ControlPlaneUnavailableError, match="deploy_core"):
        await deploy_workflow(EchoWorkflow(), service("orphan"), nowhere)


# sessions


def test_sessions(client: LlamaDeployClient) -> None:
    session = client.create_session()
    assert session.session_id in {s.session_id for s in client.list_sessions()}
    assert client.get_session(session.session_id).session_id == session.session_id
    named = client.get_or_create_session("my-session")
    assert client.get_or_create_session("my-session").session_id == named.session_id == "my-session"
    client.delete_session(session.session_id)
    with pytest.raises(SessionNotFoundError) as info:
        client.get_session(session.session_id)
    assert info.value.session_id == session.session_id
    with pytest.raises(SessionNotFoundError):
        client.delete_session(session.session_id)


def test_state_is_kept_per_session(client: LlamaDeployClient) -> None:
    session = client.create_session()
    assert session.run("counter") == "1"
    assert session.run("counter") == "2"
    assert client.create_session().run("counter") == "1"
    # state is per (session, service): another service in the same session starts fresh
    assert session.run("sleep", tag="x")["log"] == ["x"]
    assert session.run("counter") == "3"


def test_a_session_s_runs_each_get_the_whole_timeout(client: LlamaDeployClient) -> None:
    # sleep_short_timeout has timeout=0.5: three 0.3 s runs pass only if each starts afresh
    session = client.create_session()
    logs = [session.run("sleep_short_timeout", seconds=0.3, tag=i)["log"] for i in range(3)]
    assert logs[-1] == [0, 1, 2]


async def test_twenty_concurrent_sessions_never_share_state(
    aclient: AsyncLlamaDeployClient,
) -> None:
    sessions = [await aclient.create_session() for _ in range(20)]

    async def count_three(session) -> list[str]:
        return [await session.run("counter") for _ in range(3)]

    results = await asyncio.gather(*(count_three(s) for s in sessions))
    assert results == [["1", "2", "3"]] * 20


async def test_one_session_runs_its_tasks_in_order(aclient: AsyncLlamaDeployClient) -> None:
    session = await aclient.create_session()
    # later tasks are shorter: run in parallel they would finish first
    task_ids = [await session.run_nowait("sleep", seconds=0.3 - 0.05 * i, tag=i) for i in range(5)]
    results = [(await session.get_task_result(t, wait_s=30)).result for t in task_ids]
    assert results[-1]["log"] == [0, 1, 2, 3, 4]
    for earlier, later in itertools.pairwise(results):
        assert earlier["end"] <= later["start"]


async def test_sessions_run_in_parallel(aclient: AsyncLlamaDeployClient) -> None:
    sessions = [await aclient.create_session() for _ in range(5)]
    start = time.monotonic()
    await asyncio.gather(*(s.run("sleep", seconds=1.0) for s in sessions))
    assert time.monotonic() - start < 2.5


async def test_two_replicas_share_the_tasks(aclient: AsyncLlamaDeployClient) -> None:
    sessions = [await aclient.create_session() for _ in range(16)]
    results = await asyncio.gather(*(s.run("sleep_x2", seconds=0.3) for s in sessions))
    assert len({r["replica"] for r in results}) == 2


# tasks and results


def test_task_lifecycle(client: LlamaDeployClient) -> None:
    session = client.create_session()
    assert session.get_current_task() is None
    first = session.run_nowait("sleep", seconds=1.0, tag="a")
    second = session.create_task(TaskDefinition(input='{"tag": "b"}', agent_id="sleep"))
    assert session.get_task(first).status in (TaskStatus.PENDING, TaskStatus.RUNNING)
    assert session.get_task(second).status is TaskStatus.PENDING  # waits for the first
    final = session.get_task_result(second, wait_s=30)
    assert final.status is TaskStatus.COMPLETED
    assert final.result["log"] == ["a", "b"]
    assert [t.task_id for t in session.get_tasks()] == [first, second]
    assert session.get_current_task().task_id == second
    assert session.get_task_result(first).status is TaskStatus.COMPLETED


def test_a_run_answers_with_what_the_control_plane_records(client, deployed) -> None:
    # the replica answers as it sends the outcome: the answer and the record must agree
    session = client.create_session()
    for service_name, status in (("echo", TaskStatus.COMPLETED), ("failing", TaskStatus.FAILED)):
        run_url = f"{deployed.url}{workflow_route(service_name)}/sessions/{session.session_id}/run"
        body = TaskDefinition(input='{"arg1": "x"}').model_dump_json()
        answered = TaskResult.model_validate_json(httpx.post(run_url, content=body).content)
        recorded = session.get_task_result(answered.task_id, wait_s=10)
        assert answered.status is status
        assert answered.model_dump(exclude={"finished_at"}) == recorded.model_dump(
            exclude={"finished_at"}
        )


def test_results_keep_their_type(client: LlamaDeployClient) -> None:
    session = client.create_session()
    assert session.run("echo", arg1="hello_world") == "hello_world_result"
    assert session.run("structured", n=3) == {"items": [1, 2, 3], "nested": {"ok": True}, "n": 3}


def test_a_result_that_is_not_json_fails_clearly(client: LlamaDeployClient) -> None:
    with pytest.raises(TaskFailedError, match="not JSON-serializable") as info:
        client.create_session().run("opaque")
    assert info.value.error_type == "ResultNotSerializableError"


def test_a_failing_workflow_raises_its_own_error(client: LlamaDeployClient) -> None:
    session = client.create_session()
    with pytest.raises(TaskFailedError) as info:
        session.run("failing", arg1="bad")
    assert info.value.error_type == "ValueError"
    assert info.value.error == "arg1 was 'bad', which is not allowed"
    result = session.get_task_result(info.value.task_id)
    assert result.status is TaskStatus.FAILED
    assert result.error == "arg1 was 'bad', which is not allowed"


def test_a_workflow_that_times_out(client: LlamaDeployClient) -> None:
    with pytest.raises(TaskTimeoutError) as info:
        client.create_session().run("sleep_short_timeout", seconds=5)
    assert "timed out" in info.value.error


def test_unknown_service_fails_at_once(client: LlamaDeployClient) -> None:
    session = client.create_session()
    start = time.monotonic()
    with pytest.raises(ServiceNotFoundError) as info:
        session.run("not_deployed", arg1="x")
    assert info.value.service_name == "not_deployed"
    with pytest.raises(ServiceNotFoundError):
        session.run_nowait("not_deployed")
    assert time.monotonic() - start < 5


def test_unknown_session_and_task(client: LlamaDeployClient) -> None:
    session = client.create_session()
    with pytest.raises(TaskNotFoundError) as info:
        session.get_task_result("no-such-task")
    assert info.value.task_id == "no-such-task"
    client.delete_session(session.session_id)
    with pytest.raises(SessionNotFoundError):
        session.run("echo", arg1="x")
    with pytest.raises(SessionNotFoundError):
        session.get_tasks()


def test_a_task_of_another_session_is_not_found(client: LlamaDeployClient) -> None:
    task_id = client.create_session().run_nowait("echo", arg1="x")
    with pytest.raises(TaskNotFoundError):
        client.create_session().get_task_result(task_id)


def test_run_kwargs_must_be_json(client: LlamaDeployClient) -> None:
    with pytest.raises(InvalidRequestError, match="not JSON-serializable"):
        client.create_session().run("echo", arg1=object())


def test_malformed_requests_get_422(deployed: ControlPlaneConfig, client) -> None:
    session_id = client.create_session().session_id
    url = f"{deployed.url}/sessions/{session_id}/tasks"
    for body in ({"input": "not json", "agent_id": "echo"}, {"input": "[1]"}, {"nope": 1}):
        response = httpx.post(url, json=body)
        assert response.status_code == 422, body
    response = httpx.get(f"{deployed.url}/sessions/nope/tasks")
    assert response.status_code == 404
    assert response.json()["error"] == "SessionNotFoundError"
    # a service's own run route answers the same way
    run_url = f"{deployed.url}{workflow_route('echo')}/sessions/{session_id}/run"
    for body in (
        {"input": "not json"},
        {"input": "{}", "agent_id": "counter"},
        {"input": "{}", "session_id": "another"},
    ):
        response = httpx.post(run_url, json=body)
        assert response.status_code == 422, body
        assert response.json()["error"] == "InvalidRequestError", body
    response = httpx.get(run_url)
    assert (response.status_code, response.json()["error"]) == (404, "NotFoundError")
    response = httpx.post(run_url.replace(session_id, "nope"), json={"input": "{}"})
    assert (response.status_code, response.json()["error"]) == (404, "SessionNotFoundError")
    response = httpx.post(run_url, json={"input": '{"arg1": "x"}'})
    assert response.json()["result"] == "x_result"


async def test_a_replica_that_dies_mid_task_is_retried(deployed, tmp_path) -> None:
    await asyncio.gather(
        deploy_workflow(DiesOnceWorkflow(str(tmp_path / "a")), service("dies_once"), deployed),
        deploy_workflow(DiesOnceWorkflow(str(tmp_path / "b")), service("dies_bg"), deployed),
    )
    async with AsyncLlamaDeployClient(deployed) as client:
        session = await client.create_session()
        # a run the client sent to a replica, which drove it and died: the client's request
        # is cut, the orchestrator adopts the task once the replica's driver is silent
        result = await session.run("dies_once")
        assert result.startswith("survived")
        # a task the orchestrator sent to a replica that died: it sends it again at once
        task_id = await session.run_nowait("dies_bg")
        assert (await session.get_task_result(task_id, wait_s=60)).result.startswith("survived")
        tasks = await session.get_tasks()
    assert [t.status for t in tasks] == [TaskStatus.COMPLETED] * 2
    assert [t.attempts for t in tasks] == [2, 2]


def test_client_timeout(deployed: ControlPlaneConfig) -> None:
    with LlamaDeployClient(deployed, timeout=0.5) as client:
        session = client.create_session()
        with pytest.raises(RequestTimeoutError, match=r"client's timeout \(0\.5 s\)"):
            session.run("sleep", seconds=3)


def test_unreachable_control_plane_names_the_address() -> None:
    config = ControlPlaneConfig(port=9)  # nothing listens on the discard port
    # the client tries again until its timeout (the default: a minute), then names the address
    with pytest.raises(ControlPlaneUnavailableError, match=r"127\.0\.0\.1:9"):
        LlamaDeployClient(config, timeout=3).create_session()


async def test_async_client_methods(aclient: AsyncLlamaDeployClient) -> None:
    assert "echo" in {s.service_name for s in await aclient.list_services()}
    assert (await aclient.get_service("echo")).service_name == "echo"
    session = await aclient.get_or_create_session("async-session")
    assert (await aclient.get_session("async-session")).session_id == "async-session"
    assert await session.run("echo", arg1="a") == "a_result"
    task_id = await session.create_task(TaskDefinition(input='{"arg1": "b"}', agent_id="echo"))
    assert (await session.get_task_result(task_id, wait_s=30)).result == "b_result"
    assert len(await session.get_tasks()) == 2
    assert (await session.get_current_task()).task_id == task_id
    assert "async-session" in {s.session_id for s in await aclient.list_sessions()}
    definition = ServiceDefinition(service_name="async-external")
    await aclient.register_service(definition)
    await aclient.deregister_service("async-external")
    await aclient.delete_session("async-session")
    with pytest.raises(SessionNotFoundError):
        await aclient.get_session("async-session")


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="a Linux scheduling policy")
def test_the_control_plane_lets_the_replicas_keep_their_cores(deployed) -> None:
    """Every thread of the control plane's actor runs under SCHED_BATCH: woken by a replica's
    call, it waits for an idle core rather than take the replica's (see `_scheduling`)."""

    def policies(_: object) -> set[int]:
        return {os.sched_getscheduler(int(t)) for t in os.listdir("/proc/self/task")}

    control_plane = ray.get_actor(CONTROL_PLANE_ACTOR_NAME)
    assert ray.get(control_plane.__ray_call__.remote(policies), timeout=30) == {os.SCHED_BATCH}


def test_a_restarted_orchestrator_adopts_the_tasks_it_drove(client, deployed) -> None:
    session = client.create_session()
    # started through the API, the orchestrator drives it
    task = TaskDefinition(input='{"seconds": 2, "tag": "survivor"}', agent_id="sleep")
    url = f"{deployed.url}/sessions/{session.session_id}/tasks"
    assert httpx.post(url, json=task.model_dump(), timeout=30).status_code == 200
    task_id = task.task_id
    wait_for(
        lambda: session.get_task(task_id).status is TaskStatus.RUNNING,
        timeout_s=20,
        what="the task to run",
    )
    ray.kill(ray.get_actor(ORCHESTRATOR_ACTOR_NAME), no_restart=False)
    # no request needed: its new incarnation drives again what the silent one left
    result = session.get_task_result(task_id, wait_s=90)
    assert result.status is TaskStatus.COMPLETED
    assert result.result["log"] == ["survivor"]
    assert result.attempts == 2
