"""`LlamaDeployClient` and `AsyncLlamaDeployClient` with their session clients: the seed's
methods over the control plane's HTTP API. Each method builds a `Call` in `_client_core` and
sends it; the two clients differ only in how they send."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
from workflows.events import Event

from .._shared.config import ControlPlaneConfig
from .._shared.errors import LlamaDeployError, ServiceNotFoundError
from .._shared.retry import call_retrying, call_retrying_sync
from .._shared.types import (
    ServiceDefinition,
    ServiceStatus,
    SessionDefinition,
    TaskDefinition,
    TaskResult,
)
from . import core
from .core import DEFAULT_POLL_INTERVAL, Call

# an idle connection is let go after 4 s, before a server or proxy on uvicorn's default
# keep-alive (5 s) closes it: with the same 5 s on both ends, a request could go out on a
# connection as the server closes it, and fail to read its answer
_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=4.0)


class PooledTransport(httpx.AsyncBaseTransport):
    """httpx's connection pool checks every one of its connections (a socket call each) on
    every request, so with hundreds of requests in flight a single pool spends more CPU on that
    than on the requests: measured here, 256 concurrent runs got 60 answers/s from one pool and
    300/s from eight. Each request takes the pool with the fewest responses open, the first of
    those, so that a client with one call at a time keeps to one warm connection (taking the
    pools in turn, its calls went out on eight, and HAProxy spent 40% more CPU on each). Each
    pool opens connections as needed and keeps up to 32 idle."""

    def __init__(self, pools: int = 8) -> None:
        idle = (_LIMITS.max_keepalive_connections or 0) // pools
        limits = httpx.Limits(
            max_connections=None,
            max_keepalive_connections=idle,
            keepalive_expiry=_LIMITS.keepalive_expiry,
        )
        self._pools = [httpx.AsyncHTTPTransport(limits=limits) for _ in range(pools)]
        self._open = [0] * pools  # per pool, its responses not yet closed

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        pool = min(range(len(self._pools)), key=self._open.__getitem__)
        self._open[pool] += 1
        try:
            response = await self._pools[pool].handle_async_request(request)
        except BaseException:
            self._open[pool] -= 1
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _ClosedOnce(response.stream, functools.partial(self._closed, pool))
        return response

    def _closed(self, pool: int) -> None:
        self._open[pool] -= 1

    async def aclose(self) -> None:
        await asyncio.gather(*(pool.aclose() for pool in self._pools))


class _ClosedOnce(httpx.AsyncByteStream):
    """A response's body that calls `closed` when it is closed, once."""

    def __init__(self, stream: httpx.AsyncByteStream, closed: Callable[[], None]) -> None:
        self._stream = stream
        self._closed: Callable[[], None] | None = closed

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        closed, self._closed = self._closed, None
        try:
            await self._stream.aclose()
        finally:
            if closed is not None:
                closed()


