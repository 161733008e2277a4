"""The soak: `ringpipe chaos` killing worker nodes of a local multi-node cluster under steady load.

Starts `ringpipe serve --nodes N` (the demo model unless --model; a head and N worker nodes, real
raylets on 127.0.0.1), runs `ringpipe chaos --fault kill-node --every 30-60s --duration 10m
--restart-nodes` against it, and writes what chaos reported to results/: chaos.md (the summary,
headed by the command, the machine and the soak's targets with their verdicts), chaos-timeline.png,
and chaos.json (every request and fault; not committed). Stops everything it started.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python bench/chaos.py                 # the 10-minute soak
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python bench/chaos.py --duration 2m   # a short one
    .venv/bin/python bench/chaos.py --rewrite     # chaos.md again from results/chaos.json, running nothing
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import describe  # noqa: E402

from cluster.chaos_report import write_report  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CLI = [sys.executable, "-m", "cluster.cli"]
TARGET_RATIO = 3.0  # p99 latency during faults at most this many times the steady p99


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


HOW_TO_READ = """## How to read this

- **The targets** are the soak's, from the run's own record. The load is sent with ringpipe's Python
  client, as an application would: it resends a call answered `UNAVAILABLE` (0.1–2 s backoff) and
  resumes a broken stream from its last offset (`resumes` per request in chaos.json), and a request
  counts once however often it was resent. *failed requests*: requests that ended in an error, any
  status. *mismatched outputs*: outputs unequal to the failure-free reference the same request got
  before any fault (greedy and seeded sampling alike). *repeated or lost tokens*: from the offsets of
  streamed tokens. The latency ratio: p99 latency of requests overlapping a fault's window over that
  of every other request.
- **A fault's window** runs from the kill until the cluster was whole again (every ring position
  serving, the standby back, the killed node restarted and its pipelines rebuilt) or 5 s passed,
  whichever is later. *detected* is the controller's verdict on a pipeline with a stage on the node;
  a node that held no stage has nothing to detect. *recovered* includes restarting the node (a new
  raylet joining) and rebuilding its pipelines, so it is much longer than the takeover a client sees:
  streams resume on another replica as soon as the failure is detected.
- **Every node shares the machine's cores**: a restarted node and a pipeline loading its weights take
  CPU from the stages serving, which is part of what the *during* latencies show.
