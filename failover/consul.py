"""The Consul backend of the membership registry (see `failover/registry.py`).

The controller's state is one JSON document under `ConsulSettings.key` in Consul's KV.
Each replica is an instance of the service `ConsulSettings.service`, id
`{service}-{replica_id}`, with its replica id in the meta field `replica_id` and one TTL
check (id `service:{service}-{replica_id}`) that starts passing and that
`replica_alive` renews (every heartbeat interval, or every third of the TTL if shorter);
Consul reaps an instance whose check stayed critical for `deregister_after_s`. `live_replicas` reads Consul's health API, so other tools can too.

Errors: every call raises `RegistryError` naming the agent and what failed, except
`replica_alive`, which a heartbeat loop calls: it logs a warning instead, and it
re-registers an instance Consul no longer knows (reaped) when this object registered it.
py-consul reads CONSUL_HTTP_* variables on its own; every one of them is overridden here
so that the settings alone decide.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import consul
import requests

log = logging.getLogger("ringpipe.failover")

_FAILURES = (consul.ConsulException, requests.RequestException)


@dataclass(frozen=True)
class ConsulSettings:
    address: str = "127.0.0.1:8500"  # host:port of a Consul agent's HTTP API
    scheme: str = "http"
    token: str | None = None  # ACL token, sent as X-Consul-Token
    service: str = "ringpipe-replica"
    ttl_s: float = 10.0
    key: str = "ringpipe/state"
    deregister_after_s: float = 60.0  # Consul's minimum is one minute
    request_timeout_s: float = 5.0  # bounds a heartbeat's wait on a hung agent


class RegistryError(Exception):
    """A Consul call failed; `address` is the agent, `action` what was attempted."""

    def __init__(self, address: str, action: str, cause: BaseException) -> None:
        self.address, self.action = address, action
        super().__init__(
            f"Consul at {address}: could not {action}: {cause!r}. Check that a Consul agent "
            f"listens there and that the ACL token, if any, allows it."
        )


def _split_host_port(address: str) -> tuple[str, int | None]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return address.strip("[]"), None
    return host.strip("[]"), int(port)


class ConsulRegistry:
    """The controller's state in Consul's KV, and one TTL-checked service per replica."""

    def __init__(self, settings: ConsulSettings) -> None:
        self.settings = settings
        host, port = _split_host_port(settings.address)
        self._client = consul.Consul(
            host=host, port=port or 8500, scheme=settings.scheme, token=settings.token,
            verify=True, connections_timeout=settings.request_timeout_s,
        )
        self._client.token = settings.token  # py-consul lets CONSUL_HTTP_TOKEN win otherwise
        self._addresses: dict[str, str] = {}  # replica id -> address, of those registered here
        # three renewals per TTL: a check lapses only when two in a row are late or lost
        self.renew_every_s = settings.ttl_s / 3

    def _service_id(self, replica_id: str) -> str:
        return f"{self.settings.service}-{replica_id}"

    def _check_id(self, replica_id: str) -> str:
        return f"service:{self._service_id(replica_id)}"

    def load(self) -> dict | None:
        try:
            _, entry = self._client.kv.get(self.settings.key)
        except _FAILURES as e:
            raise RegistryError(self.settings.address, f"read key {self.settings.key}", e) from e
        return json.loads(entry["Value"]) if entry and entry.get("Value") else None

    def save(self, state: dict) -> None:
        try:
            self._client.kv.put(self.settings.key, json.dumps(state))
        except _FAILURES as e:
            raise RegistryError(self.settings.address, f"write key {self.settings.key}", e) from e

    def clear(self) -> None:
        try:
            self._client.kv.delete(self.settings.key)
            _, entries = self._client.health.service(self.settings.service)
            ids = {entry["Service"]["ID"] for entry in entries or ()}
            for service_id in ids | {self._service_id(r) for r in self._addresses}:
                self._client.agent.service.deregister(service_id)
        except _FAILURES as e:
            raise RegistryError(self.settings.address, "clear the state and replicas", e) from e
        self._addresses.clear()

    def replica_up(self, replica_id: str, address: str) -> None:
        self._addresses[replica_id] = address
        try:
            self._register(replica_id, address)
        except _FAILURES as e:
            raise RegistryError(self.settings.address, f"register replica {replica_id}", e) from e

    def _register(self, replica_id: str, address: str) -> None:
        host, port = _split_host_port(address)
        check = consul.Check.ttl(f"{self.settings.ttl_s:g}s") | {
            "CheckID": self._check_id(replica_id),
            "Status": "passing",  # a TTL check starts critical unless told otherwise
            "DeregisterCriticalServiceAfter": f"{self.settings.deregister_after_s:g}s",
        }
        self._client.agent.service.register(
            self.settings.service, service_id=self._service_id(replica_id), address=host,
            port=port, meta={"replica_id": replica_id, "address": address}, check=check,
        )

    def replica_alive(self, replica_id: str) -> None:
        try:
            if self._client.agent.check.ttl_pass(self._check_id(replica_id)):
                return
            address = self._addresses.get(replica_id)
            what = "registering it again" if address else "call replica_up"
            log.warning("Consul at %s does not know replica %s; %s", self.settings.address, replica_id, what)
            if address:
                self._register(replica_id, address)
        except _FAILURES as e:
            log.warning("Consul at %s: could not renew replica %s's TTL check: %r",
                        self.settings.address, replica_id, e)

    def replica_down(self, replica_id: str) -> None:
        self._addresses.pop(replica_id, None)
        try:
            self._client.agent.service.deregister(self._service_id(replica_id))
        except _FAILURES as e:
            raise RegistryError(self.settings.address, f"deregister replica {replica_id}", e) from e

    def live_replicas(self) -> list[str]:
        """Replica ids whose TTL check passes, by Consul's health API."""
        try:
            _, entries = self._client.health.service(self.settings.service, passing=True)
        except _FAILURES as e:
            raise RegistryError(self.settings.address, "list live replicas", e) from e
        return sorted(entry["Service"]["Meta"]["replica_id"] for entry in entries or ())
