"""Every client method the seed's README lists, sync and async, against its documented
behaviour: return types, errors and edge cases (an empty session, unknown ids, a task of
another session). Where we differ on purpose, the README's difference table says so."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest
import pytest_asyncio

from llama_deploy_ray import (
    AsyncLlamaDeployClient,
    AsyncSessionClient,
    ControlPlaneConfig,
    InvalidRequestError,
    LlamaDeployClient,
    ServiceDefinition,
    ServiceNotFoundError,
    SessionClient,
    SessionDefinition,
    SessionNotFoundError,
    TaskDefinition,
    TaskFailedError,
    TaskNotFoundError,
    TaskResult,
    TaskStatus,
    deploy_workflow,
)

from .conftest import service
from .workflows import EchoWorkflow, FailingWorkflow

T = TypeVar("T")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def deployed(control_plane_config: ControlPlaneConfig) -> ControlPlaneConfig:
    await asyncio.gather(
        deploy_workflow(EchoWorkflow(), service("seed_echo"), control_plane_config),
        deploy_workflow(FailingWorkflow(), service("seed_failing"), control_plane_config),
    )
    return control_plane_config


async def done(value: T | Awaitable[T]) -> T:
    """What a sync or an async client's method gave."""
    return await value if inspect.isawaitable(value) else value  # type: ignore[return-value]


@pytest.fixture
def clients(client: LlamaDeployClient, aclient: AsyncLlamaDeployClient) -> list[Any]:
    return [client, aclient]


async def test_create_session(clients: list[Any]) -> None:
    for client in clients:
        first, second = await done(client.create_session()), await done(client.create_session())
        assert isinstance(first, (SessionClient, AsyncSessionClient))
        assert first.session_id != second.session_id
        listed = {s.session_id for s in await done(client.list_sessions())}
        assert {first.session_id, second.session_id} <= listed


async def test_list_sessions(clients: list[Any]) -> None:
    for client in clients:
        session = await done(client.create_session())
        sessions = await done(client.list_sessions())
        assert all(isinstance(s, SessionDefinition) for s in sessions)
        assert session.session_id in {s.session_id for s in sessions}


async def test_get_session(clients: list[Any]) -> None:
    for client in clients:
        session = await done(client.create_session())
        again = await done(client.get_session(session.session_id))
        assert again.session_id == session.session_id
        for error in (ValueError, SessionNotFoundError):  # the seed's client raised ValueError
            with pytest.raises(error):
                await done(client.get_session("no-such-id"))


async def test_get_or_create_session(clients: list[Any]) -> None:
    for i, client in enumerate(clients):
        session_id = f"seed-get-or-create-{i}"
        created = await done(client.get_or_create_session(session_id))
        again = await done(client.get_or_create_session(session_id))
        assert created.session_id == again.session_id == session_id
        listed = [s.session_id for s in await done(client.list_sessions())]
        assert listed.count(session_id) == 1


async def test_get_service(clients: list[Any]) -> None:
    for client in clients:
        definition = await done(client.get_service("seed_echo"))
        assert isinstance(definition, ServiceDefinition)
        assert definition.service_name == "seed_echo"
        for error in (ValueError, ServiceNotFoundError):
            with pytest.raises(error):
                await done(client.get_service("no-such-service"))


async def test_delete_session(clients: list[Any]) -> None:
    for client in clients:
        session = await done(client.create_session())
        assert await done(session.run("seed_echo", arg1="x")) == "x_result"
        assert await done(client.delete_session(session.session_id)) is None
        with pytest.raises(SessionNotFoundError):
            await done(client.get_session(session.session_id))
        with pytest.raises(SessionNotFoundError):
            await done(client.delete_session(session.session_id))


async def test_list_services(clients: list[Any]) -> None:
    for client in clients:
        services = await done(client.list_services())
        assert all(isinstance(s, ServiceDefinition) for s in services)
        assert {"seed_echo", "seed_failing"} <= {s.service_name for s in services}


async def test_register_and_deregister_service(clients: list[Any]) -> None:
    for i, client in enumerate(clients):
        definition = ServiceDefinition(service_name=f"seed_external_{i}", host="h", port=1)
        assert await done(client.register_service(definition)) == definition
        assert await done(client.get_service(definition.service_name)) == definition
        assert await done(client.deregister_service(definition.service_name)) is None
        with pytest.raises(ServiceNotFoundError):
            await done(client.deregister_service(definition.service_name))


async def test_session_run(clients: list[Any]) -> None:
    for client in clients:
        session = await done(client.create_session())
        assert await done(session.run("seed_echo", arg1="hello")) == "hello_result"
        with pytest.raises(TaskFailedError, match="not allowed"):  # not a result string
            await done(session.run("seed_failing", arg1="x"))
        with pytest.raises(ServiceNotFoundError):
            await done(session.run("no-such-service"))


async def test_session_create_task(clients: list[Any]) -> None:
    for client in clients:
        session = await done(client.create_session())
        task_def = TaskDefinition(input='{"arg1": "hello"}', agent_id="seed_echo")
        task_id = await done(session.create_task(task_def))
        assert task_id == task_def.task_id
        result = await done(session.get_task_result(task_id, wait_s=30))
        assert result.result == "hello_result"
        other = await done(client.create_session())
        elsewhere = TaskDefinition(input="{}", agent_id="seed_echo", session_id=other.session_id)
        with pytest.raises(InvalidRequestError, match="names session"):
            await done(session.create_task(elsewhere))


async def test_session_get_tasks(clients: list[Any]) -> None:
    for client in clients:
        session = await done(client.create_session())
        assert await done(session.get_tasks()) == []
        await done(session.run("seed_echo", arg1="a"))
        await done(session.run("seed_echo", arg1="b"))
        tasks = await done(session.get_tasks())
        assert all(isinstance(t, TaskResult) for t in tasks)
        assert [t.result for t in tasks] == ["a_result", "b_result"]


async def test_session_get_current_task(clients: list[Any]) -> None:
    for client in clients:
        session = await done(client.create_session())
        assert await done(session.get_current_task()) is None
        await done(session.run("seed_echo", arg1="a"))
        await done(session.run("seed_echo", arg1="b"))
        current = await done(session.get_current_task())
        assert isinstance(current, TaskResult) and current.result == "b_result"


async def test_session_get_task_result(clients: list[Any]) -> None:
    for client in clients:
        session = await done(client.create_session())
        other = await done(client.create_session())
        task_id = await done(session.run_nowait("seed_echo", arg1="x"))
        # None until final: the seed's `while result is None` loop
        result = await done(session.get_task_result(task_id))
        while result is None:
            await asyncio.sleep(0.05)
            result = await done(session.get_task_result(task_id))
        assert (result.status, result.result) == (TaskStatus.COMPLETED, "x_result")
        for error in (ValueError, TaskNotFoundError):
            with pytest.raises(error):
                await done(session.get_task_result("no-such-task"))
        with pytest.raises(TaskNotFoundError):  # a task of another session
            await done(other.get_task_result(task_id))
