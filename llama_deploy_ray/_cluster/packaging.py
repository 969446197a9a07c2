"""Getting a workflow to its replicas.

Workflow instances do not pickle on workflows 2.x (their runtime holds a weakref), so an
instance travels as its class plus the attributes its own `__init__` set, and is rebuilt in the
replica; `Workflow.__init__`'s options (timeout, verbose, ...) are passed again. The class is
pickled by value, so a workflow defined in a script or a test module needs nothing installed on
the workers. A workflow can also be named by import path, `"package.module:attribute"`, which
the replica imports (it must be importable there: install it, or ship it with `runtime_env`).

The events a workflow receives with `ctx.wait_for_event` appear in no step's signature;
`additional_events` names them, and they travel in the same pickle as the workflow's class, so
the replica's copy of such a class is the one its steps wait for.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import Any

import cloudpickle
from pydantic import BaseModel, ConfigDict
from workflows import Workflow
from workflows.events import Event

from .._shared.errors import InvalidRequestError
from .._shared.workflows_internals import FRAMEWORK_ATTRS, init_options
from .nested import NESTED_ATTR, add_workflows, bound_step_names


class PackedWorkflow(BaseModel):
    """A workflow ready to cross to a replica: an import path, or a pickled class and state."""

    # stored as JSON by the control plane (see `_deploy.ServiceDeployment`)
    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    import_path: str | None = None
    payload: bytes | None = None
    name: str
    timeout: float | None = None  # the workflow's, when known here (not for an import path)
    nested: dict[str, PackedWorkflow] = {}
    # for an import path: its additional events, pickled by reference (an instance's are in
    # its payload)
    additional_events: bytes | None = None


def pack_workflow(
    workflow: Workflow | str, additional_events: Sequence[type[Event]] = ()
) -> PackedWorkflow:
    additional = list(additional_events)
    for event_class in additional:
        if not (isinstance(event_class, type) and issubclass(event_class, Event)):
            raise InvalidRequestError(
                f"additional_events must be Event classes, got {event_class!r}"
            )
    if isinstance(workflow, str):
        _split_import_path(workflow)
        events = cloudpickle.dumps(additional) if additional else None
        return PackedWorkflow(import_path=workflow, name=workflow, additional_events=events)
    if not isinstance(workflow, Workflow):
        raise InvalidRequestError(
            f"workflow must be a llama-index Workflow instance or an import path "
            f"'module:attribute', got {type(workflow).__name__}"
        )
    cls = type(workflow)
    options = init_options(workflow)
    # nested workflows travel packed on their own; add_workflows binds them again
    skip = FRAMEWORK_ATTRS | {NESTED_ATTR} | bound_step_names(workflow)
    user_attrs = {k: v for k, v in workflow.__dict__.items() if k not in skip}
    nested = {n: pack_workflow(w) for n, w in workflow.__dict__.get(NESTED_ATTR, {}).items()}
    module = sys.modules.get(cls.__module__)
    by_value = module is not None and cls.__module__ != "__main__"
    if by_value:
        cloudpickle.register_pickle_by_value(module)
    try:
        payload = cloudpickle.dumps((cls, options, user_attrs, additional))
    except Exception as exc:
        raise InvalidRequestError(
            f"workflow {cls.__name__} cannot be sent to Ray replicas: pickling it failed "
            f"({type(exc).__name__}: {exc}). Keep unpicklable objects (clients, locks) out of "
            "its attributes, or deploy it by import path 'module:attribute'."
        ) from exc
    finally:
        if by_value:
            cloudpickle.unregister_pickle_by_value(module)
    timeout = options.get("timeout")
    return PackedWorkflow(
        payload=payload,
        name=cls.__name__,
        nested=nested,
        timeout=float(timeout) if timeout is not None else None,
    )


def unpack_workflow(packed: PackedWorkflow) -> Workflow:
    return unpack_service(packed)[0]


def unpack_service(packed: PackedWorkflow) -> tuple[Workflow, list[type[Event]]]:
    """The workflow and its additional events."""
    if packed.import_path is not None:
        module_name, attr = _split_import_path(packed.import_path)
        target: Any = getattr(importlib.import_module(module_name), attr)
        workflow = target() if isinstance(target, type) else target
        if not isinstance(workflow, Workflow):
            raise InvalidRequestError(
                f"{packed.import_path} is a {type(workflow).__name__}, not a Workflow"
            )
        events = packed.additional_events
        return workflow, cloudpickle.loads(events) if events is not None else []
    assert packed.payload is not None
    # a deployment stored before additional events existed has none
    cls, options, user_attrs, *additional = cloudpickle.loads(packed.payload)
    workflow = cls.__new__(cls)
    Workflow.__init__(workflow, **options)
    workflow.__dict__.update(user_attrs)
    if packed.nested:
        add_workflows(workflow, **{n: unpack_workflow(p) for n, p in packed.nested.items()})
    return workflow, additional[0] if additional else []


def _split_import_path(path: str) -> tuple[str, str]:
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise InvalidRequestError(f"import path {path!r} must look like 'package.module:attribute'")
    return module_name, attr
