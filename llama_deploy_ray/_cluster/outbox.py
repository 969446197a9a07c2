"""One call in flight, the rest coalesced: how a driver sends what it produces quickly (the
outcomes of the runs it finishes, the tasks it begins) to the control plane.

Items put while a call is on its way go together in the next call, so under load one call
carries many items, and items leave in the order they were put. An `Outbox` sends without
waiting for answers; a `Batcher` gives each asker the answer to its own item.

    outbox = Outbox(send_outcomes)  # def send_outcomes(batch) -> awaitable
    outbox.put(outcome)             # sent at once when no call is on its way

    batcher = Batcher(send_begins)  # async def send_begins(batch) -> list of answers
    answer = await batcher.ask(item)  # the answer to this item, from the call that carried it
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Outbox(Generic[T]):
    def __init__(
        self,
        send: Callable[[list[T]], Awaitable[Any]],
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]] = asyncio.ensure_future,
    ) -> None:
        """`send(batch)` is called when the batch leaves (a send that makes its call at once,
        such as an actor call's `.remote`, is on its way before `put` returns); `spawn` runs
        the background sender (give a driver's, so that draining it waits for the sends)."""
        self._send = send
        self._spawn = spawn
        self._items: list[T] = []
        self._sending: asyncio.Task[None] | None = None

    def put(self, item: T) -> None:
        self._items.append(item)
        if self._sending is None or self._sending.done():
            self._sending = self._spawn(self._drain(self._send(self._take())))

    def hurry(self, wanted: Callable[[T], bool]) -> None:
        """If an item `wanted` waits for the call on its way, send what waits now, in a call
        of its own: something that must follow it is about to be sent."""
        if any(wanted(item) for item in self._items):
            self._spawn(self._drain(self._send(self._take())))

    def _take(self) -> list[T]:
        batch, self._items = self._items, []
        return batch

    async def _drain(self, first: Awaitable[Any]) -> None:
        await first
        while self._items:
            await self._send(self._take())


class Batcher(Generic[T, R]):
    def __init__(self, send: Callable[[list[T]], Awaitable[list[R]]]) -> None:
        """`send(batch)` answers each item of the batch, in order."""
        self._send = send
        self._asked: list[tuple[T, asyncio.Future[R]]] = []
        self._sending: asyncio.Task[None] | None = None

    async def ask(self, item: T) -> R:
        answer: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._asked.append((item, answer))
        if self._sending is None or self._sending.done():
            self._sending = asyncio.ensure_future(self._drain())
        return await answer

    async def _drain(self) -> None:
        while self._asked:
            asked, self._asked = self._asked, []
            try:
                answers = await self._send([item for item, _ in asked])
            except Exception as exc:  # the call failed: so did each of its items
                for _, answer in asked:
                    if not answer.done():
                        answer.set_exception(exc)
                continue
            for (_, answer), value in zip(asked, answers, strict=True):
                if not answer.done():  # its asker may have gone
                    answer.set_result(value)
