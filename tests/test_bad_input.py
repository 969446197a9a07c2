"""A task that cannot start fails clearly, and its session goes on (on a real local Ray)."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio

from llama_deploy_ray import (
    ControlPlaneConfig,
    LlamaDeployClient,
    TaskFailedError,
    TaskStatus,
    deploy_workflow,
)

from .conftest import service
from .workflows import (
    EchoWorkflow,
    TypedStartWorkflow,
    UnrestorableWorkflow,
)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def deployed(control_plane_config: ControlPlaneConfig) -> ControlPlaneConfig:
    config = control_plane_config
    await asyncio.gather(
        deploy_workflow(EchoWorkflow(), service("c_echo"), config),
        deploy_workflow(TypedStartWorkflow(), service("typed"), config),
        deploy_workflow(UnrestorableWorkflow(), service("unrestorable"), config),
    )
    return config


# a task that cannot start fails, and its session goes on


def test_run_kwargs_the_workflow_refuses_fail_the_task_and_the_session_goes_on(
    client: LlamaDeployClient,
) -> None:
    session = client.create_session()
    for kwargs, named in (({"start_event": "x"}, "start_event"), ({"ctx": "x"}, "ctx")):
        with pytest.raises(TaskFailedError, match="could not start the task") as info:
            session.run("c_echo", **kwargs)
        assert named in str(info.value)
    with pytest.raises(TaskFailedError, match="Greeting"):  # its required field is missing
        session.run("typed")
    # every later task of the session runs, on the same services
    assert session.run("typed", name="ada") == "hello ada"
    assert session.run("c_echo", arg1="next") == "next_result"
    statuses = [t.status for t in session.get_tasks()]
    assert statuses == [TaskStatus.FAILED] * 3 + [TaskStatus.COMPLETED] * 2


def test_a_state_that_cannot_be_restored_fails_its_tasks_clearly(
    client: LlamaDeployClient,
) -> None:
    session = client.create_session()
    assert session.run("unrestorable") == "kept"
    for _ in range(2):  # each later task ends, with the cause
        with pytest.raises(TaskFailedError, match="could not start the task") as info:
            session.run("unrestorable")
        assert "refuses to be restored" in str(info.value)  # the cause
    assert session.run("c_echo", arg1="other") == "other_result"  # its other services go on
