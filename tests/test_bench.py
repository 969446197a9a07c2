"""The benchmark harness runs end to end on a tiny size (it reports; it asserts nothing about
the figures)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .conftest import ROOT


def test_bench_harness_smoke(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench/run.py"),
            "--quick",
            "--modes",
            "default",
            # hello and the streaming workload; the waiting and CPU-bound ones add only time
            "--workloads",
            "stream3",
            "--out",
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((tmp_path / "latest.json").read_text())
    hello = results["default"]["hello"]
    for system in (
        "in_process",
        "serve_http",
        "serve_http_again",
        "serve_handle",
        "ours_sync_client",
        "ours_async_client",
        "ours_python_api",
        "ours_nested_call",
    ):
        assert hello[system]["p50_ms"] > 0, system
    assert results["default"]["memory"]["points"]
    assert (tmp_path / "latest.png").stat().st_size > 0
    assert "bare Serve over HTTP" in done.stdout
    assert "bare Serve again / bare Serve" in done.stdout


def test_client_cpu_bench_smoke() -> None:
    import socket

    with socket.socket() as probe:  # a free port for its stub server
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench/client_cpu.py"), "--calls", "50", "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    for row in ("httpx AsyncClient post", "AsyncLlamaDeployClient run", "LlamaDeployClient run"):
        assert f"| {row} |" in done.stdout
