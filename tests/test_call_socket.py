"""The control plane's call socket, on real sockets: calls start in the order sent, errors come
back as themselves, a connection without the secret gets nothing, a broken connection fails
its calls as an unreachable actor does, then is made again, and a control plane restarted on
its store checks the stored secret."""

from __future__ import annotations

import asyncio
import gc
import pickle
import struct
import subprocess
import sys
import weakref

import pytest
from ray.exceptions import ActorUnavailableError

from llama_deploy_ray._cluster.call_socket import (
    Address,
    CallClient,
    CallServer,
    CallSocketClosed,
    _frame,
)
from llama_deploy_ray._cluster.control_plane import ControlPlane
from llama_deploy_ray._shared.errors import TaskNotFoundError

SECRET = b"0123456789abcdef0123456789abcdef"


class Target:
    def __init__(self) -> None:
        self.started: list[int] = []

    async def record(self, n: int, wait_s: float = 0.0) -> int:
        self.started.append(n)
        await asyncio.sleep(wait_s)
        return n

    async def refuse(self, task_id: str) -> None:
        raise TaskNotFoundError(task_id)

    async def _private(self) -> None:
        raise AssertionError("a private method must not be callable")


def _client(server: CallServer, secret: bytes = SECRET) -> CallClient:
    async def find() -> tuple[Address, bytes]:
        return await server.address(), secret

    return CallClient(find)


async def test_calls_start_in_the_order_sent_and_errors_come_back_as_themselves() -> None:
    target = Target()
    client = _client(CallServer(target, Target, SECRET))
    # the later calls are quicker: answered first, but started in the order sent
    sent = [client.send("record", n, 0.05 * (5 - n)) for n in range(5)]
    assert await asyncio.gather(*sent) == [0, 1, 2, 3, 4]
    assert target.started == [0, 1, 2, 3, 4]

    with pytest.raises(TaskNotFoundError, match="t-1"):
        await client.send("refuse", "t-1")
    for method in ("_private", "no_such_call"):
        with pytest.raises(AttributeError, match=f"no call '{method}'"):
            await client.send(method)


async def test_a_connection_without_the_secret_gets_no_answer() -> None:
    target = Target()
    client = _client(CallServer(target, Target, SECRET), secret=b"a guess")
    with pytest.raises(CallSocketClosed):
        await asyncio.wait_for(client.send("record", 1), 5)
    assert target.started == []


async def test_a_frame_before_the_proof_is_not_taken() -> None:
    """A peer that skips the handshake and sends a call: the server reads its first 32 bytes
    as the proof, refuses it, and never unpickles anything."""
    target = Target()
    server = CallServer(target, Target, SECRET)
    host, port = await server.address()
    reader, writer = await asyncio.open_connection(host, port)
    await reader.readexactly(16)  # the nonce
    writer.write(struct.pack("!Q", 40) + b"x" * 40)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
    writer.close()
    assert target.started == []


async def test_a_broken_connection_fails_its_calls_as_an_unreachable_actor_and_is_made_again() -> (
    None
):
    """The actor dies with a call on its connection (here: a server that reads the call and
    closes): the call fails with an error the handles send again (an `ActorUnavailableError`),
    and the next call connects to where the restarted actor listens."""

    async def dies_with_the_call(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(b"n" * 16)
        await reader.readexactly(32)  # the proof
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
        await reader.readexactly(length)
        writer.close()

    dying = await asyncio.start_server(dies_with_the_call, "127.0.0.1", 0)
    restarted = Target()
    addresses = [
        dying.sockets[0].getsockname()[:2],
        await CallServer(restarted, Target, SECRET).address(),
    ]

    async def find() -> tuple[Address, bytes]:
        return addresses.pop(0), SECRET

    client = CallClient(find)
    with pytest.raises(ActorUnavailableError):
        await asyncio.wait_for(client.send("record", 1), 5)
    assert await client.send("record", 2) == 2
    assert restarted.started == [2]
    dying.close()


async def test_a_control_plane_restarted_on_its_store_takes_calls_with_the_stored_secret(
    tmp_path,
) -> None:
    """Ray restarts the actor with the secret it was first given, or a whole new cluster
    starts one with a new secret, on the old store: the secret is the stored one, and so is
    the one its socket checks."""
    store = str(tmp_path / "state.sqlite3")
    first = ControlPlane(60, 60, state_secret=SECRET, state_store=store)
    await first.ready()
    session = await first.create_session()
    await first.ready()  # committed
    restarted = ControlPlane(60, 60, state_secret=b"a new cluster's secret", state_store=store)
    client = CallClient(restarted.call_socket)
    assert (await client.send("get_session", session.session_id)).session_id == session.session_id


async def test_a_client_let_go_closes_its_connection() -> None:
    """A process that looked the control plane up for one call lets its handle go: the
    connection closes then, not later in the garbage collector with its reader pending."""

    def readers() -> list[asyncio.Task]:
        return [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "_Connection._read"]

    before = set(readers())  # the other tests' (this event loop may be theirs too)
    client = _client(CallServer(Target(), Target, SECRET))
    assert await client.send("record", 1) == 1
    assert len(set(readers()) - before) == 1
    del client
    await asyncio.sleep(0.01)
    assert set(readers()) - before == set()


async def test_a_closed_event_loop_is_let_go() -> None:
    """A process that runs `asyncio.run` again and again (a Ray task calling a workflow each
    time) keeps one event loop's connection, not every loop it had."""
    server = CallServer(Target(), Target, SECRET)
    await server.address()  # it listens on this event loop, which stays
    client = _client(server)
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def call(n: int) -> int:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        return await client.send("record", n)

    for n in range(3):
        assert await asyncio.to_thread(asyncio.run, call(n)) == n
    gc.collect()
    assert [loop() is None for loop in loops] == [True, True, False]


def test_a_class_of_a_scripts_main_is_shipped_by_value(monkeypatch) -> None:
    """Frames are plain pickles where they can be; a value of a class that only the sending
    script defines travels by value (as in Ray's calls), so another process can take it."""

    class Answer:
        def __init__(self, n: int) -> None:
            self.n = n

    assert pickle.loads(_frame(Answer(1))[8:]).n == 1  # a class made in a function
    Answer.__module__, Answer.__qualname__ = "__main__", "Answer"
    monkeypatch.setattr(sys.modules["__main__"], "Answer", Answer, raising=False)
    body = _frame(Answer(42))[8:]
    taken = subprocess.run(
        [
            sys.executable,
            "-c",
            "import pickle, sys; print(pickle.loads(sys.stdin.buffer.read()).n)",
        ],
        input=body,
        capture_output=True,
        timeout=60,
    )
    assert taken.stdout.strip() == b"42", taken.stderr.decode()[-2000:]
