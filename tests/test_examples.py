"""The examples, run as their README says: each script in its own process, against the core."""

from __future__ import annotations

import subprocess
import sys

from .conftest import ROOT


def run_script(path: str, env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, path, *args],
        cwd=(ROOT / path).parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, f"{path} failed:\n{done.stderr[-3000:]}"
    return done.stdout


def test_quickstart_in_three_processes(control_plane_config, core_env) -> None:
    # the core already runs in its own process, started from core.py (see conftest)
    run_script(str(ROOT / "examples/quickstart/workflow.py"), core_env)
    output = run_script(str(ROOT / "examples/quickstart/client.py"), core_env)
    assert output.strip().splitlines()[-1] == "hello_world_result"
    # from Ray tasks in the cluster, without HTTP
    output = run_script(str(ROOT / "examples/quickstart/in_cluster.py"), core_env)
    assert output.strip().splitlines()[-3:] == [
        "ada_result grace_result",
        "alan_result",
        "barbara_result edsger_result",
    ]


def test_nested_workflows_from_two_processes_then_one(control_plane_config, core_env) -> None:
    nested = ROOT / "examples/nested"
    run_script(str(nested / "deploy_one.py"), core_env, "inner")
    run_script(str(nested / "deploy_one.py"), core_env, "outer")
    assert run_script(str(nested / "client.py"), core_env).strip() == "hello_world_result_result"
    run_script(str(nested / "deploy.py"), core_env)  # both from one script, as in the seed
    assert run_script(str(nested / "client.py"), core_env).strip() == "hello_world_result_result"


def test_streaming_and_human_input_example(control_plane_config, core_env) -> None:
    example = ROOT / "examples/streaming_hitl"
    run_script(str(example / "deploy.py"), core_env)
    lines = run_script(str(example / "client.py"), core_env, "42").strip().splitlines()
    assert lines == [
        "[1] Progress: warming up",
        "[2] Progress: thinking hard",
        "[3] Progress: almost there",
        "[5] Progress: got 42",
        "you said 42",
    ]
