"""cluster.yaml passes the checks `ray up` makes before launching anything."""

from __future__ import annotations

import copy

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from .conftest import ROOT


def test_cluster_yaml_is_a_valid_ray_cluster_config() -> None:
    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    assert config["provider"]["type"] == "local"
    assert len(config["provider"]["worker_ips"]) >= 1
    assert any("llama-deploy-ray" in cmd for cmd in config["setup_commands"])
    assert any("deploy_core" in cmd for cmd in config["head_start_ray_commands"])
    assert "available_node_types" not in raw
