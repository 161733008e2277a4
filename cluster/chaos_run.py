"""`ringpipe chaos`: faults injected into a running service under load, and a report that proves
what was lost (nothing, or the run fails).

The run joins the cluster (`--address`, RAY_ADDRESS, else the one running on this
machine), answers the request pool
once while nothing is broken (the references), starts the load, lets it settle
for the warm-up, then injects a fault every `--every` seconds (a range draws
each gap) for `--duration`, each of a kind drawn from `--fault` (every kind once per round, in a drawn order):
  kill-node         a worker node's raylet and every process under it (never the head)
  kill-actor        one stage actor of a replica or standby
  kill-coordinator  one coordinator replica of the Serve app
  pause-node        SIGSTOP a worker node's processes for `--pause`, then SIGCONT
  slow-node         CPU hogs on a worker node for `--slow`
  partition-node    a worker node's links cut for `--partition`, then restored: its processes run
                    on, cut off (local clusters with nodes in namespaces, `ringpipe serve --netns`;
                    on a real cluster use firewall rules, see README)
A watcher per fault measures detection (the controller's failover verdict on a
pipeline the fault touched, or the replica paused for a slow node) and recovery
(the membership whole again: every ring position filled and accepting, the
standbys back, no touched pipeline left, the nodes back, the coordinators
back). With `--restart-nodes`, a killed node, or one Ray declared dead while
paused, is started again on this machine (local clusters: on a real one the
autoscaler does it). Load goes on for `--cooldown` after the last fault, then
the report is written (cluster/chaos_report.py); the exit status is 1 when an
invariant broke.
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cluster import chaos
from cluster.load import Load, LoadSettings, make_pool, references
from cluster.node_fault import GRACE_S as FAULT_DELAY_S

POLL_S = 0.2
RESTART_TRIES = 3  # starts of a killed node (`--restart-nodes`) before its fault is left unrecovered


@dataclass(frozen=True)
class ChaosSettings:
    target: str
    report: Path
    faults: tuple[str, ...] = ("kill-node",)
    every_s: tuple[float, float] = (30.0, 30.0)
    duration_s: float = 600.0
    seed: int = 0
    restart_nodes: bool = False
    warmup_s: float = 10.0
    cooldown_s: float = 20.0
    pause_s: float = 5.0
    slow_s: float = 10.0
    partition_s: float = 20.0
    recovery_timeout_s: float = 180.0
    pool: int = 16
    sampled_fraction: float = 0.25
    prompts: tuple[str, ...] = ()
    load: LoadSettings = field(default_factory=LoadSettings)


class Run:
    """One chaos run: the cluster's handles, the targets it must return to, the faults so far."""

    def __init__(self, settings: ChaosSettings, controller) -> None:
        import ray

        self.settings = settings
        self.rng = random.Random(settings.seed)
        self.controller = controller
        self.replicas = len(ray.get(self.controller.membership.remote()).members)
        self.standby = len(ray.get(self.controller.standbys.remote()))
        self.nodes = len(chaos.worker_nodes())
        self.coordinators = len(chaos.coordinator_replicas())
        self.gcs_address = ray.get_runtime_context().gcs_address
        self.faults: list[dict] = []
        self.restarted: list = []  # `ray start --block` processes of restarted nodes
        self.broken: set[str] = set()  # nodes killed, or paused or slowed now: not chosen again
        self.watchers: list[threading.Thread] = []
        self._restarting: dict[int, subprocess.Popen] = {}  # id(fault) -> its node's latest restart
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    # -- faults
    def inject(self, kind: str) -> None:
        import ray

        fault = {"kind": kind, "target": None, "t": self.now(), "duration_s": None, "detected_s": None,
                 "recovered_s": None, "error": None}
        wall = time.time()
        pipelines = ray.get(self.controller.pipeline_nodes.remote())
        touched: set[str] = set()
        node = None
        try:
            if kind in ("kill-node", "pause-node", "slow-node", "partition-node"):
                candidates = [n for n in chaos.worker_nodes() if n["NodeID"] not in self.broken]
                if not candidates:
                    raise LookupError("no worker node left to break")
                node = self.rng.choice(candidates)
                self.broken.add(node["NodeID"])
                fault["target"] = f"node {node['NodeID'][:12]} ({node['NodeManagerAddress']})"
                touched = {p for p, stages in pipelines.items() if any(s["node_id"] == node["NodeID"] for s in stages)}
                action, seconds = {"kill-node": ("kill", 0.0), "pause-node": ("pause", self.settings.pause_s),
                                   "slow-node": ("slow", self.settings.slow_s),
                                   "partition-node": ("partition", self.settings.partition_s)}[kind]
                chaos.node_fault(node["NodeID"], action, seconds)
                # the fault starts once its process there waited for the task to answer
                fault["t"], wall = self.now() + FAULT_DELAY_S, time.time() + FAULT_DELAY_S
                fault["duration_s"] = seconds or None
            elif kind == "kill-actor":
                pipelines = self._some_pipeline(pipelines)
                fault["t"], wall = self.now(), time.time()
                pipeline = self.rng.choice(sorted(pipelines))
                stage = self.rng.randrange(len(pipelines[pipeline]))
                fault["target"] = f"{pipeline}.stage-{stage}"
                touched = {pipeline}
                chaos.kill_stage(chaos.StageProcess("", 0, pipeline, stage, f"{pipeline}.stage-{stage}.tp0", "", 0))
            elif kind == "kill-coordinator":
                name = self.rng.choice(chaos.coordinator_replicas())
                fault["target"] = name.split("#")[-1]
                fault["actor"] = name
                chaos.kill_coordinator(name)
            else:
                raise ValueError(f"unknown fault {kind!r}")
        except Exception as exc:  # noqa: BLE001 — a fault that could not be injected is reported, not fatal
            fault["error"] = f"{type(exc).__name__}: {exc}"
        fault["touched"] = sorted(touched)
        self.faults.append(fault)
        if fault["error"] is None:
            watcher = threading.Thread(target=self._watch, args=(fault, wall, touched, node), daemon=True)
            watcher.start()
            self.watchers.append(watcher)

    def _some_pipeline(self, pipelines: dict[str, list[dict]]) -> dict[str, list[dict]]:
        """Those of `pipelines` still live, or, while the cluster has none live (every one lost at once
        and being rebuilt), the first ones it has again; LookupError past the recovery timeout."""
        import ray

        deadline = self.now() + self.settings.recovery_timeout_s
        while True:
            # live now: the answer above may be seconds old (stages on a paused node answer late)
            live = {m.pipeline for m in ray.get(self.controller.membership.remote()).members}
            live |= set(ray.get(self.controller.standbys.remote()))
            pipelines = {name: stages for name, stages in pipelines.items() if name in live}
            if pipelines:
                return pipelines
            if self.now() > deadline:
                raise LookupError(f"no live pipeline for {self.settings.recovery_timeout_s:g} s")
            time.sleep(POLL_S)
            pipelines = ray.get(self.controller.pipeline_nodes.remote())

    def _watch(self, fault: dict, wall: float, touched: set[str], node: dict | None) -> None:
        """Fill in the fault's detection and recovery times (seconds after it was injected)."""
        import ray

        t, kind = fault["t"], fault["kind"]
        # kills, and partitions (longer than any heartbeat timeout), end pipelines for certain; a pause
        # or a slowdown may be too short to be noticed at all
        certain = kind.startswith("kill-") or kind == "partition-node"
        node_back = node is None
        deadline = t + (fault["duration_s"] or 0) + self.settings.recovery_timeout_s
        while self.now() < deadline:
            try:
                if fault["detected_s"] is None:
                    fault["detected_s"] = self._detected(kind, wall, touched)
                if not node_back:
                    node_back = self._node_back(fault, node)
                # a fault certain to end a pipeline it touched is over once the controller saw it
                seen = fault["detected_s"] is not None or not touched or not certain
                if node_back and seen and self._whole(touched if certain else set(), fault):
                    fault["recovered_s"] = round(self.now() - t, 3)
                    return
            except ray.exceptions.RayError:
                pass  # the controller restarting: ask again
            time.sleep(POLL_S)

    def _detected(self, kind: str, wall: float, touched: set[str]) -> float | None:
        import ray

        if kind == "slow-node":
            members = ray.get(self.controller.membership.remote()).members
            if any(not m.accepting and m.pipeline in touched for m in members):
                return round(time.time() - wall, 3)
            return None
        verdicts = [f["at"] for f in ray.get(self.controller.failovers.remote())
                    if f["pipeline"] in touched and f["at"] >= wall - 0.5]
        return round(max(0.0, min(verdicts) - wall), 3) if verdicts else None

    def _node_back(self, fault: dict, node: dict) -> bool:
        """The fault on `node` over: a slowed or paused node running again (or, if Ray declared it
        dead meanwhile, restarted), a killed one restarted. Restarts only with `--restart-nodes`;
        without, a node that died is not waited for."""
        import ray

        if self.now() < fault["t"] + (fault["duration_s"] or 0):
            return False
        killed = fault["kind"] == "kill-node"
        dead = killed or not any(n["NodeID"] == node["NodeID"] and n["Alive"] for n in ray.nodes())
        if not dead:
            self.broken.discard(node["NodeID"])
            return True
        if not self.settings.restart_nodes:
            return True
        process = self._restarting.get(id(fault))
        if process is None or (process.poll() is not None and fault["restarted"] < RESTART_TRIES):
            # first restart, or the last one failed (a node whose raylet did not register in time
            # on a loaded machine exits 1): start it again
            fault["restarted"] = fault.get("restarted", 0) + 1
            process = chaos.restart_node(node, self.gcs_address, str(self.settings.report / "nodes.log"))
            self._restarting[id(fault)] = process
            self.restarted.append(process)
        return len([n for n in chaos.worker_nodes() if n["NodeID"] not in self.broken]) >= self.nodes

    def _whole(self, touched: set[str], fault: dict) -> bool:
        import ray

        members = ray.get(self.controller.membership.remote()).members
        standbys = ray.get(self.controller.standbys.remote())
        live = {m.pipeline for m in members} | set(standbys)
        return (len(members) == self.replicas and all(m.accepting for m in members)
                and len(standbys) == self.standby and not (touched & live)
                and len(chaos.coordinator_replicas()) >= self.coordinators
                and fault.get("actor") not in chaos.coordinator_replicas())


