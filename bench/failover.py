"""Failover: how fast a failure is seen, how soon the first resumed token arrives, and what is lost.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python bench/failover.py               # ~30 min on 2 cores
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python bench/failover.py --kills 2     # smoke run

On a local multi-node cluster (a head and worker nodes, real raylets on 127.0.0.1) serving a
small random Llama (2 replicas x 2 stages, default heartbeats), once with `replicas.standby: 1`
and once with none. `--nodes`: worker nodes (default: 2 per pipeline, ring members and standby,
so that each pipeline has nodes of its own; 3 was the setting before placement kept them apart). Each kill happens while 4 greedy streams of 400 tokens run, and each of:

- crash: a stage actor is killed (stage 0 and 1 in turn);
- hang: a stage process is paused with SIGSTOP (resumed after its takeover);
- node: a worker node holding a stage is killed (raylet and workers); a new one is added after.

Measured per kill (wall clock, one machine): kill -> detection (the controller's verdict), kill ->
first resumed token (the first token, from another ring member, of a stream that was on the
victim), requests lost (a stream that ended in an error) and tokens repeated or lost (each stream
against its failure-free run). Side by side on the same cluster: kill -> Ray reporting the node
dead (`ray.nodes()`), and Serve's own replica health check with its defaults (period 10 s,
timeout 30 s) against a paused and a killed replica of a trivial deployment.

The machine is shared: unless `--no-wait`, the run first waits until no pytest process runs.
Results: `results/failover.md` and `.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._results import describe, table  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = [[5, 17, 99, 3], [8, 8, 1, 40, 41], [300, 12], [77, 78, 79, 80, 81, 82]]
NEW_TOKENS = 400


class Stream:
    """One greedy stream in a thread; every piece kept with its arrival time (wall clock)."""

    def __init__(self, target: str, prompt: list[int]) -> None:
        self.pieces: list[tuple[float, object]] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(target, prompt), daemon=True)
        self.thread.start()

    def _run(self, target: str, prompt: list[int]) -> None:
        from coordinator.client import Client

        try:
            with Client(target, retries=40, max_backoff_s=2.0) as client:
                for piece in client.stream(prompt, NEW_TOKENS, ignore_eos=True, timeout_s=300):
                    self.pieces.append((time.time(), piece))
        except BaseException as exc:  # noqa: BLE001 — counted as a lost request
            self.error = exc

    @property
    def tokens(self) -> list[int]:
        return [t for _, p in self.pieces for t in p.token_ids]

    def member(self) -> tuple[str, int] | None:
        return (self.pieces[-1][1].replica_id, self.pieces[-1][1].epoch) if self.pieces else None

    def running(self) -> bool:
        return bool(self.pieces) and self.pieces[-1][1].finish_reason is None

    def first_elsewhere(self, old: tuple[str, int], after: float) -> float | None:
        return next((t for t, p in self.pieces if t >= after and (p.replica_id, p.epoch) != old), None)


def token_errors(got: list[int], want: list[int]) -> int:
    """Tokens repeated, lost or changed: positions that differ, plus the length difference."""
    return sum(a != b for a, b in zip(got, want, strict=False)) + abs(len(got) - len(want))


def wait(condition, timeout_s: float, what: str, poll_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(poll_s)


def converged(controller, replicas: int, standby: int) -> bool:
    import ray

    return (
        len(ray.get(controller.membership.remote()).ring_ids) == replicas
        and len(ray.get(controller.standbys.remote())) == standby
    )


def node_dead_reporter(node_id: str, started: float, out: dict) -> threading.Thread:
    """Polls `ray.nodes()` until Ray reports `node_id` dead; stores the delay in out["ray_node_dead_s"]."""
    import ray

    def poll() -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            if any(n["NodeID"] == node_id and not n["Alive"] for n in ray.nodes()):
                out["ray_node_dead_s"] = time.time() - started
                return
            time.sleep(0.02)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    return t


def one_kill(svc, cluster, controller, kind: str, stage: int, expected: list[list[int]], standby: int) -> dict:
    import ray

    from cluster import chaos

    wait(lambda: converged(controller, 2, standby), 300, "convergence", 0.2)
    streams = [Stream(svc.target, p) for p in PROMPTS]
    wait(lambda: sum(s.running() and len(s.tokens) >= 4 for s in streams) >= 3, 60, "streams under way", 0.005)
    busiest = Counter(s.member()[0] for s in streams if s.running()).most_common(1)[0][0]
    victim = chaos.stage_process(controller, busiest, stage)
    old = (victim.replica_id, victim.epoch)
    on_victim = [s for s in streams if s.running() and s.member() == old]
    out: dict = {"kind": kind, "stage": stage, "standby": standby, "streams_on_victim": len(on_victim)}
    started = time.time()
    if kind == "crash":
        chaos.kill_stage(victim)
    elif kind == "hang":
        chaos.pause_stage(victim)
    else:
        reporter = node_dead_reporter(victim.node_id, started, out)
        chaos.kill_node(cluster, victim.node_id)

    def detected() -> list[dict]:
        return [f for f in ray.get(controller.failovers.remote()) if f["pipeline"] == victim.pipeline]

    wait(detected, 60, "detection", 0.02)
    if kind == "hang":
        chaos.resume_stage(victim)
    out["detection_s"] = detected()[0]["at"] - started
    for s in streams:
        s.thread.join(300)
    firsts = [t for s in on_victim if (t := s.first_elsewhere(old, started)) is not None]
    out["first_resumed_token_s"] = min(firsts) - started if firsts else None
    out["resumed_streams"] = len(firsts)
    out["requests_lost"] = sum(s.error is not None or not s.pieces for s in streams)
    out["errors"] = [str(s.error)[:300] for s in streams if s.error is not None]
    out["token_errors"] = sum(token_errors(s.tokens, want) for s, want in zip(streams, expected, strict=True))
    if kind == "node":
        reporter.join(120)
        cluster.add_node(node_ip_address="127.0.0.1", object_store_memory=256 << 20, num_cpus=6)
    return out


def serve_health_check(trials: int) -> list[dict]:
    """Serve's replica health check, defaults untouched: a paused and a killed replica of a trivial app."""
    import ray
    from ray import serve

    @serve.deployment(name="Probe", ray_actor_options={"num_cpus": 0})
    class Probe:
        def __call__(self) -> str:
            return "ok"

    serve.run(Probe.bind(), name="probe", route_prefix="/probe")

    def replica() -> dict | None:
        return next(
            (a for a in ray._private.state.actors().values()
             if a["State"] == "ALIVE" and (a["Name"] or "").startswith("SERVE_REPLICA::probe#")),
            None,
        )

    def replaced(name: str) -> bool:
        states = serve.status().applications["probe"].deployments["Probe"].replica_states
        current = replica()
        return (current is not None and current["Name"] != name) or set(states) != {"RUNNING"}

    out = []
    try:
        for i in range(trials):
            for kind in ("hang", "crash"):
                wait(lambda: replica() is not None and not replaced(replica()["Name"]), 120, "a running probe", 0.2)
                r = replica()
                started = time.time()
                if kind == "hang":
                    os.kill(r["Pid"], signal.SIGSTOP)
                else:
                    ray.kill(ray.get_actor(r["Name"], namespace="serve"), no_restart=True)
                wait(lambda name=r["Name"]: replaced(name), 180, "Serve to notice", 0.05)
                out.append({"kind": kind, "trial": i, "serve_detection_s": time.time() - started})
                if kind == "hang":
                    try:
                        os.kill(r["Pid"], signal.SIGKILL)
                    except ProcessLookupError:
                        pass
    finally:
        serve.delete("probe")
    return out


