"""Simulated stages and coordinators for `control_plane.py`: the real controller, nothing real under it.

- `SimulatedPipeline`: what the controller uses of `shards.replica.Replica` (its `pipeline_factory`).
  Its stages are entries in a few `StageHost` actors, hundreds per process; stage i of a pipeline
  is (host, pipeline, i), on a simulated node. Nodes hold `stages_per_node` stages each, a
  pipeline's stages on distinct nodes, and a node's stages all live in one host, so the monitor's
  per-node probing works as on a cluster. Where the nodes and hosts are is read from Ray's KV
  (`write_config`, keyed by the controller's name, which every pipeline name starts with).
- `StageHost`: answers pings, Ray calls and datagrams (`shards/beat.py`, one socket per host)
  (a real stage's answer, without load) and keeps every `vigil` call
  pending until its stage fails (a head's also until its pipeline stalled, as a real head's). Faults: `crash` (the vigil returns "failed" at once, pings say
  "failed") and `hang` (pings never answer, the vigil stays pending). A hung stage that is not a
  head stalls its pipeline: its head reports `pipeline_wait_s` counted from the hang, as a real head
  whose micro-batch (or keepalive) never came back would (`stall`).
- `WatcherHost`: many followers of the real `coordinator.follow.MembershipFollower`, each recording
  when it first saw each epoch; the host keeps which pipelines each epoch held.

Blocking methods (`place`, `start`, `nodes`, `stats`, `shutdown`, `attach`, `discard`) run in the
controller's thread pool; `send_*` run on its event loop and only use handles cached by then.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from dataclasses import dataclass

import ray

from shards.beat import BeatResponder
from shards.replica import answers

KV_NAMESPACE = "ringpipe-bench"
# every simulated node's CPU, as a real stage's ping reports it: half busy, neither hot nor idle for
# the adaptive rule (failover/adaptive.py), so that weights stay put and the epochs measure failovers
SIM_NODE_CPU = 0.5


# -- where things are: written by the driver, read in the controller's process
def write_config(controller: str, hosts: list[str], nodes: int, stages_per_node: int) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(
        f"sim/{controller}".encode(),
        json.dumps({"hosts": hosts, "nodes": nodes, "stages_per_node": stages_per_node}).encode(),
        overwrite=True,
        namespace=KV_NAMESPACE,
    )


def clear_config(controller: str) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(f"sim/{controller}".encode(), namespace=KV_NAMESPACE)


def node_id(n: int) -> str:
    return f"simnode-{n:04d}"


def host_of(node: str, hosts: list[str]) -> str:
    """Every stage of a node lives in the same host (a node is a machine; a host, some of them)."""
    return hosts[int(node.rsplit("-", 1)[1]) % len(hosts)]


class _Cluster:
    """The controller process's view of the simulated cluster: host handles and node occupancy."""

    def __init__(self, config: dict) -> None:
        self.hosts: list[str] = config["hosts"]
        self.per_node: int = config["stages_per_node"]
        self.used = [0] * config["nodes"]
        self.initial = 0
        self.lock = threading.Lock()
        self.handles = {h: ray.get_actor(h, namespace=KV_NAMESPACE) for h in self.hosts}

    def take(self, stages: int, avoid: frozenset[str]) -> list[str]:
        """Nodes for a new pipeline's stages, all distinct. The first pipelines are laid out in turn
        (pipeline j's stage i on node (j·S + i) mod N: every node holds every stage index once for
        S = stages_per_node); later ones take the emptiest nodes, off `avoid` where that fits (soft,
        as the real placement is)."""
        with self.lock:
            n = len(self.used)
            if stages > n:
                raise RuntimeError(f"{stages} stages need {stages} nodes, the simulation has {n}")
            if self.initial * stages < n * self.per_node:
                j, self.initial = self.initial, self.initial + 1
                chosen = [(j * stages + i) % n for i in range(stages)]
            else:
                order = sorted(
                    range(n),
                    key=lambda x: (
                        self.used[x] >= self.per_node,
                        node_id(x) in avoid,
                        self.used[x],
                        x,
                    ),
                )
                chosen = order[:stages]
            for x in chosen:
                self.used[x] += 1
            return [node_id(x) for x in chosen]

    def free(self, nodes: list[str]) -> None:
        with self.lock:
            for node in nodes:
                x = int(node.rsplit("-", 1)[1])
                self.used[x] = max(0, self.used[x] - 1)


