"""Configs: they refuse nonsense, read the environment, and reach Serve as its options."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from llama_deploy_ray import (
    AutoscalingConfig,
    ControlPlaneConfig,
    WorkflowServiceConfig,
)
from llama_deploy_ray._cluster.packaging import pack_workflow

from .workflows import EchoWorkflow


def test_configs_refuse_nonsense() -> None:
    with pytest.raises(ValidationError, match="not both"):
        WorkflowServiceConfig(
            service_name="x", num_replicas=2, autoscaling=AutoscalingConfig(max_replicas=3)
        )
    with pytest.raises(ValidationError, match=r"min_replicas \(5\) is above max_replicas \(2\)"):
        AutoscalingConfig(min_replicas=5, max_replicas=2)
    with pytest.raises(ValidationError):
        WorkflowServiceConfig(service_name="x", num_replica=2)  # typo
    with pytest.raises(ValidationError):
        WorkflowServiceConfig(service_name="has space")
    with pytest.raises(ValidationError):
        ControlPlaneConfig(port=70000)


def test_configs_read_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("CONTROL_PLANE_PORT", "8123")
    assert ControlPlaneConfig().url == "http://127.0.0.1:8123"


def test_deployment_options_reach_serve() -> None:
    config = WorkflowServiceConfig(
        service_name="svc",
        autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=3, upscale_delay_s=2),
        max_ongoing_requests=7,
        ray_actor_options={"num_cpus": 0.5, "memory": 2**20, "resources": {"tpu": 1}},
        runtime_env={"env_vars": {"A": "1"}},
    )
    options = config.deployment_options()
    assert options["max_ongoing_requests"] == 7
    assert options["autoscaling_config"]["max_replicas"] == 3
    assert options["autoscaling_config"]["upscale_delay_s"] == 2
    assert "num_replicas" not in options
    assert options["ray_actor_options"] == {
        "num_cpus": 0.5,
        "num_gpus": 0.0,
        "memory": 2**20,
        "resources": {"tpu": 1},
        # Serve's fast mode holds 1,000 log records before writing them; ours write each
        "runtime_env": {"env_vars": {"RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1", "A": "1"}},
    }
    assert options["logging_config"] == {
        "encoding": "TEXT",
        "log_level": "INFO",
        "enable_access_log": False,
    }
    default = WorkflowServiceConfig(service_name="s").deployment_options()
    assert default["num_replicas"] == 1
    assert default["ray_actor_options"]["num_cpus"] == 0.25
    chosen = WorkflowServiceConfig(
        service_name="s",
        logging_config={"encoding": "JSON", "buffer_records": 50},
        runtime_env={"env_vars": {"RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "7"}},
    ).deployment_options()
    assert chosen["logging_config"]["encoding"] == "JSON"
    # a variable the user sets wins
    assert chosen["ray_actor_options"]["runtime_env"]["env_vars"] == {
        "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "7"
    }


def test_a_stopping_replica_waits_as_long_as_its_workflow_may_run() -> None:
    from llama_deploy_ray._shared.config import DRAIN_MARGIN_S, DRAIN_WITHOUT_TIMEOUT_S

    config = WorkflowServiceConfig(service_name="svc")
    assert config.deployment_options(45.0)["graceful_shutdown_timeout_s"] == 45.0 + DRAIN_MARGIN_S
    assert config.deployment_options(None)["graceful_shutdown_timeout_s"] == DRAIN_WITHOUT_TIMEOUT_S
    chosen = WorkflowServiceConfig(service_name="svc", graceful_shutdown_timeout_s=5)
    assert chosen.deployment_options(45.0)["graceful_shutdown_timeout_s"] == 5
    assert pack_workflow(EchoWorkflow(timeout=12)).timeout == 12.0
    assert pack_workflow("tests.workflows:EchoWorkflow").timeout is None