def run_mode(checkpoint: str, standby: int, kills: int, kinds: list[str], serve_trials: int,
             nodes: int | None = None) -> tuple[list, list]:
    import ray

    from cluster.config import parse_config
    from cluster.serve import start_service
    from coordinator.client import Client
    from failover.controller import CONTROLLER_NAME, NAMESPACE

    cfg = parse_config({
        "model": {"path": checkpoint},
        "pipeline": {"stages": 2, "max_batch": 4, "max_seq_len": 512, "prefill_chunk": 32},
        "replicas": {"count": 2, "standby": standby},
        "server": {"port": 24731, "http_port": 24732, "coordinators": 2},
    })
    svc = start_service(cfg, progress=False, nodes=nodes or 2 * (2 + standby))
    try:
        controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
        with Client(svc.target) as client:
            expected = [client.generate(p, NEW_TOKENS, ignore_eos=True).token_ids for p in PROMPTS]
        rows = []
        for kind in kinds:
            for k in range(kills):
                row = one_kill(svc, svc.local_cluster, controller, kind, k % 2, expected, standby)
                print(json.dumps(row), flush=True)  # the log keeps every row, should a later kill fail
                rows.append(row)
        probes = serve_health_check(serve_trials) if serve_trials else []
        for p in probes:
            print(json.dumps(p), flush=True)
        return rows, probes
    finally:
        svc.shutdown()