_clusters: dict[str, _Cluster] = {}
_clusters_lock = threading.Lock()


def _cluster(pipeline_name: str) -> _Cluster:
    """The cluster of the controller that named this pipeline (`{controller}.p{n}`); blocks the first time."""
    controller = pipeline_name.rsplit(".p", 1)[0]
    with _clusters_lock:
        if controller not in _clusters:
            from ray.experimental import internal_kv

            raw = internal_kv._internal_kv_get(f"sim/{controller}".encode(), namespace=KV_NAMESPACE)
            if raw is None:
                raise RuntimeError(f"no simulated cluster configured for controller {controller!r}")
            _clusters[controller] = _Cluster(json.loads(raw))
        return _clusters[controller]


# -- the pipeline the controller drives
@dataclass(frozen=True)
class SimPlan:
    index: int
    layer_start: int
    layer_end: int


@dataclass(frozen=True)
class SimStage:
    """One simulated stage: an entry of a host. What `actors` holds and `head` is (it goes into the membership)."""

    host: str
    pipeline: str
    index: int
    node_id: str


class SimulatedPipeline:
    LAYERS_PER_STAGE = 4

    def __init__(
        self, spec, name: str, namespace: str | None = None, detached: bool = False
    ) -> None:
        self.spec, self.name, self.namespace, self.detached = spec, name, namespace, detached
        per = self.LAYERS_PER_STAGE
        self.plans = [SimPlan(i, i * per, (i + 1) * per) for i in range(spec.stages)]
        self.actors: list[SimStage] = []
        self._nodes: list[str] = []
        self._pid = 0
        self._cluster: _Cluster | None = (
            None  # set by place/attach (a blocking call), used by send_*
        )

    @property
    def head(self) -> SimStage:
        return self.actors[0]

    def _handle(self, stage: SimStage):
        return self._cluster.handles[stage.host]

    def _by_host(self) -> dict[str, list[SimStage]]:
        out: dict[str, list[SimStage]] = {}
        for stage in self.actors:
            out.setdefault(stage.host, []).append(stage)
        return out

    # -- life cycle (blocking: the controller's thread pool)
    def place(self, timeout_s: float = 300.0, avoid: frozenset[str] = frozenset()) -> list[str]:
        self._cluster = _cluster(self.name)
        if not self._nodes:
            self._nodes = self._cluster.take(len(self.plans), avoid)
        return list(self._nodes)

    def start(self, timeout_s: float = 300.0) -> list[dict]:
        if not self._nodes:
            self.place(timeout_s)
        hosts = self._cluster.hosts
        self.actors = [
            SimStage(host_of(node, hosts), self.name, i, node) for i, node in enumerate(self._nodes)
        ]
        try:
            pids = ray.get(
                [
                    self._cluster.handles[h].add.remote(
                        self.name, [(s.index, s.node_id) for s in stages]
                    )
                    for h, stages in self._by_host().items()
                ],
                timeout=timeout_s,
            )
        except Exception:
            self.shutdown()
            raise
        self._pid = pids[0]
        return [{} for _ in self.actors]

    def shutdown(self, timeout_s: float = 10.0) -> None:
        if self._cluster is None:
            return
        refs = [self._cluster.handles[h].remove.remote(self.name) for h in self._by_host()]
        try:
            ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        finally:
            self._cluster.free(self._nodes)
            self._nodes, self.actors = [], []

    @classmethod
    def discard(cls, spec, name: str, namespace: str) -> None:
        cluster = _cluster(name)
        ray.get([h.remove.remote(name) for h in cluster.handles.values()], timeout=30)

    @classmethod
    def attach(cls, spec, name: str, namespace: str) -> SimulatedPipeline:
        """The running pipeline `name`; ValueError when any of its stages is gone."""
        cluster = _cluster(name)
        found = [
            s
            for h in ray.get([h.find.remote(name) for h in cluster.handles.values()], timeout=30)
            for s in h
        ]
        if sorted(i for i, _, _ in found) != list(range(spec.stages)):
            raise ValueError(
                f"simulated pipeline {name} is gone (found stages {sorted(i for i, _, _ in found)})"
            )
        pipeline = cls(spec, name, namespace, detached=True)
        pipeline._cluster = cluster
        found.sort()
        pipeline._nodes = [node for _, node, _ in found]
        pipeline.actors = [
            SimStage(host_of(node, cluster.hosts), name, i, node) for i, node, _ in found
        ]
        pipeline._pid = found[0][2]
        return pipeline

    # -- reading (blocking)
    def nodes(self, timeout_s: float | None = None) -> list[dict]:
        return [
            {"node_id": s.node_id, "ip": "127.0.0.1", "pid": self._pid, "host": s.host}
            for s in self.actors
        ]

    def stats(self, timeout_s: float = 5.0) -> list[dict | None]:
        return answers([self._handle(s).stats.remote(self.name, s.index) for s in self.actors], timeout_s)

    # -- refs the monitor awaits (its event loop: no blocking)
    def send_ping(self, index: int):
        stage = self.actors[index]
        return self._handle(stage).ping.remote(self.name, index)

    def send_pings(self) -> list:
        return [self.send_ping(i) for i in range(len(self.actors))]

    def send_beat_address(self, index: int):
        return self._handle(self.actors[index]).beat_address.remote()

    def send_vigils(self, stall_after_s: float | None = None) -> list:
        return [self._handle(s).vigil.remote(self.name, s.index, stall_after_s if s.index == 0 else None)
                for s in self.actors]


