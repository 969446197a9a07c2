"""The core's two actors, the control plane and the orchestrator: their names, how they are
started, and the typed handles every other module calls them through.

A handle's methods are the actor's, typed. The control plane's travel on its call socket
(`_call_socket`: a Ray actor call costs about a millisecond of CPU on each side, a frame there
a few hundredths), the orchestrator's as Ray calls. Calls that are safe to repeat (reads, and
the drivers' calls, which the control plane makes idempotent) are sent again while the actor
restarts (`_retry.call_actor`); the others (creating a session, deleting one, cancelling a
task, sending an event) are sent once, and a restart shows as `ControlPlaneUnavailableError`
to whoever asked. Two calls are sent now and answered later, for callers that collect the
answer afterwards: `finish_tasks_sent` and `heartbeat_ref` (a Ray call: the heartbeat beats
from a thread of its own, without an event loop).

The control plane may be several actors, shards that each hold the sessions whose id hashes
to them (`ControlPlaneConfig.shards`). `ControlPlaneHandle` is the whole control plane: what
spans sessions (the registry of services, listings, sizes) it asks of every shard, and
`for_session` gives the shard (`ControlPlaneShard`) that holds a session, its tasks, their
events and its state.

    control_plane = ControlPlaneHandle.lookup(namespace)
    result = await control_plane.for_session(session_id).get_task(session_id, task_id, wait_s=30)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.exceptions import ActorUnavailableError, RayActorError

from .._shared.config import (
    ACTOR_MAX_CONCURRENCY,
    ORCHESTRATOR_ACTOR_NAME,
    control_plane_actor_name,
)
from .._shared.errors import ControlPlaneUnavailableError, LlamaDeployError, ServiceNotFoundError
from .._shared.events import EventBatch
from .._shared.retry import call_actor
from .._shared.types import (
    DriverNotice,
    FinishedTasks,
    ServiceDefinition,
    SessionDefinition,
    StartedTask,
    TaskDefinition,
    TaskOutcome,
    TaskResult,
    TaskStatus,
)
from .call_socket import Address, CallClient
from .outbox import Batcher

# Ray's resource that only the head node has: the core's actors live there, as Serve's
# controller does, so the control plane's SQLite file is always on the same machine.
HEAD_NODE_RESOURCE = "node:__internal_head__"


def core_actor_options(name: str, namespace: str) -> dict[str, Any]:
    """One detached, restarting actor of the core, on the head node."""
    return {
        "name": name,
        "namespace": namespace,
        "lifetime": "detached",
        "get_if_exists": True,
        "max_restarts": -1,
        "max_concurrency": ACTOR_MAX_CONCURRENCY,
        "num_cpus": 0,
        "resources": {HEAD_NODE_RESOURCE: 0.001},
    }


class _Handle:
    def __init__(self, actor: ActorHandle, name: str) -> None:
        # Ray's type hints do not know an actor's methods' `.remote`
        self._actor: Any = actor
        self._name = name

    async def _call(self, make: Callable[[], Any], *, again: bool = True) -> Any:
        """Await the call `make()` sends, sent again while the actor restarts if `again`;
        an actor still unreachable is a `ControlPlaneUnavailableError`."""
        try:
            return await (call_actor(make) if again else make())
        except (RayActorError, ActorUnavailableError) as exc:
            raise ControlPlaneUnavailableError(
                f"the core's {self._name} is unreachable ({type(exc).__name__}); Ray restarts "
                "it within seconds: retry shortly"
            ) from exc

    def wait_ready(self) -> None:
        """Block until the actor has started (the control plane loads its store first)."""
        ray.get(self._actor.ready.remote())

    def kill(self) -> None:
        """Stop the actor for good (`llama-deploy-ray down`); its state store stays."""
        ray.kill(self._actor, no_restart=True)


def _lookup(name: str, namespace: str) -> ActorHandle:
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError as exc:
        raise ControlPlaneUnavailableError(
            f"no {name} in the Ray cluster at {ray.get_runtime_context().gcs_address} "
            f"(namespace {namespace!r}); start the core with deploy_core(...) first"
        ) from exc


class ControlPlaneShard(_Handle):
    """One control plane actor (`_control_plane.ControlPlane`), typed."""

    def __init__(self, actor: ActorHandle, shard: int = 0) -> None:
        super().__init__(actor, f"control plane (shard {shard})")
        self._begins: Batcher[
            tuple[TaskDefinition, str, bool, bool, bool, str | None],
            StartedTask | TaskResult | LlamaDeployError | None,
        ] = Batcher(self._begin_tasks)
        self._socket = CallClient(self._socket_address)

    async def _socket_address(self) -> tuple[Address, bytes]:
        return await call_actor(self._actor.call_socket.remote)

    async def _ask(self, method: str, *args: Any, again: bool = True) -> Any:
        """The actor's `method(*args)`, sent on its socket (see `_call_socket`)."""
        return await self._call(functools.partial(self._socket.send, method, *args), again=again)

    # the cluster

    def shard_count_blocking(self) -> int:
        return ray.get(self._actor.shard_count.remote())

    async def state_secret(self) -> bytes:
        return await self._ask("state_secret")

    def state_secret_blocking(self) -> bytes:
        """For a replica's constructor, which runs before its event loop takes calls."""
        return ray.get(self._actor.state_secret.remote())

    async def sizes(self) -> dict[str, int]:
        return await self._ask("sizes")

    # services

    async def register_service(
        self,
        definition: ServiceDefinition,
        accepted_events: list[str] | None = None,
        deployment: str | None = None,
    ) -> ServiceDefinition:
        return await self._ask("register_service", definition, accepted_events, deployment)

    async def deregister_service(self, service_name: str) -> None:
        await self._ask("deregister_service", service_name, again=False)

    async def get_service(self, service_name: str) -> ServiceDefinition:
        return await self._ask("get_service", service_name)

    async def list_services(self) -> list[ServiceDefinition]:
        return await self._ask("list_services")

    async def deployments(self) -> dict[str, str]:
        return await self._ask("deployments")

    async def service_tasks(self, service_name: str) -> dict[str, int]:
        return await self._ask("service_tasks", service_name)

    # sessions

    async def create_session(self, session_id: str) -> SessionDefinition:
        return await self._ask("create_session", session_id, again=False)

    async def get_or_create_session(self, session_id: str) -> SessionDefinition:
        return await self._ask("get_or_create_session", session_id)

    async def get_session(self, session_id: str) -> SessionDefinition:
        return await self._ask("get_session", session_id)

    async def list_sessions(self, offset: int, limit: int | None) -> list[SessionDefinition]:
        return await self._ask("list_sessions", offset, limit)

    async def delete_session(self, session_id: str) -> None:
        await self._ask("delete_session", session_id, again=False)

    async def get_session_state(self, session_id: str) -> dict[str, dict[str, Any]]:
        return await self._ask("get_session_state", session_id)

    # tasks

    async def begin_task(
        self,
        task: TaskDefinition,
        owner: str,
        handler: bool = False,
        queue: bool = True,
        resent: bool = False,
        held: str | None = None,
    ) -> StartedTask | TaskResult | None:
        """The control plane's `begin_tasks` for one task: begins asked while a call is on its
        way go together in the next call (under load, one call begins many tasks). `resent`:
        an earlier begin of it got no answer; `held`: as in `begin_tasks`."""
        answer = await self._begins.ask((task, owner, handler, queue, resent, held))
        if isinstance(answer, LlamaDeployError):
            raise answer
        return answer

    async def _begin_tasks(
        self, begins: list[tuple[TaskDefinition, str, bool, bool, bool, str | None]]
    ) -> list[StartedTask | TaskResult | LlamaDeployError | None]:
        sent = 0

        def begin() -> Awaitable[Any]:
            nonlocal sent
            sent += 1  # a call sent again says so: the tasks it may have begun are its own
            return self._socket.send(
                "begin_tasks",
                [
                    (task, owner, resent or sent > 1, handler, queue, held)
                    for task, owner, handler, queue, resent, held in begins
                ],
            )

        return await self._call(begin)

    async def start_task(self, task_id: str, owner: str) -> StartedTask | None:
        return await self._ask("start_task", task_id, owner)

    async def record_retry(self, task_id: str) -> None:
        await self._ask("record_retry", task_id)

    async def park_task(self, task_id: str, outcome: TaskOutcome) -> StartedTask | None:
        return await self._ask("park_task", task_id, outcome)

    async def deliver_event(
        self, session_id: str, task_id: str, service_name: str, event: dict[str, Any], owner: str
    ) -> StartedTask | None:
        return await self._ask(
            "deliver_event", session_id, task_id, service_name, event, owner, again=False
        )

    async def read_inbox(self, task_id: str, after: int, wait_s: float) -> EventBatch:
        return await self._ask("read_inbox", task_id, after, wait_s)

    async def append_events(self, events: dict[str, list[dict[str, Any]]]) -> None:
        await self._ask("append_events", events)

    async def read_events(
        self, session_id: str, task_id: str, after: int, wait_s: float
    ) -> EventBatch:
        return await self._ask("read_events", session_id, task_id, after, wait_s)

    async def cancel_task(self, session_id: str, task_id: str) -> TaskResult:
        return await self._ask("cancel_task", session_id, task_id, again=False)

    async def finish_task(self, task_id: str, outcome: TaskOutcome) -> TaskResult:
        return await self._ask("finish_task", task_id, outcome)

    def finish_tasks_sent(
        self, outcomes: dict[str, TaskOutcome], hold_states: bool
    ) -> Awaitable[FinishedTasks]:
        """`finish_tasks`, sent now (once connected, when not yet); await its answer."""
        return self._socket.send("finish_tasks", outcomes, hold_states)

    async def get_task(
        self, session_id: str | None, task_id: str, wait_s: float = 0.0
    ) -> TaskResult:
        return await self._ask("get_task", session_id, task_id, wait_s)

    async def list_tasks(self, session_id: str, offset: int, limit: int | None) -> list[TaskResult]:
        return await self._ask("list_tasks", session_id, offset, limit)

    async def get_current_task(self, session_id: str) -> TaskResult | None:
        return await self._ask("get_current_task", session_id)

    async def latest_tasks(
        self, session_prefix: str, statuses: set[TaskStatus] | None, services: set[str] | None
    ) -> list[TaskResult]:
        """Asked a page at a time: one answer of a day's handlers would hold the actor's other
        calls for as long as it takes to pickle (a quarter of a second per 50,000)."""
        found: list[TaskResult] = []
        after: int | None = -1
        while after is not None:
            page, after = await self._ask("latest_tasks", session_prefix, statuses, services, after)
            found += page
        return found

    # drivers

    def heartbeat_ref(self, driver_id: str) -> ray.ObjectRef:
        return self._actor.heartbeat.remote(driver_id)

    async def watch_driver(
        self, driver_id: str, wait_s: float, adopt_orphans: bool, incarnation: str
    ) -> DriverNotice:
        return await self._ask("watch_driver", driver_id, wait_s, adopt_orphans, incarnation)


