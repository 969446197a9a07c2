"""Every call returns, and nothing runs twice: timeouts, refused events, blocked replicas, retried
requests (on a real local Ray)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from starlette.types import ASGIApp, Receive, Scope, Send

from llama_deploy_ray import (
    AsyncLlamaDeployClient,
    AsyncSessionClient,
    ControlPlaneConfig,
    InvalidRequestError,
    LlamaDeployClient,
    RequestTimeoutError,
    SessionClient,
    TaskDefinition,
    TaskResult,
    TaskStatus,
    deploy_workflow,
)
from llama_deploy_ray._client.clients import PooledTransport
from llama_deploy_ray._shared.config import DRIVER_SILENCE_S

from .conftest import _free_port, run_url, service
from .workflows import (
    BlockingWorkflow,
    HumanWorkflow,
    SleepWorkflow,
    TypedHumanWorkflow,
)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def deployed(control_plane_config: ControlPlaneConfig) -> ControlPlaneConfig:
    config = control_plane_config
    await asyncio.gather(
        deploy_workflow(BlockingWorkflow(timeout=120), service("blocking"), config),
        deploy_workflow(HumanWorkflow(timeout=60), service("c_human"), config),
        deploy_workflow(TypedHumanWorkflow(timeout=60), service("typed_human"), config),
        deploy_workflow(SleepWorkflow(timeout=120), service("c_sleep"), config),
    )
    return config


# every call returns


async def test_the_client_timeout_bounds_a_whole_run(deployed: ControlPlaneConfig) -> None:
    # only the runs go through the clients with a 2 s timeout: on a busy machine creating a
    # session may take that long too
    with LlamaDeployClient(deployed) as setup:
        session_ids = [setup.create_session().session_id for _ in range(3)]
    with LlamaDeployClient(deployed, timeout=2) as client:
        for session_id, service_name, kwargs in (
            (session_ids[0], "c_sleep", {"seconds": 6}),
            (session_ids[1], "c_human", {}),
        ):
            session = SessionClient(client, session_id)
            start = time.monotonic()
            with pytest.raises(RequestTimeoutError, match="client's timeout"):
                session.run(service_name, **kwargs)
            assert time.monotonic() - start < 4.5
            for task in session.get_tasks():  # what was asked goes on: stop it
                session.cancel_task(task.task_id)
    async with AsyncLlamaDeployClient(deployed, timeout=2) as aclient:
        session = AsyncSessionClient(aclient, session_ids[2])
        start = time.monotonic()
        with pytest.raises(TimeoutError):  # a RequestTimeoutError is also a TimeoutError
            await session.run("c_sleep", seconds=6)
        assert time.monotonic() - start < 4.5


def test_an_event_that_does_not_fit_is_refused_when_sent(
    client: LlamaDeployClient, deployed: ControlPlaneConfig
) -> None:
    session = client.create_session()
    task_id = session.run_nowait("typed_human")
    url = f"{deployed.url}/sessions/{session.session_id}/tasks/{task_id}/events"

    def send(event: dict) -> httpx.Response:
        return httpx.post(url, json={"service_name": "typed_human", "event": event}, timeout=30)

    for wrong in ({"number": "not a number"}, {}):
        refused = send({"__type__": "Answer", **wrong})
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"] == "InvalidRequestError"
        assert "Answer" in refused.json()["message"]
    unknown = send({"__type__": "NoSuchEvent", "number": 1})
    assert unknown.status_code == 422 and "NoSuchEvent" in unknown.json()["message"]
    assert send({"__type__": "Answer", "number": 21}).is_success
    result = session.get_task_result(task_id, wait_s=30)
    assert result is not None and result.result == 42  # the refused ones never reached it


def test_a_step_that_blocks_its_replica_is_not_run_twice(
    client: LlamaDeployClient, tmp_path: Path
) -> None:
    # the replica's event loop is blocked for longer than a silent driver is given: its
    # heartbeat, beaten from a thread, keeps its task from being adopted and run again
    log = tmp_path / "runs.log"
    session = client.create_session()
    assert session.run("blocking", seconds=DRIVER_SILENCE_S + 5, log=str(log)) == "done"
    assert log.read_text().count("ran") == 1
    (task,) = session.get_tasks()
    assert task.attempts == 1


async def test_a_retried_request_runs_its_task_once(
    client: LlamaDeployClient, deployed: ControlPlaneConfig
) -> None:
    session = client.create_session()
    task = TaskDefinition(input=json.dumps({"seconds": 0.5, "tag": "once"}), agent_id="c_sleep")
    url = run_url(deployed, "c_sleep", session.session_id)

    def send(body: TaskDefinition) -> httpx.Response:
        return httpx.post(url, content=body.model_dump_json(), timeout=30)

    answers = await asyncio.gather(*(asyncio.to_thread(send, task) for _ in range(3)))
    assert all(a.is_success for a in answers)
    assert {TaskResult.model_validate_json(a.content).task_id for a in answers} == {task.task_id}
    final = session.get_task_result(task.task_id, wait_s=30)
    assert final is not None and final.result["log"] == ["once"]
    # the same task sent again, by either route, is still that one task
    assert send(task).is_success
    assert session.create_task(task) == task.task_id
    assert [t.task_id for t in session.get_tasks()] == [task.task_id]
    # another task under the same id is refused
    other = task.model_copy(update={"input": json.dumps({"tag": "other"})})
    assert send(other).status_code == 422
    with pytest.raises(InvalidRequestError, match="already exists"):
        session.create_task(other)


def test_a_request_sent_again_after_its_run_does_not_run_its_steps_again(
    client: LlamaDeployClient, deployed: ControlPlaneConfig, tmp_path: Path
) -> None:
    # the replica holds the state the first run left, and starts a session's next run from
    # it before its begin is answered, but only for a task id it knows is new: a request
    # sent again (a client's retry after a cut connection) names a task that already ran
    log = tmp_path / "runs.log"
    session = client.create_session()
    url = run_url(deployed, "blocking", session.session_id)
    task = TaskDefinition(input=json.dumps({"seconds": 0, "log": str(log)}), agent_id="blocking")
    for _ in range(3):
        answer = httpx.post(url, content=task.model_dump_json(), timeout=30)
        assert TaskResult.model_validate_json(answer.content).result == "done"
    assert log.read_text().count("ran") == 1
    # a new task on that session still runs (ahead of its begin, from the state held)
    assert session.run("blocking", seconds=0, log=str(log)) == "done"
    assert log.read_text().count("ran") == 2
    # the same through the control plane API's run (the orchestrator drives it)
    api_url = f"{deployed.url}/sessions/{session.session_id}/run"
    named = TaskDefinition(input=task.input, agent_id="blocking")
    for _ in range(3):
        answer = httpx.post(api_url, json=named.model_dump(), timeout=30)
        assert TaskResult.model_validate_json(answer.content).result == "done"
    unnamed = {"input": task.input, "agent_id": "blocking"}
    assert httpx.post(api_url, json=unnamed, timeout=30).json()["result"] == "done"
    assert log.read_text().count("ran") == 4
    assert [t.status for t in session.get_tasks()] == [TaskStatus.COMPLETED] * 4


@contextlib.asynccontextmanager
async def _serving(app: ASGIApp) -> AsyncIterator[ControlPlaneConfig]:
    """`app` on uvicorn (its defaults: a 5 s keep-alive) on a free local port, as a core's
    address for the clients."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    serving = asyncio.ensure_future(server.serve())
    try:
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        yield ControlPlaneConfig(host="127.0.0.1", port=port)
    finally:
        server.should_exit = True
        await serving


