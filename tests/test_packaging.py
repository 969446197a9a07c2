"""How a workflow travels to its replicas: as an instance with its attributes, or by import path."""

from __future__ import annotations

import pickle

import pytest

from llama_deploy_ray import (
    InvalidRequestError,
)
from llama_deploy_ray._cluster.packaging import pack_workflow, unpack_workflow

from .workflows import DiesOnceWorkflow, EchoWorkflow


def test_workflow_instances_travel_with_their_attributes() -> None:
    original = DiesOnceWorkflow("/tmp/marker", timeout=12)
    rebuilt = unpack_workflow(pickle.loads(pickle.dumps(pack_workflow(original))))
    assert type(rebuilt).__name__ == "DiesOnceWorkflow"
    assert rebuilt.marker == "/tmp/marker"
    assert rebuilt._timeout == 12


def test_workflows_by_import_path() -> None:
    packed = pack_workflow("tests.workflows:EchoWorkflow")
    assert isinstance(unpack_workflow(packed), EchoWorkflow)
    with pytest.raises(InvalidRequestError, match="module:attribute"):
        pack_workflow("tests.workflows.EchoWorkflow")
    with pytest.raises(InvalidRequestError, match="not a Workflow"):
        unpack_workflow(pack_workflow("tests.workflows:Path"))
    with pytest.raises(InvalidRequestError, match="Workflow instance"):
        pack_workflow(42)  # type: ignore[arg-type]


def test_unpicklable_workflow_attributes_are_named() -> None:
    import threading

    workflow = EchoWorkflow()
    workflow.lock = threading.Lock()
    with pytest.raises(InvalidRequestError, match="import path"):
        pack_workflow(workflow)
