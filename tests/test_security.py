"""Secure by default, on a real local Ray: client data is never unpickled, API keys guard every
route, cross-site requests are refused, and bad requests get a 4xx with a JSON message."""

from __future__ import annotations

import asyncio
import base64
import json
import pickle
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import pytest_asyncio

# imported at collection, not lazily mid-suite: CPython 3.11 can fail to compile a module
# after an earlier RecursionError in the process ("AST constructor recursion depth mismatch")
import schemathesis
import schemathesis.specs.openapi.coverage._operation
import schemathesis.specs.openapi.schemas
from hypothesis import HealthCheck, Phase, settings
from pydantic import SecretStr
from ray.experimental import internal_kv
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from llama_deploy_ray import (
    ControlPlaneConfig,
    LlamaDeployClient,
    ServiceNotFoundError,
    TaskDefinition,
    UnauthorizedError,
    deploy_workflow,
)
from llama_deploy_ray._cluster.guard import _KV_KEY, REFRESH_S, publish_guard
from llama_deploy_ray._shared.config import workflow_route
from llama_deploy_ray_haproxy import bind_admin_pages

from .conftest import service, wait_for
from .workflows import ChatWorkflow, EchoWorkflow, StreamingWorkflow


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def deployed(control_plane_config: ControlPlaneConfig) -> ControlPlaneConfig:
    await asyncio.gather(
        deploy_workflow(ChatWorkflow(), service("chat"), control_plane_config),
        deploy_workflow(EchoWorkflow(), service("s_echo"), control_plane_config),
        deploy_workflow(StreamingWorkflow(), service("s_streaming"), control_plane_config),
    )
    return control_plane_config