def _close_if_opened(opening: concurrent.futures.Future[httpx.Response]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


class LlamaDeployClient:
    """Talks to a deployed control plane.

        client = LlamaDeployClient(ControlPlaneConfig())
        session = client.create_session()
        print(session.run("my_workflow", arg1="hello_world"))

    `timeout` (seconds) bounds each request, a `run` included; it defaults to
    `control_plane_config.request_timeout_s`.
    """

    def __init__(
        self, control_plane_config: ControlPlaneConfig | None = None, timeout: float | None = None
    ) -> None:
        config = control_plane_config or ControlPlaneConfig()
        self.timeout = timeout if timeout is not None else config.request_timeout_s
        self.base_url = config.url
        self._http = httpx.Client(
            base_url=config.url, limits=_LIMITS, headers=config.auth_headers()
        )
        self._live: core.LiveStreams[httpx.Response] = core.LiveStreams()
        self._openers = concurrent.futures.ThreadPoolExecutor(32, "llama-deploy-start")

    def _send(self, call: Call[core.T], deadline: float | None = None) -> core.T:
        """Send `call`, again under the retry policy while that may help, until `deadline`
        (by default the client's timeout from now)."""
        deadline = deadline or core.deadline_after(self.timeout)
        sends = call.sends()
        return call_retrying_sync(
            lambda: self._send_once(next(sends), deadline),
            functools.partial(core.is_retryable, call),
            budget_s=deadline - time.monotonic(),
        )

    def _send_once(self, call: Call[core.T], deadline: float) -> core.T:
        kwargs = core.request_kwargs(call, self.base_url, deadline, self.timeout)
        try:
            response = self._http.request(**kwargs)
        except httpx.TransportError as exc:
            raise core.transport_error(exc, call, self.base_url, self.timeout) from exc
        return core.read_response(call, response)

    def _open(self, call: Call[Any], deadline: float) -> httpx.Response:
        """Send `call` and return its response once its headers arrived, its body unread (the
        caller closes it); an error answer is raised."""
        kwargs = core.request_kwargs(call, self.base_url, deadline, self.timeout)
        request = self._http.build_request(**kwargs)
        try:
            response = self._http.send(request, stream=True)
            if not response.is_success:
                try:
                    response.read()
                finally:
                    response.close()
        except httpx.TransportError as exc:
            raise core.transport_error(exc, call, self.base_url, self.timeout) from exc
        if not response.is_success:
            core.read_response(call, response)
        return response

    def _start(self, session_id: str, task: TaskDefinition) -> str:
        call = core.start_task(session_id, task)
        deadline = core.deadline_after(self.timeout)
        # in a thread of its own, so that a start Serve keeps waiting can be left to it
        opening = self._openers.submit(
            call_retrying_sync,
            functools.partial(self._open, call, deadline),
            functools.partial(core.is_retryable, call),
            budget_s=deadline - time.monotonic(),
        )
        try:
            response = opening.result(timeout=core.LIVE_START_S)
        except (concurrent.futures.TimeoutError, ServiceNotFoundError) as exc:
            # every replica is busy (the orchestrator queues it), or the service has no route
            # yet (just deployed: the registry has the say)
            if isinstance(exc, concurrent.futures.TimeoutError):
                opening.add_done_callback(_close_if_opened)
            self._send(core.create_task(session_id, task), deadline)
            return task.task_id
        for let_go in self._live.keep(task.task_id, response):
            let_go.close()
        return task.task_id

    def _events(self, session_id: str, task_id: str, after: int) -> Iterator[dict[str, Any]]:
        cursor = core.StreamCursor(session_id, task_id, after, self.timeout)
        live = self._live.take(task_id)
        if live is not None:
            try:
                for line in live.iter_lines():
                    if (event := cursor.live_event(line)) is not None:
                        yield event
            except httpx.TransportError:
                pass  # cut: read on from the control plane
            finally:
                live.close()
            if cursor.ended:
                return
        while True:
            try:
                for event in self._stream(cursor.call()):
                    cursor.seen(event)
                    yield event
                return
            except LlamaDeployError as exc:
                time.sleep(cursor.wait_before_reconnecting_s(exc))

    def _stream(self, call: Call[dict[str, Any] | None]) -> Iterator[dict[str, Any]]:
        response = self._open(call, core.deadline_after(self.timeout))
        try:
            for line in response.iter_lines():
                item = call.parse(line)
                if item is not None:
                    yield item
        except httpx.TransportError as exc:
            raise core.transport_error(exc, call, self.base_url, self.timeout) from exc
        finally:
            response.close()

    def close(self) -> None:
        self._openers.shutdown(wait=False, cancel_futures=True)
        for response in self._live.take_all():
            response.close()
        self._http.close()

    def __enter__(self) -> LlamaDeployClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def create_session(self, poll_interval: float = DEFAULT_POLL_INTERVAL) -> SessionClient:
        return SessionClient(self, self._send(core.create_session()).session_id)

    def list_sessions(self) -> list[SessionDefinition]:
        """Every session, fetched a page at a time."""
        sessions: list[SessionDefinition] = []
        while page := self._send(core.list_sessions(offset=len(sessions))):
            sessions += page
        return sessions

    def get_session(
        self, session_id: str, poll_interval: float = DEFAULT_POLL_INTERVAL
    ) -> SessionClient:
        return SessionClient(self, self._send(core.get_session(session_id)).session_id)

    def get_or_create_session(
        self, session_id: str, poll_interval: float = DEFAULT_POLL_INTERVAL
    ) -> SessionClient:
        return SessionClient(self, self._send(core.get_or_create_session(session_id)).session_id)

    def get_service(self, service_name: str) -> ServiceDefinition:
        return self._send(core.get_service(service_name))

    def get_service_status(self, service_name: str) -> ServiceStatus:
        """Its replicas (running, starting, ...) and its unfinished tasks, by state."""
        return self._send(core.get_service_status(service_name))

    def delete_session(self, session_id: str) -> None:
        self._send(core.delete_session(session_id))

    def list_services(self) -> list[ServiceDefinition]:
        return self._send(core.list_services())

    def register_service(self, service_def: ServiceDefinition) -> ServiceDefinition:
        return self._send(core.register_service(service_def))

    def deregister_service(self, service_name: str) -> None:
        self._send(core.deregister_service(service_name))


class SessionClient:
    """Runs tasks in one session; made by `LlamaDeployClient`."""

    def __init__(self, client: LlamaDeployClient, session_id: str) -> None:
        self.client = client
        self.session_id = session_id

    def run(self, service_name: str, **run_kwargs: Any) -> Any:
        """Run the service's workflow with `run_kwargs` and return its result; raises
        `TaskFailedError` (with the workflow's own error) when it fails, and
        `RequestTimeoutError` when the client's timeout runs out first (the task goes on).

        A run whose request was cut is sent again: it carries its task id, so the control
        plane runs it once and the answer is that one run's."""
        deadline = core.deadline_after(self.client.timeout)
        task = core.task_definition(service_name, run_kwargs)
        result = self.client._send(core.run_task(self.session_id, task), deadline)
        while not result.status.is_final:  # waits for input, or another replica runs it
            call = core.wait_for_final(self.session_id, task.task_id, deadline)
            result = self.client._send(call, deadline)
        return core.result_value(result)

    def run_nowait(self, service_name: str, **run_kwargs: Any) -> str:
        """Start the service's workflow and return the task id at once."""
        return self.create_task(core.task_definition(service_name, run_kwargs))

    def create_task(self, task_def: TaskDefinition) -> str:
        """Start the task (its `agent_id` names the service) and return its id at once. A
        replica of the service records and runs it, and its answer goes on with the task's
        stream: `get_task_result_stream` reads it there (the client keeps the answers of the
        last 16 tasks it started). When no replica takes it within a second (all are busy),
        the control plane records it instead, and runs it once a replica is free."""
        return self.client._start(self.session_id, task_def)

    def get_tasks(self) -> list[TaskResult]:
        """Every task of the session, fetched a page at a time."""
        tasks: list[TaskResult] = []
        while page := self.client._send(core.get_tasks(self.session_id, offset=len(tasks))):
            tasks += page
        return tasks

    def get_current_task(self) -> TaskResult | None:
        return self.client._send(core.get_current_task(self.session_id))

    def get_task_result(self, task_id: str, wait_s: float = 0.0) -> TaskResult | None:
        """The task's result once it is final (its status, result or error), None until then;
        with `wait_s`, wait up to that long for it first (the server holds the request)."""
        return self.client._send(core.get_task_result(self.session_id, task_id, wait_s))

    def get_task(self, task_id: str, wait_s: float = 0.0) -> TaskResult:
        """Where the task is now (`status`) and, once final, its result or error; with
        `wait_s`, wait up to that long for it to finish first."""
        return self.client._send(core.get_task(self.session_id, task_id, wait_s))

    def get_task_result_stream(self, task_id: str, after: int = 0) -> Iterator[dict[str, Any]]:
        """The events the task's workflow streams, each as it happens, as dicts of the event's
        fields plus `__type__` (its class name) and `__seq__` (its place in the stream; pass
        the last one seen as `after` to resume). Ends when the task ends; a dropped
        connection is resumed from the last event seen."""
        return self.client._events(self.session_id, task_id, after)

    def send_event(self, service_name: str, task_id: str, ev: Event | dict[str, Any]) -> None:
        """Send `ev` (e.g. a HumanResponseEvent, or its fields as a dict with `__type__`, the
        class name) into the running task, exactly once."""
        self.client._send(core.send_event(self.session_id, service_name, task_id, ev))

    def cancel_task(self, task_id: str) -> TaskResult:
        """Cancel the task (and tasks it started); returns its now-cancelled result."""
        return self.client._send(core.cancel_task(self.session_id, task_id))


class AsyncLlamaDeployClient:
    """The async twin of `LlamaDeployClient`, for many concurrent sessions.

    client = AsyncLlamaDeployClient(ControlPlaneConfig())
    session = await client.create_session()
    print(await session.run("my_workflow", arg1="hello_world"))
    """

    def __init__(
        self, control_plane_config: ControlPlaneConfig | None = None, timeout: float | None = None
    ) -> None:
        config = control_plane_config or ControlPlaneConfig()
        self.timeout = timeout if timeout is not None else config.request_timeout_s
        self.base_url = config.url
        self._http = httpx.AsyncClient(
            base_url=config.url, transport=PooledTransport(), headers=config.auth_headers()
        )
        self._live: core.LiveStreams[httpx.Response] = core.LiveStreams()

    async def _send(self, call: Call[core.T], deadline: float | None = None) -> core.T:
        """Send `call`, again under the retry policy while that may help, until `deadline`
        (by default the client's timeout from now)."""
        deadline = deadline or core.deadline_after(self.timeout)
        sends = call.sends()

        async def send() -> core.T:  # tenacity awaits coroutine functions only
            return await self._send_once(next(sends), deadline)

        return await call_retrying(
            send,
            functools.partial(core.is_retryable, call),
            budget_s=deadline - time.monotonic(),
        )

    async def _send_once(self, call: Call[core.T], deadline: float) -> core.T:
        kwargs = core.request_kwargs(call, self.base_url, deadline, self.timeout)
        try:
            response = await self._http.request(**kwargs)
        except httpx.TransportError as exc:
            raise core.transport_error(exc, call, self.base_url, self.timeout) from exc
        return core.read_response(call, response)

    async def _open(self, call: Call[Any], deadline: float) -> httpx.Response:
        """Send `call` and return its response once its headers arrived, its body unread (the
        caller closes it); an error answer is raised."""
        kwargs = core.request_kwargs(call, self.base_url, deadline, self.timeout)
        request = self._http.build_request(**kwargs)
        try:
            response = await self._http.send(request, stream=True)
            if not response.is_success:
                try:
                    await response.aread()
                finally:
                    await response.aclose()
        except httpx.TransportError as exc:
            raise core.transport_error(exc, call, self.base_url, self.timeout) from exc
        if not response.is_success:
            core.read_response(call, response)
        return response

    async def _start(self, session_id: str, task: TaskDefinition) -> str:
        call = core.start_task(session_id, task)
        deadline = core.deadline_after(self.timeout)
        opening = call_retrying(
            functools.partial(self._open, call, deadline),
            functools.partial(core.is_retryable, call),
            budget_s=deadline - time.monotonic(),
        )
        try:
            response = await asyncio.wait_for(opening, core.LIVE_START_S)
        except (asyncio.TimeoutError, ServiceNotFoundError):
            # every replica is busy (the orchestrator queues it), or the service has no route
            # yet (just deployed: the registry has the say)
            await self._send(core.create_task(session_id, task), deadline)
            return task.task_id
        for let_go in self._live.keep(task.task_id, response):
            await let_go.aclose()
        return task.task_id

    async def _events(
        self, session_id: str, task_id: str, after: int
    ) -> AsyncIterator[dict[str, Any]]:
        cursor = core.StreamCursor(session_id, task_id, after, self.timeout)
        live = self._live.take(task_id)
        if live is not None:
            try:
                async for line in live.aiter_lines():
                    if (event := cursor.live_event(line)) is not None:
                        yield event
            except httpx.TransportError:
                pass  # cut: read on from the control plane
            finally:
                await live.aclose()
            if cursor.ended:
                return
        while True:
            try:
                async for event in self._stream(cursor.call()):
                    cursor.seen(event)
                    yield event
                return
            except LlamaDeployError as exc:
                await asyncio.sleep(cursor.wait_before_reconnecting_s(exc))

    async def _stream(self, call: Call[dict[str, Any] | None]) -> AsyncIterator[dict[str, Any]]:
        response = await self._open(call, core.deadline_after(self.timeout))
        try:
            async for line in response.aiter_lines():
                item = call.parse(line)
                if item is not None:
                    yield item
        except httpx.TransportError as exc:
            raise core.transport_error(exc, call, self.base_url, self.timeout) from exc
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        for response in self._live.take_all():
            await response.aclose()
        await self._http.aclose()

    async def __aenter__(self) -> AsyncLlamaDeployClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def create_session(
        self, poll_interval: float = DEFAULT_POLL_INTERVAL
    ) -> AsyncSessionClient:
        return AsyncSessionClient(self, (await self._send(core.create_session())).session_id)

    async def list_sessions(self) -> list[SessionDefinition]:
        """Every session, fetched a page at a time."""
        sessions: list[SessionDefinition] = []
        while page := await self._send(core.list_sessions(offset=len(sessions))):
            sessions += page
        return sessions

    async def get_session(
        self, session_id: str, poll_interval: float = DEFAULT_POLL_INTERVAL
    ) -> AsyncSessionClient:
        return AsyncSessionClient(self, (await self._send(core.get_session(session_id))).session_id)

    async def get_or_create_session(
        self, session_id: str, poll_interval: float = DEFAULT_POLL_INTERVAL
    ) -> AsyncSessionClient:
        session = await self._send(core.get_or_create_session(session_id))
        return AsyncSessionClient(self, session.session_id)

    async def get_service(self, service_name: str) -> ServiceDefinition:
        return await self._send(core.get_service(service_name))

    async def get_service_status(self, service_name: str) -> ServiceStatus:
        """Its replicas (running, starting, ...) and its unfinished tasks, by state."""
        return await self._send(core.get_service_status(service_name))

    async def delete_session(self, session_id: str) -> None:
        await self._send(core.delete_session(session_id))

    async def list_services(self) -> list[ServiceDefinition]:
        return await self._send(core.list_services())

    async def register_service(self, service_def: ServiceDefinition) -> ServiceDefinition:
        return await self._send(core.register_service(service_def))

    async def deregister_service(self, service_name: str) -> None:
        await self._send(core.deregister_service(service_name))


class AsyncSessionClient:
    """Runs tasks in one session; made by `AsyncLlamaDeployClient`."""

    def __init__(self, client: AsyncLlamaDeployClient, session_id: str) -> None:
        self.client = client
        self.session_id = session_id

    async def run(self, service_name: str, **run_kwargs: Any) -> Any:
        """Run the service's workflow with `run_kwargs` and return its result; raises
        `TaskFailedError` (with the workflow's own error) when it fails, and
        `RequestTimeoutError` when the client's timeout runs out first (the task goes on).

        A run whose request was cut is sent again: it carries its task id, so the control
        plane runs it once and the answer is that one run's."""
        deadline = core.deadline_after(self.client.timeout)
        task = core.task_definition(service_name, run_kwargs)
        result = await self.client._send(core.run_task(self.session_id, task), deadline)
        while not result.status.is_final:  # waits for input, or another replica runs it
            call = core.wait_for_final(self.session_id, task.task_id, deadline)
            result = await self.client._send(call, deadline)
        return core.result_value(result)

    async def run_nowait(self, service_name: str, **run_kwargs: Any) -> str:
        """Start the service's workflow and return the task id at once."""
        return await self.create_task(core.task_definition(service_name, run_kwargs))

    async def create_task(self, task_def: TaskDefinition) -> str:
        """Start the task (its `agent_id` names the service) and return its id at once. A
        replica of the service records and runs it, and its answer goes on with the task's
        stream: `get_task_result_stream` reads it there (the client keeps the answers of the
        last 16 tasks it started). When no replica takes it within a second (all are busy),
        the control plane records it instead, and runs it once a replica is free."""
        return await self.client._start(self.session_id, task_def)

    async def get_tasks(self) -> list[TaskResult]:
        """Every task of the session, fetched a page at a time."""
        tasks: list[TaskResult] = []
        while page := await self.client._send(core.get_tasks(self.session_id, offset=len(tasks))):
            tasks += page
        return tasks

    async def get_current_task(self) -> TaskResult | None:
        return await self.client._send(core.get_current_task(self.session_id))

    async def get_task_result(self, task_id: str, wait_s: float = 0.0) -> TaskResult | None:
        """The task's result once it is final (its status, result or error), None until then;
        with `wait_s`, wait up to that long for it first (the server holds the request)."""
        return await self.client._send(core.get_task_result(self.session_id, task_id, wait_s))

    async def get_task(self, task_id: str, wait_s: float = 0.0) -> TaskResult:
        """Where the task is now (`status`) and, once final, its result or error; with
        `wait_s`, wait up to that long for it to finish first."""
        return await self.client._send(core.get_task(self.session_id, task_id, wait_s))

    def get_task_result_stream(self, task_id: str, after: int = 0) -> AsyncIterator[dict[str, Any]]:
        """The events the task's workflow streams, each as it happens, as dicts of the event's
        fields plus `__type__` (its class name) and `__seq__` (its place in the stream; pass
        the last one seen as `after` to resume). Ends when the task ends; a dropped
        connection is resumed from the last event seen."""
        return self.client._events(self.session_id, task_id, after)

    async def send_event(self, service_name: str, task_id: str, ev: Event | dict[str, Any]) -> None:
        """Send `ev` (e.g. a HumanResponseEvent, or its fields as a dict with `__type__`, the
        class name) into the running task, exactly once."""
        await self.client._send(core.send_event(self.session_id, service_name, task_id, ev))

    async def cancel_task(self, task_id: str) -> TaskResult:
        """Cancel the task (and tasks it started); returns its now-cancelled result."""
        return await self.client._send(core.cancel_task(self.session_id, task_id))
