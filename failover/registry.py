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
import logging
from typing import Protocol

log = logging.getLogger("ringpipe.registry")


class Registry(Protocol):
    def load(self) -> dict | None:
        """The saved state, or None when there is none."""

    def save(self, state: dict) -> None: ...

    def clear(self) -> None:
        """Forget the state and every replica (a clean shutdown)."""

    def replica_up(self, replica_id: str, address: str) -> None: ...

    def replica_alive(self, replica_id: str) -> None: ...

    def replica_down(self, replica_id: str) -> None: ...

    # how often `replica_alive` must be called at least (a third of a TTL); None: no TTL to keep
    renew_every_s: float | None


class GcsRegistry:
    """The controller's state under one key of Ray's GCS key-value store."""

    renew_every_s = None  # the liveness calls are no-ops

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


class RegistryWriter:
    """Every registry call, made by one background thread: the controller never waits on the registry.

    `save` keeps only the newest state (older unsaved ones are superseded); the liveness calls
    (`replica_up`, `replica_alive`, `replica_down`) are made in order. A failed call is retried
    with backoff until it succeeds or is superseded; meanwhile `health()` says the registry is
    degraded and why. `load` (a restart) is retried the same way by its caller.
    """

    def __init__(self, registry: Registry, retry_s: float = 0.5, max_retry_s: float = 10.0) -> None:
        import collections
        import threading

        self.registry, self.retry_s, self.max_retry_s = registry, retry_s, max_retry_s
        self.renew_every_s = getattr(registry, "renew_every_s", None)
        self._cond = threading.Condition()
        self._state: dict | None = None
        self._calls: collections.deque = collections.deque()
        self._error: str | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="registry", daemon=True)
        self._thread.start()

    def health(self) -> tuple[bool, str]:
        """(ok, why not)."""
        with self._cond:
            return self._error is None, self._error or ""

    def failed(self, why: str | None) -> None:
        """Say the registry is degraded (`why`), or (None) that it answers again."""
        with self._cond:
            self._error = why

    def save(self, state: dict) -> None:
        with self._cond:
            self._state = state
            self._cond.notify()

    def replica_up(self, replica_id: str, address: str) -> None:
        self._call("replica_up", replica_id, address)

    def replica_alive(self, replica_id: str) -> None:
        with self._cond:  # renewals pile up only while the registry is down: keep one per replica
            if ("replica_alive", (replica_id,)) in self._calls:
                return
        self._call("replica_alive", replica_id)

    def replica_down(self, replica_id: str) -> None:
        self._call("replica_down", replica_id)

    def _call(self, method: str, *args) -> None:
        with self._cond:
            self._calls.append((method, args))
            self._cond.notify()

    def stop(self, final=None, timeout_s: float = 10.0) -> None:
        """Finish what is queued, then make the `final` call (e.g. `registry.clear`) and stop."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout_s)
        if final is not None:
            try:
                final()
            except Exception as exc:  # noqa: BLE001 — shutting down: say it and go on
                log.warning("registry: %s failed at shutdown: %s", getattr(final, "__name__", final), exc)

    def _run(self) -> None:
        backoff = self.retry_s
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopped or self._state is not None or self._calls)
                if self._stopped and self._state is None and not self._calls:
                    return
                state, self._state = self._state, None
                call = self._calls[0] if self._calls else None
            try:
                if state is not None:
                    self.registry.save(state)
                if call is not None:
                    getattr(self.registry, call[0])(*call[1])
            except Exception as exc:  # noqa: BLE001 — kept, retried, and shown in status
                why = f"{type(exc).__name__}: {exc}"
                log.warning("registry unavailable (%s); retrying in %.1fs", why, backoff)
                with self._cond:
                    if self._state is None and state is not None:
                        self._state = state  # not superseded: save it again
                    self._error = why
                    if self._stopped:
                        return
                    self._cond.wait(backoff)
                backoff = min(backoff * 2, self.max_retry_s)
                continue
            backoff = self.retry_s
            with self._cond:
                if call is not None and self._calls and self._calls[0] is call:
                    self._calls.popleft()
                self._error = None