class LeavesAMark:
    """Unpickled, it creates the file it names."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_client_data_kept_in_state_is_never_unpickled(
    client: LlamaDeployClient, tmp_path: Path
) -> None:
    mark = tmp_path / "unpickled"
    attack = base64.b64encode(pickle.dumps(LeavesAMark(mark))).decode()
    session = client.create_session()
    assert session.run("chat", message=attack) is None
    # the next task restores the state that holds the client's string, which comes back as
    # that string: llama-index's PickleSerializer would have unpickled it here
    assert session.run("chat", message="hello") == attack
    assert session.run("chat", message="again") == "hello"
    assert not mark.exists()


# bad requests: a 4xx with a JSON message, never a 500


def test_bad_requests_get_a_4xx_with_a_json_message(
    client: LlamaDeployClient, deployed: ControlPlaneConfig
) -> None:
    session, other = client.create_session(), client.create_session()
    url = deployed.url
    run = f"{url}{workflow_route('s_echo')}/sessions/{session.session_id}/run"
    deep = "[" * 100_000 + "]" * 100_000
    parent = TaskDefinition(input="{}", agent_id="s_echo")
    client.get_session(other.session_id).create_task(parent)
    cases = {
        "deeply nested input": ("POST", run, {"input": '{"a": ' + deep + "}"}),
        "input nested past the limit": (
            "POST",
            run,
            {"input": json.dumps({"a": json.loads("[" * 65 + "]" * 65)})},
        ),
        "an event type that is a list": (
            "POST",
            f"{url}/sessions/{session.session_id}/tasks/t/events",
            {"service_name": "s_echo", "event": {"__type__": ["x"]}},
        ),
        "a wrong field type": ("POST", run, {"input": 42}),
        "an unknown field": ("POST", run, {"input": "{}", "surprise": 1}),
        "a task id with a slash": ("POST", run, {"input": "{}", "task_id": "a/b"}),
        "a task id that is too long": ("POST", run, {"input": "{}", "task_id": "a" * 200}),
        "a parent task of another session": (
            "POST",
            f"{url}/sessions/{session.session_id}/tasks",
            {"input": "{}", "agent_id": "s_echo", "parent_task_id": parent.task_id},
        ),
        "a session id with a space": ("PUT", f"{url}/sessions/a%20b", None),
        "a page too large": ("GET", f"{url}/sessions?limit=1000000", None),
    }
    for what, (method, target, body) in cases.items():
        answer = httpx.request(method, target, json=body, timeout=30)
        assert 400 <= answer.status_code < 500, (what, answer.status_code, answer.text[:300])
        assert isinstance(answer.json(), dict), what
    # nothing was created in either session by what was refused
    assert session.get_tasks() == []
    assert [t.task_id for t in client.get_session(other.session_id).get_tasks()] == [parent.task_id]


def test_bodies_past_the_limit_get_413_before_they_are_read(deployed: ControlPlaneConfig) -> None:
    limit = ControlPlaneConfig().max_request_bytes
    huge = b'{"input": "' + b"x" * (limit + 10) + b'"}'

    def chunked() -> Iterator[bytes]:  # no Content-Length: the guard counts
        for start in range(0, len(huge), 65536):
            yield huge[start : start + 65536]

    targets = (
        f"{deployed.url}/sessions/create",
        f"{deployed.url}{workflow_route('s_echo')}/sessions/s1/run",
    )
    for target in targets:
        for body in (huge, chunked()):
            answer = httpx.post(target, content=body, timeout=60)
            assert answer.status_code == 413, (target, answer.text[:200])
            assert answer.json()["error"] == "PayloadTooLargeError"


def test_cross_site_requests_are_refused(
    client: LlamaDeployClient, deployed: ControlPlaneConfig
) -> None:
    session = client.create_session()
    evil = {"Origin": "http://evil.example"}
    run = f"{deployed.url}{workflow_route('s_echo')}/sessions/{session.session_id}/run"
    for target in (f"{deployed.url}/sessions/create", run):
        answer = httpx.post(target, headers=evil, json={"input": "{}"}, timeout=30)
        assert answer.status_code == 403 and answer.json()["error"] == "ForbiddenError"
    assert session.get_tasks() == []
    # reads are not refused, and the site itself may post
    assert httpx.get(f"{deployed.url}/services", headers=evil, timeout=30).is_success
    same_site = {"Origin": deployed.url}
    answer = httpx.post(run, headers=same_site, json={"input": '{"arg1": "x"}'}, timeout=30)
    assert answer.is_success and answer.json()["result"] == "x_result"


# API keys (this module's last tests: they turn keys on for the shared core, then off)


APP_ORIGIN = "http://app.example:3000"


def with_key(config: ControlPlaneConfig, key: str) -> ControlPlaneConfig:
    return config.model_copy(update={"api_key": SecretStr(key)})


@pytest.fixture(scope="module")
def keyed(deployed: ControlPlaneConfig) -> Iterator[ControlPlaneConfig]:
    keyed = with_key(deployed, "new-key,old-key")
    publish_guard(keyed.model_copy(update={"allowed_origins": [APP_ORIGIN]}))
    run = f"{deployed.url}{workflow_route('s_echo')}/sessions/s1/run"

    def refused(expected: bool) -> bool:
        answers = (
            httpx.get(f"{deployed.url}/services", timeout=30),
            httpx.post(run, json={"input": "{}"}, timeout=30),
        )
        return all((a.status_code == 401) == expected for a in answers)

    # each replica (two of the API) reads the settings again at its first request past
    # REFRESH_S since its last read: after that long, every replica's next answer obeys them
    time.sleep(REFRESH_S)
    wait_for(lambda: refused(True), timeout_s=REFRESH_S * 3, what="the keys to take effect")
    yield keyed
    internal_kv._internal_kv_del(_KV_KEY, namespace=deployed.namespace)
    time.sleep(REFRESH_S)
    wait_for(lambda: refused(False), timeout_s=REFRESH_S * 3, what="the keys to be dropped")


def test_without_a_key_every_route_answers_401_and_changes_nothing(
    keyed: ControlPlaneConfig,
) -> None:
    url = keyed.url
    run = f"{url}{workflow_route('s_echo')}/sessions/s1/run"
    attempts = [
        ("GET", f"{url}/services", None),
        ("GET", f"{url}/sessions", None),
        ("POST", f"{url}/services/deregister?service_name=s_echo", None),
        ("POST", f"{url}/sessions/create", None),
        ("POST", run, {"input": "{}"}),
        ("GET", f"{url}/sessions/s1/tasks/t1/events", None),
    ]
    for header in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "new-key"}):
        for method, target, body in attempts:
            answer = httpx.request(method, target, json=body, headers=header, timeout=30)
            assert answer.status_code == 401, (method, target, header)
            assert answer.json()["error"] == "UnauthorizedError"
    assert httpx.get(f"{url}/health", timeout=30).json() == {"status": "healthy"}
    with LlamaDeployClient(with_key(keyed, "old-key")) as client:
        assert "s_echo" in {s.service_name for s in client.list_services()}  # not deregistered
    with LlamaDeployClient(with_key(keyed, "wrong")) as client, pytest.raises(UnauthorizedError):
        client.list_services()


def test_clients_with_either_key_work_everywhere(keyed: ControlPlaneConfig) -> None:
    for key in ("new-key", "old-key"):  # two keys at once: one can be rotated out
        with LlamaDeployClient(with_key(keyed, key)) as client:
            session = client.create_session()
            assert session.run("s_echo", arg1="k") == "k_result"
            task_id = session.run_nowait("s_streaming", pause=0.05)
            assert [e["step"] for e in session.get_task_result_stream(task_id)] == [0, 1, 2]
            with pytest.raises(ServiceNotFoundError):
                client.get_service("nope")


def test_an_allowed_origin_gets_cors_and_others_do_not(keyed: ControlPlaneConfig) -> None:
    run = f"{keyed.url}{workflow_route('s_echo')}/sessions/cors/run"
    httpx.put(f"{keyed.url}/sessions/cors", headers=keyed.auth_headers(), timeout=30)
    preflight = {"Access-Control-Request-Method": "POST"}
    for target in (f"{keyed.url}/sessions/create", run):
        allowed = httpx.options(target, headers={"Origin": APP_ORIGIN, **preflight}, timeout=30)
        assert allowed.status_code == 204
        assert allowed.headers["access-control-allow-origin"] == APP_ORIGIN
        assert "Authorization" in allowed.headers["access-control-allow-headers"]
        other = {"Origin": "http://evil.example", **preflight}
        assert httpx.options(target, headers=other, timeout=30).status_code == 403
    answer = httpx.post(
        run,
        headers={"Origin": APP_ORIGIN, **keyed.auth_headers()},
        json={"input": '{"arg1": "cors"}'},
        timeout=30,
    )
    assert answer.is_success and answer.json()["result"] == "cors_result"
    assert answer.headers["access-control-allow-origin"] == APP_ORIGIN
    listed = httpx.get(
        f"{keyed.url}/services", headers={"Origin": APP_ORIGIN, **keyed.auth_headers()}
    )
    assert listed.headers["access-control-allow-origin"] == APP_ORIGIN
    plain = httpx.get(f"{keyed.url}/services", headers=keyed.auth_headers(), timeout=30)
    assert "access-control-allow-origin" not in plain.headers  # CORS is off for the rest


# fuzzed: every route of the API's OpenAPI schema, with and without the key


@pytest.fixture(scope="module")
def api_schema(keyed: ControlPlaneConfig):
    return schemathesis.openapi.from_url(
        f"{keyed.url}/openapi.json", headers={"Authorization": "Bearer new-key"}, timeout=30
    )


fuzzed = schemathesis.pytest.from_fixture("api_schema")


@fuzzed.parametrize()
@settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate],
)
def test_fuzzed_requests_never_get_a_5xx(case) -> None:
    checks = [not_a_server_error, response_schema_conformance]
    for headers in ({"Authorization": "Bearer new-key"}, {}):
        case.call_and_validate(headers=headers, checks=checks, timeout=30)


def test_haproxy_admin_pages_listen_on_loopback_and_traffic_where_serve_put_it(
    control_plane_config: ControlPlaneConfig,
) -> None:
    """Serve's fast mode (the shared core runs in it) would bind HAProxy's stats page and
    metrics to every interface; they listen on 127.0.0.1, and the API where it is configured."""
    haproxies = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "haproxy"]
    assert haproxies, "the shared core runs Serve's HAProxy"
    listening = {
        c.laddr.port: c.laddr.ip
        for p in haproxies
        for c in p.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN
    }
    assert listening == {
        8404: "127.0.0.1",
        9101: "127.0.0.1",
        control_plane_config.port: control_plane_config.host,
    }
    # the real HAProxy answers there: the program Serve ran became it
    assert httpx.get("http://127.0.0.1:8404/stats", timeout=10).status_code == 200
    assert "haproxy_process" in httpx.get("http://127.0.0.1:9101/metrics", timeout=10).text


def test_only_the_admin_sections_of_a_haproxy_config_are_rebound() -> None:
    config = (
        "frontend prometheus\n"
        "    bind :9101\n"
        "    mode http\n"
        "frontend http_frontend\n"
        "    bind 0.0.0.0:8000\n"
        "backend b\n"
        "    server s1 10.0.0.2:30000 check\n"
        "listen stats\n"
        "  bind *:8404\n"
        "  stats enable\n"
    )
    assert bind_admin_pages(config, "127.0.0.1") == config.replace(
        "bind :9101", "bind 127.0.0.1:9101"
    ).replace("bind *:8404", "bind 127.0.0.1:8404")
