"""Config validation: every bad value is one clear error naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.config import ConfigError, load_config, merge, parse_config

REPO = Path(__file__).resolve().parents[2]

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


def test_local_yaml_is_the_built_in_default():
    from cluster.config import LOCAL_DEFAULTS, demo_model_dir

    local = load_config(REPO / "configs" / "local.yaml")
    assert local == parse_config(LOCAL_DEFAULTS)
    assert local.model.directory == str(demo_model_dir())


def test_serve_yaml_is_valid_and_needs_its_token(monkeypatch):
    from cluster.config import auth_token

    cfg = load_config(REPO / "configs" / "serve.yaml")
    assert cfg.replicas.count == 4 and cfg.routing.key == "session"
    monkeypatch.delenv("RINGPIPE_TOKEN", raising=False)
    with pytest.raises(ConfigError, match=r"server\.auth\.token_env.*RINGPIPE_TOKEN"):
        auth_token(cfg)
    monkeypatch.setenv("RINGPIPE_TOKEN", "abc")
    assert auth_token(cfg) == "abc"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"routing": {"key": "sticky"}}, "routing.key"),
        ({"routing": {"load_factor": 0.5}}, "routing.load_factor"),
        ({"replicas": {"count": 0}}, "replicas.count"),
        ({"server": {"port": 70000}}, "server.port"),
        ({"server": {"auth": {"token_env": "A", "token_file": "/x"}}}, "server.auth"),
        ({"server": {"max_request_bytes": 10}}, "server.max_request_bytes"),
        ({"pipeline": {"max_queue": -1}}, "pipeline.max_queue"),
        ({"server": {"colour": "red"}}, "server.colour"),
        ({"replicas": {"standby": -1}}, "replicas.standby"),
        ({"failover": {"heartbeat": {"interval_s": 3, "timeout_s": 3}}}, "failover.heartbeat"),
        ({"failover": {"heartbeat": {"slow": {"count": 0}}}}, "failover.heartbeat.slow.count"),
        ({"failover": {"heartbeat": {"slow": {"threshold_ms": 0}}}}, "failover.heartbeat.slow.threshold_ms"),
        ({"failover": {"takeover": {"max_retries": -1}}}, "failover.takeover.max_retries"),
        ({"failover": {"takeover": {"max_resume_tokens": -5}}}, "failover.takeover.max_resume_tokens"),
        ({"failover": {"registry": {"backend": "etcd"}}}, "failover.registry.backend"),
        ({"failover": {"registry": {"consul": {"ttl_s": 0}}}}, "failover.registry.consul.ttl_s"),
        ({"failover": {"heartbeat": {"slow": {"max_paused_fraction": 1.5}}}},
         "failover.heartbeat.slow.max_paused_fraction"),
        ({"failover": {"heartbeat": {"slow": {"max_paused_fraction": -0.1}}}},
         "failover.heartbeat.slow.max_paused_fraction"),
        ({"failover": {"heartbeat": {"slow": {"peer_factor": 0.9}}}}, "failover.heartbeat.slow.peer_factor"),
        ({"failover": {"adaptive": {"enabled": "sometimes"}}}, "failover.adaptive.enabled"),
        ({"failover": {"adaptive": {"hot_cpu": 0}}}, "failover.adaptive.hot_cpu"),
        ({"failover": {"adaptive": {"hot_cpu": 1.5}}}, "failover.adaptive.hot_cpu"),
        ({"failover": {"adaptive": {"hot_s": 0}}}, "failover.adaptive.hot_s"),
        ({"failover": {"adaptive": {"idle_cpu": -0.1}}}, "failover.adaptive.idle_cpu"),
        ({"failover": {"adaptive": {"idle_s": -1}}}, "failover.adaptive.idle_s"),
        ({"failover": {"adaptive": {"recover_s": 0}}}, "failover.adaptive.recover_s"),
        ({"failover": {"adaptive": {"min_weight": 0}}}, "failover.adaptive.min_weight"),
        ({"failover": {"adaptive": {"min_weight": 1.1}}}, "failover.adaptive.min_weight"),
        ({"failover": {"adaptive": {"max_weight": 0.9}}}, "failover.adaptive.max_weight"),
        ({"failover": {"adaptive": {"stale_s": 0}}}, "failover.adaptive.stale_s"),
        ({"failover": {"adaptive": {"idle_cpu": 0.8, "hot_cpu": 0.8}}}, "failover.adaptive"),
        ({"failover": {"adaptive": {"cpu": 0.5}}}, "failover.adaptive.cpu"),
        ({"server": {"metrics_port": -1}}, "server.metrics_port"),
        ({"server": {"metrics_port": 65536}}, "server.metrics_port"),
    ],
)
def test_service_keys_are_validated_by_name(override, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        parse_config(merge({"model": {"demo": True}}, override))


def test_model_needs_a_path_unless_demo():
    with pytest.raises(ConfigError, match="config key 'model'.*model.path"):
        parse_config({"model": {}})


def test_failover_keys_reach_the_controller_and_coordinators(monkeypatch):
    from cluster.serve import controller_settings, coordinator_settings

    cfg = load_config(REPO / "configs" / "serve.yaml")
    monkeypatch.setenv("RINGPIPE_TOKEN", "abc")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "consul-secret")
    controller = controller_settings(cfg)
    assert (controller.replicas, controller.standby) == (4, 1)
    hb, slow = controller.heartbeat, controller.slow
    assert (hb.interval_s, hb.timeout_s) == (0.5, 3.0)
    assert (slow.threshold_s, slow.count, slow.pause_s, slow.max_paused_fraction, slow.peer_factor) == (
        0.2, 5, 5.0, 0.5, 1.5
    )
    assert controller.adaptive == cfg.failover.adaptive.adaptive_settings()
    assert controller.consul is None  # backend: gcs
    takeover = coordinator_settings(cfg).takeover
    assert (takeover.max_retries, takeover.retry_interval_s, takeover.max_resume_tokens) == (3, 0.1, 8192)

    consul = merge(cfg.model_dump(), {"failover": {"registry": {"backend": "consul"}}})
    settings = controller_settings(parse_config(consul)).consul
    assert (settings.address, settings.token, settings.key) == ("127.0.0.1:8500", "consul-secret", "ringpipe/state")
    monkeypatch.delenv("CONSUL_HTTP_TOKEN")
    with pytest.raises(ConfigError, match=r"failover\.registry\.consul\.token_env"):
        controller_settings(parse_config(consul))


def test_adaptive_and_slow_keys_have_their_defaults_and_reach_the_adaptive_settings():
    from failover.adaptive import AdaptiveSettings

    cfg = parse_config({"model": {"demo": True}})
    slow = cfg.failover.heartbeat.slow
    assert (slow.max_paused_fraction, slow.peer_factor) == (0.5, 1.5)
    assert cfg.failover.adaptive.adaptive_settings() == AdaptiveSettings()  # the designed rule by default
    serve = load_config(REPO / "configs" / "serve.yaml").failover  # spells out every key, at its default
    assert (serve.heartbeat, serve.adaptive) == (cfg.failover.heartbeat, cfg.failover.adaptive)
    custom = {"enabled": False, "hot_cpu": 0.9, "hot_s": 5, "idle_cpu": 0.1, "idle_s": 60, "recover_s": 20,
              "min_weight": 0.5, "max_weight": 1.5, "stale_s": 2}
    settings = parse_config(merge(BASE, {"failover": {"adaptive": custom}})).failover.adaptive.adaptive_settings()
    assert {k: getattr(settings, k) for k in custom} == custom
    assert (settings.hot_factor, settings.idle_factor) == (0.7, 1.2)  # −30 % / +20 %: the design's steps


def test_a_taken_metrics_port_is_one_error_naming_the_key():
    import socket

    from cluster.serve import check_metrics_ports
    from tests.conftest import free_port

    port = free_port(3)
    check_metrics_ports(port, 3)
    check_metrics_ports(0, 3)  # 0: Ray picks the ports
    with socket.socket() as held:
        held.bind(("127.0.0.1", port + 2))
        held.listen()
        with pytest.raises(ConfigError, match=rf"config key 'server.metrics_port': port {port + 2} on 127.0.0.1 "
                           rf"is taken .*3 nodes take ports {port}-{port + 2}"):
            check_metrics_ports(port, 3)
