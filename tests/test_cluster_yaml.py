"""The cluster files pass the checks `ray up` makes before launching anything, and the cloud
variant starts the same core, the same way, as the file for machines you own."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from .conftest import ROOT

SAME_IN_BOTH = (
    "file_mounts",
    "rsync_exclude",
    "setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)


def checked(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    raw = yaml.safe_load((ROOT / name).read_text())
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return raw, config


def test_cluster_yaml_lists_machines_you_own() -> None:
    raw, config = checked("cluster.yaml")
    assert config["provider"]["type"] == "local"
    assert len(config["provider"]["worker_ips"]) >= 1
    assert any("llama-deploy-ray" in cmd for cmd in config["setup_commands"])
    assert any("deploy_core" in cmd for cmd in config["head_start_ray_commands"])
    assert "available_node_types" not in raw


def test_cluster_aws_yaml_lets_the_autoscaler_choose_machines() -> None:
    raw, config = checked("cluster-aws.yaml")
    local, _ = checked("cluster.yaml")
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}  # no replica on the head
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert any(t["min_workers"] < t["max_workers"] for t in workers)  # room to scale
    for key in SAME_IN_BOTH:
        assert raw[key] == local[key], f"{key} differs between cluster.yaml and cluster-aws.yaml"


def test_a_mistyped_node_type_is_refused_before_launch() -> None:
    raw = yaml.safe_load((ROOT / "cluster-aws.yaml").read_text())
    raw["available_node_types"]["cpu_worker"]["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(raw))