def _answering(peers: list[tuple[str, int]], held: asyncio.Event | None = None) -> ASGIApp:
    """An app that notes each request's peer (host, port: its connection) and answers `{}`;
    to `/held`, once `held` is set."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        peers.append(scope["client"])
        if scope["path"] == "/held" and held is not None:
            await held.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    return app


async def test_the_clients_let_an_idle_connection_go_before_a_5_s_keep_alive_closes_it() -> None:
    """Behind a server or proxy on uvicorn's default keep-alive (5 s), a connection reused as
    the server closes it fails to read its answer; the clients open a new one after 4 s idle."""
    peers: list[tuple[str, int]] = []
    async with _serving(_answering(peers)) as config:
        with LlamaDeployClient(config) as sync_client:
            async with AsyncLlamaDeployClient(config) as async_client:
                for name, get in (
                    ("async", async_client._http.get),
                    ("sync", lambda url: asyncio.to_thread(sync_client._http.get, url)),
                ):
                    for _ in range(8):
                        await get("/")
                    before, peers[:] = set(peers), []
                    await asyncio.sleep(4.5)  # idle: within uvicorn's 5 s, past the clients' 4 s
                    for _ in range(8):
                        await get("/")
                    again, peers[:] = before & set(peers), []
                    assert not again, f"the {name} client used idle connections again: {again}"


async def test_the_async_client_keeps_one_call_at_a_time_on_one_connection_and_spreads_many() -> (
    None
):
    """Calls one at a time go out on one warm connection; calls at once spread over the
    client's pools (`PooledTransport`), a response counting until it is closed."""
    peers: list[tuple[str, int]] = []
    held = asyncio.Event()
    async with (
        _serving(_answering(peers, held)) as config,
        AsyncLlamaDeployClient(config) as client,
    ):
        transport = client._http._transport
        assert isinstance(transport, PooledTransport)
        for _ in range(16):
            await client._http.get("/")
        assert len(set(peers)) == 1, f"one call at a time went out on {len(set(peers))}"

        peers.clear()
        calls = [asyncio.ensure_future(client._http.get("/held")) for _ in range(16)]
        for _ in range(200):
            if len(peers) == 16:
                break
            await asyncio.sleep(0.05)
        assert transport._open == [2] * 8  # 16 at once: two on each of the 8 pools
        held.set()
        await asyncio.gather(*calls)
        async with client._http.stream("GET", "/") as streamed:
            assert transport._open == [1] + [0] * 7  # open until its body is closed
            await streamed.aread()
        assert transport._open == [0] * 8

    refused = PooledTransport()
    async with httpx.AsyncClient(transport=refused) as http:
        with pytest.raises(httpx.ConnectError):  # nothing listens there any more
            await http.get(f"{config.url}/")
    assert refused._open == [0] * 8
