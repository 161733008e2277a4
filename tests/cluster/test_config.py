"""Config validation: every bad value is one clear error naming its key."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.config import ConfigError, load_config, parse_config

BASE = {"model": {"path": "/models/demo"}}


def with_(section: str, key: str, value) -> dict:
    return {**BASE, section: {**BASE.get(section, {}), key: value}}


@pytest.mark.parametrize(
    "section,key,value",
    [
        ("pipeline", "stages", 0),
        ("pipeline", "max_batch", -1),
        ("pipeline", "max_seq_len", "long"),
        ("pipeline", "placement_strategy", "EVERYWHERE"),
        ("pipeline", "tensor_parallel", 0),
        ("transport", "timeout_s", 0),
        ("model", "dtype", "float8"),
        ("model", "device", "tpu"),
        ("pipeline", "no_such_key", 1),
    ],
)
def test_bad_value_names_its_key(section, key, value):
    with pytest.raises(ConfigError) as err:
        parse_config(with_(section, key, value))
    assert f"'{section}.{key}'" in str(err.value)


def test_cross_field_rules_name_the_section():
    with pytest.raises(ConfigError, match="keepalive_s"):
        parse_config({**BASE, "transport": {"timeout_s": 1, "keepalive_s": 2}})
    with pytest.raises(ConfigError, match="float16"):
        parse_config({"model": {"path": "x", "dtype": "float16"}})
    with pytest.raises(ConfigError, match="'model'"):
        parse_config({})


@given(stages=st.integers(1, 64), batch=st.integers(1, 1024), chunk=st.integers(1, 4096))
def test_valid_values_reach_the_replica_spec(stages, batch, chunk):
    cfg = parse_config({**BASE, "pipeline": {"stages": stages, "max_batch": batch, "prefill_chunk": chunk}})
    spec = cfg.replica_spec()
    assert (spec.stages, spec.max_batch, spec.prefill_chunk) == (stages, batch, chunk)
    assert spec.model_dir == "/models/demo"


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  path: /m\npipeline:\n  stages: 3\n")
    assert load_config(path).pipeline.stages == 3
    assert load_config(path, {"pipeline": {"stages": 2}}).pipeline.stages == 2
    path.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="no such"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert files
    for path in files:
        if path.name.startswith("cluster"):
            continue  # Ray cluster-launcher configs, not ours
        load_config(path)
