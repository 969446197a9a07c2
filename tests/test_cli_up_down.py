"""`llama-deploy-ray up` on a machine with no Ray running starts one and the core on it;
`down` stops both. A Ray of its own, so the shared core is stopped first."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from .conftest import ROOT, _free_port, stop_shared_core
from .terminal import Cli

pytestmark = pytest.mark.own_ray


@pytest.mark.timeout(600)
def test_up_deploy_run_down(tmp_path: Path) -> None:
    stop_shared_core()
    subprocess.run(["ray", "stop", "--force"], capture_output=True)  # no Ray runs here now
    port = _free_port()
    env = {
        **os.environ,
        "HOME": str(tmp_path),  # where `up` keeps what it started
        "CONTROL_PLANE_PORT": str(port),
        "CONTROL_PLANE_STATE_STORE": str(tmp_path / "state.sqlite3"),
    }
    # a fresh shell's: not this process's Ray address, nor the token mode its ray.init set
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE"):
        env.pop(name, None)
    cli = Cli(ROOT, env)
    try:
        assert f"its API is at http://127.0.0.1:{port}" in cli("up").stdout
        cli("deploy", "examples/quickstart/deployment.yaml")
        answer = cli("run", "my_workflow", "-a", "arg1=hello_world").stdout
        assert answer.strip() == "hello_world_result"
        assert "the local Ray `up` started" in cli("down").stdout
        assert subprocess.run(["ray", "status"], capture_output=True).returncode != 0
        assert (
            "could not reach the control plane" in cli("--timeout", "2", "status", status=1).stderr
        )
    finally:
        subprocess.run(["ray", "stop", "--force"], capture_output=True)
        subprocess.run(["pkill", "haproxy"])
