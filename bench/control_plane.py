"""The control plane at scale: the real controller on real Ray over simulated stages and coordinators.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 .venv/bin/python bench/control_plane.py  # ~35 min
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 .venv/bin/python bench/control_plane.py \\
        --stages 100 --watchers 4 --final-crashes 2 --final-hangs 2 --final-steady 5 --quiet-wait 0 \\
        --out /tmp/cp.md                                                 # smoke run (one point), ~1 min
    .venv/bin/python bench/control_plane.py --rewrite     # the .md again from results/control_plane.json

`failover.controller.Controller`, unchanged, builds its pipelines with `bench._sim.SimulatedPipeline`:
stages are entries in a few `StageHost` actors (hundreds per process, S = 4 per pipeline, 4 per
simulated node), coordinators are real `coordinator.follow.MembershipFollower`s, many per
`WatcherHost` process. For every point of the grid (stages × coordinators) it measures a fault-free
window (controller CPU, false verdicts), then crashes and hangs one at a time (detection: command
→ the controller's failover record) and the propagation of each takeover to every watcher. The
last point (the largest) runs the longer settings (`--final-*`): the 10-minute false-verdict window.
A coordinator's hash-ring rebuild at each P is timed apart (no Ray).

Results: `results/control_plane.md` and `.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(
    0, str(Path(__file__).resolve().parent.parent)
)  # workers import bench._sim from here too

from bench._point import STAGES_PER_PIPELINE, Settings, run_point  # noqa: E402
from bench._pure import monitor_work, ring_builds  # noqa: E402
from bench._results import describe, table  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
OUR_CODE = ["failover", "coordinator/follow.py", "coordinator/ring.py", "bench"]
# at the largest point (1,000 stages, 256 coordinators)
TARGET_CRASH_P99_S = 0.5
TARGET_PROPAGATION_P99_S = 1.0
TARGET_CONTROLLER_CORES = 0.5


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--stages",
        type=ints,
        default=[100, 500, 1000],
        help="total stages per point (S=4 per pipeline)",
    )
    p.add_argument(
        "--watchers", type=ints, default=[16, 64, 256], help="simulated coordinators per point"
    )
    p.add_argument("--crashes", type=int, default=4, help="stage crashes per point")
    p.add_argument("--hangs", type=int, default=4, help="stage hangs per point")
    p.add_argument(
        "--steady", type=float, default=15.0, help="fault-free window per point, seconds"
    )
    p.add_argument(
        "--final-crashes", type=int, default=12, help="crashes at the last (largest) point"
    )
    p.add_argument("--final-hangs", type=int, default=8, help="hangs at the last (largest) point")
    p.add_argument(
        "--final-steady",
        type=float,
        default=600.0,
        help="fault-free window at the last point, seconds",
    )
    p.add_argument(
        "--gap", type=float, default=1.0, help="seconds between a recovery and the next fault"
    )
    p.add_argument("--interval", type=float, default=0.5, help="heartbeat interval_s")
    p.add_argument("--timeout", type=float, default=3.0, help="heartbeat timeout_s")
    p.add_argument("--stage-hosts", type=int, default=4, help="StageHost processes")
    p.add_argument("--watcher-hosts", type=int, default=4, help="WatcherHost processes")
    p.add_argument(
        "--ring-repeats",
        type=int,
        default=20,
        help="repeats of each pure timing per P (a ring build, a monitor interval)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="before each point, wait at most this long for the machine to be quiet (0: never wait)",
    )
    p.add_argument(
        "--quiet-below",
        type=float,
        default=0.3,
        help="quiet: processes this benchmark did not start use fewer cores than this (10 s average)",
    )
    p.add_argument(
        "--dashboard",
        action="store_true",
        help="run Ray's dashboard and find the controller's pid with ray.util.state.list_actors "
        "(default: no dashboard, one process less on 2 cores; the pid from this driver's process tree)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--rewrite",
        action="store_true",
        help="write the .md again from the recorded .json, running nothing",
    )
    p.add_argument("--out", type=Path, default=RESULTS / "control_plane.md")
    return p.parse_args(argv)


def pct(xs: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (None for no samples)."""
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(point: dict, timeout_s: float, interval_s: float) -> dict:
    faults = point["faults"]
    crash = [f["detection_s"] for f in faults if f["kind"] == "crash" and f.get("detected")]
    hang = [f["detection_s"] for f in faults if f["kind"] == "hang" and f.get("detected")]
    prop = point["propagation"]["delays_s"]
    missing = sum(p["missing"] for p in point["propagation"]["per_fault"])
    first = point["propagation"]["first_per_process_s"]
    spread = point["propagation"]["spread_per_process_s"]
    steady = point["steady"]
    return {
        "stages": point["stages"],
        "watchers": point["watchers"],
        "pipelines": point["pipelines"],
        "crash_n": len(crash),
        "crash_p50_s": pct(crash, 50),
        "crash_p99_s": pct(crash, 99),
        "hang_n": len(hang),
        "hang_p50_s": pct(hang, 50),
        "hang_p99_s": pct(hang, 99),
        "hang_max_s": max(hang) if hang else None,
        "undetected": sum(not f.get("detected") for f in faults),
        "prop_n": len(prop),
        "prop_p50_s": pct(prop, 50),
        "prop_p99_s": pct(prop, 99),
        "prop_max_s": max(prop) if prop else None,
        "prop_missing": missing,
        "prop_first_p99_s": pct(first, 99),  # the first watcher of each process
        "prop_spread_p50_s": pct(spread, 50),  # last − first watcher within one process
        "controller_cores": steady["controller_cores"],
        "steady_s": steady["s"],
        "false_verdicts": steady["false_verdicts"] + len(point["unexpected_failovers"]),
        "epochs_steady": steady["epochs_published"],
        "stalls": point["health"]["monitor_stalls"],
        "pings_per_s": steady["pings_per_s"],
        "pings_due_per_s": steady["pings_due_per_s"],
        "stage_hosts_cores": steady["stage_hosts_cores"],
        "watcher_hosts_cores": steady["watcher_hosts_cores"],
        "other_procs_cores": steady["other_procs_cores"],
        "machine_cores": steady["machine_cores"],
        "faults_other_procs_cores": point["faults_other_procs_cores"],
        "start_s": point["start_s"],
        "log_errors": point.get("controller_log", {}).get("error_lines"),
        "pauses": point.get("controller_log", {}).get("paused_lines"),
        "rebuild_p50_s": pct([f["rebuild_s"] for f in point["faults"] if "rebuild_s" in f], 50),
        "hang_target_s": timeout_s + interval_s,
    }