"""


def write_results(record: dict) -> list[str]:
    """chaos.md, chaos-timeline.png and chaos.json under results/ from a soak's record (its `bench`
    entry says how it ran); the invariants it broke, if any."""
    bench = record["bench"]
    with tempfile.TemporaryDirectory() as scratch:
        paths = write_report(record, Path(scratch))
        body = paths["summary"].read_text()
        summary = json.loads(paths["report"].read_text())["summary"]  # what write_report computed
        RESULTS.mkdir(exist_ok=True)
        shutil.copy(paths["timeline"], RESULTS / "chaos-timeline.png")
        shutil.copy(paths["report"], RESULTS / "chaos.json")
    steady, during = summary["phases"]["steady"], summary["phases"]["during"]
    ratio = summary["p99_during_over_steady"]
    failed, mismatched = steady["failed"] + during["failed"], steady["mismatched"] + during["mismatched"]
    lost = sum(p[k] for p in (steady, during) for k in ("repeated", "lost"))
    rows = [
        ("failed requests", "0", failed, failed == 0),
        ("mismatched outputs", "0", mismatched, mismatched == 0),
        ("repeated or lost tokens", "0", lost, lost == 0),
        ("p99 during faults / steady p99", f"≤ {TARGET_RATIO:g}", "–" if ratio is None else f"{ratio:.2f}",
         ratio is not None and ratio <= TARGET_RATIO),
    ]
    verdicts = "\n".join(f"| {what} | {wanted} | {got} | {'met' if ok else 'NOT met'} |"
                         for what, wanted, got, ok in rows)
    machine = bench["machine"]
    header = (
        "# Soak: worker nodes killed under load\n\n"
        f"Command: `{bench['command']}`\n\n"
        f"It ran `{bench['serve']}` (head + {bench['nodes']} worker nodes on 127.0.0.1, {bench['model']}) "
        f"and `{bench['chaos']}` against it. Machine: {machine['cpu']}, {machine['cores']} cores, "
        f"{machine['ram_gib']} GiB, Python {machine['python']}, commit {machine['commit']}. "
        "Every node shares the machine's cores.\n\n"
        "| target | wanted | got | verdict |\n|---|---|---|---|\n" + verdicts + "\n\n"
        "The timeline: `chaos-timeline.png`. Every request and fault: `chaos.json` (not committed; "
        "rerun the command to get it).\n\n" + HOW_TO_READ + "\n---\n\n"
    )
    (RESULTS / "chaos.md").write_text(header + body.replace("# Chaos run", "## Chaos run", 1))
    print(f"wrote {RESULTS / 'chaos.md'}")
    return summary["violations"]


def run_soak(args: argparse.Namespace) -> tuple[dict, int]:
    """Serve, run chaos against it, stop everything started; chaos's record and exit status."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    work = Path(tempfile.mkdtemp(prefix="ringpipe-soak-"))
    port = free_port()
    serve_cmd = [*CLI, "serve", "--nodes", str(args.nodes), "--replicas", str(args.replicas),
                 "--standby", str(args.standby), "--port", str(port)]
    if args.model:
        serve_cmd += ["--model", args.model]
    chaos_args = ["--fault", "kill-node", "--every", args.every, "--duration", args.duration,
                  "--restart-nodes", "--concurrency", str(args.concurrency),
                  "--max-new-tokens", str(args.max_new_tokens), "--seed", str(args.seed)]
    machine = describe(["cluster", "coordinator", "failover", "shards"])  # the code measured, before it runs
    log = open(work / "serve.log", "w")  # noqa: SIM115
    server = subprocess.Popen(serve_cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    restarted: list[int] = []
    try:
        deadline = time.monotonic() + 600
        while "Ray cluster: " not in (work / "serve.log").read_text():
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("serve did not start:\n" + (work / "serve.log").read_text()[-3000:])
            time.sleep(1)
        address = re.search(r"Ray cluster: (\S+)", (work / "serve.log").read_text())[1]
        chaos = subprocess.run([*CLI, "chaos", "--address", address, "--target", f"127.0.0.1:{port}",
                                "--report", str(work / "report"), *chaos_args], env=env, text=True,
                               capture_output=True)
        print(chaos.stdout[-4000:], chaos.stderr[-2000:], sep="\n")
        record = json.loads((work / "report" / "report.json").read_text())
        restarted = record.get("restarted_nodes", [])
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(180)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        for pid in restarted:
            if psutil.pid_exists(pid):
                os.kill(pid, signal.SIGTERM)
    record["bench"] = {
        "command": ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python bench/chaos.py " + " ".join(sys.argv[1:])).strip(),
        "serve": " ".join(["ringpipe", *serve_cmd[3:]]), "chaos": " ".join(["ringpipe chaos", *chaos_args]),
        "nodes": args.nodes, "model": args.model or "the demo model", "machine": machine,
    }
    return record, chaos.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=4, help="worker nodes beside the head")
    parser.add_argument("--model", help="checkpoint directory (default: the demo model)")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--standby", type=int, default=1)
    parser.add_argument("--duration", default="10m")
    parser.add_argument("--every", default="30-60s")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rewrite", action="store_true",
                        help="run nothing: write chaos.md and the timeline again from results/chaos.json "
                             "(after a change to the report), keeping the command and commit it records")
    args = parser.parse_args()
    if args.rewrite:
        return 1 if write_results(json.loads((RESULTS / "chaos.json").read_text())) else 0
    record, status = run_soak(args)
    write_results(record)
    return status


if __name__ == "__main__":
    sys.exit(main())
