"""In-process stand-ins for Ray actor handles, for unit tests of pure logic."""

from __future__ import annotations

import asyncio
from typing import Any


class ActorLike:
    """An in-memory object (a `ControlPlane`) behind what a handle expects of a Ray actor:
    each method's `.remote(...)` returns something to await."""

    def __init__(self, target: object) -> None:
        self._target = target

    def __getattr__(self, name: str) -> object:
        method = getattr(self._target, name)

        class _Method:
            @staticmethod
            def remote(*args: object, **kwargs: object) -> asyncio.Future:
                return asyncio.ensure_future(method(*args, **kwargs))

        return _Method


async def begin(control_plane: Any, task: Any, owner: str, queue: bool = True) -> Any:
    """A `ControlPlane`'s `begin_tasks` for one task, as a driver begins it: its answer."""
    (answer,) = await control_plane.begin_tasks([(task, owner, False, False, queue, None)])
    return answer
