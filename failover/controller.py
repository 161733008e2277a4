"""The controller: a detached, named, restartable Ray actor that keeps the pipeline replicas alive.

It creates every replica (a detached placement group and stage actors, named
so that they outlive it), watches them with the heartbeat monitor, and
publishes the epoch-numbered `Membership` coordinators route by. Coordinators
find it by name (`CONTROLLER_NAME` in `NAMESPACE`), read `membership()` and
wait for the next change with `watch(epoch)`, a long poll.

Ring positions are slots (`replica-0` …). When a stage dies, its slot's member
leaves (epoch + 1) — in the same change a warm standby, if there is one, takes
the slot — and a new pipeline is built in the background: it takes the slot
back if it is still empty (so the slot's sessions return to it), else it
becomes the next standby. A slow stage's member stays but is off the ring.

Everything needed to find the replicas again is saved in the registry (Ray's
GCS by default) at every change; a restarted controller attaches to them by
name and carries on from the saved epoch.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import ray

from failover.heartbeat import Health, HeartbeatMonitor, HeartbeatSettings, Verdict
from failover.membership import Member, Membership, StageInfo
from failover.metrics import metrics
from failover.registry import GcsRegistry, Registry
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
    consul: object | None = None  # failover.consul.ConsulSettings: keep membership in Consul, not Ray's GCS
    start_timeout_s: float = 600.0
    rebuild_backoff_s: float = 2.0
    recent_failovers: int = 50


@dataclass
class _Slot:
    replica: Replica | None = None  # None while its pipeline is being rebuilt
    epoch: int = 0  # when the current pipeline took the slot
    stages: tuple[StageInfo, ...] = ()
    paused: bool = False


@dataclass
class _Failover:
    at: float  # wall clock
    replica_id: str
    pipeline: str
    stage: int
    reason: str
    silent_s: float
    action: str  # "standby promoted" | "rebuilding" | "standby replaced"
    restored_at: float | None = None
    details: dict = field(default_factory=dict)


@ray.remote(num_cpus=0, max_concurrency=64, max_restarts=-1)
class Controller:
    def __init__(self, spec: ReplicaSpec, settings: ControllerSettings, name: str = CONTROLLER_NAME) -> None:
        if settings.replicas < 1:
            raise ValueError(f"replicas must be ≥ 1, got {settings.replicas}")
        self.spec, self.settings, self.name = spec, settings, name
        self.registry: Registry = _registry(settings, name)
        self.monitor = HeartbeatMonitor(settings.heartbeat)
        self._lock = threading.Condition()
        self._slots: dict[str, _Slot] = {}
        self._standbys: list[Replica] = []
        self._pipelines: dict[str, Replica] = {}  # every live pipeline by name: slots' and standbys'
        self._stage_infos: dict[str, tuple[StageInfo, ...]] = {}  # where each pipeline's stages run
        self._epoch, self._next_pipeline = 0, 0
        self._unsettled: set[str] = set()  # pipelines being built or shut down: discarded after a restart
        self._membership = Membership()
        self._failovers: collections.deque[_Failover] = collections.deque(maxlen=settings.recent_failovers)
        self._stopped = threading.Event()
        self._started = False
        self._incarnation = uuid.uuid4().hex  # tells a restarted controller from the one before
        state = self.registry.load()
        if state:
            self._recover(state)
        threading.Thread(target=self._watch_stages, name="heartbeats", daemon=True).start()
        threading.Thread(target=self._renew_registry, name="registry", daemon=True).start()

    # -- life cycle
    def start(self) -> Membership:
        """Start every replica and standby (in parallel) unless a previous incarnation did."""
        with self._lock:
            if self._started:
                return self._membership
        count = self.settings.replicas + self.settings.standby
        pipelines = [self._new_pipeline() for _ in range(count)]
        used: set[str] = set()
        try:
            for p in pipelines:  # one after another, each kept off the nodes of those before where it fits
                used.update(p.place(self.settings.start_timeout_s, frozenset(used)))
        except Exception as exc:
            for p in pipelines:
                p.shutdown()
            raise RuntimeError(f"replicas could not be placed: {exc}") from exc
        with ThreadPoolExecutor(count) as pool:
            futures = [pool.submit(p.start, self.settings.start_timeout_s) for p in pipelines]
            errors = [f"{p.name}: {exc}" for p, f in zip(pipelines, futures, strict=True) if (exc := f.exception())]
        if errors:
            for p in pipelines:
                p.shutdown()
            raise RuntimeError("replicas failed to start: " + "; ".join(errors))
        stages = [_stage_infos(p) for p in pipelines]
        with self._lock:
            self._started = True
            for i, (p, info) in enumerate(zip(pipelines[: self.settings.replicas], stages, strict=False)):
                self._take_slot(f"replica-{i}", p, info)
            for p, info in zip(pipelines[self.settings.replicas :], stages[self.settings.replicas :], strict=True):
                self._add_standby(p, info)
            self._publish()
            return self._membership

    def shutdown(self) -> None:
        self._stopped.set()
        with self._lock:
            pipelines = list(self._pipelines.values())
            self._pipelines.clear()
            self._slots.clear()
            self._standbys.clear()
            self._epoch += 1
            self._membership = Membership(self._epoch, ())
            self._lock.notify_all()
        for p in pipelines:
            p.shutdown()
        self._tell_registry(self.registry.clear)

    # -- reading
    def incarnation(self) -> str:
        """A new value each time Ray (re)starts the controller."""
        return self._incarnation

    def membership(self) -> Membership:
        return self._membership

    def watch(self, epoch: int, timeout_s: float = 10.0) -> Membership:
        """The membership once its epoch differs from `epoch`, or the current one after `timeout_s`."""
        with self._lock:
            self._lock.wait_for(lambda: self._membership.epoch != epoch, timeout=timeout_s)
            return self._membership

    def failovers(self) -> list[dict]:
        """Recent failovers, oldest first."""
        return [vars(f).copy() for f in self._failovers]

    def standbys(self) -> list[str]:
        return [p.name for p in self._standbys]

    def pipeline_nodes(self) -> dict[str, list[dict]]:
        """Each live pipeline's stage actors: node id, IP and process id (for chaos tests)."""
        return {name: p.nodes() for name, p in list(self._pipelines.items())}

    def stats(self) -> dict[str, list[dict | None]]:
        """Each ring member's per-stage stats (None for a stage that did not answer)."""
        with self._lock:
            current = {sid: s.replica for sid, s in self._slots.items() if s.replica is not None}
        with ThreadPoolExecutor(max(1, len(current))) as pool:
            futures = {sid: pool.submit(r.stats, 2.0) for sid, r in current.items()}
            return {sid: fut.result() for sid, fut in futures.items()}

    # -- membership changes (under self._lock)
    def _new_pipeline(self) -> Replica:
        with self._lock:
            self._next_pipeline += 1
            name = f"{self.name}.p{self._next_pipeline}"
            self._unsettled.add(name)
            self._save()
        return Replica(self.spec, name, namespace=NAMESPACE, detached=True)

    def _retire(self, pipeline: Replica) -> None:
        """Shut a pipeline down (in the background); until it is gone a restart would discard it."""
        def run() -> None:
            pipeline.shutdown(5.0)
            with self._lock:
                self._unsettled.discard(pipeline.name)
                self._save()

        with self._lock:
            self._unsettled.add(pipeline.name)
        threading.Thread(target=run, daemon=True).start()

    def _nodes_in_use(self) -> frozenset[str]:
        """The nodes the live pipelines' stages run on: a new pipeline keeps off them where it fits."""
        with self._lock:
            live = set(self._pipelines)
            return frozenset(stage.node_id for name, stages in self._stage_infos.items() if name in live
                             for stage in stages)

    def _take_slot(self, slot: str, pipeline: Replica, stages: tuple[StageInfo, ...]) -> None:
        self._epoch += 1
        self._slots[slot] = _Slot(pipeline, self._epoch, stages)
        self._watch_pipeline(pipeline, stages)
        self._tell_registry(self.registry.replica_up, slot, stages[0].address if stages else "")

    def _tell_registry(self, call, *args) -> None:
        try:
            call(*args)
        except Exception:  # noqa: BLE001 — the registry mirrors membership; serving does not wait on it
            log.exception("registry call %s%s failed", getattr(call, "__name__", call), args)

    def _renew_registry(self) -> None:
        """Tell the registry which ring positions passed their heartbeats (Consul's TTL checks)."""
        while not self._stopped.wait(self.settings.heartbeat.interval_s):
            with self._lock:
                healthy = [
                    sid for sid, s in self._slots.items()
                    if s.replica is not None and not s.paused
                ]
            for sid in healthy:
                self.registry.replica_alive(sid)

    def _add_standby(self, pipeline: Replica, stages: tuple[StageInfo, ...]) -> None:
        self._standbys.append(pipeline)
        self._watch_pipeline(pipeline, stages)

    def _watch_pipeline(self, pipeline: Replica, stages: tuple[StageInfo, ...]) -> None:
        self._unsettled.discard(pipeline.name)
        self._pipelines[pipeline.name] = pipeline
        self._stage_infos[pipeline.name] = stages
        for i in range(len(pipeline.actors)):
            self.monitor.watch((pipeline.name, i))

    def _drop_pipeline(self, pipeline: Replica) -> None:
        self._pipelines.pop(pipeline.name, None)
        self._stage_infos.pop(pipeline.name, None)
        for i in range(len(pipeline.actors)):
            self.monitor.forget((pipeline.name, i))

    def _publish(self) -> None:
        members = tuple(
            Member(
                sid, s.epoch, s.replica.head, s.stages, self.spec.max_batch, accepting=not s.paused,
                pipeline=s.replica.name,
            )
            for sid, s in sorted(self._slots.items())
            if s.replica is not None
        )
        self._membership = Membership(self._epoch, members)
        self._lock.notify_all()
        m = metrics()
        m.ring_size.set(len(self._membership.ring_ids))
        m.members.set(len(members))
        self._save()

    def _save(self) -> None:
        state = {
            "epoch": self._epoch,
            "next_pipeline": self._next_pipeline,
            "slots": {
                sid: {"pipeline": s.replica.name if s.replica else None, "epoch": s.epoch, "paused": s.paused}
                for sid, s in self._slots.items()
            },
            "standbys": [p.name for p in self._standbys],
            "unsettled": sorted(self._unsettled),
            "failovers": [vars(f) for f in self._failovers],
        }
        try:
            self.registry.save(state)
        except Exception:  # noqa: BLE001 — serving goes on; the next change saves again
            log.exception("could not save membership to the registry")

    # -- recovery after a restart
    def _recover(self, state: dict) -> None:
        """Attach to the pipelines a previous incarnation saved; those gone are taken over as if dead."""
        self._epoch, self._next_pipeline = state["epoch"], state["next_pipeline"]
        self._failovers.extend(_Failover(**f) for f in state.get("failovers", []))
        self._started = True
        for name in state.get("unsettled", []):  # half built, or half shut down, when the controller died
            Replica.discard(self.spec, name, NAMESPACE)
        for name in state["standbys"]:
            found = self._attach(name)
            if isinstance(found, tuple):
                self._add_standby(*found)
        lost = []
        for sid, saved in state["slots"].items():
            found = self._attach(saved["pipeline"])
            if isinstance(found, tuple):
                pipeline, stages = found
                self._slots[sid] = _Slot(pipeline, saved["epoch"], stages, saved["paused"])
                self._watch_pipeline(pipeline, stages)
            else:
                self._slots[sid] = _Slot(None, saved["epoch"])
                if saved["pipeline"] is not None:
                    lost.append((sid, saved["pipeline"], found))
        with self._lock:
            for sid, name, why in lost:
                self._take_over(sid, name, 0, f"pipeline gone when the controller restarted: {why}", 0.0)
            self._publish()
            missing = sum(s.replica is None for s in self._slots.values()) + self.settings.standby - len(self._standbys)
        log.warning("controller restarted: recovered epoch %d, %d slots, %d lost", self._epoch, len(self._slots), len(lost))
        for _ in range(missing):
            self._rebuild_later()

    def _attach(self, name: str | None) -> tuple[Replica, tuple[StageInfo, ...]] | str:
        """The running pipeline `name` and where its stages are; else why it cannot be used."""
        if name is None:
            return "no pipeline"
        try:
            pipeline = Replica.attach(self.spec, name, NAMESPACE)
            return pipeline, _stage_infos(pipeline, timeout_s=self.settings.heartbeat.timeout_s)
        except (ValueError, ray.exceptions.RayError) as exc:
            log.warning("pipeline %s is gone (%s): it will be rebuilt", name, _short(exc))
            return _short(exc)

    # -- heartbeats
    def _watch_stages(self) -> None:
        """The monitor loop: pings on schedule, one outstanding vigil per stage, verdicts acted on."""
        pings: dict[ray.ObjectRef, tuple[str, int]] = {}
        vigils: dict[ray.ObjectRef, tuple[str, int]] = {}
        watched: set[tuple[str, int]] = set()
        while not self._stopped.is_set():
            try:
                watched = self._heartbeat_round(pings, vigils, watched)
            except Exception:  # noqa: BLE001 — the monitor must outlive any one bad round
                log.exception("heartbeat round failed")
                self._stopped.wait(self.settings.heartbeat.interval_s)

    def _heartbeat_round(self, pings: dict, vigils: dict, watched: set) -> set:
        """Send the pings due and a vigil to every new stage, take in what came back, act on verdicts."""
        hb = self.settings.heartbeat
        with self._lock:
            pipelines = dict(self._pipelines)
            due = self.monitor.due()
        for key in due:
            pipeline = pipelines.get(key[0])
            if pipeline is None:
                continue
            ref = pipeline.actors[key[1]].ping.remote()
            with self._lock:
                pings[ref] = key
                self.monitor.sent(key)
        for name, pipeline in pipelines.items():
            if (name, 0) not in watched:
                for i, ref in enumerate(pipeline.send_vigils()):
                    vigils[ref] = (name, i)
                    watched.add((name, i))
        refs = [*pings, *vigils]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=min(0.05, hb.interval_s / 4)) if refs else ([], [])
        with self._lock:
            for ref in ready:
                if ref in pings:
                    self._on_ping(pings.pop(ref), ref)
                else:
                    self._on_vigil(vigils.pop(ref), ref)
            for verdict in self.monitor.check():
                self._on_verdict(verdict)
        live = set(pipelines)
        if not refs:
            self._stopped.wait(hb.interval_s / 4)
        return {k for k in watched if k[0] in live}

    def _on_ping(self, key: tuple[str, int], ref) -> None:
        try:
            answer = ray.get(ref)
        except ray.exceptions.ActorUnavailableError:
            self.monitor.unanswered(key)
        except ray.exceptions.RayActorError as exc:
            self.monitor.died(key, f"stage actor died: {_short(exc)}")
        except ray.exceptions.RayError:  # no proof of death (a node going away, say): the timeout decides
            self.monitor.unanswered(key)
        else:
            failed = None
            if answer["state"] in ("failed", "stopped"):
                failed = f"stage {answer['state']}: {answer['error']}"
            self.monitor.answered(key, failed)
            if key[1] == 0:  # the head knows its replica's queue
                slot = next((sid for sid, s in self._slots.items() if s.replica and s.replica.name == key[0]), None)
                if slot is not None:
                    metrics().queue_depth.set(answer["waiting"], tags={"replica": slot})

    def _on_vigil(self, key: tuple[str, int], ref) -> None:
        try:
            answer = ray.get(ref)
        except ray.exceptions.ActorUnavailableError:
            return  # transient: the heartbeat decides
        except ray.exceptions.RayActorError as exc:
            self.monitor.died(key, f"stage actor died: {_short(exc)}")
        except ray.exceptions.RayError:
            return  # no proof of death: the heartbeat decides
        else:
            self.monitor.died(key, f"stage {answer['state']}: {answer['error']}")

    def _on_verdict(self, verdict: Verdict) -> None:
        name, actor = verdict.key
        with self._lock:
            pipeline = self._pipelines.get(name)
            if pipeline is None:
                return
            slot = next((sid for sid, s in self._slots.items() if s.replica is pipeline), None)
            if verdict.health is Health.DEAD:
                if verdict.reason.startswith("stage failed"):  # its transport broke: which peer died?
                    actor = _culprit(pipeline, actor)
                stage = actor // self.spec.tensor_parallel
                self._on_death(slot, pipeline, stage, verdict)
            elif slot is not None:
                paused = any(self.monitor.health((name, i)) is Health.SLOW for i in range(len(pipeline.actors)))
                if paused != self._slots[slot].paused:
                    log.warning("%s (%s) %s: %s", slot, name, "paused" if paused else "resumed", verdict.reason)
                    self._slots[slot].paused = paused
                    self._epoch += 1
                    self._publish()

    def _on_death(self, slot: str | None, pipeline: Replica, stage: int, verdict: Verdict) -> None:
        self._drop_pipeline(pipeline)
        if slot is None:  # a standby died
            self._standbys.remove(pipeline)
        self._retire(pipeline)
        self._take_over(slot, pipeline.name, stage, verdict.reason, verdict.silent_s)
        self._publish()
        self._rebuild_later()

    def _take_over(self, slot: str | None, pipeline: str, stage: int, reason: str, silent_s: float) -> None:
        """Hand a dead pipeline's ring position to a standby (or leave it for the rebuild); record it."""
        m = metrics()
        action = "standby replaced"
        if slot is not None:
            self._tell_registry(self.registry.replica_down, slot)
            self._epoch += 1
            if self._standbys:
                spare = self._standbys.pop(0)
                self._slots[slot] = _Slot(spare, self._epoch, self._stage_infos[spare.name])
                self._tell_registry(self.registry.replica_up, slot, self._slots[slot].stages[0].address)
                action = "standby promoted"
            else:
                self._slots[slot] = _Slot(None, self._epoch)
                action = "rebuilding"
            m.takeovers.inc(tags={"action": action})
        m.failures_detected.inc(tags={"replica": slot or "standby", "kind": _kind(reason)})
        m.detection_latency_s.observe(silent_s)
        record = _Failover(time.time(), slot or "standby", pipeline, stage, reason, silent_s, action)
        if action == "standby promoted":
            record.restored_at = record.at
        self._failovers.append(record)
        log.warning("%s (%s) stage %d dead after %.2fs silent: %s → %s",
                    slot or "standby", pipeline, stage, silent_s, reason, action)

    # -- rebuilding
    def _rebuild_later(self) -> None:
        threading.Thread(target=self._rebuild, name="rebuild", daemon=True).start()

    def _rebuild(self) -> None:
        """Build a new pipeline until one starts; it fills an empty slot, else becomes a standby."""
        backoff = self.settings.rebuild_backoff_s
        while not self._stopped.is_set():
            pipeline = self._new_pipeline()
            try:
                pipeline.place(self.settings.start_timeout_s, self._nodes_in_use())
                pipeline.start(self.settings.start_timeout_s)
                stages = _stage_infos(pipeline)
                break
            except Exception as exc:  # noqa: BLE001 — try again: a node may come back
                log.warning("rebuilding %s failed (%s); retrying in %.0fs", pipeline.name, exc, backoff)
                pipeline.shutdown()
                with self._lock:
                    self._unsettled.discard(pipeline.name)
                self._stopped.wait(backoff)
                backoff = min(backoff * 2, 60.0)
        else:
            return
        with self._lock:
            if self._stopped.is_set():
                pipeline.shutdown()
                return
            empty = sorted(sid for sid, s in self._slots.items() if s.replica is None)
            if empty:
                self._take_slot(empty[0], pipeline, stages)
                for f in reversed(self._failovers):
                    if f.replica_id == empty[0] and f.restored_at is None:
                        f.restored_at = time.time()
                        break
            else:
                self._add_standby(pipeline, stages)
            self._publish()