def pct(values: list[float], q: float) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))]


def fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


HOW_TO_READ = """## How to read this

- **detection**: wall time from the kill (or SIGSTOP) to the controller's verdict. Targets: a
  crash within 0.5 s (it is seen through an outstanding call that Ray fails when the actor dies);
  a hang within `timeout_s` + `interval_s` = 3.5 s. A hang is declared `timeout_s` after the last
  answered ping, which came up to `interval_s` before the SIGSTOP: hence 2.5-3 s.
- **first resumed token**: from the kill to the first token, from another ring member, of a stream
  that was on the victim: detection, the coordinator's resume (prompt + tokens so far re-prefilled
  on the successor) and one decode step. Target with a standby: detection + 1 s.
- **node**: with enough worker nodes (`--nodes`, by default 2 per pipeline) placement keeps the
  pipelines on disjoint nodes, so a node kill takes one pipeline and its streams resume on a
  survivor. Target: first resumed token ≤ detection + 1 s at p99 (the "resumed − detection"
  column). With fewer nodes than that (3, as before) a node kill can take every ring member and
  the standby at once; the streams then wait for a rebuild (a placement group, processes, weights).
- **requests lost / tokens repeated or lost**: streams that ended in an error, and tokens that
  differ from the failure-free run of the same request (positions that differ plus the length
  difference). Target 0 for both.
- **side by side**: Ray reporting a dead node (GCS health checks) and Serve replacing a paused or
  killed replica of a trivial deployment (its health check with defaults: every 10 s, 30 s
  timeout), on the same cluster and machine.
"""


