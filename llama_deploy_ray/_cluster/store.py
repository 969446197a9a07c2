"""Where the control plane's records outlive it: a SQLite file (the default) or Redis.

The control plane keeps its records in memory for speed and writes every change through to a
store before it answers the call that made it (see `_control_plane`); on start it loads what
the store holds. A store is a few tables of JSON text by key, plus each task's two event logs:

- `meta`: the cluster's state-signing secret and its number of control-plane shards;
- `service`: a `StoredService` per service name, with what redeploys it;
- `session`: a `StoredSession` per session id;
- `task`: a `StoredTask` per task id, its events beside it;
- `state`: a session's workflow state on one service, keyed `session_id/service_name`.

Records carry their creation `order`, so a store need not keep insertion order itself.

    store = open_store("sqlite:///var/lib/llama-deploy-ray/default.sqlite3", "default")
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlparse

from pydantic import BaseModel

from .._shared.errors import InvalidRequestError
from .._shared.types import ServiceDefinition, SessionDefinition, TaskDefinition, TaskResult

Table = Literal["meta", "service", "session", "task", "state"]
TABLES: tuple[Table, ...] = ("meta", "service", "session", "task", "state")
EventLogName = Literal["stream", "inbox"]


class StoredService(BaseModel):
    definition: ServiceDefinition
    accepted_events: list[str] | None = None
    # JSON that `deploy_core` redeploys the service from after a cluster restart (None: the
    # service was registered without one, by hand)
    deployment: str | None = None


class StoredSession(BaseModel):
    order: int
    definition: SessionDefinition


class StoredTask(BaseModel):
    order: int
    definition: TaskDefinition
    result: TaskResult
    owner: str
    children: list[str]
    snapshot: dict[str, Any] | None = None
    inbox_seq: int = 0


@dataclass
class EventAppend:
    """Events added to one of a task's logs; those before `first_kept` were dropped."""

    task_id: str
    log: EventLogName
    events: list[dict[str, Any]]
    first_kept: int


@dataclass
class Batch:
    """The changes of one group commit, written in one transaction."""

    puts: list[tuple[Table, str, str]] = field(default_factory=list)
    # deleting a task also deletes its event logs
    deletes: list[tuple[Table, str]] = field(default_factory=list)
    events: list[EventAppend] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.puts) + len(self.deletes) + len(self.events)


@dataclass
class Records:
    """Everything a store holds: JSON text by table and key, and event logs by task."""

    tables: dict[Table, dict[str, str]]
    events: dict[tuple[str, EventLogName], list[dict[str, Any]]]


class StateStore(Protocol):
    def load(self) -> Records: ...

    async def write(self, batch: Batch) -> None: ...

    def close(self) -> None: ...


def open_store(url: str, namespace: str, shard: int = 0) -> StateStore | None:
    """The store `url` names (see `ControlPlaneConfig.state_store`) for one control-plane
    shard; None for `memory`. Shard 0 uses the file or key prefix itself, shard N a file or
    prefix of its own beside it."""
    if url == "memory":
        return None
    parsed = urlparse(url)
    suffix = f".shard{shard}" if shard else ""
    if parsed.scheme in ("redis", "rediss", "unix"):
        return RedisStore(url, prefix=f"llama-deploy-ray:{namespace}{suffix}:")
    if parsed.scheme in ("", "sqlite"):
        path = Path(parsed.path if parsed.scheme else url).expanduser()
        return SQLiteStore(path.with_name(path.stem + suffix + path.suffix))
    raise InvalidRequestError(
        f"state store {url!r} is not one we know: give a file path, 'sqlite:///path', "
        "'redis://host:port/db' or 'memory'"
    )


