"""The registries with the real controller: Ray's GCS by default, Consul (against the local fake agent
of `fake_consul.py`: no Consul server can run on these machines; `test_consul.py` has the live suite)."""

from __future__ import annotations

import time

import pytest
import ray

from cluster import chaos
from failover.consul import ConsulRegistry, ConsulSettings
from failover.controller import NAMESPACE, Controller, ControllerSettings
from failover.registry import GcsRegistry
from shards.spec import ReplicaSpec
from tests.failover.fake_consul import FakeConsul
from tests.reference import wait_for

pytestmark = pytest.mark.slow


def test_gcs_registry_round_trip(ray_cluster):
    registry = GcsRegistry("test-registry/state")
    assert registry.load() is None
    state = {"epoch": 7, "slots": {"replica-0": {"pipeline": "p1", "epoch": 7, "paused": False}}}
    registry.save(state)
    assert GcsRegistry("test-registry/state").load() == state  # a new reader (a restarted controller) sees it
    registry.clear()
    assert registry.load() is None


@pytest.fixture
def consul_controller(ray_cluster, make_checkpoint):
    checkpoint = make_checkpoint("llama", vocab=128, layers=2, hidden=32)
    with FakeConsul() as fake:
        settings = ConsulSettings(address=fake.address, service="test-replica", ttl_s=1.5, key="test/ringpipe")
        spec = ReplicaSpec(model_dir=str(checkpoint), stages=1, max_batch=2, max_seq_len=64, torch_threads=1)
        controller = Controller.options(name="consul-controller", namespace=NAMESPACE, lifetime="detached").remote(
            spec, ControllerSettings(replicas=2, consul=settings), "consul-controller"
        )
        try:
            yield controller, ConsulRegistry(settings)
        finally:
            ray.get(controller.shutdown.remote(), timeout=60)
            ray.kill(controller, no_restart=True)


def test_controller_keeps_membership_in_consul(consul_controller):
    controller, consul = consul_controller
    membership = ray.get(controller.start.remote())
    assert membership.replica_ids == ("replica-0", "replica-1")
    # the registry is written by a background writer, off the controller's loop: soon, not at once
    wait_for(lambda: (consul.load() or {}).get("epoch") == membership.epoch, 30, "the membership saved in Consul")
    saved = consul.load()
    assert {sid: s["pipeline"] for sid, s in saved["slots"].items()} == {m.replica_id: m.pipeline for m in membership.members}

    # the monitor renews each replica's 1.5 s TTL check (every 0.5 s): still passing two TTLs later,
    # looked at every 50 ms
    until = time.monotonic() + 3.0
    while time.monotonic() < until:
        assert consul.live_replicas() == ["replica-0", "replica-1"], "a live replica's TTL check lapsed"
        time.sleep(0.05)

    # a dead replica leaves Consul's live list, and comes back once rebuilt
    victim = membership.get("replica-1")
    ray.kill(ray.get_actor(f"{victim.pipeline}.stage-0.tp0", namespace=NAMESPACE), no_restart=True)
    wait_for(lambda: consul.live_replicas() == ["replica-0"], 30, "replica-1 to leave Consul")
    wait_for(lambda: consul.live_replicas() == ["replica-0", "replica-1"], 120, "replica-1 to be rebuilt")
    rebuilt = ray.get(controller.membership.remote())
    assert rebuilt.get("replica-1").pipeline != victim.pipeline

    # a restarted controller recovers the membership from Consul's KV
    chaos.kill_controller(controller)
    after = ray.get(controller.membership.remote())
    assert after.epoch >= rebuilt.epoch  # recovered, not restarted from 0 (weights may have moved it on)
    assert [(m.replica_id, m.pipeline) for m in after.members] == [(m.replica_id, m.pipeline) for m in rebuilt.members]
    wait_for(lambda: consul.load()["epoch"] == ray.get(controller.membership.remote()).epoch, 30,
             "the restarted controller's state to be saved")


def test_consul_down_at_start_degrades_the_registry_not_the_controller(ray_cluster, make_checkpoint):
    """Consul failing every call when the controller starts: the controller still starts and
    serves, says the registry is degraded and why, and saves its state once Consul answers."""
    checkpoint = make_checkpoint("llama", vocab=128, layers=2, hidden=32)
    with FakeConsul() as fake:
        fake.fail_status = 500
        settings = ConsulSettings(address=fake.address, service="down-replica", ttl_s=1.5, key="test/down")
        spec = ReplicaSpec(model_dir=str(checkpoint), stages=1, max_batch=2, max_seq_len=64, torch_threads=1)
        controller = Controller.options(name="consul-down", namespace=NAMESPACE).remote(
            spec, ControllerSettings(replicas=1, consul=settings, registry_wait_s=1.0), "consul-down"
        )
        try:
            membership = ray.get(controller.start.remote(), timeout=120)
            assert membership.replica_ids == ("replica-0",)
            health = ray.get(controller.health.remote())
            assert not health["registry_ok"] and "500" in health["registry_error"], health
            consul = ConsulRegistry(settings)
            fake.fail_status = None
            wait_for(lambda: ray.get(controller.health.remote())["registry_ok"], 30, "the registry to recover")
            wait_for(lambda: (consul.load() or {}).get("epoch") == ray.get(controller.membership.remote()).epoch,
                     30, "the state to be saved in Consul")
            assert consul.live_replicas() == ["replica-0"]
        finally:
            fake.fail_status = None
            ray.get(controller.shutdown.remote(), timeout=60)
            ray.kill(controller, no_restart=True)
