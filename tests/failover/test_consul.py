"""`ConsulRegistry` against the fake Consul agent, and against a real one when CONSUL_HTTP_ADDR
names it (the `[live]` cases, each under a unique key and service that it cleans up).

TTLs are short (0.5 s on the fake, 1 s live) so that expiry is seen within seconds.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import pytest

from failover.consul import ConsulRegistry, ConsulSettings, RegistryError
from tests.failover.fake_consul import FakeConsul
from tests.reference import wait_for

LIVE_ADDR = os.environ.get("CONSUL_HTTP_ADDR")
SKIP_LIVE = pytest.mark.skipif(
    not LIVE_ADDR, reason="set CONSUL_HTTP_ADDR to run against a real Consul agent"
)


@dataclass
class Target:
    settings: ConsulSettings  # unique service and key for this test
    expiry_s: float  # how long a lapsed check may take to show as critical


@pytest.fixture
def fake() -> Iterator[FakeConsul]:
    with FakeConsul() as agent:
        yield agent


@pytest.fixture(params=["fake", pytest.param("live", marks=SKIP_LIVE)])
def target(request: pytest.FixtureRequest) -> Target:
    unique = uuid.uuid4().hex[:8]
    names = {"service": f"ringpipe-test-{unique}", "key": f"ringpipe-test/{unique}/state"}
    if request.param == "fake":
        agent = request.getfixturevalue("fake")
        return Target(ConsulSettings(address=agent.address, ttl_s=0.5, **names), expiry_s=3.0)
    scheme, _, address = LIVE_ADDR.rpartition("://")
    token = os.environ.get("CONSUL_HTTP_TOKEN")
    settings = ConsulSettings(address, scheme or "http", token, ttl_s=1.0, **names)
    return Target(settings, expiry_s=15.0)


@pytest.fixture
def make_registry(target: Target) -> Iterator[Callable[..., ConsulRegistry]]:
    """`make_registry(**settings_overrides)`; every registry made is cleared afterwards."""
    made: list[ConsulRegistry] = []

    def make(**overrides: object) -> ConsulRegistry:
        made.append(ConsulRegistry(replace(target.settings, **overrides)))
        return made[-1]

    yield make
    for registry in made:
        registry.clear()


def closed_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_load_is_none_until_saved_then_round_trips(make_registry):
    registry = make_registry()
    assert registry.load() is None
    state = {"epoch": 3, "replicas": {"r0": {"actor": "replica-r0", "pg": None}}, "note": "ünï"}
    registry.save(state)
    assert registry.load() == state
    assert make_registry().load() == state  # a restarted controller finds it


def test_clear_forgets_state_and_replicas(make_registry, target):
    registry = make_registry()
    registry.save({"epoch": 1})
    registry.replica_up("r0", "10.0.0.1:50051")
    wait_for(lambda: registry.live_replicas() == ["r0"], target.expiry_s, "r0 live")
    make_registry().clear()  # another instance: it finds the replicas through Consul
    assert registry.load() is None
    wait_for(lambda: registry.live_replicas() == [], target.expiry_s, "no replicas")


def test_replica_up_is_listed_until_its_ttl_lapses(make_registry, target):
    registry = make_registry()
    registry.replica_up("r0", "10.0.0.1:50051")
    registry.replica_up("r1", "10.0.0.2:50051")
    wait_for(lambda: registry.live_replicas() == ["r0", "r1"], target.expiry_s, "both live")
    wait_for(lambda: registry.live_replicas() == [], target.expiry_s, "both TTLs lapsed")


def test_replica_alive_keeps_it_listed_past_several_ttls(make_registry, target):
    registry = make_registry()
    registry.replica_up("r0", "10.0.0.1:50051")
    registry.replica_up("r1", "10.0.0.2:50051")
    wait_for(lambda: registry.live_replicas() == ["r0", "r1"], target.expiry_s, "both live")
    ttl_s = target.settings.ttl_s
    # a heartbeat loop for r0 only, four periods per TTL, for four TTLs
    end = time.monotonic() + 4 * ttl_s
    while time.monotonic() < end:
        registry.replica_alive("r0")
        assert "r0" in registry.live_replicas()
        time.sleep(ttl_s / 4)
    assert registry.live_replicas() == ["r0"]


def test_replica_down_removes_it(make_registry, target):
    registry = make_registry()
    registry.replica_up("r0", "10.0.0.1:50051")
    registry.replica_up("r1", "10.0.0.2:50051")
    wait_for(lambda: registry.live_replicas() == ["r0", "r1"], target.expiry_s, "both live")
    registry.replica_down("r0")
    registry.replica_alive("r1")
    wait_for(lambda: registry.live_replicas() == ["r1"], target.expiry_s, "r0 gone")


def test_service_instance_carries_the_replica(fake):
    registry = ConsulRegistry(ConsulSettings(address=fake.address, service="svc"))
    registry.replica_up("r7", "10.0.0.7:50051")
    service = fake.services["svc-r7"]
    assert (service["Service"], service["Address"], service["Port"]) == ("svc", "10.0.0.7", 50051)
    assert service["Meta"] == {"replica_id": "r7", "address": "10.0.0.7:50051"}
    check = fake.checks["service:svc-r7"]
    assert (check["ttl_s"], check["deregister_s"], check["status"]) == (10.0, 60.0, "passing")


def test_token_is_sent_on_every_call_and_the_environment_does_not_override_it(fake, monkeypatch):
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "from-the-environment")
    registry = ConsulRegistry(ConsulSettings(address=fake.address, token="s3cret"))
    registry.save({"epoch": 1})
    registry.load()
    registry.replica_up("r0", "10.0.0.1:1")
    registry.replica_alive("r0")
    registry.live_replicas()
    registry.replica_down("r0")
    registry.clear()
    assert set(fake.tokens) == {"s3cret"}
    fake.tokens.clear()
    ConsulRegistry(ConsulSettings(address=fake.address)).load()
    assert fake.tokens == [None]


def test_replica_alive_registers_a_reaped_replica_again(fake):
    registry = ConsulRegistry(ConsulSettings(address=fake.address, ttl_s=0.2, deregister_after_s=0.1))
    registry.replica_up("r0", "10.0.0.1:50051")
    wait_for(lambda: registry.live_replicas() == [] and not fake.services, 5.0, "r0 reaped")
    registry.replica_alive("r0")
    assert registry.live_replicas() == ["r0"]


def test_unreachable_consul_raises_registry_error_naming_the_address():
    address = closed_address()
    registry = ConsulRegistry(ConsulSettings(address=address, request_timeout_s=2.0))
    for call in (registry.load, lambda: registry.save({}), registry.live_replicas,
                 lambda: registry.replica_up("r0", "10.0.0.1:1")):
        with pytest.raises(RegistryError, match=address) as info:
            call()
        assert info.value.address == address


def test_replica_alive_only_logs_when_consul_fails(fake, caplog):
    registry = ConsulRegistry(ConsulSettings(address=fake.address))
    registry.replica_up("r0", "10.0.0.1:1")
    with caplog.at_level(logging.WARNING, logger="ringpipe.failover"):
        fake.fail_status = 500
        registry.replica_alive("r0")
        ConsulRegistry(ConsulSettings(address=closed_address())).replica_alive("r0")
        fake.fail_status = None
        registry.replica_alive("never-registered")
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 3, messages
    assert fake.address in messages[0] and "r0" in messages[0]
    assert "never-registered" in messages[2]