def _registry(settings: ControllerSettings, name: str) -> Registry:
    if settings.consul is not None:
        from failover.consul import ConsulRegistry

        return ConsulRegistry(settings.consul)
    return GcsRegistry(f"{name}/state", NAMESPACE)


def _stage_infos(pipeline: Replica, timeout_s: float | None = None) -> tuple[StageInfo, ...]:
    nodes = pipeline.nodes(timeout_s)
    tp = pipeline.spec.tensor_parallel
    return tuple(
        StageInfo(p.index, nodes[p.index * tp]["node_id"], nodes[p.index * tp]["ip"], p.layer_start, p.layer_end)
        for p in pipeline.plans
    )


def _culprit(pipeline: Replica, reporter: int, timeout_s: float = 0.3) -> int:
    """The actor of `pipeline` that is dead (or does not answer), when `reporter` saw its transport
    break; `reporter` itself when every other one answers."""
    refs = pipeline.send_pings()
    for i, ref in enumerate(refs):
        if i == reporter:
            continue
        try:
            ray.get(ref, timeout=timeout_s)
        except ray.exceptions.RayError:
            return i
    return reporter


def _kind(reason: str) -> str:
    if reason.startswith("no heartbeat"):
        return "hung"
    if "actor died" in reason:
        return "crashed"
    return "broken"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