# -- the stages
class _Stage:
    def __init__(self, index: int, node: str) -> None:
        self.index, self.node = index, node
        self.state, self.error = "serving", None
        self.down = asyncio.Event()  # failed or stopped: vigils return
        self.released = asyncio.Event()  # a hung stage's pings return once it is stopped
        self.hung = False


@ray.remote(num_cpus=0, max_concurrency=100_000)
class StageHost:
    """Hundreds of simulated stages in one process."""

    def __init__(self) -> None:
        self.stages: dict[tuple[str, int], _Stage] = {}
        self.stalled: dict[str, float] = {}  # pipeline -> wall time its head started waiting in vain
        self.stall_news: dict[str, asyncio.Event] = {}  # pipeline -> set when it stalls (head vigils wait on it)
        self.pings = 0
        self._beats: BeatResponder | None = None

    async def beat_address(self) -> tuple[str, int]:
        """Where this host's stages answer ping datagrams (one socket for all of them)."""
        if self._beats is None:
            self._beats = BeatResponder(ray.util.get_node_ip_address(), self._beat_answer)
        return self._beats.address

    async def _beat_answer(self, pipeline: str, index: int) -> dict | None:
        self.pings += 1
        stage = self.stages.get((pipeline, index))
        return None if stage is not None and stage.hung else self._answer(pipeline, index, stage)

    async def add(self, pipeline: str, stages: list[tuple[int, str]]) -> int:
        for index, node in stages:
            self.stages[(pipeline, index)] = _Stage(index, node)
        return os.getpid()

    async def remove(self, pipeline: str) -> None:
        for key in [k for k in self.stages if k[0] == pipeline]:
            stage = self.stages.pop(key)
            if stage.state == "serving":
                stage.state = "stopped"
            stage.down.set()
            stage.released.set()
        self.stalled.pop(pipeline, None)
        self.stall_news.pop(pipeline, None)

    async def find(self, pipeline: str) -> list[tuple[int, str, int]]:
        return [(i, s.node, os.getpid()) for (p, i), s in self.stages.items() if p == pipeline]

    def _answer(self, pipeline: str, index: int, stage: _Stage | None) -> dict:
        answer = {
            "stage": index,
            "state": stage.state if stage else "stopped",
            "error": stage.error if stage else None,
            "time": time.time(),
            "running": 0,
            "waiting": 0,
            "node_cpu": SIM_NODE_CPU,
        }
        if index == 0:
            since = self.stalled.get(pipeline)
            answer.update(
                {
                    "pipeline_wait_s": time.time() - since if since is not None else 0.0,
                    "step_s": None,
                    "slowest_step_s": 0.0,
                }
            )
        return answer

    async def ping(self, pipeline: str, index: int) -> dict:
        self.pings += 1
        stage = self.stages.get((pipeline, index))
        if stage is not None and stage.hung:
            await stage.released.wait()
        return self._answer(pipeline, index, stage)

    async def vigil(self, pipeline: str, index: int, stall_after_s: float | None = None) -> dict:
        """As `StageActor.vigil`: returns when the stage is down, or (a head given `stall_after_s`)
        when its pipeline has stalled that long; event-driven rather than polled, hundreds per process."""
        stage = self.stages.get((pipeline, index))
        if stage is None:
            return self._answer(pipeline, index, stage)
        waits = [asyncio.ensure_future(stage.down.wait())]
        if index == 0 and stall_after_s is not None:
            waits.append(asyncio.ensure_future(self._stalled_for(pipeline, stall_after_s)))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        answer = self._answer(pipeline, index, stage)
        if not stage.down.is_set():
            answer["state"] = "stalled"
        return answer

    async def _stalled_for(self, pipeline: str, seconds: float) -> None:
        await self.stall_news.setdefault(pipeline, asyncio.Event()).wait()
        await asyncio.sleep(max(0.0, self.stalled.get(pipeline, time.time()) + seconds - time.time()))

    async def stats(self, pipeline: str, index: int) -> dict:
        return {"stage": index, "steps": 0}

    # -- faults
    async def crash(self, pipeline: str, index: int) -> bool:
        stage = self.stages.get((pipeline, index))
        if stage is None:
            return False
        stage.state, stage.error = "failed", "simulated crash"
        stage.down.set()
        return True

    async def hang(self, pipeline: str, index: int) -> bool:
        stage = self.stages.get((pipeline, index))
        if stage is None:
            return False
        stage.hung = True
        return True

    async def stall(self, pipeline: str, since: float) -> None:
        """The head of `pipeline` (here) has waited since `since` (wall clock) for a result that never comes."""
        self.stalled[pipeline] = since
        self.stall_news.setdefault(pipeline, asyncio.Event()).set()

    async def counts(self) -> dict:
        return {"stages": len(self.stages), "pings": self.pings, "pid": os.getpid()}


