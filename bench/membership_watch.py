"""How fast a new membership reaches many coordinators, by how it travels and is decoded.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python bench/membership_watch.py     # ~1 min

A stand-in controller (an asyncio actor answering `watch` as `failover.controller.Controller`
does) holds a membership of `--members` pipelines of 4 stages, each with a real actor handle for
its head. `--watchers` followers, the real `coordinator.follow.MembershipFollower`, spread over
`--processes` actors, long-poll it. The driver publishes `--epochs` new epochs, 2 s apart, and
each follower records when it saw each; the delay is from the publish to that sight.

Variants, side by side in one run:
- `bytes, gc on`: encoded once per epoch (`failover.membership.encode`), carried in the answer,
  decoded by `pickle.loads` with Python's garbage collector running;
- `bytes, gc paused`: the same, decoded by `failover.membership.decode` (what ringpipe ships).
Results: `results/membership_watch.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pickle
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402

from bench._results import describe, table  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("bytes, gc on", "bytes, gc paused")


@ray.remote(num_cpus=0)
class Head:
    def ping(self) -> int:
        return 1


def membership(epoch: int, members: int, head):
    from failover.membership import Member, Membership, StageInfo

    return Membership(epoch=epoch, members=tuple(
        Member(replica_id=f"replica-{i}", epoch=epoch, head=head, max_batch=8, pipeline=f"replica-{i}-1",
               stages=tuple(StageInfo(j, f"node-{i}-{j}", f"10.0.{i % 250}.{j}", 4 * j, 4 * j + 4)
                            for j in range(4)))
        for i in range(members)))


@ray.remote(num_cpus=0, max_concurrency=100_000)
class StandIn:
    """Answers `watch(epoch, incarnation, timeout_s)` as the controller does."""

    def __init__(self, members: int, head) -> None:
        self.members, self.head = members, head
        self.epoch, self.published = 0, asyncio.Event()
        self._publish()

    def _publish(self) -> None:
        from failover.membership import encode

        self.payload = encode(membership(self.epoch, self.members, self.head))

    async def bump(self) -> float:
        self.epoch += 1
        self._publish()
        published, self.published = self.published, asyncio.Event()
        published.set()
        return time.time()

    async def watch(self, epoch: int, incarnation: str = "", timeout_s: float = 10.0):
        published = self.published
        if epoch == self.epoch:
            try:
                await asyncio.wait_for(published.wait(), timeout_s)
            except TimeoutError:
                pass
        return self.epoch, "one", self.payload


@ray.remote(num_cpus=0)
class Followers:
    def __init__(self, controller, variant: str, count: int) -> None:
        import coordinator.follow as follow

        if variant == "bytes, gc on":  # this process's followers decode as before (bench-only swap)
            follow.decode = pickle.loads
        self.seen = [[] for _ in range(count)]
        self.followers = [follow.MembershipFollower(controller, self._recorder(i)) for i in range(count)]
        self.tasks = []

    def _recorder(self, i: int):
        return lambda m: self.seen[i].append((m.epoch, time.time()))

    async def start(self) -> None:
        self.tasks = [asyncio.create_task(f.run()) for f in self.followers]

    async def first_epochs(self) -> int:
        return min((s[-1][0] if s else -1) for s in self.seen)

    async def records(self) -> list:
        for t in self.tasks:
            t.cancel()
        return self.seen


def run_variant(variant: str, args) -> list[float]:
    head = Head.remote()
    controller = StandIn.remote(args.members, head)
    hosts = [Followers.remote(controller, variant, args.watchers // args.processes) for _ in range(args.processes)]
    ray.get([h.start.remote() for h in hosts])
    while min(ray.get([h.first_epochs.remote() for h in hosts])) < 0:
        time.sleep(0.2)
    time.sleep(1.0)
    ats = []
    for _ in range(args.epochs):
        ats.append(ray.get(controller.bump.remote()))
        time.sleep(2.0)
    seen = [s for h in hosts for s in ray.get(h.records.remote())]
    delays = []
    for k, at in enumerate(ats, start=1):
        for s in seen:
            t = next((t for e, t in s if e >= k), None)
            delays.append(t - at if t is not None else float("inf"))
    for actor in (*hosts, controller, head):
        ray.kill(actor)
    return sorted(delays)


def pct(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(len(xs) * q / 100))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--members", type=int, default=250, help="pipelines in the membership (1,000 stages)")
    p.add_argument("--watchers", type=int, default=256, help="followers (coordinators)")
    p.add_argument("--processes", type=int, default=4, help="processes the followers share")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--out", type=Path, default=RESULTS / "membership_watch.md")
    args = p.parse_args()

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        results = {v: run_variant(v, args) for v in VARIANTS}
    finally:
        ray.shutdown()
    meta = describe(["bench/membership_watch.py", "coordinator/follow.py", "failover/membership.py"],
                    ray=ray.__version__)
    rows = [[v, f"{pct(d, 50):.3f}", f"{pct(d, 99):.3f}", f"{d[-1]:.3f}", len(d)] for v, d in results.items()]
    text = (
        "# A new membership reaching many coordinators\n\n"
        f"Command: `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python bench/membership_watch.py "
        f"--members {args.members} --watchers {args.watchers} --processes {args.processes} --epochs {args.epochs}`\n\n"
        f"Machine: {meta['cpu']}, {meta['cores']} cores, {meta['ram_gib']} GiB, Python {meta['python']}, "
        f"Ray {meta['ray']}, commit {meta['commit']}\n\n"
        f"{args.watchers} followers (the real `MembershipFollower`) in {args.processes} processes, a membership of "
        f"{args.members} pipelines × 4 stages with actor handles, {args.epochs} epochs; delay from the publish "
        "to each follower's sight of the epoch, in seconds. Nothing else runs (no stages, no pings): this is the "
        "cost of the transfer and the decoding alone.\n\n"
        + table(["how the membership travels", "p50 s", "p99 s", "max s", "n"], rows)
        + "\n"
    )
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
