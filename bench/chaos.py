"""The soak: `ringpipe chaos` killing worker nodes of a local multi-node cluster under steady load.

Starts `ringpipe serve --nodes N` (the demo model unless --model; a head and N worker nodes, real
raylets on 127.0.0.1), runs `ringpipe chaos --fault kill-node --every 30-60s --duration 10m
--restart-nodes` against it, and writes what chaos reported to results/: chaos.md (the summary,
headed by the command, the machine and the soak's targets with their verdicts), chaos-timeline.png,
and chaos.json (every request and fault; not committed). Stops everything it started.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python bench/chaos.py                 # the 10-minute soak
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python bench/chaos.py --duration 2m   # a short one
"""

from __future__ import annotations

import argparse
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

from cluster.chaos_report import summarize  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CLI = [sys.executable, "-m", "cluster.cli"]
TARGET_RATIO = 3.0  # p99 latency during faults at most this many times the steady p99


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    args = parser.parse_args()

    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    work = Path(tempfile.mkdtemp(prefix="ringpipe-soak-"))
    port = free_port()
    serve_cmd = [*CLI, "serve", "--nodes", str(args.nodes), "--replicas", str(args.replicas),
                 "--standby", str(args.standby), "--port", str(port)]
    if args.model:
        serve_cmd += ["--model", args.model]
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
        chaos_args = ["--fault", "kill-node", "--every", args.every, "--duration", args.duration,
                      "--restart-nodes", "--concurrency", str(args.concurrency),
                      "--max-new-tokens", str(args.max_new_tokens), "--seed", str(args.seed)]
        chaos = subprocess.run([*CLI, "chaos", "--address", address, "--target", f"127.0.0.1:{port}",
                                "--report", str(work / "report"), *chaos_args], env=env, text=True,
                               capture_output=True)
        print(chaos.stdout[-4000:], chaos.stderr[-2000:], sep="\n")
        import json

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

    summary = summarize(record)
    steady, during = summary["phases"]["steady"], summary["phases"]["during"]
    ratio = summary["p99_during_over_steady"]
    lost = sum(p[k] for p in (steady, during) for k in ("repeated", "lost"))
    rows = [
        ("failed requests", "0", steady["failed"] + during["failed"], steady["failed"] + during["failed"] == 0),
        ("mismatched outputs", "0", steady["mismatched"] + during["mismatched"],
         steady["mismatched"] + during["mismatched"] == 0),
        ("repeated or lost tokens", "0", lost, lost == 0),
        ("p99 during faults / steady p99", f"≤ {TARGET_RATIO:g}", "–" if ratio is None else f"{ratio:.2f}",
         ratio is not None and ratio <= TARGET_RATIO),
    ]
    verdicts = "\n".join(f"| {what} | {wanted} | {got} | {'met' if ok else 'NOT met'} |"
                         for what, wanted, got, ok in rows)
    machine = describe(["cluster", "coordinator", "failover", "shards"])
    command = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python bench/chaos.py " + " ".join(sys.argv[1:])
    header = (
        "# Soak: worker nodes killed under load\n\n"
        f"Command: `{command}`\n\n"
        f"It ran `{' '.join(['ringpipe', *serve_cmd[3:]])}` (head + {args.nodes} worker nodes on 127.0.0.1, "
        f"{'the demo model' if not args.model else args.model}) and `ringpipe chaos {' '.join(chaos_args)}` "
        f"against it. Machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB, "
        f"Python {machine['python']}, commit {machine['commit']}. Every node shares the machine's cores.\n\n"
        "| target | wanted | got | verdict |\n|---|---|---|---|\n" + verdicts + "\n\n"
        "The timeline: `chaos-timeline.png`. Every request and fault: `chaos.json` (not committed; "
        "rerun the command to get it).\n\n---\n\n"
    )
    RESULTS.mkdir(exist_ok=True)
    body = (work / "report" / "summary.md").read_text()
    (RESULTS / "chaos.md").write_text(header + body.replace("# Chaos run", "## Chaos run", 1))
    shutil.copy(work / "report" / "timeline.png", RESULTS / "chaos-timeline.png")
    shutil.copy(work / "report" / "report.json", RESULTS / "chaos.json")
    print(f"wrote {RESULTS / 'chaos.md'}")
    return chaos.returncode


if __name__ == "__main__":
    sys.exit(main())
