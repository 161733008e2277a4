"""One point of the grid: the real controller over P simulated pipelines, W simulated coordinators.

In order: start the stage hosts, the controller (P pipelines of S stages) and the watchers; wait
until every watcher follows the controller's epoch; a fault-free window (controller CPU, false
verdicts); then crashes and hangs, one at a time, each on a random ring member's stage (stage
index in turn 0..S-1), waiting after each for the failover record, the rebuilt pipeline and every
watcher to catch up. Then every watcher's record gives the membership propagation of each takeover.
Everything started here is stopped here.
"""

from __future__ import annotations

import glob
import os
import random
import time
from dataclasses import dataclass

import psutil
import ray

from bench._foreign_load import ForeignLoad
from bench._sim import (
    KV_NAMESPACE,
    SimulatedPipeline,
    StageHost,
    WatcherHost,
    clear_config,
    host_of,
    write_config,
)

STAGES_PER_PIPELINE = 4


@dataclass(frozen=True)
class Settings:
    crashes: int
    hangs: int
    steady_s: float
    gap_s: float = 1.0  # between one fault's recovery and the next fault
    interval_s: float = 0.5
    timeout_s: float = 3.0
    stages_per_node: int = 4
    stage_hosts: int = 4
    watcher_hosts: int = 4
    watch_timeout_s: float = 10.0
    state_api: bool = False  # the dashboard runs: find the controller's pid through `list_actors`
    quiet_wait_s: float = (
        0.0  # before the point, wait this long at most for the machine to be quiet
    )
    quiet_below_cores: float = 0.3  # quiet: other processes use less than this
    seed: int = 0


