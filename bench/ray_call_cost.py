"""What one Ray actor call costs the process that makes it and the process that answers it.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python bench/ray_call_cost.py          # ~1 min

The control plane's CPU at scale is its Ray calls (`results/control_plane-findings.md`): the
monitor pings every pipeline's head once an interval. This measures, on a local Ray cluster on
127.0.0.1, the CPU time (user + system, from /proc) per call of:

- a caller: an async actor that sends `ping()` to 4 actors and awaits the answers, as the
  controller's monitor does (`caller`);
- a receiver: an async actor answering calls with two small arguments and no return value, what
  the controller would pay per heartbeat if the heads pushed theirs instead (`receiver`).

Each is run `--rounds` times; the table gives the fastest and the median round. Results:
`results/ray_call_cost.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import ray  # noqa: E402

from bench._results import describe, table  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@ray.remote(num_cpus=0)
class Answerer:
    async def ping(self) -> dict:
        return {"state": "serving", "time": time.time()}

    async def beat(self, name: str, info: dict) -> None:
        return None

    def pid(self) -> int:
        return os.getpid()


@ray.remote(num_cpus=0, max_concurrency=1000)
class Caller:
    def __init__(self, targets: list) -> None:
        self.targets = targets

    def pid(self) -> int:
        return os.getpid()

    async def pings(self, calls: int) -> None:
        for _ in range(calls // len(self.targets)):
            await asyncio.gather(*(t.ping.remote() for t in self.targets))

    async def beats(self, sink, calls: int) -> None:
        for _ in range(calls // len(self.targets)):
            await asyncio.gather(*(sink.beat.remote("p", {"state": "serving"}) for _ in self.targets))


def cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def per_call_ms(pid: int, run, calls: int) -> float:
    before = cpu_s(pid)
    ray.get(run())
    return (cpu_s(pid) - before) / calls * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=4000, help="calls per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=RESULTS / "ray_call_cost.md")
    args = p.parse_args()

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        targets = [Answerer.remote() for _ in range(4)]
        sink_pid = ray.get(targets[0].pid.remote())
        caller = Caller.remote(targets)
        caller_pid = ray.get(caller.pid.remote())
        ray.get(caller.pings.remote(400))  # warm: connections, workers
        caller_ms = [per_call_ms(caller_pid, lambda: caller.pings.remote(args.calls), args.calls)
                     for _ in range(args.rounds)]
        receiver_ms = [per_call_ms(sink_pid, lambda: caller.beats.remote(targets[0], args.calls), args.calls)
                       for _ in range(args.rounds)]
    finally:
        ray.shutdown()

    meta = describe(["bench/ray_call_cost.py"], ray=ray.__version__)
    rows = [[name, f"{min(ms):.3f}", f"{statistics.median(ms):.3f}", f"{500 * statistics.median(ms) / 1e3:.2f}"]
            for name, ms in (("caller (send ping, await answer)", caller_ms),
                             ("receiver (take a call, answer it)", receiver_ms))]
    text = (
        "# What one Ray actor call costs\n\n"
        f"Command: `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python bench/ray_call_cost.py`"
        f" ({args.rounds} rounds of {args.calls} calls)\n\n"
        f"Machine: {meta['cpu']}, {meta['cores']} cores, {meta['ram_gib']} GiB, Python {meta['python']}, "
        f"Ray {meta['ray']}, commit {meta['commit']}\n\n"
        "CPU time (user + system) of one process per call, in ms; the last column is what 500 calls a second "
        "(250 pipeline heads, one heartbeat each every 0.5 s) cost that process, in cores.\n\n"
        + table(["side", "fastest round, ms/call", "median round, ms/call", "cores at 500 calls/s"], rows)
        + "\n"
    )
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
