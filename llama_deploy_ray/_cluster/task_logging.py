"""Log records a replica writes while it runs a task carry the task: its id, its session and
its service, so a person can follow one task through the replicas' log files.

Every record made in the task's context (its steps included: they run in tasks the run
started) gets the attributes `llama_task_id`, `llama_session_id` and `llama_service`. Serve's
JSON log encoding writes them as fields of the record; its text encoding writes no extra
attributes, so with `TEXT` they are appended to each line of Serve's logger as `key=value`,
the way Ray's own text formatter writes extra attributes.

    with task_logged(task_id, session_id, service):
        ...  # logging.getLogger("ray.serve").info("hello") carries the three fields
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import ray
from pydantic import BaseModel
from ray.serve._private.logging_utils import get_serve_logs_dir
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

# Serve's logger: what replicas log through it (and print) goes to their log files
SERVE_LOGGER = "ray.serve"
TASK_LOG_FIELDS = ("llama_task_id", "llama_session_id", "llama_service")

_current: ContextVar[tuple[str, str, str] | None] = ContextVar("task_log_fields", default=None)
_installed = False


def install_task_logging(encoding: str) -> None:
    """Tag this process's log records with the task they were made for (once per process);
    `encoding` is the replica's Serve log encoding, TEXT or JSON."""
    global _installed
    if _installed:
        return
    _installed = True
    make_record = logging.getLogRecordFactory()

    def tagged_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        fields = _current.get()
        if fields is not None:
            record.__dict__.update(zip(TASK_LOG_FIELDS, fields, strict=True))
        return record

    logging.setLogRecordFactory(tagged_record)
    if encoding == "TEXT":
        # on the logger, not its handlers: Serve replaces the handlers when it reconfigures
        logging.getLogger(SERVE_LOGGER).addFilter(_append_fields_to_text)


@contextlib.contextmanager
def task_logged(task_id: str, session_id: str, service: str) -> Iterator[None]:
    """Records made in this context (and in asyncio tasks it starts) carry the task."""
    token = _current.set((task_id, session_id, service))
    try:
        yield
    finally:
        _current.reset(token)


def _append_fields_to_text(record: logging.LogRecord) -> bool:
    if TASK_LOG_FIELDS[0] in record.__dict__:
        fields = " ".join(f"{name}={record.__dict__[name]}" for name in TASK_LOG_FIELDS)
        # a print's record ends with its newline: the fields stay on its line
        record.msg, record.args = f"{record.getMessage().rstrip()} {fields}", None
    return True


class TaskLogLine(BaseModel):
    node: str  # the node's IP address
    file: str  # the replica's log file, under that node's Serve log directory
    line: str


def find_task_log_lines(task_id: str) -> list[TaskLogLine]:
    """Every line of the replicas' log files, on every node, that names the task, oldest
    first (lines start with their time, TEXT and JSON alike). Needs a connected Ray."""
    searches = [
        _grep_serve_logs.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote(task_id, node["NodeManagerAddress"])
        for node in ray.nodes()
        if node["Alive"]
    ]
    found = [line for lines in ray.get(searches) for line in lines]
    return sorted(found, key=lambda found: _time_in(found.line))


@ray.remote(num_cpus=0)
def _grep_serve_logs(task_id: str, node: str) -> list[TaskLogLine]:
    logs = Path(get_serve_logs_dir())
    found = []
    for path in sorted(logs.glob("replica_*.log*")):
        with open(path, errors="replace") as lines:
            found += [
                TaskLogLine(node=node, file=path.name, line=line.rstrip("\n"))
                for line in lines
                if task_id in line
            ]
    return found


_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}")


def _time_in(line: str) -> str:
    found = _TIME.search(line)
    return found.group() if found else ""
