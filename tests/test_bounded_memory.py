"""Bounded memory on a real local Ray: capped streams, paged listings, sessions forgotten."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
import pytest_asyncio
import ray

from llama_deploy_ray import (
    ControlPlaneConfig,
    LlamaDeployClient,
    deploy_workflow,
)
from llama_deploy_ray._cluster.actors import ControlPlaneShard
from llama_deploy_ray._cluster.control_plane import ControlPlane

from .conftest import MAX_EVENTS_PER_TASK, service, wait_for
from .workflows import (
    ManyEventsWorkflow,
)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def deployed(control_plane_config: ControlPlaneConfig) -> ControlPlaneConfig:
    await deploy_workflow(ManyEventsWorkflow(), service("many_events"), control_plane_config)
    return control_plane_config


# bounded memory


def test_a_stream_past_its_cap_drops_its_oldest_events_with_a_marker(
    client: LlamaDeployClient,
) -> None:
    extra = 100
    session = client.create_session()
    task_id = session.run_nowait("many_events", n=MAX_EVENTS_PER_TASK + extra)
    # read as they happen from the replica that runs the task, every event comes
    live = list(session.get_task_result_stream(task_id))
    assert [e["__seq__"] for e in live] == list(range(1, MAX_EVENTS_PER_TASK + extra + 1))
    # read again, from the control plane, which keeps the last MAX_EVENTS_PER_TASK
    events = list(session.get_task_result_stream(task_id))
    marker, kept = events[0], events[1:]
    assert (marker["__type__"], marker["dropped"], marker["__seq__"]) == (
        "EventsDropped",
        extra,
        extra,
    )
    assert [e["step"] for e in kept] == list(range(extra, MAX_EVENTS_PER_TASK + extra))
    assert kept[-1]["__seq__"] == MAX_EVENTS_PER_TASK + extra
    resumed = list(session.get_task_result_stream(task_id, after=kept[9]["__seq__"]))
    assert resumed == kept[10:]


def test_listings_come_a_page_at_a_time(
    client: LlamaDeployClient, deployed: ControlPlaneConfig
) -> None:
    for _ in range(3):
        client.create_session()
    page = httpx.get(f"{deployed.url}/sessions", params={"limit": 2}, timeout=30)
    assert page.is_success and len(page.json()) == 2
    next_page = httpx.get(f"{deployed.url}/sessions", params={"offset": 2, "limit": 2}, timeout=30)
    assert {s["session_id"] for s in page.json()}.isdisjoint(
        s["session_id"] for s in next_page.json()
    )
    too_many = httpx.get(f"{deployed.url}/sessions", params={"limit": 100_000}, timeout=30)
    assert too_many.status_code == 422


@pytest.mark.timeout(600)
def test_a_hundred_thousand_sessions_are_forgotten_on_time(control_plane_config) -> None:
    # a control plane of its own, so that its memory is this test's alone; its sessions are
    # created on its call socket, as the cluster's processes call it (100,000 in 10-30 s
    # here, against a minute or more as Ray calls), and kept 60 s
    actor = (
        ray.remote(ControlPlane)
        .options(num_cpus=0)
        .remote(task_retention_s=1.0, session_retention_s=60.0, state_secret=b"s" * 32)
    )
    ray.get(actor.ready.remote())
    shard = ControlPlaneShard(actor)

    async def create(count: int) -> None:
        for _ in range(count // 10_000):
            await asyncio.gather(*(shard.create_session(uuid.uuid4().hex) for _ in range(10_000)))

    async def create_them() -> tuple[dict[str, int], dict[str, int]]:
        await create(10_000)  # the socket's and Ray's own memory settle first
        baseline = await actor.sizes.remote()
        await create(100_000)
        return baseline, await actor.sizes.remote()

    def sizes() -> dict[str, int]:
        return ray.get(actor.sizes.remote())

    baseline, full = asyncio.run(create_them())
    assert full["sessions"] >= 100_000
    grown = full["rss_bytes"] - baseline["rss_bytes"]
    assert grown > 50_000_000  # they took memory
    # no task ends meanwhile: only the retention timer can forget them
    after = wait_for(
        lambda: (s := sizes())["sessions"] == 0 and s,
        timeout_s=300,
        what="the idle sessions to be dropped",
    )
    assert after["rss_bytes"] - baseline["rss_bytes"] < 0.2 * grown, (baseline, full, after)
    ray.kill(actor)
