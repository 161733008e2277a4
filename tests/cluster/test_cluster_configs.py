"""configs/cluster.yaml (AWS) and configs/cluster-local.yaml (on-premise) pass the checks `ray up`
makes before it starts anything: Ray's defaults for the provider merged in (`prepare_config`) and
Ray's JSON schema of cluster configs (`validate_config`). Nothing here talks to AWS (boto3 is kept
out of reach): that is `ray up`'s next step, which looks up instance types and security groups.
tests/cluster/test_ray_up.py runs the on-premise one for real."""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from cluster.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BOTH = ["cluster.yaml", "cluster-local.yaml"]


def raw(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def checked(cfg: dict) -> dict:
    """What `ray up` does with a config before it touches any machine: defaults, then the schema."""
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


@pytest.fixture(autouse=True)
def no_aws(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)  # any AWS call would fail to import


@pytest.mark.parametrize("name", BOTH)
def test_ray_accepts_the_config(name):
    cfg = checked(raw(name))
    assert cfg["head_node_type"] in cfg["available_node_types"]


def test_a_misspelt_key_is_rejected_by_name():
    cfg = raw("cluster.yaml")
    cfg["setup_command"] = cfg.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError, match="'setup_command' was unexpected"):
        checked(cfg)


def test_a_wrong_value_is_rejected_naming_the_field():
    cfg = raw("cluster.yaml")
    cfg["available_node_types"]["ringpipe.gpu"]["resources"]["GPU"] = 0.5  # Ray counts whole GPUs here
    with pytest.raises(jsonschema.ValidationError) as error:
        checked(cfg)
    assert list(error.value.path) == ["available_node_types", "ringpipe.gpu", "resources", "GPU"]


def test_a_local_cluster_without_its_machines_is_refused():
    cfg = raw("cluster-local.yaml")
    del cfg["provider"]["worker_ips"]
    with pytest.raises(Exception, match="worker_ips"):
        checked(cfg)


def test_local_cluster_starts_every_worker_listed():
    cfg = checked(raw("cluster-local.yaml"))
    (node_type,) = cfg["available_node_types"].values()
    assert node_type["min_workers"] == node_type["max_workers"] == len(cfg["provider"]["worker_ips"]) == 2


def test_aws_gpu_nodes_hold_every_stage_of_the_service():
    """configs/serve.yaml's replicas, standbys included, fit the GPU nodes `ray up` starts, one GPU per stage."""
    cfg = checked(raw("cluster.yaml"))
    service = load_config(CONFIGS / "serve.yaml")
    node_types = cfg["available_node_types"]
    gpus = sum(t.get("min_workers", 0) * t["resources"].get("GPU", 0) for t in node_types.values())
    assert service.model.device == "cuda"
    assert gpus >= (service.replicas.count + service.replicas.standby) * service.pipeline.stages
    assert node_types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert sum(t.get("min_workers", 0) for t in node_types.values()) <= cfg["max_workers"]


@pytest.mark.parametrize("name", BOTH)
def test_every_node_joins_with_the_clusters_token(name):
    cfg = raw(name)
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    ray_starts = [c for c in starts if re.search(r"ray start\b", c)]
    assert len(ray_starts) == 2
    for command in ray_starts:
        assert "RAY_AUTH_MODE=token" in command and "RAY_AUTH_TOKEN_PATH=$HOME/.ray/auth_token" in command
        assert "--disable-usage-stats" in command and "RAY_USAGE_STATS_ENABLED=0" in command
        assert "ulimit -n 65536" not in command  # fails where the hard limit is lower
    assert "~/.ray/auth_token" in cfg["file_mounts"]  # the same token file on every node


@pytest.mark.parametrize("name", BOTH)
def test_the_head_deploys_ringpipe_in_the_background(name):
    cfg = raw(name)
    (deploy,) = [c for c in cfg["head_start_ray_commands"] if "ringpipe deploy" in c]
    assert "ringpipe deploy --config ~/ringpipe/configs/serve.yaml --address auto" in deploy
    assert "RAY_AUTH_MODE=token" in deploy and 'RINGPIPE_TOKEN="$(cat ~/.ringpipe/token)"' in deploy
    # nohup, no terminal, backgrounded: `ray up` returns and the deploy outlives the SSH session
    assert deploy.lstrip().count("nohup ") == 1 and deploy.rstrip().endswith("&") and "< /dev/null" in deploy
    assert cfg["head_start_ray_commands"].index(deploy) == len(cfg["head_start_ray_commands"]) - 1
    assert (CONFIGS / "serve.yaml").is_file() and "~/ringpipe" in cfg["file_mounts"]


def test_local_nodes_never_stop_ray():
    """`ray stop` stops every Ray process of the SSH user on that machine: nodes sharing a machine
    (as in test_ray_up.py) would stop each other."""
    cfg = raw("cluster-local.yaml")
    assert not any("ray stop" in c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])


def test_aws_installs_the_ray_that_runs_ray_up():
    """The launcher and the cluster must run the same Ray; torch comes from PyPI (its CUDA build)."""
    setup = " ".join(raw("cluster.yaml")["setup_commands"])
    assert f'"ray[serve]=={ray.__version__}"' in setup
    assert re.search(r'pip install -q "torch==[\d.]+"', setup) and "--index-url" not in setup
    assert f'"ray[serve]=={ray.__version__}"' in " ".join(raw("cluster-local.yaml")["setup_commands"])
