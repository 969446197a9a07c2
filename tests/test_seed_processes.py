"""The seed's quickstart, the seed's way: core, workflow and client each in its own process."""

from __future__ import annotations

import subprocess
import sys

from .conftest import QUICKSTART


def test_quickstart_in_three_processes(control_plane_config, core_env) -> None:
    # the core runs in its own process already (see conftest); deploy, then ask
    deploy = subprocess.run(
        [sys.executable, str(QUICKSTART / "workflow.py")],
        env=core_env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert deploy.returncode == 0, deploy.stderr[-3000:]
    client = subprocess.run(
        [sys.executable, str(QUICKSTART / "client.py")],
        env=core_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert client.returncode == 0, client.stderr[-3000:]
    assert client.stdout.strip().splitlines()[-1] == "hello_world_result"
