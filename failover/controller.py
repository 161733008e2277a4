"""The controller: a named Ray actor that creates the pipeline replicas and publishes membership.

It owns every `Replica` (their placement groups and stage actors) and the
epoch-numbered `Membership` that coordinators route by. Coordinators find it by
name (`CONTROLLER_NAME` in `NAMESPACE`), read `membership()`, and wait for the
next change with `watch(epoch)`, which answers as soon as the epoch moves past
the one they hold (or after `timeout_s` with the current one).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import ray

from failover.membership import Member, Membership, StageInfo
from shards.replica import Replica
from shards.spec import ReplicaSpec

CONTROLLER_NAME = "ringpipe-controller"
NAMESPACE = "ringpipe"


@ray.remote(num_cpus=0, max_concurrency=32, max_restarts=0)
class Controller:
    def __init__(self, spec: ReplicaSpec, replicas: int) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be ≥ 1, got {replicas}")
        self.spec, self.count = spec, replicas
        self._replicas: dict[str, Replica] = {}
        self._membership = Membership()
        self._changed = threading.Condition()

    # -- life cycle
    def start(self, timeout_s: float = 600.0) -> Membership:
        """Start every replica (in parallel) and put them on the ring; returns the membership."""
        names = [f"replica-{i}" for i in range(self.count)]
        replicas = {name: Replica(self.spec, name=name) for name in names}
        with ThreadPoolExecutor(len(names)) as pool:
            futures = {name: pool.submit(r.start, timeout_s) for name, r in replicas.items()}
            errors = []
            for name, fut in futures.items():
                try:
                    fut.result()
                except Exception as exc:  # noqa: BLE001 — reported together below
                    errors.append(f"{name}: {exc}")
        if errors:
            for r in replicas.values():
                r.shutdown()
            raise RuntimeError("replicas failed to start: " + "; ".join(errors))
        for name in names:
            self._join(name, replicas[name])
        return self._membership

    def _join(self, name: str, replica: Replica) -> None:
        nodes = replica.nodes()
        tp = self.spec.tensor_parallel
        stages = tuple(
            StageInfo(p.index, nodes[p.index * tp]["node_id"], nodes[p.index * tp]["ip"], p.layer_start, p.layer_end)
            for p in replica.plans
        )
        with self._changed:
            self._replicas[name] = replica
            epoch = self._membership.epoch + 1
            member = Member(name, epoch, replica.head, stages, self.spec.max_batch)
            self._membership = Membership(epoch, (*self._membership.members, member))
            self._changed.notify_all()

    def shutdown(self) -> None:
        with self._changed:
            replicas = list(self._replicas.values())
            self._replicas.clear()
            self._membership = Membership(self._membership.epoch + 1, ())
            self._changed.notify_all()
        for r in replicas:
            r.shutdown()

    # -- reading
    def membership(self) -> Membership:
        return self._membership

    def watch(self, epoch: int, timeout_s: float = 10.0) -> Membership:
        """The membership once its epoch differs from `epoch`, or the current one after `timeout_s`."""
        with self._changed:
            self._changed.wait_for(lambda: self._membership.epoch != epoch, timeout=timeout_s)
            return self._membership

    def stats(self) -> dict[str, list[dict | None]]:
        """Each replica's per-stage stats (None for a stage that did not answer)."""
        with ThreadPoolExecutor(max(1, len(self._replicas))) as pool:
            futures = {name: pool.submit(r.stats, 2.0) for name, r in self._replicas.items()}
            return {name: fut.result() for name, fut in futures.items()}
