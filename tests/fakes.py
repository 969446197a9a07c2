"""In-process stand-ins for Ray actor handles, for unit tests of pure logic."""

from __future__ import annotations

import asyncio
from typing import Any

from llama_deploy_ray._cluster.call_socket import Address, CallServer
from llama_deploy_ray._cluster.control_plane import ControlPlane

_SECRET = b"the in-process actor's own secret"


class ActorLike:
    """An in-memory object (a `ControlPlane`, or a stand-in for one) behind what a handle
    expects of a Ray actor: each method's `.remote(...)` returns something to await, and its
    calls are taken on a socket, as the actor takes them (`call_socket`)."""

    def __init__(self, target: object) -> None:
        self._target = target
        self._server = CallServer(target, ControlPlane, _SECRET)

    def __getattr__(self, name: str) -> object:
        method = self._call_socket if name == "call_socket" else getattr(self._target, name)

        class _Method:
            @staticmethod
            def remote(*args: object, **kwargs: object) -> asyncio.Future:
                return asyncio.ensure_future(method(*args, **kwargs))

        return _Method

    async def _call_socket(self) -> tuple[Address, bytes]:
        return await self._server.address(), _SECRET


async def begin(control_plane: Any, task: Any, owner: str, queue: bool = True) -> Any:
    """A `ControlPlane`'s `begin_tasks` for one task, as a driver begins it: its answer."""
    (answer,) = await control_plane.begin_tasks([(task, owner, False, False, queue, None)])
    return answer
