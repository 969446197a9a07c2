"""The outbox and the batcher: one call in flight, what is put meanwhile coalesced into the next,
in order; the batcher answers each asker from the call that carried its item."""

from __future__ import annotations

import asyncio

import pytest

from llama_deploy_ray._cluster.outbox import Batcher, Outbox


def _blocked_outbox() -> tuple[Outbox[int], list[list[int]], asyncio.Event]:
    """An outbox whose calls are noted, and land once the event is set."""
    calls: list[list[int]] = []
    release = asyncio.Event()

    async def send(batch: list[int]) -> None:
        calls.append(batch)
        await release.wait()

    return Outbox(send), calls, release


async def test_items_put_during_a_call_go_together_in_the_next() -> None:
    outbox, calls, release = _blocked_outbox()
    outbox.put(1)  # sent at once
    await asyncio.sleep(0)
    for item in (2, 3, 4):
        outbox.put(item)  # a call is on its way: these wait, together
    await asyncio.sleep(0.01)
    assert calls == [[1]]
    release.set()
    await asyncio.sleep(0.01)
    assert calls == [[1], [2, 3, 4]]


def test_a_send_that_calls_at_once_is_on_its_way_before_put_returns() -> None:
    called: list[list[int]] = []

    async def main() -> None:
        def send(batch: list[int]) -> asyncio.Future[None]:
            called.append(batch)  # e.g. an actor call's .remote(): made here, awaited later
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done

        outbox: Outbox[int] = Outbox(send)
        outbox.put(7)
        assert called == [[7]]

    asyncio.run(main())


async def test_asks_during_a_call_go_together_and_each_gets_its_own_answer() -> None:
    calls: list[list[int]] = []
    release = asyncio.Event()

    async def send(batch: list[int]) -> list[int]:
        calls.append(batch)
        await release.wait()
        return [item * 10 for item in batch]

    batcher: Batcher[int, int] = Batcher(send)
    first = asyncio.ensure_future(batcher.ask(1))
    await asyncio.sleep(0.01)
    rest = [asyncio.ensure_future(batcher.ask(item)) for item in (2, 3, 4)]
    await asyncio.sleep(0.01)
    assert calls == [[1]]  # the others wait for the call on its way
    release.set()
    assert await first == 10
    assert await asyncio.gather(*rest) == [20, 30, 40]
    assert calls == [[1], [2, 3, 4]]


async def test_a_failed_call_fails_each_of_its_asks_and_not_the_next() -> None:
    async def send(batch: list[str]) -> list[str]:
        if "bad" in batch:
            raise ConnectionError("unreachable")
        return batch

    batcher: Batcher[str, str] = Batcher(send)
    asks = [asyncio.ensure_future(batcher.ask(item)) for item in ("bad", "other")]
    for ask in asks:
        with pytest.raises(ConnectionError):
            await ask
    assert await batcher.ask("good") == "good"


async def test_hurry_sends_what_waits_at_once_when_it_holds_a_wanted_item() -> None:
    outbox, calls, release = _blocked_outbox()
    outbox.put(1)  # on its way
    outbox.put(2)
    outbox.put(3)
    outbox.hurry(lambda item: item == 9)  # none wanted: they wait for the call on its way
    await asyncio.sleep(0.01)
    assert calls == [[1]]
    outbox.hurry(lambda item: item == 3)  # sent now, beside the call on its way
    await asyncio.sleep(0.01)
    assert calls == [[1], [2, 3]]
    outbox.put(4)
    release.set()
    await asyncio.sleep(0.01)
    assert calls == [[1], [2, 3], [4]]
