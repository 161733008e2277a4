"""Where membership is kept, so that a restarted controller finds the replicas it had.

A registry stores one JSON-able dict (the controller's state: replicas, their
actor and placement-group names, the epoch, recent failovers) and hears about
each replica's life: `replica_up` when it joins the ring, `replica_alive` after
every heartbeat round it passed, `replica_down` when it leaves.

- `GcsRegistry` (the default): Ray's GCS key-value store. Nothing to run; the
  state lives as long as the Ray cluster. The liveness calls are no-ops: the
  controller's own monitor is the authority.
- `ConsulRegistry` (`failover/consul.py`): Consul's KV for the state, plus a
  Consul service per replica with a TTL check that `replica_alive` renews, so
  Consul's health API lists the live replicas for other tools.
"""

from __future__ import annotations

import json
from typing import Protocol


class Registry(Protocol):
    def load(self) -> dict | None:
        """The saved state, or None when there is none."""

    def save(self, state: dict) -> None: ...

    def clear(self) -> None:
        """Forget the state and every replica (a clean shutdown)."""

    def replica_up(self, replica_id: str, address: str) -> None: ...

    def replica_alive(self, replica_id: str) -> None: ...

    def replica_down(self, replica_id: str) -> None: ...


class GcsRegistry:
    """The controller's state under one key of Ray's GCS key-value store."""

    def __init__(self, key: str, namespace: str = "ringpipe") -> None:
        self.key, self.namespace = key.encode(), namespace

    def load(self) -> dict | None:
        from ray.experimental import internal_kv

        raw = internal_kv._internal_kv_get(self.key, namespace=self.namespace)
        return json.loads(raw) if raw else None

    def save(self, state: dict) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(self.key, json.dumps(state).encode(), overwrite=True, namespace=self.namespace)

    def clear(self) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_del(self.key, namespace=self.namespace)

    def replica_up(self, replica_id: str, address: str) -> None:
        pass

    def replica_alive(self, replica_id: str) -> None:
        pass

    def replica_down(self, replica_id: str) -> None:
        pass