class SQLiteStore:
    """One SQLite file in WAL mode. A commit survives the process that made it (an actor
    killed, Ray stopped); `synchronous=NORMAL` lets the last commits before a power loss go."""

    def __init__(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
        except (OSError, sqlite3.Error) as exc:
            raise InvalidRequestError(
                f"cannot open the state store {str(path)!r} ({exc}); point "
                "CONTROL_PLANE_STATE_STORE at a writable file"
            ) from exc
        self._db.execute("PRAGMA synchronous=NORMAL")
        for table in TABLES:
            self._db.execute(
                f"CREATE TABLE IF NOT EXISTS {table} (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
            )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS events (task_id TEXT, log TEXT, seq INTEGER, "
            "value TEXT NOT NULL, PRIMARY KEY (task_id, log, seq)) WITHOUT ROWID"
        )

    def load(self) -> Records:
        tables = {t: dict(self._db.execute(f"SELECT key, value FROM {t}")) for t in TABLES}
        events: dict[tuple[str, EventLogName], list[dict[str, Any]]] = {}
        rows = self._db.execute("SELECT task_id, log, value FROM events ORDER BY task_id, seq")
        for task_id, log, value in rows:
            events.setdefault((task_id, log), []).append(json.loads(value))
        return Records(tables=tables, events=events)

    async def write(self, batch: Batch) -> None:
        # sqlite3 is fast enough here to run on the caller's event loop: a commit of a turn's
        # changes takes tens of microseconds
        db = self._db
        db.execute("BEGIN")
        try:
            for table, key, value in batch.puts:
                db.execute(
                    f"INSERT INTO {table} (key, value) VALUES (?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (key, value),
                )
            for table, key in batch.deletes:
                db.execute(f"DELETE FROM {table} WHERE key = ?", (key,))
                if table == "task":
                    db.execute("DELETE FROM events WHERE task_id = ?", (key,))
            for append in batch.events:
                db.executemany(
                    "INSERT OR REPLACE INTO events (task_id, log, seq, value) VALUES (?, ?, ?, ?)",
                    [
                        (append.task_id, append.log, e["__seq__"], json.dumps(e))
                        for e in append.events
                    ],
                )
                if append.first_kept > 1:
                    db.execute(
                        "DELETE FROM events WHERE task_id = ? AND log = ? AND seq < ?",
                        (append.task_id, append.log, append.first_kept),
                    )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._db.close()


class RedisStore:
    """Hashes per table and a list per event log under one key prefix; a batch is one
    MULTI/EXEC transaction. Durable as the Redis server is configured (AOF for every write)."""

    def __init__(self, url: str, prefix: str) -> None:
        try:
            import redis
            import redis.asyncio
        except ImportError as exc:
            raise InvalidRequestError(
                "a Redis state store needs the redis package: pip install 'llama-deploy-ray[redis]'"
            ) from exc
        self._url = url
        self._prefix = prefix
        self._sync = redis.Redis.from_url(url, decode_responses=True)
        self._async: Any = None
        self._async_factory = redis.asyncio.Redis.from_url

    def _events_key(self, task_id: str, log: str) -> str:
        return f"{self._prefix}events:{task_id}:{log}"

    def load(self) -> Records:
        pipe = self._sync.pipeline(transaction=False)
        for table in TABLES:
            pipe.hgetall(self._prefix + table)
        tables: dict[Table, dict[str, str]] = dict(zip(TABLES, pipe.execute(), strict=True))
        logs = [(t, log) for t in tables["task"] for log in ("stream", "inbox")]
        pipe = self._sync.pipeline(transaction=False)
        for task_id, log in logs:
            pipe.lrange(self._events_key(task_id, log), 0, -1)
        events: dict[tuple[str, EventLogName], list[dict[str, Any]]] = {}
        for key, values in zip(logs, pipe.execute(), strict=True):
            if values:
                events[key] = [json.loads(v) for v in values]  # type: ignore[index]
        return Records(tables=tables, events=events)

    async def write(self, batch: Batch) -> None:
        if self._async is None:
            self._async = self._async_factory(self._url, decode_responses=True)
        pipe = self._async.pipeline(transaction=True)
        for table, key, value in batch.puts:
            pipe.hset(self._prefix + table, key, value)
        for table, key in batch.deletes:
            pipe.hdel(self._prefix + table, key)
            if table == "task":
                pipe.delete(self._events_key(key, "stream"), self._events_key(key, "inbox"))
        for append in batch.events:
            key = self._events_key(append.task_id, append.log)
            pipe.rpush(key, *(json.dumps(e) for e in append.events))
            if append.first_kept > 1:
                last = append.events[-1]["__seq__"]
                pipe.ltrim(key, -(last - append.first_kept + 1), -1)
        await pipe.execute()

    def close(self) -> None:
        self._sync.close()
