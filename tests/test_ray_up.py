"""`ray up cluster.yaml` for real: this machine is the cluster's head, reached over SSH at
127.0.0.1 (sshd from Debian's packages, installed here if missing). The file is the one a user
copies; only what names the machines (`provider`, `auth`, the worker counts) is replaced.
`ray up` runs its setup and start commands as written, the quickstart workflow is deployed from
the head with `ray exec`, a client runs it over HTTP with the API key the file hands the core,
and `ray down` stops it all. A Ray of its own, so the shared core is stopped first."""

from __future__ import annotations

import contextlib
import getpass
import os
import pwd
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

from llama_deploy_ray import ControlPlaneConfig, LlamaDeployClient, UnauthorizedError

from .conftest import ROOT, stop_shared_core, wait_for

pytestmark = pytest.mark.own_ray

# Ray's SSH command runner has no port option: the local provider reaches nodes on port 22
SSH_PORT = 22
API_PORT = 8000  # what the core in cluster.yaml listens on
RAY_BIN = Path(sys.executable).parent
# what ray up and the core leave in the head's home (here, this machine's): what is there
# already is set aside for the test and put back after it
HEAD_FILES = (
    ".llama-deploy-ray",
    "llama-deploy-ray",
    "llama-deploy-ray.key",
    "ray_bootstrap_config.yaml",
    "ray_bootstrap_key.pem",
)


@dataclass
class RayUpCluster:
    config_file: Path
    env: dict[str, str]
    api_key: str

    def ray(self, *args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(RAY_BIN / "ray"), *args],
            cwd=ROOT,  # file_mounts' "." is the repository
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if done.returncode != 0:
            pytest.fail(f"ray {' '.join(args)} exited {done.returncode}:\n{done.stdout[-4000:]}")
        return done


def _install_sshd_and_rsync() -> None:
    if shutil.which("sshd", path="/usr/sbin:/usr/bin") and shutil.which("rsync"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    packages = ["openssh-server", "rsync"]
    installed = subprocess.run(["apt-get", "install", "-y", "-q", *packages], env=env)
    if installed.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
        subprocess.run(["apt-get", "install", "-y", "-q", *packages], env=env, check=True)


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def _start_sshd(workdir: Path, client_key: Path) -> subprocess.Popen[bytes]:
    """An sshd of the test's own: its host key, its authorized key, on 127.0.0.1 only."""
    if not _port_is_free(SSH_PORT):
        pytest.fail(f"127.0.0.1:{SSH_PORT} is taken; ray up's local provider needs it for SSH")
    host_key = workdir / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", host_key], check=True)
    authorized = workdir / "authorized_keys"
    authorized.write_text(client_key.with_suffix(".pub").read_text())
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    sshd = subprocess.Popen(
        [
            "/usr/sbin/sshd",
            "-D",
            "-e",
            "-p",
            str(SSH_PORT),
            "-h",
            str(host_key),
            "-o",
            "ListenAddress=127.0.0.1",
            "-o",
            f"AuthorizedKeysFile={authorized}",
            "-o",
            "PermitRootLogin=prohibit-password",
            "-o",
            "PasswordAuthentication=no",
            "-o",
            "StrictModes=no",
            "-o",
            f"PidFile={workdir / 'sshd.pid'}",
        ],
        stderr=(workdir / "sshd.log").open("wb"),
    )
    wait_for(lambda: not _port_is_free(SSH_PORT), timeout_s=30, what="sshd to listen")
    return sshd


def _cluster_file(workdir: Path, client_key: Path) -> Path:
    """cluster.yaml as a user copies it, pointed at this machine."""
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["auth"] = {"ssh_user": getpass.getuser(), "ssh_private_key": str(client_key)}
    config["min_workers"] = config["max_workers"] = 0
    path = workdir / "cluster.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _editable_location() -> str | None:
    shown = subprocess.run(
        [sys.executable, "-m", "pip", "show", "llama-deploy-ray"], capture_output=True, text=True
    ).stdout
    marker = "Editable project location: "
    found = [line.removeprefix(marker) for line in shown.splitlines() if line.startswith(marker)]
    return found[0] if found else None


@contextlib.contextmanager
def _head_home_set_aside(workdir: Path) -> Iterator[None]:
    """The head's home as a new machine's, and as it was again afterwards."""
    head_home = Path(pwd.getpwnam(getpass.getuser()).pw_dir)
    aside = workdir / "set_aside"
    aside.mkdir()
    for name in HEAD_FILES:
        if (head_home / name).exists():
            shutil.move(head_home / name, aside / name)
    try:
        yield
    finally:
        for name in HEAD_FILES:
            path = head_home / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
            if (aside / name).exists():
                shutil.move(aside / name, path)


@contextlib.contextmanager
def _editable_install_kept() -> Iterator[None]:
    """The head's setup command installs the package into the head's Python, which is this
    one: an editable install is made editable again afterwards."""
    editable = _editable_location()
    try:
        yield
    finally:
        if editable:
            subprocess.run(
                [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e", editable],
                check=True,
            )


@pytest.fixture(scope="module")
def ray_up(tmp_path_factory) -> Iterator[RayUpCluster]:
    stop_shared_core()
    _install_sshd_and_rsync()
    workdir = tmp_path_factory.mktemp("ray_up")
    home = workdir / "home"  # the user's machine: ~/.llama-deploy-ray.key lives here
    home.mkdir()
    api_key = "ray-up-test-key-0123456789"
    (home / ".llama-deploy-ray.key").write_text(api_key + "\n")
    client_key = workdir / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", client_key], check=True)
    env = {**os.environ, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cluster = RayUpCluster(_cluster_file(workdir, client_key), env, api_key)
    with _editable_install_kept(), _head_home_set_aside(workdir):
        sshd = _start_sshd(workdir, client_key)
        try:
            cluster.ray("up", "-y", "--no-config-cache", str(cluster.config_file), timeout_s=900)
            yield cluster
        finally:
            subprocess.run(
                [str(RAY_BIN / "ray"), "down", "-y", str(cluster.config_file)],
                cwd=ROOT,
                env=env,
                capture_output=True,
                timeout=300,
            )
            sshd.terminate()
            sshd.wait(timeout=30)
            subprocess.run(["ray", "stop", "--force"], capture_output=True)
            subprocess.run(["pkill", "haproxy"])


@pytest.mark.timeout(1500)
def test_ray_up_then_a_workflow_deployed_from_the_head_answers_a_client(ray_up) -> None:
    ray_up.ray(
        "exec",
        str(ray_up.config_file),
        "python3 ~/llama-deploy-ray/examples/quickstart/workflow.py",
        timeout_s=300,
    )
    config = ControlPlaneConfig(host="127.0.0.1", port=API_PORT, api_key=ray_up.api_key)
    with LlamaDeployClient(config, timeout=120) as client:
        assert client.create_session().run("my_workflow", arg1="up") == "up_result"
    keyless = ControlPlaneConfig(host="127.0.0.1", port=API_PORT)
    with LlamaDeployClient(keyless, timeout=30) as client, pytest.raises(UnauthorizedError):
        client.list_services()
    # the file's start commands have Serve run HAProxy through llama-deploy-ray-haproxy
    admin = {
        c.laddr.port: c.laddr.ip
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port in (8404, 9101)
    }
    assert admin == {8404: "127.0.0.1", 9101: "127.0.0.1"}
