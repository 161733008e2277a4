"""Adaptive weights: each replica's weight from its node's CPU. Pure, clock injected.

The controller feeds every replica's node CPU utilisation (a fraction, 0..1)
to `observe` and republishes the membership when `changed` names a replica. A
weight scales the replica's bounded-load cap on the ring (`coordinator/ring.py`),
never the keys it owns, so cache affinity survives a weight change; only the
ratio of weights matters (all replicas at 0.1, or at 2.0, route as if equal).

Rules, on a run of samples of one kind that no gap longer than `stale_s` breaks:

- hot (CPU above `hot_cpu`) for `hot_s`: weight × `hot_factor` (−30 %), and
  again for every further `hot_s` still hot;
- idle (CPU below `idle_cpu`) for `idle_s`: weight × `idle_factor` (+20 %), and
  again for every further `idle_s` still idle;
- in between for `recover_s`: one step back toward 1.0 (undoing one cut, or
  one raise), never past 1.0;
- always within [`min_weight`, `max_weight`].

A sample of another kind starts a new run; so does a gap with no sample for
more than `stale_s` (no evidence that the condition held), and the weight is
kept meanwhile: a replica nobody measures keeps the weight it has.

Why stepped rules. The source design also sketches a continuous weight
∝ 1 / (cpu × latency²). It was considered and not chosen: it is unbounded (an
idle node's weight goes to infinity, a slow one's to zero), it moves with every
noisy sample, so the membership epoch would churn, and it double-counts latency,
which the slow rule (`failover/slow.py`) already acts on. Stepped rules are
bounded, change the weight at most once per period (a republish at most every
10 s per replica), say exactly what the design says (−30 % after 10 s over 80 %,
+20 % after 30 s idle), explain themselves in one line for `ringpipe status`,
and come back to 1.0 once the condition clears.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class AdaptiveSettings:
    enabled: bool = True
    hot_cpu: float = 0.8  # CPU fraction above which a node is hot
    hot_s: float = 10.0
    hot_factor: float = 0.7  # −30 %
    idle_cpu: float = 0.2  # CPU fraction below which a node is idle
    idle_s: float = 30.0
    idle_factor: float = 1.2  # +20 %
    recover_s: float = 10.0
    min_weight: float = 0.1
    max_weight: float = 2.0
    stale_s: float = 5.0  # a longer gap between samples breaks a run

    def __post_init__(self) -> None:
        if not 0 <= self.idle_cpu < self.hot_cpu <= 1:
            raise ValueError(f"need 0 ≤ idle_cpu < hot_cpu ≤ 1, got {self.idle_cpu}, {self.hot_cpu}")
        if not 0 < self.min_weight <= 1 <= self.max_weight:
            raise ValueError(f"need 0 < min_weight ≤ 1 ≤ max_weight, got {self.min_weight}, {self.max_weight}")
        if not 0 < self.hot_factor < 1 < self.idle_factor:
            raise ValueError(f"need 0 < hot_factor < 1 < idle_factor, got {self.hot_factor}, {self.idle_factor}")
        if min(self.hot_s, self.idle_s, self.recover_s, self.stale_s) <= 0:
            raise ValueError("hot_s, idle_s, recover_s and stale_s must be > 0")


class Load(enum.Enum):
    HOT = "hot"
    IDLE = "idle"
    NORMAL = "normal"


@dataclass
class _Replica:
    load: Load
    since: float  # the run of this kind began
    step_from: float  # the next step is due one period after this
    last_sample: float
    weight: float = 1.0
    reason: str = ""


class AdaptiveWeights:
    def __init__(self, settings: AdaptiveSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings, self.clock = settings, clock
        self._replicas: dict[str, _Replica] = {}
        self._changed: set[str] = set()

    def classify(self, cpu: float) -> Load:
        s = self.settings
        if cpu > s.hot_cpu:
            return Load.HOT
        if cpu < s.idle_cpu:
            return Load.IDLE
        return Load.NORMAL

    def observe(self, replica_id: str, cpu: float) -> None:
        """One CPU sample (0..1) of the node `replica_id` runs on, taken now."""
        if not self.settings.enabled:
            return
        if not math.isfinite(cpu):
            raise ValueError(f"cpu must be a finite fraction, got {cpu}")
        now, load = self.clock(), self.classify(cpu)
        r = self._replicas.get(replica_id)
        if r is None:
            self._replicas[replica_id] = _Replica(load, now, now, now)
            return
        # a gap of exactly stale_s keeps the run: the float difference of two clock readings that far
        # apart can come out a hair over it
        if load is not r.load or now - r.last_sample > self.settings.stale_s + 1e-9:
            r.load, r.since, r.step_from = load, now, now  # a new run: nothing has held for long yet
        r.last_sample = now
        while now - r.step_from >= (period := self._period(load, r.weight)) - 1e-9:  # float sums of samples
            r.step_from += period
            self._step(replica_id, r, cpu, now - r.since)

    def forget(self, replica_id: str) -> None:
        self._replicas.pop(replica_id, None)
        self._changed.discard(replica_id)

    def weight(self, replica_id: str) -> float:
        r = self._replicas.get(replica_id)
        return r.weight if r is not None else 1.0

    def reason(self, replica_id: str) -> str:
        """Why the weight last changed, e.g. "node CPU 93% for 10s: -30%"; "" at 1.0."""
        r = self._replicas.get(replica_id)
        return r.reason if r is not None else ""

    def changed(self) -> set[str]:
        """The replicas whose weight changed since the last call (republish only these)."""
        out, self._changed = self._changed, set()
        return out

    def _period(self, load: Load, weight: float) -> float:
        s = self.settings
        if load is Load.IDLE and weight < 1.0:  # a cut replica gone idle recovers at the recovery pace
            return s.recover_s
        return {Load.HOT: s.hot_s, Load.IDLE: s.idle_s, Load.NORMAL: s.recover_s}[load]

    def _step(self, replica_id: str, r: _Replica, cpu: float, held_s: float) -> None:
        s = self.settings
        held = f"node CPU {cpu:.0%} for {held_s:.0f}s"
        if r.load is Load.HOT:
            weight, why = r.weight * s.hot_factor, f"{held}: -{1 - s.hot_factor:.0%}"
        elif r.load is Load.IDLE and r.weight >= 1.0:
            weight, why = r.weight * s.idle_factor, f"node CPU {cpu:.0%}, idle {held_s:.0f}s: +{s.idle_factor - 1:.0%}"
        elif r.weight < 1:
            weight, why = min(1.0, r.weight / s.hot_factor), f"{held}: back toward 1.0"
        else:
            weight, why = max(1.0, r.weight / s.idle_factor), f"{held}: back toward 1.0"
        if math.isclose(weight, 1.0, rel_tol=1e-9):
            weight = 1.0  # 0.7 × 0.7 / 0.7 / 0.7 is not exactly 1.0 in floating point
        weight = min(s.max_weight, max(s.min_weight, weight))
        if weight == r.weight:
            return  # at a bound already: the reason stays the one that took it there
        r.weight, r.reason = weight, ("" if weight == 1.0 else why)
        self._changed.add(replica_id)
