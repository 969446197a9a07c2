"""Human in the loop on a real local Ray: a waiting task is parked, answered, and holds no slot."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import pytest_asyncio
from llama_index.core.workflow import HumanResponseEvent

from llama_deploy_ray import (
    AsyncLlamaDeployClient,
    ControlPlaneConfig,
    InvalidRequestError,
    LlamaDeployClient,
    TaskStateError,
    TaskStatus,
    deploy_workflow,
)

from .conftest import service, wait_for
from .workflows import (
    HumanWorkflow,
)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def deployed(control_plane_config: ControlPlaneConfig) -> ControlPlaneConfig:
    await asyncio.gather(
        deploy_workflow(
            HumanWorkflow(timeout=3), service("human", input_hold_s=0.5), control_plane_config
        ),
        deploy_workflow(HumanWorkflow(), service("human_x2", num_replicas=2), control_plane_config),
        deploy_workflow(
            HumanWorkflow(timeout=60),
            service("human_one_slot", max_ongoing_requests=1, input_hold_s=0.5),
            control_plane_config,
        ),
    )
    return control_plane_config


# human in the loop


def answer_when_asked(session, service_name: str, task_id: str, response: str) -> list[dict]:
    seen = []
    for event in session.get_task_result_stream(task_id):
        seen.append(event)
        if event["__type__"] == "InputRequiredEvent":
            session.send_event(service_name, task_id, HumanResponseEvent(response=response))
    return seen


def test_human_in_the_loop(client: LlamaDeployClient) -> None:
    session = client.create_session()
    task_id = session.run_nowait("human_x2")
    seen = answer_when_asked(session, "human_x2", task_id, "42")
    assert seen[0]["prefix"] == "Enter a number: "
    assert session.get_task_result(task_id, wait_s=30).result == "42"


def test_answer_sent_before_the_workflow_waits(client: LlamaDeployClient) -> None:
    session = client.create_session()
    task_id = session.run_nowait("human_x2")
    session.send_event("human_x2", task_id, HumanResponseEvent(response="early"))
    assert session.get_task_result(task_id, wait_s=30).result == "early"


async def test_human_in_the_loop_on_two_replicas(aclient: AsyncLlamaDeployClient) -> None:
    sessions = [await aclient.create_session() for _ in range(8)]
    task_ids = [await s.run_nowait("human_x2") for s in sessions]
    for i, (session, task_id) in enumerate(zip(sessions, task_ids, strict=True)):
        async for event in session.get_task_result_stream(task_id):
            if event["__type__"] == "InputRequiredEvent":
                await session.send_event("human_x2", task_id, HumanResponseEvent(response=str(i)))
    results = [
        (await s.get_task_result(t, wait_s=30)).result
        for s, t in zip(sessions, task_ids, strict=True)
    ]
    assert results == [str(i) for i in range(8)]


def test_a_waiting_task_is_parked_and_outlives_its_timeout(client: LlamaDeployClient) -> None:
    # "human" has timeout=3 and input_hold_s=0.5: it is parked long before 3 s, and waiting
    # parked does not count against the timeout
    session = client.create_session()
    task_id = session.run_nowait("human")
    wait_for(
        lambda: session.get_task(task_id).status is TaskStatus.WAITING,
        timeout_s=20,
        what="the task to be parked",
    )
    time.sleep(4)
    session.send_event("human", task_id, HumanResponseEvent(response="late"))
    result = session.get_task_result(task_id, wait_s=30)
    assert result.status is TaskStatus.COMPLETED, result.error
    assert result.result == "late"


def test_a_live_stream_goes_on_once_its_task_is_parked(client: LlamaDeployClient) -> None:
    # read from the replica that ran the task until it was parked, then from the control plane
    session = client.create_session()
    task_id = session.run_nowait("human")
    stream = session.get_task_result_stream(task_id)
    assert next(stream)["__type__"] == "InputRequiredEvent"
    wait_for(
        lambda: session.get_task(task_id).status is TaskStatus.WAITING,
        timeout_s=20,
        what="the task to be parked",
    )
    session.send_event("human", task_id, HumanResponseEvent(response="parked"))
    assert list(stream) == []  # it ends with the task
    assert session.get_task_result(task_id, wait_s=30).result == "parked"


def test_run_waits_through_human_input(client: LlamaDeployClient, deployed) -> None:
    session = client.create_session()

    def answer_later() -> None:
        with LlamaDeployClient(deployed) as other:
            task = other.get_session(session.session_id)
            current = wait_for(task.get_current_task, timeout_s=20, what="the run's task")
            answer_when_asked(task, "human", current.task_id, "7")

    with ThreadPoolExecutor(1) as helper:
        answered = helper.submit(answer_later)
        assert session.run("human") == "7"
        answered.result(timeout=30)


def test_a_parked_run_holds_no_replica_slot(client: LlamaDeployClient, deployed) -> None:
    waiting = client.create_session()
    with ThreadPoolExecutor(1) as helper:
        run = helper.submit(waiting.run, "human_one_slot")
        task = wait_for(
            lambda: (t := waiting.get_current_task()) and t.status is TaskStatus.WAITING and t,
            timeout_s=20,
            what="the run to be parked",
        )
        # the service's only slot is free again: another task runs while the first one waits
        other = client.create_session()
        other_id = other.run_nowait("human_one_slot")
        answer_when_asked(other, "human_one_slot", other_id, "second")
        assert other.get_task_result(other_id, wait_s=30).result == "second"
        waiting.send_event("human_one_slot", task.task_id, HumanResponseEvent(response="first"))
        assert run.result(timeout=30) == "first"


def test_bad_events_are_refused(client: LlamaDeployClient) -> None:
    session = client.create_session()
    task_id = session.run_nowait("human_x2")
    with pytest.raises(InvalidRequestError, match="accepts no event of type 'Progress'"):
        from .workflows import Progress

        session.send_event("human_x2", task_id, Progress(step=1))
    with pytest.raises(InvalidRequestError, match="runs on service 'human_x2'"):
        session.send_event("human", task_id, HumanResponseEvent(response="x"))
    session.send_event("human_x2", task_id, HumanResponseEvent(response="done"))
    session.get_task_result(task_id, wait_s=30)
    with pytest.raises(TaskStateError):
        session.send_event("human_x2", task_id, HumanResponseEvent(response="again"))