def run(settings: ChaosSettings, address: str | None = None, token: str | None = None, progress: bool = True) -> dict:
    """The whole run; returns the record (also written, with the summary and the plot, to `settings.report`)."""
    from cluster.chaos_report import write_report
    from cluster.local import find_cluster, init_ray
    from cluster.serve import running_controller
    from coordinator.client import Client

    address = find_cluster(address)  # the flag, RAY_ADDRESS, else the one cluster on this machine
    init_ray(address)
    controller = running_controller(address)  # NoService, in one line, when the cluster runs none
    settings.report.mkdir(parents=True, exist_ok=True)
    chaos_run = Run(settings, controller)
    say = print if progress else (lambda *a, **k: None)
    pool = make_pool(settings.pool, settings.seed, settings.sampled_fraction, list(settings.prompts) or None)
    say(f"references: {len(pool)} requests answered before any fault…", flush=True)
    with Client(settings.target, token=token, retries=20) as client:
        dtype = client.status().dtype or "float32"  # what the output check may promise (chaos_report)
        expected = references(client, pool, settings.load.max_new_tokens)
    started_at = time.time()
    chaos_run.t0 = time.monotonic()
    load = Load(settings.target, pool, expected, settings.load, settings.seed, chaos_run.t0, token)
    load.start()
    try:
        time.sleep(settings.warmup_s)
        faults_start = chaos_run.now()
        kinds: list[str] = []
        while chaos_run.now() < faults_start + settings.duration_s:
            if not kinds:  # each kind once per round, in a drawn order
                kinds = chaos_run.rng.sample(settings.faults, len(settings.faults))
            kind = kinds.pop()
            chaos_run.inject(kind)
            last = chaos_run.faults[-1]
            say(f"[{last['t']:7.1f}s] {kind} {last['target'] or ''}{' FAILED: ' + last['error'] if last['error'] else ''}",
                flush=True)
            gap = chaos_run.rng.uniform(*settings.every_s)
            time.sleep(max(0.0, min(gap, faults_start + settings.duration_s - chaos_run.now())))
        faults_end = chaos_run.now()
        for watcher in chaos_run.watchers:
            watcher.join()
        time.sleep(settings.cooldown_s)
    finally:
        load.stop()
    record = {
        "version": 1, "started_at": started_at, "target": settings.target,
        "settings": {**asdict(settings), "report": str(settings.report)},
        "dtype": dtype, "load_start": 0.0, "faults_start": faults_start, "faults_end": faults_end, "load_end": chaos_run.now(),
        "faults": chaos_run.faults, "requests": sorted(load.records, key=lambda r: r["t_start"]),
        "restarted_nodes": [p.pid for p in chaos_run.restarted],
        "pool": [{"prompt": list(e.prompt) if isinstance(e.prompt, tuple) else e.prompt, "sampling": e.sampling,
                  "expected": ids} for e, ids in zip(pool, expected, strict=True)],
    }
    write_report(record, settings.report)
    return record


