"""What the control plane computes without Ray, timed apart at each P (one process, no Ray):

- a coordinator's hash-ring rebuild (`coordinator.ring.HashRing`, what `Router.apply` does at every
  membership change): 256 of them packed into a few processes on 2 cores would time the packing;
- the controller monitor's pure work per heartbeat interval: `SlowPolicy.observe` once per pipeline
  (every head answers once an interval) and `HeartbeatMonitor.due` + `check` once per tick
  (every `min(0.1, interval/4)` s) over all S·P stages, the ones it pings and the ones it does not.
"""

from __future__ import annotations

import statistics
import time


def _timed_s(fn, repeats: int) -> tuple[float, float]:
    """(fastest, median) of `repeats` calls: on a shared machine the fastest is the work itself."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def ring_builds(pipelines: list[int], repeats: int, vnodes: int = 128) -> list[dict]:
    """A cold build (no member's virtual nodes hashed before: a coordinator's first) and a rebuild
    after one member was replaced (the others' virtual nodes kept from the last build: a failover)."""
    from coordinator.ring import HashRing, _vnode_points

    def cold(ids: list[str]) -> None:
        _vnode_points.cache_clear()
        HashRing(ids, vnodes, 1.25)

    out = []
    for P in pipelines:
        ids = [f"replica-{i}" for i in range(P)]
        fastest, med = _timed_s(lambda ids=ids: cold(ids), repeats)
        HashRing(ids, vnodes, 1.25)
        changes = iter(range(10**9))
        warm, warm_med = _timed_s(lambda ids=ids, c=changes: HashRing([*ids[1:], f"new-{next(c)}"], vnodes, 1.25),
                                  repeats)
        out.append(
            {
                "pipelines": P,
                "vnodes": vnodes,
                "min_ms": fastest * 1e3,
                "median_ms": med * 1e3,
                "one_changed_min_ms": warm * 1e3,
                "one_changed_median_ms": warm_med * 1e3,
                "repeats": repeats,
            }
        )
    return out


def monitor_work(
    pipelines: list[int],
    stages_per_pipeline: int,
    interval_s: float,
    timeout_s: float,
    repeats: int,
) -> list[dict]:
    from failover.heartbeat import HeartbeatMonitor, HeartbeatSettings
    from failover.slow import SlowPolicy, SlowSettings

    tick_s = min(0.1, interval_s / 4)
    out = []
    for P in pipelines:
        names = [f"p{i}" for i in range(P)]
        slow = SlowPolicy(SlowSettings())
        for _ in range(8):  # every pipeline's recent window full, as in a steady run
            for n in names:
                slow.observe(n, 0.002)

        def interval(slow=slow, names=names) -> None:
            for n in names:
                slow.observe(n, 0.002)

        observe_s, observe_med = _timed_s(interval, repeats)
        live = HeartbeatMonitor(HeartbeatSettings(interval_s, timeout_s))
        for n in names:
            for i in range(stages_per_pipeline):
                live.watch((n, i), pinged=i == 0)

        def tick(live=live) -> None:
            live.due()
            live.check()

        tick_cost, _ = _timed_s(tick, repeats)
        per_s = observe_s / interval_s + tick_cost / tick_s
        out.append(
            {
                "pipelines": P,
                "stages": P * stages_per_pipeline,
                "observe_ms_per_interval": observe_s * 1e3,
                "observe_median_ms": observe_med * 1e3,
                "due_check_ms_per_tick": tick_cost * 1e3,
                "cores": per_s,
            }
        )
    return out
