"""Nested workflows and cancellation on a real local Ray: a child runs on its deployed service
(behind its session's earlier task there, and again when its replica dies), its events reach
the parent's stream, and a cancel reaches it."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import pytest_asyncio
import ray

from llama_deploy_ray import (
    AsyncLlamaDeployClient,
    AsyncSessionClient,
    ControlPlaneConfig,
    LlamaDeployClient,
    TaskCancelledError,
    TaskFailedError,
    TaskResult,
    TaskStateError,
    TaskStatus,
    add_workflows,
    deploy_workflow,
)

from .conftest import service, wait_for
from .workflows import (
    HelperOuterWorkflow,
    InnerWorkflow,
    LocalInnerWorkflow,
    OuterWorkflow,
    SleepWorkflow,
)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def deployed(control_plane_config: ControlPlaneConfig) -> ControlPlaneConfig:
    outer = OuterWorkflow(timeout=60)
    add_workflows(outer, child=LocalInnerWorkflow())
    helper_outer = HelperOuterWorkflow()
    add_workflows(helper_outer, helper=LocalInnerWorkflow())
    await asyncio.gather(
        deploy_workflow(InnerWorkflow(timeout=60), service("child"), control_plane_config),
        deploy_workflow(outer, service("parent"), control_plane_config),
        deploy_workflow(helper_outer, service("helper_outer"), control_plane_config),
        deploy_workflow(
            SleepWorkflow(timeout=60),
            service("one_slot", max_ongoing_requests=1),
            control_plane_config,
        ),
    )
    return control_plane_config


# nested workflows


def test_nested_workflow_runs_on_the_deployed_service(client: LlamaDeployClient) -> None:
    session = client.create_session()
    assert session.run("parent", arg1="hello_world") == "hello_world_result_result"
    parent, child = sorted(session.get_tasks(), key=lambda t: t.created_at)
    assert parent.service_name == "parent" and child.service_name == "child"
    assert child.parent_task_id == parent.task_id
    assert child.status is TaskStatus.COMPLETED


def test_nested_workflow_falls_back_to_the_local_instance(client: LlamaDeployClient) -> None:
    # no service is named "helper": the instance given to add_workflows runs in the replica
    session = client.create_session()
    assert session.run("helper_outer", arg1="x") == "x_local_result"
    assert [t.service_name for t in session.get_tasks()] == ["helper_outer"]


def test_child_events_reach_the_parent_stream(client: LlamaDeployClient) -> None:
    session = client.create_session()
    task_id = session.run_nowait("parent", arg1="a")
    # read from the parent's replica until the child starts, then from the control plane:
    # every event once, in the log's order
    events = list(session.get_task_result_stream(task_id))
    assert [e["__seq__"] for e in events] == [1, 2, 3]
    steps = [e["step"] for e in events]
    assert sorted(steps) == [1, 2, 100] and steps.index(1) < steps.index(2)


def test_a_child_behind_its_sessions_earlier_task_waits_its_turn(
    client: LlamaDeployClient,
) -> None:
    # the child's service runs an earlier task of the session: the child does not start on a
    # replica of its own (it would hold its slot waiting), the orchestrator waits for its turn
    session = client.create_session()
    earlier = session.run_nowait("child", arg1="first", seconds=2)
    assert session.run("parent", arg1="x") == "x_result_result"
    first, _, nested = sorted(session.get_tasks(), key=lambda t: t.created_at)
    assert first.task_id == earlier and nested.service_name == "child"
    assert first.status is nested.status is TaskStatus.COMPLETED
    assert (first.finished_at or 0) <= (nested.finished_at or 0)


async def test_a_child_whose_replica_dies_mid_run_still_answers_its_parent(
    aclient: AsyncLlamaDeployClient,
) -> None:
    session = await aclient.create_session()
    task_id = await session.run_nowait("parent", arg1="x", seconds=3)
    await _child_running(session)
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith("SERVE_REPLICA::child#"):
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]))
    # the orchestrator adopts the child once its replica's driver is silent, and runs it again
    result = await session.get_task_result(task_id, wait_s=120)
    assert result is not None and result.result == "x_result_result", result
    child = (await session.get_tasks())[1]
    assert child.status is TaskStatus.COMPLETED and child.attempts == 2, child


def test_a_failing_child_fails_the_parent(client: LlamaDeployClient) -> None:
    with pytest.raises(TaskFailedError, match=r"arg1 is required"):
        client.create_session().run("child")


# cancellation


def test_cancel_a_running_task_frees_its_slot(client: LlamaDeployClient) -> None:
    session = client.create_session()
    task_id = session.run_nowait("one_slot", seconds=60)
    wait_for(
        lambda: session.get_task(task_id).status is TaskStatus.RUNNING,
        timeout_s=20,
        what="the task to run",
    )
    assert session.cancel_task(task_id).status is TaskStatus.CANCELLED
    # the only slot of "one_slot" is free again: another session's task runs at once
    start = time.monotonic()
    assert client.create_session().run("one_slot", seconds=0)["log"] == [None]
    assert time.monotonic() - start < 10
    with pytest.raises(TaskStateError):
        session.cancel_task(task_id)


def test_cancel_a_queued_task(client: LlamaDeployClient) -> None:
    session = client.create_session()
    first = session.run_nowait("one_slot", seconds=5, tag="a")
    # the replica's one slot is taken: the task is recorded by the control plane, and queued
    second = session.run_nowait("one_slot", seconds=0, tag="b")
    assert session.get_task(second).status is TaskStatus.PENDING
    assert session.cancel_task(second).status is TaskStatus.CANCELLED
    assert session.get_task_result(first, wait_s=30).result["log"] == ["a"]
    assert session.get_task_result(second).status is TaskStatus.CANCELLED


async def test_cancel_reaches_children(aclient: AsyncLlamaDeployClient) -> None:
    session = await aclient.create_session()
    task_id = await session.run_nowait("parent", arg1="x", seconds=60)
    await _child_running(session)
    result = await session.cancel_task(task_id)
    assert result.status is TaskStatus.CANCELLED
    assert [t.status for t in await session.get_tasks()] == [TaskStatus.CANCELLED] * 2


def test_run_raises_when_its_task_is_cancelled(client, deployed) -> None:
    session = client.create_session()

    def cancel_once_running() -> TaskResult:
        with LlamaDeployClient(deployed) as other:
            watched = other.get_session(session.session_id)
            current = wait_for(
                lambda: (t := watched.get_current_task()) and t.status is TaskStatus.RUNNING and t,
                timeout_s=30,
                what="the run's task to be running",
            )
            return watched.cancel_task(current.task_id)

    with ThreadPoolExecutor(1) as helper:
        cancelled = helper.submit(cancel_once_running)
        with pytest.raises(TaskCancelledError):
            session.run("one_slot", seconds=30)
        assert cancelled.result(timeout=30).status is TaskStatus.CANCELLED


async def _child_running(session: AsyncSessionClient) -> None:
    """Wait (20 s at most) until the parent task's child runs."""
    for _ in range(200):
        tasks = await session.get_tasks()
        if len(tasks) == 2 and tasks[1].status is TaskStatus.RUNNING:
            return
        await asyncio.sleep(0.1)
    pytest.fail("the child task never ran")
