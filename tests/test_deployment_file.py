"""Deployment files: validated by the config models, with errors that name the file, the line
and the field; workflows imported from the file's directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama_deploy_ray._cluster.deployment_file import Deployment, DeploymentFileError

from .conftest import ROOT

GREETER = """
from llama_index.core.workflow import StartEvent, StopEvent, Workflow, step


class Greeter(Workflow):
    @step
    async def greet(self, ev: StartEvent) -> StopEvent:
        return StopEvent(result="hello " + str(ev.get("name", "you")))


greeter = Greeter(timeout=30)
"""


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "greeting.py").write_text(GREETER)
    path = tmp_path / "deployment.yaml"
    path.write_text(text)
    return path


def test_a_file_gives_each_service_its_config_and_workflow(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
control_plane:
  port: 8123
applications:
  - name: greeter
    import_path: greeting:greeter
    autoscaling: {min_replicas: 1, max_replicas: 3}
    ray_actor_options: {num_cpus: 0}
    runtime_env: {env_vars: {GREETING: hi}}
  - name: greeter_class
    import_path: greeting:Greeter
""",
    )
    deployment = Deployment(path)
    assert deployment.control_plane.port == 8123
    first, second = deployment.services
    assert first.service_name == "greeter" and first.autoscaling is not None
    assert first.autoscaling.max_replicas == 3 and first.runtime_env == {
        "env_vars": {"GREETING": "hi"}
    }
    assert second.service_name == "greeter_class" and second.num_replicas is None
    assert deployment.workflow(0)._timeout == 30  # the instance the module made
    assert type(deployment.workflow(1)).__name__ == "Greeter"  # a class is instantiated


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "applications:\n  - name: g\n    import_path: greeting:greeter\n    num_replica: 2\n",
            r"deployment.yaml:4: applications\[0\].num_replica: Extra inputs are not permitted",
        ),
        (
            "applications:\n  - name: g\n    import_path: greeting:greeter\n"
            "    num_replicas: 2\n    autoscaling: {min_replicas: 1}\n",
            r"deployment.yaml:2: applications\[0\]: Value error, give num_replicas \(2\) or "
            "autoscaling, not both",
        ),
        (
            "applications:\n  - import_path: greeting:greeter\n",
            r"deployment.yaml:2: applications\[0\].name: Field required",
        ),
        (
            "control_plane:\n  port: none\napplications:\n  - name: g\n    import_path: a:b\n",
            r"deployment.yaml:2: control_plane.port: Input should be a valid integer",
        ),
        (
            "applications:\n  - name: has space\n    import_path: greeting:greeter\n",
            r"deployment.yaml:2: applications\[0\].name: String should match pattern",
        ),
        ("applications: [\n", r"deployment.yaml: not valid YAML"),
        ("services: {}\n", r"deployment.yaml:1: applications: Field required"),
    ],
)
def test_a_bad_file_names_its_line_and_field(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(DeploymentFileError, match=expected):
        Deployment(write(tmp_path, text))


@pytest.mark.parametrize(
    ("import_path", "expected"),
    [
        ("nowhere:greeter", "No module named 'nowhere'"),
        ("greeting:absent", "has no attribute 'absent'"),
        ("greeting:StartEvent", "not a llama-index Workflow"),
    ],
)
def test_a_workflow_that_cannot_be_imported_is_named(
    tmp_path: Path, import_path: str, expected: str
) -> None:
    path = write(tmp_path, f"applications:\n  - name: g\n    import_path: {import_path}\n")
    deployment = Deployment(path)
    with pytest.raises(DeploymentFileError, match=f"deployment.yaml:3: .*{expected}"):
        deployment.workflow(0)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DeploymentFileError, match=r"cannot read deployment file .*nope\.yaml"):
        Deployment(tmp_path / "nope.yaml")


def test_the_quickstart_deployment_file_holds() -> None:
    deployment = Deployment(ROOT / "examples" / "quickstart" / "deployment.yaml")
    assert [s.service_name for s in deployment.services] == ["my_workflow"]
    assert type(deployment.workflow(0)).__name__ == "MyWorkflow"
