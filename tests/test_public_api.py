"""The public surface: the names exported, the clients' methods, and a layout in which the core
actors are reached through their typed handles only."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import llama_deploy_ray
from llama_deploy_ray import (
    AsyncLlamaDeployClient,
    AsyncSessionClient,
    LlamaDeployClient,
    SessionClient,
)


def test_public_names() -> None:
    seed_names = {
        "ControlPlaneConfig",
        "SimpleMessageQueueConfig",
        "SimpleOrchestratorConfig",
        "WorkflowServiceConfig",
        "deploy_core",
        "deploy_workflow",
        "LlamaDeployClient",
        "AsyncLlamaDeployClient",
        "TaskDefinition",
        "TaskResult",
        "SessionDefinition",
        "ServiceDefinition",
        "QueueMessage",
    }
    assert seed_names <= set(llama_deploy_ray.__all__)
    # the root is the one curated surface: everything public there is listed, and only that
    public = {name for name in vars(llama_deploy_ray) if not name.startswith("_")}
    assert public == set(llama_deploy_ray.__all__)


@pytest.mark.parametrize(
    ("sync_cls", "async_cls"),
    [(LlamaDeployClient, AsyncLlamaDeployClient), (SessionClient, AsyncSessionClient)],
)
def test_sync_and_async_clients_have_the_same_methods(sync_cls, async_cls) -> None:
    def public(cls) -> dict[str, inspect.Signature]:
        return {
            name: inspect.signature(member)
            for name, member in vars(cls).items()
            if callable(member) and not name.startswith("_") and name not in ("close", "aclose")
        }

    sync_methods, async_methods = public(sync_cls), public(async_cls)
    assert sync_methods.keys() == async_methods.keys()
    for name, signature in sync_methods.items():
        assert list(signature.parameters) == list(async_methods[name].parameters), name
        method = getattr(async_cls, name)
        if name.endswith("_stream"):  # an async iterator, consumed with `async for`
            assert "AsyncIterator" in str(inspect.signature(method).return_annotation), name
        else:
            assert inspect.iscoroutinefunction(method), name


def test_the_core_actors_are_called_through_their_typed_handles_only() -> None:
    package = Path(llama_deploy_ray.__file__).parent
    for path in package.rglob("*.py"):
        if path.name == "actors.py":
            continue
        source = path.read_text()
        assert "get_actor(" not in source, f"{path.name} looks an actor up by name"
        call = re.search(r"(control_plane|orchestrator)\w*\.\w+\.remote\(", source)
        assert call is None, f"{path.name} calls a core actor without its handle: {call}"


def test_the_shared_vocabulary_depends_on_neither_side_and_clients_not_on_the_cluster() -> None:
    package = Path(llama_deploy_ray.__file__).parent
    for side, forbidden in (("_shared", ("_client", "_cluster")), ("_client", ("_cluster",))):
        for path in (package / side).glob("*.py"):
            imports = re.findall(r"^\s*from \.\.(\w+)", path.read_text(), re.MULTILINE)
            wrong = set(imports) & set(forbidden)
            assert not wrong, f"{side}/{path.name} imports {wrong}"
