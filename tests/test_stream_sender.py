"""The stream sender: a replica's runs' events leave together after the linger, one call in
flight; a run that ends takes what was not sent, once what was sent has landed."""

from __future__ import annotations

import asyncio
from typing import Any

from llama_deploy_ray._cluster.stream_sender import StreamSender
from llama_deploy_ray._shared.config import STREAM_LINGER_S

Events = dict[str, list[dict[str, Any]]]


class Shard:
    def __init__(self, delay_s: float = 0.0) -> None:
        self.calls: list[Events] = []
        self.landed: list[Events] = []
        self.delay_s = delay_s
        self.fail = False

    async def append_events(self, events: Events) -> None:
        self.calls.append(events)
        await asyncio.sleep(self.delay_s)
        if self.fail:
            self.fail = False
            raise ConnectionError("unreachable")
        self.landed.append(events)


def sender(shard: Shard) -> StreamSender:
    return StreamSender(shard)  # type: ignore[arg-type]


async def test_runs_events_leave_together_and_a_short_runs_go_with_its_outcome() -> None:
    shard = Shard()
    streams = sender(shard)
    a, b, short = streams.stream("a", None), streams.stream("b", None), streams.stream("s", None)
    a.put({"n": 1})
    b.put({"n": 1})
    short.put({"n": 1})
    a.put({"n": 2})
    assert await short.take() == [{"n": 1}]  # it ended within the linger: no call of its own
    await asyncio.sleep(STREAM_LINGER_S * 2)
    assert shard.calls == [{"a": [{"n": 1}, {"n": 2}], "b": [{"n": 1}]}]  # one call for both
    a.put({"n": 3})
    assert await a.take() == [{"n": 3}]
    assert await b.take() == []
    await asyncio.sleep(STREAM_LINGER_S * 2)
    assert len(shard.calls) == 1


async def test_a_run_that_ends_waits_for_the_call_carrying_its_events() -> None:
    shard = Shard(delay_s=0.2)
    streams = sender(shard)
    run = streams.stream("a", None)
    run.put({"n": 1})
    await asyncio.sleep(STREAM_LINGER_S * 1.5)  # the call is on its way
    run.put({"n": 2})
    assert await run.take() == [{"n": 2}]
    assert shard.landed == [{"a": [{"n": 1}]}]  # landed before the rest was handed over


async def test_a_run_started_ahead_streams_nothing_before_it_is_recorded() -> None:
    shard = Shard()
    streams = sender(shard)
    recorded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    run = streams.stream("a", recorded)
    run.put({"n": 1})
    await asyncio.sleep(STREAM_LINGER_S * 2)
    assert shard.calls == []
    recorded.set_result(None)
    run.put({"n": 2})  # what waited goes first
    await asyncio.sleep(STREAM_LINGER_S * 2)
    assert shard.calls == [{"a": [{"n": 1}, {"n": 2}]}]
    refused: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    refused.cancel()  # its begin was refused: the run is cancelled, nothing of it is sent
    streams.stream("b", refused).put({"n": 1})
    await asyncio.sleep(STREAM_LINGER_S * 2)
    assert len(shard.calls) == 1


async def test_a_failed_call_is_logged_and_the_next_goes_on(caplog) -> None:
    shard = Shard()
    shard.fail = True
    streams = sender(shard)
    first = streams.stream("a", None)
    first.put({"n": 1})
    await asyncio.sleep(STREAM_LINGER_S * 2)
    assert await first.take() == []
    assert "did not log events of 1 tasks" in caplog.text
    second = streams.stream("b", None)
    second.put({"n": 1})
    await asyncio.sleep(STREAM_LINGER_S * 2)
    assert shard.landed == [{"b": [{"n": 1}]}]