# -- the coordinators
@ray.remote(num_cpus=0)
class WatcherHost:
    """`count` membership followers (the real coordinator code), each recording when it saw each epoch."""

    def __init__(self, controller, count: int, timeout_s: float = 10.0) -> None:
        from coordinator.follow import MembershipFollower

        self.seen: list[list[tuple[int, float]]] = [[] for _ in range(count)]
        self.members: dict[
            int, list[str]
        ] = {}  # epoch -> its members' pipelines (one copy per host)
        self.followers = [
            MembershipFollower(controller, self._recorder(i), timeout_s=timeout_s)
            for i in range(count)
        ]
        self.tasks: list[asyncio.Task] = []

    def _recorder(self, i: int):
        def on_change(membership) -> None:
            self.seen[i].append((membership.epoch, time.time()))
            if membership.epoch not in self.members:
                self.members[membership.epoch] = [m.pipeline for m in membership.members]

        return on_change

    async def start(self) -> int:
        self.tasks = [asyncio.create_task(f.run()) for f in self.followers]
        return os.getpid()

    async def lowest_epoch(self) -> int:
        """The lowest epoch any follower here has seen last (-1 while one has seen none)."""
        return min((s[-1][0] if s else -1) for s in self.seen)

    async def status(self, pipeline: str = "") -> tuple[int, int, int, bool]:
        """(lowest epoch a follower here has seen last, highest, members at the highest, whether
        `pipeline` is one of them); the lowest is -1 while a follower has seen none."""
        lowest = min((s[-1][0] if s else -1) for s in self.seen)
        highest = max((s[-1][0] if s else -1) for s in self.seen)
        members = self.members.get(highest, [])
        return lowest, highest, len(members), pipeline in members

    async def records(self) -> dict:
        return {"seen": self.seen, "members": self.members}

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
