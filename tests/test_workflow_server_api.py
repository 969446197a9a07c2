"""LlamaIndex's workflow-serving API on the same core, driven by its official client
(`llama-agents-client`): runs, streams resumed by sequence number, human input, failure,
cancel and purge, handler listings, 404s, and a handler seen as a session through
llama_deploy's API."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
from llama_agents.client import EventEnvelopeWithMetadata, EventStream, WorkflowClient
from workflows import Context, Workflow, step
from workflows.events import (
    Event,
    InputRequiredEvent,
    StartEvent,
    StopEvent,
)

from llama_deploy_ray import ControlPlaneConfig, LlamaDeployClient, deploy_workflow

from .conftest import service


class Progress(Event):
    index: int


class Question(InputRequiredEvent):
    prompt: str


class Answer(Event):
    """Received only through ctx.wait_for_event: sent by clients as an additional event."""

    text: str


class Named(StopEvent):
    greeting: str


class Greet(Workflow):
    @step
    async def greet(self, ev: StartEvent) -> StopEvent:
        return StopEvent(result=f"hello {ev.get('name', 'world')}")


class Stream3(Workflow):
    @step
    async def work(self, ctx: Context, ev: StartEvent) -> StopEvent:
        for i in range(3):
            ctx.write_event_to_stream(Progress(index=i))
        return StopEvent(result="done")


class Ask(Workflow):
    @step
    async def ask(self, ctx: Context, ev: StartEvent) -> StopEvent:
        answer = await ctx.wait_for_event(
            Answer, waiter_event=Question(prompt="colour?"), waiter_id="colour", timeout=60
        )
        return StopEvent(result=f"you said {answer.text}")


class AskForever(Workflow):
    """No timer pending while it waits: the reference server can lose such a run."""

    @step
    async def ask(self, ctx: Context, ev: StartEvent) -> StopEvent:
        answer = await ctx.wait_for_event(Answer, waiter_event=Question(prompt="still there?"))
        return StopEvent(result=answer.text)


class Fail(Workflow):
    @step
    async def fail(self, ev: StartEvent) -> StopEvent:
        raise ValueError("boom")


class Slow(Workflow):
    @step
    async def wait(self, ev: StartEvent) -> StopEvent:
        await asyncio.sleep(120)
        return StopEvent(result="late")


class Count(Workflow):
    @step
    async def count(self, ctx: Context, ev: StartEvent) -> StopEvent:
        runs = await ctx.store.get("runs", default=0) + 1
        await ctx.store.set("runs", runs)
        return StopEvent(result=runs)


class Greeting(Workflow):
    @step
    async def greet(self, ev: StartEvent) -> Named:
        return Named(greeting=f"hi {ev.get('name')}")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def deployed(control_plane_config: ControlPlaneConfig) -> ControlPlaneConfig:
    await asyncio.gather(
        deploy_workflow(Greet(timeout=30), service("ws-greet"), control_plane_config),
        deploy_workflow(Stream3(timeout=30), service("ws-stream"), control_plane_config),
        deploy_workflow(
            Ask(timeout=60),
            service("ws-ask"),
            control_plane_config,
            additional_events=[Answer],
        ),
        deploy_workflow(
            AskForever(timeout=None),
            # parked (snapshotted, its replica freed) half a second after it asks
            service("ws-ask-forever", input_hold_s=0.5),
            control_plane_config,
            additional_events=[Answer],
        ),
        deploy_workflow(Fail(timeout=30), service("ws-fail"), control_plane_config),
        deploy_workflow(Slow(timeout=300), service("ws-slow"), control_plane_config),
        deploy_workflow(Count(timeout=30), service("ws-count"), control_plane_config),
        deploy_workflow(Greeting(timeout=30), service("ws-named"), control_plane_config),
    )
    return control_plane_config


@pytest_asyncio.fixture(loop_scope="session")
async def client(deployed: ControlPlaneConfig) -> AsyncIterator[WorkflowClient]:
    async with httpx.AsyncClient(base_url=deployed.url, timeout=60) as http:
        yield WorkflowClient(httpx_client=http)


async def test_health_and_the_deployed_workflows(client: WorkflowClient) -> None:
    assert (await client.is_healthy()).status == "healthy"
    names = (await client.list_workflows()).workflows
    assert {"ws-greet", "ws-stream", "ws-ask", "ws-fail"} <= set(names)


async def test_run_answers_the_finished_handler(client: WorkflowClient) -> None:
    handler = await client.run_workflow("ws-greet", start_event={"name": "Ada"})
    assert handler.status == "completed" and handler.workflow_name == "ws-greet"
    assert handler.result is not None and handler.result.type == "StopEvent"
    assert handler.result.value == {"result": "hello Ada"}
    assert handler.result.load_event([StopEvent]).result == "hello Ada"
    assert handler.completed_at is not None and handler.run_id
    assert re.fullmatch("[A-Za-z0-9]{10}", handler.handler_id)  # the reference's ids
    # a StopEvent subclass comes back as itself
    named = await client.run_workflow("ws-named", start_event={"name": "Bo"})
    assert named.result is not None
    assert (named.result.type, named.result.value) == ("Named", {"greeting": "hi Bo"})
    assert named.result.load_event([Named]).greeting == "hi Bo"
    # the deprecated results route flattens the result: a plain StopEvent's, a subclass's fields
    http = client.httpx_client
    assert http is not None
    plain = await http.get(f"/results/{handler.handler_id}")
    assert (plain.status_code, plain.json()["result"]) == (200, "hello Ada")
    fields = await http.get(f"/results/{named.handler_id}")
    assert fields.json()["result"] == {"greeting": "hi Bo"}


async def test_run_nowait_then_wait_and_list(client: WorkflowClient) -> None:
    started = await client.run_workflow_nowait(
        "ws-greet", handler_id="ws-nowait-1", start_event=StartEvent(name="Cy")
    )
    assert (started.handler_id, started.status, started.result) == ("ws-nowait-1", "running", None)
    done = await client.wait_for_handler("ws-nowait-1", timeout=30, poll_interval=0.1)
    assert done.result is not None and done.result.value == {"result": "hello Cy"}
    assert (await client.get_handler("ws-nowait-1")).status == "completed"
    mine = (await client.get_handlers(workflow_name="ws-greet")).handlers
    assert "ws-nowait-1" in {h.handler_id for h in mine}
    assert {h.workflow_name for h in mine} == {"ws-greet"}
    completed = (await client.get_handlers(status=["completed"])).handlers
    assert "ws-nowait-1" in {h.handler_id for h in completed}
    assert {h.status for h in completed} == {"completed"}
    assert (await client.get_handlers(status=["no-such-status"])).handlers == []


async def test_a_stream_in_order_resumed_from_a_sequence_number(client: WorkflowClient) -> None:
    handler = await client.run_workflow_nowait("ws-stream")
    stream = client.get_workflow_events(handler.handler_id)
    seen = [(stream_event.type, stream_event.value) async for stream_event in stream]
    assert seen == [
        ("Progress", {"index": 0}),
        ("Progress", {"index": 1}),
        ("Progress", {"index": 2}),
        ("StopEvent", {"result": "done"}),
    ]
    assert stream.last_sequence == 3
    resumed = client.get_workflow_events(handler.handler_id, after_sequence=1)
    assert [e.type async for e in resumed] == ["Progress", "StopEvent"]
    # nothing left after the last event: the server says 204 and the stream is empty
    assert [e async for e in client.get_workflow_events(handler.handler_id, after_sequence=3)] == []


async def test_sse_ids_last_event_id_and_ndjson(deployed: ControlPlaneConfig) -> None:
    async with httpx.AsyncClient(base_url=deployed.url, timeout=60) as http:
        run = await http.post("/workflows/ws-stream/run", json={})
        handler_id = run.json()["handler_id"]
        sse = await http.get(
            f"/events/{handler_id}", params={"after_sequence": "-1"}, headers={"Last-Event-ID": "0"}
        )
        assert sse.headers["content-type"].startswith("text/event-stream")
        lines = sse.text.splitlines()
        ids = [line.removeprefix("id: ") for line in lines if line.startswith("id:")]
        assert ids == ["1", "2", "3"]  # the header wins over after_sequence
        ndjson = await http.get(
            f"/events/{handler_id}", params={"sse": "false", "after_sequence": "-1"}
        )
        lines = [json.loads(line) for line in ndjson.text.splitlines()]
        assert [e["type"] for e in lines] == ["Progress"] * 3 + ["StopEvent"]
        # the default, `now`, on an ended run: nothing to send
        assert (await http.get(f"/events/{handler_id}")).status_code == 204
        bad = await http.get(f"/events/{handler_id}", params={"after_sequence": "abc"})
        assert bad.status_code == 400 and "after_sequence" in bad.json()["detail"]


async def test_human_input_through_an_additional_event(client: WorkflowClient) -> None:
    handler = await client.run_workflow_nowait("ws-ask")
    stream = client.get_workflow_events(handler.handler_id)
    async for event in stream:
        if event.type == "Question":
            assert event.types == ["InputRequiredEvent"]
            assert event.value == {"prompt": "colour?"}
            break
    await stream.aclose()
    with pytest.raises(httpx.HTTPStatusError) as refused:
        await client.send_event(handler.handler_id, {"type": "NoSuchEvent", "value": {}})
    assert refused.value.response.status_code == 400
    sent = await client.send_event(handler.handler_id, Answer(text="blue"))
    assert sent.status == "sent"
    done = await client.wait_for_handler(handler.handler_id, timeout=60, poll_interval=0.1)
    assert done.result is not None and done.result.value == {"result": "you said blue"}
    with pytest.raises(httpx.HTTPStatusError) as ended:
        await client.send_event(handler.handler_id, Answer(text="again"))
    assert ended.value.response.status_code == 409


async def test_a_run_waiting_with_no_timer_is_kept_until_its_answer_comes(
    client: WorkflowClient,
) -> None:
    handler = await client.run_workflow_nowait("ws-ask-forever")
    stream = client.get_workflow_events(handler.handler_id)
    assert [e.type async for e in _until(stream, "Question")] == ["Question"]
    await asyncio.sleep(2)  # parked by now: no replica holds it, the control plane does
    assert (await client.get_handler(handler.handler_id)).status == "running"
    running = (await client.get_handlers(status=["running"])).handlers
    assert handler.handler_id in {h.handler_id for h in running}
    assert {h.status for h in running} == {"running"}
    await client.send_event(handler.handler_id, {"type": "Answer", "value": {"text": "yes"}})
    done = await client.wait_for_handler(handler.handler_id, timeout=60, poll_interval=0.1)
    assert done.result is not None and done.result.value == {"result": "yes"}
    running = (await client.get_handlers(status=["running"])).handlers
    assert handler.handler_id not in {h.handler_id for h in running}


async def _until(stream: EventStream, type_name: str) -> AsyncIterator[EventEnvelopeWithMetadata]:
    async for event in stream:
        yield event
        if event.type == type_name:
            break
    await stream.aclose()


async def test_a_failed_run_answers_500_with_the_handler(client: WorkflowClient) -> None:
    with pytest.raises(httpx.HTTPStatusError) as failed:
        await client.run_workflow("ws-fail", handler_id="ws-failed-1")
    body = failed.value.response.json()
    assert failed.value.response.status_code == 500
    assert (body["status"], body["error"], body["result"]) == ("failed", "boom", None)
    with pytest.raises(httpx.HTTPStatusError) as read:
        await client.get_handler("ws-failed-1")
    assert read.value.response.status_code == 500
    events = [e async for e in client.get_workflow_events("ws-failed-1")]
    assert [e.type for e in events] == ["WorkflowFailedEvent"]
    assert events[0].value["exception"]["exception_message"] == "boom"


async def test_cancel_then_purge(client: WorkflowClient) -> None:
    await client.run_workflow_nowait("ws-slow", handler_id="ws-cancel-1")
    with pytest.raises(httpx.HTTPStatusError) as duplicate:
        await client.run_workflow_nowait("ws-slow", handler_id="ws-cancel-1")
    assert duplicate.value.response.status_code == 409
    assert (await client.cancel_handler("ws-cancel-1")).status == "cancelled"
    cancelled = (await client.get_handlers(status=["cancelled"])).handlers
    assert "ws-cancel-1" in {h.handler_id for h in cancelled}
    events = [e async for e in client.get_workflow_events("ws-cancel-1")]
    assert [e.type for e in events] == ["WorkflowCancelledEvent"]
    with pytest.raises(httpx.HTTPStatusError) as again:  # no longer running
        await client.cancel_handler("ws-cancel-1")
    assert again.value.response.status_code == 404
    assert (await client.cancel_handler("ws-cancel-1", purge=True)).status == "deleted"
    with pytest.raises(httpx.HTTPStatusError) as gone:
        await client.get_handler("ws-cancel-1")
    assert gone.value.response.status_code == 404


async def test_of_two_runs_started_at_once_under_one_id_one_is_refused(
    client: WorkflowClient,
) -> None:
    both = await asyncio.gather(
        *(client.run_workflow_nowait("ws-slow", handler_id="ws-race-1") for _ in range(2)),
        return_exceptions=True,
    )
    refused = [r for r in both if isinstance(r, httpx.HTTPStatusError)]
    assert len(refused) == 1 and refused[0].response.status_code == 409, both
    assert refused[0].response.json() == {"detail": "Handler 'ws-race-1' is already running"}
    await client.cancel_handler("ws-race-1", purge=True)


async def test_a_finished_handler_run_again_continues_from_its_state(
    client: WorkflowClient, deployed: ControlPlaneConfig
) -> None:
    first = await client.run_workflow("ws-count", handler_id="ws-count-1")
    second = await client.run_workflow("ws-count", handler_id="ws-count-1")
    assert first.result is not None and second.result is not None
    assert (first.result.value, second.result.value) == ({"result": 1}, {"result": 2})
    assert first.run_id != second.run_id
    # the handler is a session of llama_deploy's API, each run one of its tasks
    with LlamaDeployClient(deployed) as llama_deploy:
        tasks = llama_deploy.get_session("handler.ws-count-1").get_tasks()
    assert [t.task_id for t in tasks] == [first.run_id, second.run_id]


async def test_unknown_names_are_404_and_bad_bodies_400(
    client: WorkflowClient, deployed: ControlPlaneConfig
) -> None:
    with pytest.raises(httpx.HTTPStatusError) as handler:
        await client.get_handler("no-such-handler")
    assert handler.value.response.status_code == 404
    assert handler.value.response.json() == {"detail": "Handler not found"}
    with pytest.raises(ValueError, match="Handler not found"):
        _ = [e async for e in client.get_workflow_events("no-such-handler")]
    with pytest.raises(httpx.HTTPStatusError) as workflow:
        await client.run_workflow("no-such-workflow")
    assert workflow.value.response.status_code == 404
    async with httpx.AsyncClient(base_url=deployed.url, timeout=60) as http:
        empty = await http.post("/workflows/ws-greet/run", content=b"")
        assert empty.status_code == 400 and "Invalid JSON body" in empty.json()["detail"]
        bad_id = await http.post("/workflows/ws-greet/run", json={"handler_id": "a/b"})
        assert bad_id.status_code == 400
        deep = b"[" * 100_000 + b"]" * 100_000  # deeper than Python's parser goes
        for route in ("/workflows/ws-greet/run", "/events/no-such-handler"):
            answer = await http.post(route, content=deep)
            assert answer.status_code == 400, route
            assert "nests too deeply" in answer.json()["detail"], route


async def test_schema_events_and_graph(client: WorkflowClient) -> None:
    schema = await client.get_workflow_schema("ws-named")
    assert schema.stop["title"] == "Named" and schema.start["title"] == "StartEvent"
    events = await client.get_workflow_events_schema("ws-ask")
    assert "Answer" in {e["title"] for e in events.events}  # the additional event
    graph = await client.get_workflow_graph("ws-stream")
    assert "work" in {node.id for node in graph.graph.nodes}
