"""The slow rule: which pipelines are paused from new work. Pure, clock injected.

A pipeline is observed through what its clients feel: the round trip of a ping
to its head and the latency of its inference steps as the head measures them
(`observe`, one number per heartbeat: the worse of the two). An observation is
slow when it is over `threshold_s` *and* over `peer_factor` times the median of
the other pipelines' recent latency: a cluster-wide slowdown makes nobody slow.
`count` slow observations in a row ask for a pause of `pause_s` (a new run asks
again).

`paused(serving)` decides who is off the ring: never more than
`max_paused_fraction` of the serving pipelines (rounded down), the ones paused
already keep their place first, then the slowest. A standby that is slow when it
is promoted stays paused (its request is kept whether or not it serves).
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

_PEERS_S = 0.5  # how stale the peers' typical latencies may be


@dataclass(frozen=True)
class SlowSettings:
    threshold_s: float = 0.2
    count: int = 5
    pause_s: float = 5.0
    max_paused_fraction: float = 0.5
    peer_factor: float = 1.5


@dataclass
class _Pipeline:
    recent: deque = field(default_factory=lambda: deque(maxlen=8))
    run: int = 0
    wanted_until: float = 0.0
    why: str = ""


class SlowPolicy:
    def __init__(self, settings: SlowSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings, self.clock = settings, clock
        self._pipelines: dict[str, _Pipeline] = {}
        self._paused: set[str] = set()
        self._typical: dict[str, float] = {}  # each pipeline's median recent latency, refreshed every _PEERS_S
        self._peers_at: float | None = None

    def forget(self, name: str) -> None:
        self._pipelines.pop(name, None)
        self._paused.discard(name)

    def typical(self, name: str) -> float | None:
        p = self._pipelines.get(name)
        return statistics.median(p.recent) if p and p.recent else None

    def observe(self, name: str, latency_s: float) -> None:
        s = self.settings
        p = self._pipelines.setdefault(name, _Pipeline())
        p.recent.append(latency_s)
        if latency_s <= s.threshold_s:  # the common case costs nothing more
            p.run = 0
            return
        peer = self._peer_median(name)
        if peer is not None and latency_s <= s.peer_factor * peer:
            p.run = 0
            return
        p.run += 1
        if p.run >= s.count:
            p.run = 0
            p.wanted_until = self.clock() + s.pause_s
            than = f", {peer * 1000:.0f} ms for its peers" if peer is not None else ""
            p.why = (f"{s.count} heartbeats in a row slower than {s.threshold_s * 1000:.0f} ms "
                     f"(last {latency_s * 1000:.0f} ms{than}): no new work for {s.pause_s:g}s")

    def _peer_median(self, name: str) -> float | None:
        """The median of the other pipelines' typical latency, computed at most once per `_PEERS_S`."""
        now = self.clock()
        if self._peers_at is None or now - self._peers_at >= _PEERS_S:
            self._typical = {n: statistics.median(p.recent) for n, p in self._pipelines.items() if p.recent}
            self._peers_at = now
        peers = [t for n, t in self._typical.items() if n != name]
        return statistics.median(peers) if peers else None

    def reason(self, name: str) -> str:
        p = self._pipelines.get(name)
        return p.why if p else ""

    def paused(self, serving: Iterable[str]) -> set[str]:
        """Of the `serving` pipelines, those off the ring now."""
        now = self.clock()
        serving = list(serving)
        limit = math.floor(self.settings.max_paused_fraction * len(serving) + 1e-9)
        wanting = [n for n in serving if (p := self._pipelines.get(n)) is not None and p.wanted_until > now]
        wanting.sort(key=lambda n: (n not in self._paused, -(self.typical(n) or 0.0)))
        self._paused = set(wanting[:limit])
        return set(self._paused)