def shard_of(session_id: str, shards: int) -> int:
    """The shard that holds a session: a hash that every process computes alike (Python's
    `hash` of a string differs between processes)."""
    if shards == 1:
        return 0
    digest = hashlib.blake2b(session_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


class ControlPlaneHandle:
    """The whole control plane: its shards, and what spans them."""

    def __init__(self, shards: list[ControlPlaneShard]) -> None:
        self.shards = shards

    @classmethod
    def lookup(cls, namespace: str) -> ControlPlaneHandle:
        first = ControlPlaneShard(_lookup(control_plane_actor_name(0), namespace))
        count = first.shard_count_blocking()
        others = [
            ControlPlaneShard(_lookup(control_plane_actor_name(i), namespace), i)
            for i in range(1, count)
        ]
        return cls([first, *others])

    def for_session(self, session_id: str | None) -> ControlPlaneShard:
        """The shard that holds this session, its tasks and its state."""
        if len(self.shards) == 1:
            return self.shards[0]
        return self.shards[shard_of(session_id or "", len(self.shards))]

    def wait_ready(self) -> None:
        for shard in self.shards:
            shard.wait_ready()

    def kill(self) -> None:
        for shard in self.shards:
            shard.kill()

    async def state_secret(self) -> bytes:
        return await self.shards[0].state_secret()  # every shard was given the same

    def state_secret_blocking(self) -> bytes:
        """For a replica's constructor, which runs before its event loop takes calls."""
        return self.shards[0].state_secret_blocking()

    async def sizes(self) -> dict[str, int]:
        """What the shards hold, summed."""
        total: dict[str, int] = {"shards": len(self.shards)}
        for sizes in await asyncio.gather(*(s.sizes() for s in self.shards)):
            for name, value in sizes.items():
                total[name] = total.get(name, 0) + value
        return total

    # services: every shard keeps the registry; shard 0 decides

    async def register_service(
        self,
        definition: ServiceDefinition,
        accepted_events: list[str] | None = None,
        deployment: str | None = None,
    ) -> ServiceDefinition:
        """Shard 0 first, so a conflicting name is refused before any shard changes; the
        others then take the same registration (repeatable: sent again, it changes nothing)."""
        first, *others = self.shards
        registered = await first.register_service(definition, accepted_events, deployment)
        await asyncio.gather(
            *(s.register_service(definition, accepted_events, deployment) for s in others)
        )
        return registered

    async def deregister_service(self, service_name: str) -> None:
        first, *others = self.shards
        await first.deregister_service(service_name)  # ServiceNotFoundError if it is not
        for shard in others:  # gone already where an earlier attempt got to
            with contextlib.suppress(ServiceNotFoundError):
                await shard.deregister_service(service_name)

    async def get_service(self, service_name: str) -> ServiceDefinition:
        return await self.shards[0].get_service(service_name)

    async def list_services(self) -> list[ServiceDefinition]:
        return await self.shards[0].list_services()

    async def deployments(self) -> dict[str, str]:
        return await self.shards[0].deployments()

    async def service_tasks(self, service_name: str) -> dict[str, int]:
        """The service's unfinished tasks on every shard, counted by status."""
        total: dict[str, int] = {}
        for counts in await asyncio.gather(*(s.service_tasks(service_name) for s in self.shards)):
            for status, count in counts.items():
                total[status] = total.get(status, 0) + count
        return total

    # sessions

    async def create_session(self) -> SessionDefinition:
        session_id = SessionDefinition().session_id
        return await self.for_session(session_id).create_session(session_id)

    async def latest_tasks(
        self,
        session_prefix: str,
        statuses: set[TaskStatus] | None = None,
        services: set[str] | None = None,
    ) -> list[TaskResult]:
        """The latest task of each session whose id starts with `session_prefix`, in one of
        `statuses`, on one of `services` (None: any), shard by shard."""
        found = await asyncio.gather(
            *(s.latest_tasks(session_prefix, statuses, services) for s in self.shards)
        )
        return [task for tasks in found for task in tasks]

    async def list_sessions(self, offset: int, limit: int | None) -> list[SessionDefinition]:
        """Sessions shard by shard, each shard's in the order they were created."""
        if len(self.shards) == 1:
            return await self.shards[0].list_sessions(offset, limit)
        page: list[SessionDefinition] = []
        for shard in self.shards:
            if limit is not None and len(page) >= limit:
                break
            held = (await shard.sizes())["sessions"]
            if offset >= held:
                offset -= held
                continue
            wanted = None if limit is None else limit - len(page)
            page += await shard.list_sessions(offset, wanted)
            offset = 0
        return page

    # drivers

    def heartbeat_refs(self, driver_id: str) -> list[ray.ObjectRef]:
        return [shard.heartbeat_ref(driver_id) for shard in self.shards]


class OrchestratorHandle(_Handle):
    """The orchestrator actor (`_orchestrator.SimpleOrchestrator`), typed. Its calls are not
    sent again: a restarted orchestrator drives again what it drove (it adopts the tasks)."""

    def __init__(self, actor: ActorHandle) -> None:
        super().__init__(actor, "orchestrator")

    @classmethod
    def lookup(cls, namespace: str) -> OrchestratorHandle:
        return cls(_lookup(ORCHESTRATOR_ACTOR_NAME, namespace))

    async def run(self, task: TaskDefinition) -> TaskResult:
        return await self._call(functools.partial(self._actor.run.remote, task), again=False)

    async def submit(self, task: TaskDefinition) -> TaskResult:
        # sent again while the orchestrator restarts: a task id is created once
        return await self._call(functools.partial(self._actor.submit.remote, task))

    async def send_event(
        self, session_id: str, task_id: str, service_name: str, event: dict[str, Any]
    ) -> None:
        await self._call(
            functools.partial(
                self._actor.send_event.remote, session_id, task_id, service_name, event
            ),
            again=False,
        )
