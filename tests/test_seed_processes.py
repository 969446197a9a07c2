"""The seed's quickstart, the seed's way: core, workflow and client each in its own process."""

from __future__ import annotations

import subprocess
import sys

from .conftest import QUICKSTART


def run_script(name: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, str(QUICKSTART / name)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stderr[-3000:]}"
    return done.stdout


def test_quickstart_in_three_processes(control_plane_config, core_env) -> None:
    # the core already runs in its own process, started from core.py (see conftest)
    run_script("workflow.py", core_env)
    assert run_script("client.py", core_env).strip().splitlines()[-1] == "hello_world_result"