def report(rows: list[dict], probes: list[dict], meta: dict, command: str) -> str:
    lines = ["# Failover benchmark", "", f"Command: `{command}`", "", "```", json.dumps(meta, indent=1), "```", ""]
    head = ["kind", "standby", "kills", "detection p50 / p99 (s)", "first resumed token p50 / p99 (s)",
            "resumed − detection p50 / p99 (s)", "streams resumed", "requests lost", "tokens repeated or lost"]
    body = []
    for (kind, standby) in sorted({(r["kind"], r["standby"]) for r in rows}):
        rs = [r for r in rows if r["kind"] == kind and r["standby"] == standby]
        det = [r["detection_s"] for r in rs]
        first = [r["first_resumed_token_s"] for r in rs]
        after = [r["first_resumed_token_s"] - r["detection_s"] for r in rs if r["first_resumed_token_s"] is not None]
        body.append([
            kind, standby, len(rs), f"{fmt(pct(det, 50))} / {fmt(pct(det, 99))}",
            f"{fmt(pct(first, 50))} / {fmt(pct(first, 99))}", f"{fmt(pct(after, 50))} / {fmt(pct(after, 99))}",
            sum(r["resumed_streams"] for r in rs),
            sum(r["requests_lost"] for r in rs), sum(r["token_errors"] for r in rs),
        ])
    lines += ["## ringpipe", "", table(head, body), ""]
    side = []
    node = [r["ray_node_dead_s"] for r in rows if "ray_node_dead_s" in r]
    if node:
        ours = [r["detection_s"] for r in rows if r["kind"] == "node"]
        side.append(["node killed", "Ray reports the node dead (`ray.nodes()`)", len(node),
                     f"{fmt(pct(node, 50))} / {fmt(pct(node, 99))}", f"{fmt(pct(ours, 50))} / {fmt(pct(ours, 99))}"])
    for kind, ours_kind in (("hang", "hang"), ("crash", "crash")):
        ps = [p["serve_detection_s"] for p in probes if p["kind"] == kind]
        if ps:
            ours = [r["detection_s"] for r in rows if r["kind"] == ours_kind]
            side.append([f"replica {'paused (SIGSTOP)' if kind == 'hang' else 'killed'}",
                         "Serve replica health check, defaults", len(ps),
                         f"{fmt(pct(ps, 50))} / {fmt(pct(ps, 99))}", f"{fmt(pct(ours, 50))} / {fmt(pct(ours, 99))}"])
    if side:
        lines += ["## Side by side: who notices, and when", "",
                  table(["failure", "noticed by", "trials", "theirs p50 / p99 (s)", "ringpipe detection p50 / p99 (s)"],
                        side), ""]
    return "\n".join([*lines, HOW_TO_READ])


def wait_for_quiet_machine() -> None:
    for _ in range(30):
        if subprocess.run(["pgrep", "-f", "pytest"], capture_output=True).returncode != 0:
            return
        print("waiting for pytest to finish…", flush=True)
        time.sleep(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="kills of each kind, per standby setting")
    parser.add_argument("--kinds", default="crash,hang,node")
    parser.add_argument("--standby", default="1,0", help="standby settings to run, in order")
    parser.add_argument("--serve-trials", type=int, default=5, help="Serve health-check trials (each kind)")
    parser.add_argument("--nodes", type=int, help="worker nodes (default: 2 per pipeline, standby included)")
    parser.add_argument("--no-wait", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "failover")
    parser.add_argument("--report-only", type=Path, help="rewrite the .md from this results .json; run nothing")
    args = parser.parse_args()
    if args.report_only:
        data = json.loads(args.report_only.read_text())
        command = data.get("command", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python bench/failover.py")
        text = report(data["kills"], data["serve"], data["meta"], command)
        args.out.with_suffix(".md").write_text(text + "\n")
        print(text)
        return
    if not args.no_wait:
        wait_for_quiet_machine()
    import ray

    from shards.create import RandomModelSpec, create_random_checkpoint

    checkpoint = Path(tempfile.mkdtemp(prefix="ringpipe-failover-"))
    create_random_checkpoint(checkpoint, RandomModelSpec(arch="llama", vocab=512, layers=4, hidden=64), None, True)
    rows, probes = [], []
    for i, standby in enumerate(int(s) for s in args.standby.split(",")):
        r, p = run_mode(str(checkpoint), standby, args.kills, args.kinds.split(","),
                        args.serve_trials if i == 0 else 0, args.nodes)
        rows += r
        probes += p
    meta = describe(["failover", "coordinator", "shards", "cluster", "bench/failover.py"], ray=ray.__version__)
    command = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python bench/failover.py " + " ".join(sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "command": command.strip(), "kills": rows, "serve": probes}, indent=1)
    )
    text = report(rows, probes, meta, command.strip())
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