def wait_until(condition, timeout_s: float, what: str, poll_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while True:
        got = condition()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(poll_s)


def controller_pid(name: str, state_api: bool) -> int:
    """The controller's process id: from Ray's state API when the dashboard runs (`state_api`), on this
    driver's cluster (other Ray clusters may run on this machine, with controllers of their own), else the
    one `ray::Controller` worker under this driver (one point, so one controller, runs at a time)."""
    from ray._private.worker import _global_node

    ours = {p.pid: p for p in psutil.Process().children(recursive=True)}
    if state_api:
        from ray.util.state import list_actors

        actors = list_actors(
            address=_global_node.address, filters=[("name", "=", name)], detail=True, timeout=10
        )
        if actors and actors[0].pid in ours:
            return int(actors[0].pid)
    for pid, proc in ours.items():
        try:
            if proc.cmdline() and proc.cmdline()[0].startswith("ray::Controller"):
                return pid
        except psutil.Error:
            continue
    raise RuntimeError(f"cannot find the process of controller {name}")


def cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def controller_log(pid: int) -> dict:
    """What the controller's worker wrote to stderr/stdout: errors and tracebacks (the last few kept)."""
    from ray._private.worker import _global_node

    logs = _global_node.get_logs_dir_path()
    bad, takeovers, paused = [], 0, 0
    for path in glob.glob(os.path.join(logs, f"worker-*-{pid}.err")) + glob.glob(
        os.path.join(logs, f"worker-*-{pid}.out")
    ):
        with open(path, errors="replace") as f:
            for line in f:
                if " dead after " in line:
                    takeovers += 1
                    continue
                if " paused: " in line:  # the slow rule took a pipeline off the ring
                    paused += 1
                    continue
                if any(w in line for w in ("Traceback", "ERROR", "Error", "failed", "exception")):
                    bad.append(line.rstrip()[:300])
    return {
        "error_lines": len(bad),
        "last_errors": bad[-8:],
        "takeover_lines": takeovers,
        "paused_lines": paused,
        "dir": logs,
    }


def wait_for_quiet(max_s: float, below_cores: float, window_s: float = 10.0) -> dict:
    """Wait (at most `max_s`) until the processes this benchmark did not start use less than
    `below_cores` over `window_s`: on 2 shared cores, another engineer's tests skew every timing."""
    began = time.monotonic()
    while True:
        foreign = ForeignLoad()
        time.sleep(window_s)
        cores, waited = foreign.cores(), time.monotonic() - began
        if cores < below_cores or waited >= max_s:
            return {"waited_s": waited, "other_procs_cores": cores, "quiet": cores < below_cores}
        print(
            f"    other processes use {cores:.2f} cores; waiting for < {below_cores:g}", flush=True
        )


def run_point(stages: int, watchers: int, s: Settings) -> dict:
    from failover.controller import NAMESPACE, Controller, ControllerSettings
    from failover.heartbeat import HeartbeatSettings
    from shards.spec import ReplicaSpec

    S = STAGES_PER_PIPELINE
    P = stages // S
    nodes = -(-P * S // s.stages_per_node)
    name = f"bench-cp-{stages}x{watchers}-{os.urandom(2).hex()}"
    hosts = [f"{name}.host-{k}" for k in range(min(s.stage_hosts, nodes))]
    rng = random.Random(s.seed)
    quiet = wait_for_quiet(s.quiet_wait_s, s.quiet_below_cores) if s.quiet_wait_s > 0 else {}
    out: dict = {
        "quiet": quiet,
        "stages": stages,
        "pipelines": P,
        "watchers": watchers,
        "nodes": nodes,
        "controller": name,
        "stage_hosts": len(hosts),
    }
    stage_hosts = {h: StageHost.options(name=h, namespace=KV_NAMESPACE).remote() for h in hosts}
    host_pids = [c["pid"] for c in ray.get([h.counts.remote() for h in stage_hosts.values()])]
    write_config(name, hosts, nodes, s.stages_per_node)
    spec = ReplicaSpec(model_dir="unused", stages=S, max_batch=8, tensor_parallel=1)
    settings = ControllerSettings(
        replicas=P,
        standby=0,
        heartbeat=HeartbeatSettings(interval_s=s.interval_s, timeout_s=s.timeout_s),
        pipeline_factory=SimulatedPipeline,
        start_timeout_s=120,
    )
    ctl = Controller.options(name=name, namespace=NAMESPACE, num_cpus=0).remote(
        spec, settings, name
    )
    watcher_hosts: list = []
    pid = None
    try:
        began = time.perf_counter()
        ray.get(
            ctl.incarnation.remote(), timeout=300
        )  # its process up (imports torch: seconds on a busy box)
        out["actor_up_s"] = time.perf_counter() - began
        began = time.perf_counter()
        ray.get(ctl.start.remote(), timeout=300)
        out["start_s"] = time.perf_counter() - began
        pid = controller_pid(name, s.state_api)
        out["pings_due_per_s"] = _pings_due_per_s(ray.get(ctl.membership.remote()), s.interval_s)
        out["controller_pid"] = pid
        n_hosts = min(s.watcher_hosts, watchers)
        counts = [watchers // n_hosts + (k < watchers % n_hosts) for k in range(n_hosts)]
        watcher_hosts = [
            WatcherHost.options(num_cpus=0).remote(ctl, c, s.watch_timeout_s) for c in counts
        ]
        watcher_pids = ray.get([w.start.remote() for w in watcher_hosts])
        out["watcher_hosts"] = n_hosts

        def caught_up(victim: str = "") -> int | None:
            """The epoch every watcher follows, once they all follow the same one, with P members
            and without `victim` (asked of the watchers: polling the controller would load it)."""
            status = ray.get([w.status.remote(victim) for w in watcher_hosts])
            epochs = {e for low, high, _, _ in status for e in (low, high)}
            if len(epochs) != 1 or any(n != P or has for _, _, n, has in status):
                return None
            return epochs.pop()

        began = time.perf_counter()
        wait_until(caught_up, 120, "every watcher to follow the first membership", 0.25)
        out["first_sync_s"] = time.perf_counter() - began
        time.sleep(2.0)  # let start-up settle before the steady window

        # -- the fault-free window
        print(f"    steady window {s.steady_s:.0f} s", flush=True)
        epoch0 = ray.get(ctl.membership.remote()).epoch
        stalls0 = ray.get(ctl.health.remote())["monitor_stalls"]
        foreign = ForeignLoad()
        w0, t0 = time.time(), time.perf_counter()
        c0, h0, k0, b0 = cpu_s([pid]), cpu_s(host_pids), cpu_s(watcher_pids), ForeignLoad._busy_s()
        pings0 = sum(c["pings"] for c in ray.get([h.counts.remote() for h in stage_hosts.values()]))
        time.sleep(s.steady_s)
        wall = time.perf_counter() - t0
        c1, h1, k1, b1 = cpu_s([pid]), cpu_s(host_pids), cpu_s(watcher_pids), ForeignLoad._busy_s()
        pings1 = sum(c["pings"] for c in ray.get([h.counts.remote() for h in stage_hosts.values()]))
        w1 = time.time()
        health = ray.get(ctl.health.remote())
        failovers = ray.get(ctl.failovers.remote())
        out["steady"] = {
            "s": wall,
            "controller_cores": (c1 - c0) / wall,
            "stage_hosts_cores": (h1 - h0) / wall,
            "watcher_hosts_cores": (k1 - k0) / wall,
            "other_procs_cores": foreign.cores(),  # not started by this benchmark
            "machine_cores": (b1 - b0) / wall,  # everything, these included
            "pings_per_s": (pings1 - pings0) / wall,
            "pings_due_per_s": out["pings_due_per_s"],  # at the nominal cadence
            "false_verdicts": sum(w0 <= f["at"] <= w1 for f in failovers),
            "false_verdict_records": [f for f in failovers if w0 <= f["at"] <= w1][:10],
            "epochs_published": ray.get(ctl.membership.remote()).epoch - epoch0,
            "monitor_stalls": health["monitor_stalls"] - stalls0,
        }

        # -- faults, one at a time
        faults, foreign = [], ForeignLoad()
        plan = ["crash"] * s.crashes + ["hang"] * s.hangs
        for k, kind in enumerate(plan):
            index = (k if kind == "crash" else k - s.crashes) % S
            faults.append(_inject(ctl, stage_hosts, hosts, kind, index, rng, s, P, caught_up))
            f = faults[-1]
            print(
                f"    {kind:5} stage {index}: "
                + (
                    f"detected in {f['detection_s']:.3f} s ({f['reason'][:60]})"
                    if f["detected"]
                    else "NOT detected"
                ),
                flush=True,
            )
        out["faults"] = faults
        out["faults_other_procs_cores"] = foreign.cores()
        victims = {f["pipeline"] for f in faults}
        everything = ray.get(ctl.failovers.remote())
        out["unexpected_failovers"] = [
            f for f in everything if f["pipeline"] not in victims and f["at"] >= w0
        ]
        out["health"] = ray.get(ctl.health.remote())

        # -- propagation, from every watcher's record
        records = ray.get([w.records.remote() for w in watcher_hosts])
        out["propagation"] = _propagation(faults, records)
    finally:
        for w in watcher_hosts:
            try:
                ray.get(w.stop.remote(), timeout=10)
            except Exception:  # noqa: BLE001 — killed below anyway
                pass
        try:
            ray.get(ctl.shutdown.remote(), timeout=60)
        except Exception as exc:  # noqa: BLE001 — say it, and kill it anyway
            out["shutdown_error"] = repr(exc)
        ray.kill(ctl)
        for w in watcher_hosts:
            ray.kill(w)
        for h in stage_hosts.values():
            ray.kill(h)
        clear_config(name)
        if pid is not None:
            out["controller_log"] = controller_log(pid)
    return out


def _inject(
    ctl,
    stage_hosts: dict,
    hosts: list[str],
    kind: str,
    index: int,
    rng: random.Random,
    s: Settings,
    P: int,
    caught_up,
) -> dict:
    membership = ray.get(ctl.membership.remote())
    member = rng.choice(membership.members)
    victim, stage = member.pipeline, member.stages[index]
    host = stage_hosts[host_of(stage.node_id, hosts)]
    head_host = stage_hosts[host_of(member.stages[0].node_id, hosts)]
    before = {(f["at"], f["pipeline"]) for f in ray.get(ctl.failovers.remote())}
    t0 = time.time()
    if kind == "crash":
        ray.get(host.crash.remote(victim, index))
    else:
        ray.get(host.hang.remote(victim, index))
        if index != 0:  # its head now waits in vain for the micro-batch that went through it
            ray.get(head_host.stall.remote(victim, t0))

    def recorded():
        return next(
            (
                f
                for f in ray.get(ctl.failovers.remote())
                if f["pipeline"] == victim and (f["at"], f["pipeline"]) not in before
            ),
            None,
        )

    fault = {
        "kind": kind,
        "stage": index,
        "pipeline": victim,
        "slot": member.replica_id,
        "node": stage.node_id,
        "injected_at": t0,
    }
    try:
        record = wait_until(
            recorded, 15 if kind == "crash" else 30, f"the {kind} of {victim} to be recorded", 0.1
        )
    except TimeoutError:
        fault["detected"] = False
        return fault
    fault.update(
        detected=True,
        at=record["at"],
        detection_s=record["at"] - t0,
        reason=record["reason"],
        silent_s=record["silent_s"],
        reported_stage=record["stage"],
        action=record["action"],
    )

    def rebuilt():
        return caught_up(victim)

    began = time.perf_counter()
    try:
        wait_until(rebuilt, 120, f"the rebuild after the {kind} of {victim}", 0.1)
        fault["rebuilt_and_followed_s"] = time.perf_counter() - began
    except TimeoutError:
        fault["rebuilt_and_followed_s"] = None
    again = next((f for f in ray.get(ctl.failovers.remote()) if f["pipeline"] == victim), None)
    if again is not None and again.get("restored_at"):
        fault["rebuild_s"] = (
            again["restored_at"] - again["at"]
        )  # the position empty, in the controller's clock
    time.sleep(s.gap_s)
    return fault


def _pings_due_per_s(membership, interval_s: float) -> float:
    """Pings a second at the monitor's nominal cadence (`failover/monitor.py`): every head once an
    interval, and once every CPU_SAMPLE_S the probe of each node that holds no head (a head's answer
    carries its node's CPU, and the simulated stages report one, as real ones do)."""
    from failover.monitor import CPU_SAMPLE_S

    nodes = {st.node_id for m in membership.members for st in m.stages}
    head_nodes = {st.node_id for m in membership.members for st in m.stages if st.index == 0}
    return len(membership.members) / interval_s + len(nodes - head_nodes) / CPU_SAMPLE_S


def _propagation(faults: list[dict], records: list[dict]) -> dict:
    """For each detected fault: from its record's "at" to each watcher's first sight of an epoch
    ≥ the takeover's (the first epoch without the victim). Also the first watcher of each process
    (what a coordinator alone in its process would see: it waits for no sibling's deserialization)."""
    members: dict[int, set[str]] = {}
    for r in records:
        for epoch, pipelines in r["members"].items():
            members.setdefault(int(epoch), set(pipelines))
    watchers = sum(len(r["seen"]) for r in records)
    delays, firsts, spreads, per_fault = [], [], [], []
    for f in faults:
        if not f.get("detected"):
            continue
        present = [e for e, p in members.items() if f["pipeline"] in p]
        after = sorted(e for e in members if present and e > max(present))
        if not after:
            per_fault.append({"pipeline": f["pipeline"], "epoch": None, "missing": watchers})
            continue
        epoch = after[0]
        mine, missing = [], 0
        for r in records:
            host = []
            for w in r["seen"]:
                t = next((t for e, t in w if e >= epoch), None)
                if t is None:
                    missing += 1
                else:
                    host.append(t - f["at"])
            if host:
                firsts.append(min(host))
                spreads.append(max(host) - min(host))
            mine.extend(host)
        delays.extend(mine)
        per_fault.append(
            {
                "pipeline": f["pipeline"],
                "epoch": epoch,
                "missing": missing,
                "max_s": max(mine) if mine else None,
                "min_s": min(mine) if mine else None,
            }
        )
    return {
        "delays_s": delays,
        "first_per_process_s": firsts,
        "spread_per_process_s": spreads,
        "per_fault": per_fault,
    }
