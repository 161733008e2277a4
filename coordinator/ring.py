"""Consistent hashing with virtual nodes and bounded loads. Pure Python.

Every replica owns `vnodes` points on a 64-bit ring; a key belongs to the first
point clockwise from its hash. The hash is BLAKE2b, never Python's `hash()`, so
every process on every machine — several coordinator replicas included — builds
the same ring from the same membership and routes the same way without talking.
Removing one of N replicas moves only the keys it owned (about 1/N of them).

Bounded loads (Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing with
Bounded Loads", 2018): `route` skips, clockwise, any replica whose in-flight
load has reached ceil(c × (total + 1) / N), so no replica takes more than `c`
times the mean, and a key's overflow lands on the same successor everywhere.

Weights (adaptive: a replica on a busy node gets less) scale a replica's cap,
never the points it owns: with weights w, replica r's cap is
ceil(c × (total + 1) × w_r / Σw). The walk is the same, so a key stays with its
owner whenever the owner is under its cap (cache affinity survives a weight
change) and only overflow moves, to the ring successors. The caps add up to at
least c × (total + 1) > total, so some replica is always under its cap. Equal
weights (or none) give exactly the unweighted caps.

Building a ring of P replicas × V points hashes every point and sorts once:
O(PV log PV). Equal hashes are ordered by replica name, so the order (and so
every route) does not depend on the order replicas were added in.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping


def stable_hash(data: str | bytes) -> int:
    """A 64-bit hash that is the same in every process and on every machine."""
    raw = data.encode() if isinstance(data, str) else data
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big")


@functools.lru_cache(maxsize=16384)
def _vnode_points(replica: str, vnodes: int) -> tuple[tuple[int, str], ...]:
    """A member's virtual nodes, sorted; kept, since a member stays on the ring across many
    membership changes: a rebuild hashes only the members new to it (at 250 members × 128 vnodes,
    hashing is two thirds of a cold build) and merges sorted runs."""
    return tuple(sorted((stable_hash(f"{replica}#{i}"), replica) for i in range(vnodes)))


class RingError(Exception):
    """Routing is impossible (no replica on the ring)."""


class HashRing:
    def __init__(self, replicas: Iterable[str] = (), vnodes: int = 128, load_factor: float = 1.25) -> None:
        if vnodes < 1:
            raise ValueError(f"vnodes must be ≥ 1, got {vnodes}")
        if load_factor < 1.0:
            raise ValueError(f"load_factor must be ≥ 1, got {load_factor}")
        self.vnodes, self.load_factor = vnodes, load_factor
        self._replicas: set[str] = set(replicas)
        self._points: list[tuple[int, str]] = sorted(self._points_of(self._replicas))  # (hash, replica)

    @property
    def replicas(self) -> frozenset[str]:
        return frozenset(self._replicas)

    def __len__(self) -> int:
        return len(self._replicas)

    def add(self, replica: str) -> None:
        if replica in self._replicas:
            return
        self._replicas.add(replica)
        # two sorted runs: Timsort merges them in linear time; (hash, name) order as when built at once
        self._points = sorted(self._points + sorted(self._points_of([replica])))

    def remove(self, replica: str) -> None:
        if replica not in self._replicas:
            return
        self._replicas.discard(replica)
        self._points = [p for p in self._points if p[1] != replica]

    def _points_of(self, replicas: Iterable[str]) -> Iterator[tuple[int, str]]:
        for replica in replicas:
            yield from _vnode_points(replica, self.vnodes)

    def successors(self, key: str) -> Iterator[str]:
        """Distinct replicas clockwise from the key's position: owner first."""
        if not self._points:
            return
        start = bisect.bisect_left(self._points, (stable_hash(key), ""))
        seen: set[str] = set()
        n = len(self._points)
        for i in range(n):
            replica = self._points[(start + i) % n][1]
            if replica not in seen:
                seen.add(replica)
                yield replica
                if len(seen) == len(self._replicas):
                    return

    def owner(self, key: str) -> str:
        for replica in self.successors(key):
            return replica
        raise RingError("no replica is on the ring")

    def capacity(
        self, loads: Mapping[str, int], weights: Mapping[str, float] | None = None, replica: str | None = None
    ) -> int:
        """The most in-flight requests `replica` may hold once one more is placed.

        Without weights (or with equal ones) every replica has the same cap and
        `replica` may be left out; with unequal weights it must be named.
        """
        if replica is None and self._weights_of(weights) is not None:
            raise ValueError("with unequal weights every replica has its own cap: name the replica")
        caps = self.capacities(loads, weights)
        if replica is None:
            return next(iter(caps.values()), 0)
        if replica not in caps:
            raise RingError(f"{replica} is not on the ring")
        return caps[replica]

    def capacities(self, loads: Mapping[str, int], weights: Mapping[str, float] | None = None) -> dict[str, int]:
        """Every replica's cap once one more request is placed (for status, and what `route` checks).

        `weights` maps replica to a weight > 0; a replica it leaves out weighs 1.0,
        and weights of replicas not on the ring are ignored.
        """
        if not self._replicas:
            return {}
        total = sum(loads.get(r, 0) for r in self._replicas)
        budget = self.load_factor * (total + 1)
        weighted = self._weights_of(weights)
        if weighted is None:  # unweighted (or all equal): exactly the cap of the paper
            cap = math.ceil(budget / len(self._replicas))
            return dict.fromkeys(self._replicas, cap)
        weight_sum = sum(weighted.values())
        return {r: math.ceil(budget * w / weight_sum) for r, w in weighted.items()}

    def _weights_of(self, weights: Mapping[str, float] | None) -> dict[str, float] | None:
        """Each ring replica's weight, or None when they are all equal."""
        if weights is None:
            return None
        weighted = {r: float(weights.get(r, 1.0)) for r in self._replicas}
        for r, w in weighted.items():
            if not (w > 0 and math.isfinite(w)):
                raise ValueError(f"weight of {r} must be a finite number > 0, got {w}")
        return None if len(set(weighted.values())) <= 1 else weighted

    def route(self, key: str, loads: Mapping[str, int], weights: Mapping[str, float] | None = None) -> str:
        """The first replica clockwise from the key whose load is under its (weighted) cap."""
        if not self._replicas:
            raise RingError("no replica is on the ring")
        caps = self.capacities(loads, weights)
        for replica in self.successors(key):
            if loads.get(replica, 0) < caps[replica]:
                return replica
        # Σ caps ≥ c(total + 1) > total = Σ loads, so some replica is under its cap
        raise AssertionError("bounded loads: some replica is always under its cap")  # pragma: no cover

    def shares(self) -> dict[str, float]:
        """Fraction of the hash space each replica owns."""
        if not self._points:
            return {}
        out = dict.fromkeys(self._replicas, 0.0)
        space = float(1 << 64)
        for i, (point, replica) in enumerate(self._points):
            prev = self._points[i - 1][0] if i else self._points[-1][0] - (1 << 64)
            out[replica] += (point - prev) / space
        return out
