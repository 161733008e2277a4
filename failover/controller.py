"""The controller: a detached, named, restartable Ray actor that keeps the pipeline replicas alive.

It creates every replica (a detached placement group and stage actors, named
so that they outlive it), watches them (`failover/rounds.py` drives
`failover/monitor.py`; a death is handled there), and publishes
the epoch-numbered `Membership` coordinators route by. Coordinators find it by
name (`CONTROLLER_NAME` in `NAMESPACE`) and follow the membership with
`watch(epoch)`, a long poll that holds no thread: the controller is an asyncio
actor, and a thousand waiting watchers are a thousand parked coroutines.

Ring positions are slots (`replica-0` …, `failover/positions.py`). When a stage
dies, its slot's member leaves (epoch + 1) — in the same change a warm standby,
if there is one, takes the slot — and a new pipeline is built in the background
(`failover/recovery.py`). A slow member stays but is off the ring; a member's
adaptive weight scales how much new work it takes.

Concurrency, said once: all state (positions, monitor, membership) lives on the
actor's event loop and is touched only there, so there is no lock. Nothing on
the loop blocks: Ray calls that wait (building, attaching, stopping pipelines)
run in `Placement`'s thread pool, registry I/O in `RegistryWriter`'s thread.
Every background task is kept in `self._tasks` and cancelled by `shutdown`.

Everything needed to find the replicas again is saved in the registry (Ray's
GCS by default) at every change; a restarted controller attaches to them by
name and carries on from the saved epoch. Until it has read the registry it
answers no `watch` with a membership, so no coordinator's ring is emptied.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from dataclasses import dataclass

import ray

from failover import recovery, rounds
from failover.adaptive import AdaptiveSettings
from failover.heartbeat import HeartbeatSettings
from failover.membership import Membership, encode
from failover.metrics import record_membership
from failover.monitor import Monitor
from failover.placement import Placement
from failover.positions import Positions
from failover.registry import GcsRegistry, Registry, RegistryWriter
from failover.slow import SlowSettings
from shards.replica import Replica
from shards.spec import ReplicaSpec

CONTROLLER_NAME = "ringpipe-controller"
NAMESPACE = "ringpipe"
log = logging.getLogger("ringpipe.controller")


@dataclass(frozen=True)
class ControllerSettings:
    replicas: int = 2
    standby: int = 0
    heartbeat: HeartbeatSettings = HeartbeatSettings()
    slow: SlowSettings = SlowSettings()
    adaptive: AdaptiveSettings = AdaptiveSettings()
    consul: object | None = None  # failover.consul.ConsulSettings: keep membership in Consul, not Ray's GCS
    start_timeout_s: float = 600.0
    registry_wait_s: float = 30.0  # a first start waits this long for an unreadable registry, then starts fresh
    rebuild_backoff_s: float = 2.0
    recent_failovers: int = 50
    # what builds a pipeline: `Replica`, or a stand-in with its methods (bench/control_plane.py's simulated ones)
    pipeline_factory: type = Replica


@ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=100_000)
class Controller:
    def __init__(self, spec: ReplicaSpec, settings: ControllerSettings, name: str = CONTROLLER_NAME) -> None:
        if settings.replicas < 1:
            raise ValueError(f"replicas must be ≥ 1, got {settings.replicas}")
        self.spec, self.settings, self.name = spec, settings, name
        self.positions = Positions(name, settings.recent_failovers)
        self.monitor = Monitor(settings.heartbeat, settings.slow, settings.adaptive, spec.tensor_parallel)
        self.placement = Placement(spec, NAMESPACE, settings.start_timeout_s, settings.pipeline_factory)
        self.registry = RegistryWriter(_registry(settings, name))
        self.started = self.stopped = False
        self._incarnation = uuid.uuid4().hex  # tells a restarted controller from the one before
        self._ready = asyncio.Event()  # set once the registry has been read (a first start or a recovery)
        self._published = asyncio.Event()  # set, and replaced, at every publish: what watchers wait on
        self._membership = Membership()
        self._membership_blob = encode(self._membership)  # encoded once per epoch, whatever the watchers
        self._tasks: set[asyncio.Task] = set()
        self.pings_counted: dict[str, int] = {}  # ping counts already added to the metric
        self.gauges_recorded_at = 0.0  # monotonic time the membership's gauges were last set (rounds.renew)
        self._loaded = False  # the registry has been read (recovery may still be running)
        self._boot_task = self.spawn(self._boot())

    def spawn(self, coro) -> asyncio.Task:
        """Run `coro` in the background, owned by the controller (cancelled at shutdown)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("controller task failed", exc_info=task.exception())

    async def _boot(self) -> None:
        state = await recovery.load_state(self)
        self._loaded = True
        if state:
            await recovery.recover(self, state)
        self._begin()

    def _begin(self) -> None:
        self._ready.set()
        self.spawn(rounds.run(self))

    # -- life cycle
    async def start(self) -> Membership:
        """Start every replica and standby (in parallel) unless a previous incarnation did.

        While the registry cannot be read (Consul down) this waits `registry_wait_s` for it, then
        starts fresh: serving does not wait on the registry, which is written once it answers."""
        try:
            await asyncio.wait_for(asyncio.shield(self._ready.wait()), self.settings.registry_wait_s)
        except TimeoutError:
            if self._loaded:  # read, and recovering: wait for it
                await self._ready.wait()
            else:
                log.warning("the registry could not be read for %.0fs: starting fresh (%s)",
                            self.settings.registry_wait_s, self.registry.health()[1])
                self._boot_task.cancel()
                self._begin()
        if self.started:
            return self._membership
        self.started = True
        count = self.settings.replicas + self.settings.standby
        pipelines = [self.placement.new(self.positions.new_name()) for _ in range(count)]
        self.save()
        used: set[str] = set()
        try:
            for p in pipelines:  # one after another, each kept off the nodes of those before where it fits
                used.update(await self.placement.place(p, frozenset(used)))
        except Exception as exc:
            await asyncio.gather(*(self.placement.retire(p) for p in pipelines))
            self.started = False
            raise RuntimeError(f"replicas could not be placed: {exc}") from exc
        results = await asyncio.gather(*(self.placement.start(p) for p in pipelines), return_exceptions=True)
        errors = [f"{p.name}: {r}" for p, r in zip(pipelines, results, strict=True) if isinstance(r, BaseException)]
        if errors:
            await asyncio.gather(*(self.placement.retire(p) for p in pipelines))
            self.started = False
            raise RuntimeError("replicas failed to start: " + "; ".join(errors))
        for i, (p, stages) in enumerate(zip(pipelines, results, strict=True)):
            if i < self.settings.replicas:
                self.positions.take_slot(f"replica-{i}", p, stages)
                self.registry.replica_up(f"replica-{i}", stages[0].address if stages else "")
            else:
                self.positions.add_standby(p, stages)
            self.monitor.watch(p, stages)
        self.publish()
        return self._membership

    async def shutdown(self) -> None:
        self.stopped = True
        self.monitor.stop()
        pipelines = self.positions.clear()
        self.publish()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*(self.placement.retire(p) for p in pipelines), return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(None, self.registry.stop, self.registry.registry.clear)
        self.placement.close()

    # -- reading
    async def incarnation(self) -> str:
        """A new value each time Ray (re)starts the controller."""
        return self._incarnation

    @property
    def membership_now(self) -> Membership:
        """The last membership published (in-process: what `membership` answers remote callers)."""
        return self._membership

    async def membership(self) -> Membership:
        await self._ready.wait()
        return self._membership

    async def watch(self, epoch: int, incarnation: str = "", timeout_s: float = 10.0):
        """(epoch, incarnation, the membership encoded), once either differs from the caller's,
        else the current ones after `timeout_s`. The membership is None while a restarted
        controller has not yet read its registry: no news, not an empty membership."""
        published = self._published
        try:
            await asyncio.wait_for(self._ready.wait(), timeout_s)
            if (self._membership.epoch, self._incarnation) == (epoch, incarnation):
                await asyncio.wait_for(published.wait(), timeout_s)
        except TimeoutError:
            if not self._ready.is_set():
                return epoch, incarnation, None
        return self._membership.epoch, self._incarnation, self._membership_blob

    async def failovers(self) -> list[dict]:
        """Recent failovers, oldest first."""
        return [vars(f).copy() for f in self.positions.failovers]

    async def standbys(self) -> list[str]:
        return [p.name for p in self.positions.standbys]

    async def health(self) -> dict:
        """The control plane's own state: the registry's, how often the monitor found itself stalled,
        and where the controller runs (its node and process)."""
        ok, why = self.registry.health()
        return {"registry_ok": ok, "registry_error": why, "monitor_stalls": self.monitor.liveness.stalls,
                "pings": self.monitor.ping_counts(), "ready": self._ready.is_set(), "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

    async def pipeline_nodes(self) -> dict[str, list[dict]]:
        """Each live pipeline's stage actors: node id, IP and process id (for chaos tests)."""
        await self._ready.wait()
        pipelines = list(self.positions.pipelines.values())
        nodes = await asyncio.gather(*(self.placement.nodes(p, 10.0) for p in pipelines), return_exceptions=True)
        # a pipeline whose stage does not answer (dead, or on a paused node) is left out, and so is one
        # declared dead while its stages were asked
        return {p.name: n for p, n in zip(pipelines, nodes, strict=True)
                if not isinstance(n, BaseException) and p.name in self.positions.pipelines}

    async def stats(self) -> dict[str, list[dict | None]]:
        """Each ring member's per-stage stats (None for a stage that did not answer)."""
        current = {sid: s.pipeline for sid, s in self.positions.slots.items() if s.pipeline is not None}
        got = await asyncio.gather(*(self.placement.stats(p, 2.0) for p in current.values()))
        return dict(zip(current, got, strict=True))

    # -- publishing
    def publish(self) -> None:
        """Make the current positions the membership every watcher gets; save them."""
        membership = self.positions.membership(self.spec.max_batch)
        self._membership, self._membership_blob = membership, encode(membership)
        published, self._published = self._published, asyncio.Event()
        published.set()
        record_membership(self.positions, membership)
        self.save()

    def save(self) -> None:
        self.registry.save(self.positions.state())

def _registry(settings: ControllerSettings, name: str) -> Registry:
    if settings.consul is not None:
        from failover.consul import ConsulRegistry

        return ConsulRegistry(settings.consul)
    return GcsRegistry(f"{name}/state", NAMESPACE)

