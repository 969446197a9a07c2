"""Deployments from a file: the services to deploy, in YAML, modelled on Ray Serve's config file.

    control_plane:                  # optional: ControlPlaneConfig fields
      port: 8000
    applications:                   # one per service
      - name: my_workflow           # the service's name
        import_path: workflows:MyWorkflow   # module:attribute, a Workflow instance or class
        num_replicas: 2             # every other WorkflowServiceConfig field, by its name
        ray_actor_options: {num_cpus: 0.5}
        runtime_env:                # Ray's runtime_env for the replicas
          env_vars: {OPENAI_API_KEY: "..."}

`import_path` is imported by the process that deploys (from the file's directory first, as
`serve run` does from its working directory), and the workflow travels to the replicas as
any instance does (see `packaging`): no package to install on the cluster for it. Errors name
the file, the line and the field.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from workflows import Workflow

from .._shared.config import ControlPlaneConfig, WorkflowServiceConfig
from .._shared.errors import InvalidRequestError


class Application(BaseModel):
    """One service: its name, where its workflow is, and its `WorkflowServiceConfig`."""

    model_config = ConfigDict(extra="allow")

    name: str
    import_path: str = Field(pattern=r"^[\w.]+:[\w.]+$")

    def service_config(self) -> WorkflowServiceConfig:
        return WorkflowServiceConfig(service_name=self.name, **(self.model_extra or {}))


class DeploymentFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    control_plane: dict[str, Any] = Field(default_factory=dict)
    applications: list[Application] = Field(min_length=1)


class DeploymentFileError(InvalidRequestError):
    """A deployment file that cannot be used; its message names the file, line and field."""


class Deployment:
    """A validated deployment file: the core to deploy into and each service's config."""

    def __init__(self, path: Path) -> None:
        self.path = path
        text = _read(path)
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise DeploymentFileError(f"{path}: not valid YAML: {exc}") from exc
        self._lines = _LineFinder(text)
        self.file = self._validate(DeploymentFile, raw, ())
        self.control_plane = self._validate(
            ControlPlaneConfig, self.file.control_plane, ("control_plane",)
        )
        self.services = [
            self._validate_service(i, app) for i, app in enumerate(self.file.applications)
        ]

    def workflow(self, index: int) -> Workflow:
        """The workflow of the `index`th application, imported here."""
        import_path = self.file.applications[index].import_path
        line = self._lines.line(("applications", index, "import_path"))
        try:
            return import_workflow(import_path, self.path.parent)
        except DeploymentFileError as exc:
            raise DeploymentFileError(
                f"{self.path}:{line}: applications[{index}].import_path: {exc}"
            ) from None

    def _validate_service(self, index: int, app: Application) -> WorkflowServiceConfig:
        prefix: tuple[str | int, ...] = ("applications", index)
        try:
            return app.service_config()
        except ValidationError as exc:
            raise self._error(exc, prefix, rename={"service_name": "name"}) from None

    def _validate(self, model: Any, data: Any, prefix: tuple[str | int, ...]) -> Any:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise self._error(exc, prefix) from None

    def _error(
        self,
        exc: ValidationError,
        prefix: tuple[str | int, ...],
        rename: dict[str, str] | None = None,
    ) -> DeploymentFileError:
        problems = []
        for error in exc.errors():
            loc = prefix + tuple((rename or {}).get(str(p), p) for p in error["loc"])
            field = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc)
            field = field.replace(".[", "[") or "(the file)"
            problems.append(f"{self.path}:{self._lines.line(loc)}: {field}: {error['msg']}")
        return DeploymentFileError("\n".join(problems))


def import_workflow(import_path: str, directory: Path = Path()) -> Workflow:
    """The workflow `module:attribute` names, imported from `directory` first (then the Python
    path); a Workflow class is instantiated with no arguments."""
    module_name, _, attr = import_path.partition(":")
    if not module_name or not attr:
        raise DeploymentFileError(f"{import_path!r} is not an import path 'module:attribute'")
    with _on_path(directory):
        try:
            target: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError) as exc:
            raise DeploymentFileError(
                f"{import_path!r} cannot be imported ({type(exc).__name__}: {exc}); it is "
                f"imported from {str(directory.resolve())!r} or the Python path"
            ) from exc
    workflow = target() if isinstance(target, type) else target
    if not isinstance(workflow, Workflow):
        raise DeploymentFileError(
            f"{import_path!r} is a {type(workflow).__name__}, not a llama-index Workflow (or a "
            "Workflow class)"
        )
    return workflow


def code_version(workflow: Workflow) -> str:
    """A version of the workflow's code: a digest of the source file that defines its class."""
    digest = hashlib.sha256(type(workflow).__qualname__.encode())
    source = inspect.getsourcefile(type(workflow))
    if source is not None:
        digest.update(Path(source).read_bytes())
    return digest.hexdigest()[:16]


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise DeploymentFileError(f"cannot read deployment file {path}: {exc}") from exc


class _LineFinder:
    """Line numbers (1-based) of the YAML nodes at a path of keys and indexes."""

    def __init__(self, text: str) -> None:
        self._root = yaml.compose(text)

    def line(self, loc: tuple[str | int, ...]) -> int:
        node, line = self._root, 1
        for part in loc:
            if node is None:
                break
            line = node.start_mark.line + 1
            if isinstance(node, yaml.MappingNode):
                node = next((v for k, v in node.value if k.value == part), None)
                if node is None:  # a missing field: the line of the mapping that lacks it
                    return line
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
                node = node.value[part] if part < len(node.value) else None
            else:
                break
        return node.start_mark.line + 1 if node is not None else line


@contextlib.contextmanager
def _on_path(directory: Path) -> Iterator[None]:
    sys.path.insert(0, str(directory.resolve()))
    try:
        yield
    finally:
        sys.path.remove(str(directory.resolve()))