def f3(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def timing_table(rows: list[dict]) -> str:
    return table(
        [
            "stages",
            "coords",
            "crash p50 / p99 s (n)",
            "hang p50 / p99 / max s (n)",
            "propagation p50 / p99 / max s (n)",
            "… first watcher of each process, p99 s",
            "… last − first within a process, p50 s",
            "false verdicts (steady s)",
        ],
        [
            [
                r["stages"],
                r["watchers"],
                f"{f3(r['crash_p50_s'])} / {f3(r['crash_p99_s'])} ({r['crash_n']})",
                f"{f3(r['hang_p50_s'])} / {f3(r['hang_p99_s'])} / {f3(r['hang_max_s'])} ({r['hang_n']})",
                f"{f3(r['prop_p50_s'])} / {f3(r['prop_p99_s'])} / {f3(r['prop_max_s'])} ({r['prop_n']})",
                f3(r["prop_first_p99_s"]),
                f3(r["prop_spread_p50_s"]),
                f"{r['false_verdicts']} ({r['steady_s']:.0f})",
            ]
            for r in rows
        ],
    )


def load_table(rows: list[dict]) -> str:
    return table(
        [
            "stages",
            "coords",
            "controller cores",
            "pings/s (due)",
            "epochs in steady",
            "monitor stalls",
            "pauses",
            "cores: sim stages, watchers",
            "machine cores (not ours)",
            "not ours during faults, cores",
            "start s",
        ],
        [
            [
                r["stages"],
                r["watchers"],
                f"{r['controller_cores']:.3f}",
                f"{r['pings_per_s']:.0f} ({r['pings_due_per_s']:.0f})",
                r["epochs_steady"],
                r["stalls"],
                "—" if r["pauses"] is None else r["pauses"],
                f"{r['stage_hosts_cores']:.2f}, {r['watcher_hosts_cores']:.2f}",
                f"{r['machine_cores']:.2f} ({r['other_procs_cores']:.2f})",
                f"{r['faults_other_procs_cores']:.2f}",
                f"{r['start_s']:.1f}",
            ]
            for r in rows
        ],
    )


def grid_table(rows: list[dict]) -> str:
    return f"{timing_table(rows)}\n\n{load_table(rows)}"


def targets(last: dict) -> list[list[str]]:
    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else ("met" if ok else "MISSED")

    def le(x: float | None, goal: float) -> bool | None:
        return None if x is None else x <= goal

    where = f"{last['stages']:,} stages, {last['watchers']} coordinators"
    return [
        [
            f"crash detection p99 ({where})",
            f"≤ {TARGET_CRASH_P99_S} s",
            f"{f3(last['crash_p99_s'])} s (n={last['crash_n']})",
            verdict(le(last["crash_p99_s"], TARGET_CRASH_P99_S)),
        ],
        [
            f"hang detection, worst ({where})",
            f"≤ timeout + interval = {last['hang_target_s']:g} s",
            f"p99 {f3(last['hang_p99_s'])} s, max {f3(last['hang_max_s'])} s (n={last['hang_n']})",
            verdict(le(last["hang_max_s"], last["hang_target_s"])),
        ],
        [
            f"membership propagation to every coordinator p99 ({where})",
            f"≤ {TARGET_PROPAGATION_P99_S} s",
            f"{f3(last['prop_p99_s'])} s (n={last['prop_n']})",
            verdict(le(last["prop_p99_s"], TARGET_PROPAGATION_P99_S)),
        ],
        [
            f"controller CPU, steady ({where})",
            f"≤ {TARGET_CONTROLLER_CORES} core",
            f"{last['controller_cores']:.3f} core",
            verdict(last["controller_cores"] <= TARGET_CONTROLLER_CORES),
        ],
        [
            f"false verdicts in a fault-free window ({where})",
            "0",
            f"{last['false_verdicts']} in {last['steady_s'] / 60:.1f} min",
            verdict(last["false_verdicts"] == 0),
        ],
    ]


def ring_table(ring: list[dict]) -> str:
    return table(
        ["pipelines (ring members)", "vnodes", "HashRing build, cold, fastest ms", "median ms",
         "rebuild, one member new, fastest ms", "median ms", "builds"],
        [
            [
                r["pipelines"],
                r["vnodes"],
                f"{r['min_ms']:.2f}",
                f"{r['median_ms']:.2f}",
                f"{r['one_changed_min_ms']:.2f}" if "one_changed_min_ms" in r else "–",
                f"{r['one_changed_median_ms']:.2f}" if "one_changed_median_ms" in r else "–",
                r["repeats"],
            ]
            for r in ring
        ],
    )


def monitor_table(monitor: list[dict]) -> str:
    return table(
        [
            "pipelines",
            "stages",
            "SlowPolicy.observe per interval, fastest ms (every head once)",
            "… median ms",
            "HeartbeatMonitor.due + check per tick, ms",
            "cores",
        ],
        [
            [
                m["pipelines"],
                m["stages"],
                f"{m['observe_ms_per_interval']:.2f}",
                f"{m['observe_median_ms']:.2f}",
                f"{m['due_check_ms_per_tick']:.3f}",
                f"{m['cores']:.3f}",
            ]
            for m in monitor
        ],
    )


HOW_TO_READ = """## How to read this

- **What is real**: `failover.controller.Controller` with its monitor, placement, positions, recovery and GCS
  registry, unchanged; Ray itself (every ping, vigil and watch is a Ray actor call, on a local cluster on
  127.0.0.1); the coordinators' membership watch (`coordinator.follow.MembershipFollower`). **What is
  simulated** (`bench/_sim.py`): the stages, entries in a few `StageHost` processes (hundreds each) that answer
  pings as a stage does, without load; and the coordinators' other work: one `WatcherHost` process runs many
  followers, nothing is routed. A simulated node holds 4 stages, a pipeline's 4 stages sit on 4 nodes, so the
  monitor pings every head each interval, and each node without a head every 2 s for its CPU ("pings/s
  (due)": what it sends at its nominal cadence), as on a cluster; a simulated stage reports its node's CPU
  as 0.5 (neither hot nor idle: weights stay put). S = 4 stages per pipeline: 100, 500, 1,000 stages are P = 25, 125, 250 pipelines (ring
  positions). Heartbeats every 0.5 s, timeout 3 s; no standby, so each takeover leaves its position empty
  ("rebuilding") until a new simulated pipeline fills it, a moment later.
- **crash**: the stage's `vigil` call returns "failed" and its pings answer "failed", as a stage whose pipeline
  broke does (a killed actor's vigil fails at the same moment, through Ray). **hang**: the stage's pings never
  answer and its vigil stays pending; a hung stage that is not a head stalls its pipeline: its head reports
  having waited since the hang (`pipeline_wait_s`), as a real head whose micro-batch or keepalive never came
  back does (a real head's clock starts at its last send, up to `keepalive_s` = 1 s either side of the hang).
  Faults rotate over stage indexes 0..3 of a random ring member, one at a time: the next comes 1 s after every
  watcher follows a membership with P members again.
- **Detection**: from the fault command (the driver's wall clock, just before its call to the host) to the
  `at` of the controller's failover record (its wall clock when it takes the position over, just before it
  publishes); one machine, one clock. Percentiles interpolate between samples: with n ≤ 20 a p99 is about
  the maximum. The hang target is judged on the maximum.
- **Propagation**: from that `at` to each watcher's first sight of an epoch ≥ the takeover's (the first epoch
  without the victim); n = takeovers × watchers. A watcher's sight comes after its long-poll `watch` returned
  and it fetched and deserialized the membership. Up to 64 followers share a process here, each deserializing
  the same membership in turn, so the last of a process waits for its siblings: "first watcher of each
  process" is what a coordinator alone in its process would see, "last − first within a process" is the
  packing. A real coordinator then rebuilds its hash ring, timed apart below and not in the figure.
- **Load** is measured over the fault-free window. **Controller cores**: its process's CPU seconds (user +
  system) per wall second, a fraction of one core. Then the simulated stages' and the watchers' processes, the
  whole machine (/proc/stat), and in brackets what processes this benchmark did not start used (another
  engineer's tests, say); the last column is the same during the faults. Everything shares 2 cores with the
  controller, so its timings include waiting for one. **Pauses**: pipelines the slow rule took off the ring
  during the whole point (the controller's log); each is two new epochs every watcher fetches.
  **Monitor stalls**: rounds in which the controller found its own loop had stalled longer than `stall_s`
  (it then restarts every silence clock, which delays hang verdicts). **Epochs in steady**: memberships
  published during the window.
- **False verdicts**: failovers recorded during the fault-free window, plus failovers of pipelines that were
  not a victim during the faults.
- **Hash ring** and **the monitor's pure work** run in this driver without Ray, before the grid; the fastest
  of the repeats is the work itself (the median also carries the machine's other load). The monitor's work
  per second is one `SlowPolicy.observe` per head per interval and one `due` + `check` per tick (0.1 s).
"""


def write_report(path: Path, r: dict) -> None:
    info = r["machine"]
    s = r["settings"]
    last = r["summary"][-1]
    problems = (
        "\n".join(f"- {p}" for p in r["problems"])
        or "- none: every point ran to the end, and the controller logged no error."
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""# control plane at scale: the real controller over simulated stages and coordinators

Written by `bench/control_plane.py` in {r["elapsed_s"] / 60:.1f} min:

```
{r["command"]}
```

**Machine:** {info["cpu"]}, {info["cores"]} cores, {info["ram_gib"]} GiB RAM, no GPU; Python {info["python"]},
Ray {info["ray"]}; commit {info["commit"]}. The controller, the simulated stages ({s["stage_hosts"]} processes),
the watchers (up to {s["watcher_hosts"]} processes), Ray's GCS and raylet and this driver share these cores, and
so does whatever else runs on this shared machine ("not ours" below). Before each point the run waited up to
{s["quiet_wait_s"]:.0f} s for other processes to use under {s["quiet_below_cores"]:g} cores.
Per point: {s["crashes"]} crashes, {s["hangs"]} hangs, a {s["steady_s"]:.0f} s fault-free window; at the last
point {s["final_crashes"]} crashes, {s["final_hangs"]} hangs and a {s["final_steady_s"] / 60:.1f} min window.
Findings about this run, written by hand: `results/control_plane-findings.md`.

## Targets

{table(["target", "goal", "measured", "verdict"], targets(last))}

## Detection and propagation

{timing_table(r["summary"])}

## Load during the fault-free window

{load_table(r["summary"])}

## Hash ring: one coordinator's rebuild per membership change (no Ray)

{ring_table(r["ring"])}

## The monitor's pure work (no Ray)

{monitor_table(r["monitor_work"])}

## What went wrong in the controller

{problems}

{HOW_TO_READ}""")


def run(args: argparse.Namespace, argv: list[str] | None) -> dict:
    began = time.perf_counter()
    points = [(st, w) for st in args.stages for w in args.watchers]
    sizes = sorted({st // STAGES_PER_PIPELINE for st in args.stages})
    ring = ring_builds(sizes, args.ring_repeats)
    monitor = monitor_work(
        sizes, STAGES_PER_PIPELINE, args.interval, args.timeout, args.ring_repeats
    )
    print(f"{ring_table(ring)}\n\n{monitor_table(monitor)}\n", flush=True)

    import ray

    ray.init(
        address="local",
        include_dashboard=args.dashboard,
        _node_ip_address="127.0.0.1",
        num_cpus=os.cpu_count(),
        object_store_memory=512 * 2**20,
        log_to_driver=False,
        configure_logging=False,
    )
    results, problems = [], []
    try:
        for k, (st, w) in enumerate(points):
            final = k == len(points) - 1
            settings = Settings(
                crashes=args.final_crashes if final else args.crashes,
                hangs=args.final_hangs if final else args.hangs,
                steady_s=args.final_steady if final else args.steady,
                gap_s=args.gap,
                interval_s=args.interval,
                timeout_s=args.timeout,
                stage_hosts=args.stage_hosts,
                watcher_hosts=args.watcher_hosts,
                seed=args.seed + k,
                quiet_wait_s=args.quiet_wait,
                quiet_below_cores=args.quiet_below,
                state_api=args.dashboard,
            )
            print(f"{st} stages, {w} coordinators", flush=True)
            try:
                point = run_point(st, w, settings)
            except Exception as exc:  # noqa: BLE001 — one point failing is a finding: go on
                problems.append(
                    f"{st} stages, {w} coordinators: the point failed: {type(exc).__name__}: {exc}"
                )
                print(f"  FAILED: {exc!r}", flush=True)
                continue
            results.append(point)
            log = point.get("controller_log", {})
            if log.get("error_lines"):
                problems.append(
                    f"{st} stages, {w} coordinators: {log['error_lines']} error lines in the controller's "
                    f"log, the last: `{log['last_errors'][-1]}`"
                )
            if "shutdown_error" in point:
                problems.append(
                    f"{st} stages, {w} coordinators: shutdown failed: {point['shutdown_error']}"
                )
            print(grid_table([summarize(point, args.timeout, args.interval)]), flush=True)
    finally:
        ray.shutdown()
    command = " ".join(
        [
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 .venv/bin/python "
            "bench/control_plane.py",
            *(sys.argv[1:] if argv is None else argv),
        ]
    )
    return {
        "command": command,
        "machine": describe(OUR_CODE, ray=ray.__version__),
        "elapsed_s": time.perf_counter() - began,
        "settings": {
            "crashes": args.crashes,
            "hangs": args.hangs,
            "steady_s": args.steady,
            "final_crashes": args.final_crashes,
            "final_hangs": args.final_hangs,
            "final_steady_s": args.final_steady,
            "gap_s": args.gap,
            "interval_s": args.interval,
            "timeout_s": args.timeout,
            "stage_hosts": args.stage_hosts,
            "watcher_hosts": args.watcher_hosts,
            "quiet_wait_s": args.quiet_wait,
            "quiet_below_cores": args.quiet_below,
            "seed": args.seed,
        },
        "ring": ring,
        "monitor_work": monitor,
        "problems": problems,
        "points": results,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    data = args.out.with_suffix(".json")
    if args.rewrite:  # the report again from the recorded run, running nothing
        result = json.loads(data.read_text())
    else:
        result = run(args, argv)
    s = result["settings"]
    result["summary"] = [summarize(p, s["timeout_s"], s["interval_s"]) for p in result["points"]]
    if not result["summary"]:
        print("no point ran to the end:\n" + "\n".join(result["problems"]))
        sys.exit(1)
    write_report(args.out, result)
    if not args.rewrite:
        data.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(
        f"\n{table(['target', 'goal', 'measured', 'verdict'], targets(result['summary'][-1]))}\n\n"
        f"{grid_table(result['summary'])}\nwrote {args.out} and .json in {result['elapsed_s'] / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