def cmd_chaos(args) -> int:
    import sys

    from cluster.call import TOKEN_ENV
    from cluster.chaos_report import summarize

    try:
        settings = ChaosSettings(
            target=args.target, report=args.report, faults=tuple(args.fault or ("kill-node",)),
            every_s=args.every, duration_s=args.duration, seed=args.seed,  # durations: parsed by argparse
            restart_nodes=args.restart_nodes, warmup_s=args.warmup, cooldown_s=args.cooldown,
            pause_s=args.pause, slow_s=args.slow, partition_s=args.partition,
            pool=args.pool,
            sampled_fraction=args.sampled_fraction,
            prompts=tuple(Path(args.prompts).read_text().splitlines()) if args.prompts else (),
            load=LoadSettings(
                concurrency=None if args.rate else args.concurrency, rate=args.rate,
                max_new_tokens=args.max_new_tokens, stream_fraction=args.stream_fraction,
                request_timeout_s=args.request_timeout,
            ),
        )
    except (ValueError, OSError) as exc:
        print(f"ringpipe: error: {exc}", file=sys.stderr)
        return 2
    record = run(settings, args.address, os.environ.get(TOKEN_ENV) or None)
    summary = summarize(record)
    print((settings.report / "summary.md").read_text())
    for line in summary["violations"]:
        print(f"INVARIANT BROKEN: {line}", file=sys.stderr)
    return 1 if summary["violations"] else 0
