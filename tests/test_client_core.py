"""The wire types the clients build and what the clients' sans-I/O core sends again, with the
retry policy behind it."""

from __future__ import annotations

import itertools
import time

import pytest
from pydantic import ValidationError
from workflows.events import HumanResponseEvent

from llama_deploy_ray import (
    InvalidRequestError,
    LlamaDeployError,
    RequestTimeoutError,
    ServiceNotFoundError,
    ServiceOverloadedError,
    TaskDefinition,
)
from llama_deploy_ray._shared.config import NEW_TASK_HEADER, workflow_route
from llama_deploy_ray._shared.errors import error_to_json

BASE = "http://127.0.0.1:8000"


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

    from llama_deploy_ray._client import core

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
        core.request_kwargs(run, BASE, deadline=time.monotonic() - 1, timeout_s=5)
    # a run's first send says its task is new (a replica may start it before the control
    # plane confirms that); a resend may follow a send that arrived, and does not
    first, resent, again = itertools.islice(run.sends(), 3)
    deadline = time.monotonic() + 5
    assert core.request_kwargs(first, BASE, deadline, 5)["headers"] == {NEW_TASK_HEADER: "1"}
    for call in (resent, again, event):
        assert "headers" not in core.request_kwargs(call, BASE, deadline, 5)
    assert resent.body == first.body  # the same task id


def test_a_call_is_sent_to_its_absolute_url_with_its_params() -> None:
    from llama_deploy_ray._client import core

    deadline = time.monotonic() + 5
    sent = core.request_kwargs(core.get_task("s1", "t1", 2.0), BASE, deadline, 5)
    assert sent["method"] == "GET"
    assert str(sent["url"]) == f"{BASE}/sessions/s1/tasks/t1"
    assert sent["params"] == {"wait_s": 2.0}
    run = core.run_task("s1", core.task_definition("svc", {"a": 1}))
    sent = core.request_kwargs(run, BASE, deadline, 5)
    assert str(sent["url"]) == f"{BASE}{workflow_route('svc')}/sessions/s1/run"
    assert "params" not in sent  # none to send
    assert sent["json"] == run.body


def test_the_retry_policy_backs_off_within_its_budget() -> None:
    from llama_deploy_ray._shared.retry import retrying_sync

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
