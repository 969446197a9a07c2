"""The `llama-deploy-ray` command as a test runs it: in a process of its own, or typed into a
real terminal."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


class Cli:
    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd, self.env = cwd, env

    def __call__(self, *args: str, status: int | None = 0) -> subprocess.CompletedProcess[str]:
        """Run the command; its exit status must be `status`, unless that is None."""
        done = subprocess.run(
            [sys.executable, "-m", "llama_deploy_ray", *args],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert status is None or done.returncode == status, (args, done.stdout, done.stderr)
        return done

    def json(self, *args: str) -> object:
        return json.loads(self("--json", *args).stdout)


class Tmux:
    """A terminal of its own (a tmux server on its own socket, with this test's environment)."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        if shutil.which("tmux") is None:
            subprocess.run(["apt-get", "install", "-y", "-q", "tmux"], check=True)
        self.socket = f"llama-deploy-ray-test-{os.getpid()}"
        env = {k: v for k, v in env.items() if k != "COLUMNS"}  # the terminal says its size
        self._tmux("new-session", "-d", "-x", "160", "-y", "45", "-c", str(cwd), env=env)

    def _tmux(self, *args: str, env: dict[str, str] | None = None) -> str:
        done = subprocess.run(
            ["tmux", "-L", self.socket, *args], env=env, capture_output=True, text=True, check=True
        )
        return done.stdout

    def type(self, line: str) -> None:
        self._tmux("send-keys", line, "Enter")

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p")

    def close(self) -> None:
        self._tmux("kill-server")
