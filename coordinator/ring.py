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
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping


def stable_hash(data: str | bytes) -> int:
    """A 64-bit hash that is the same in every process and on every machine."""
    raw = data.encode() if isinstance(data, str) else data
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big")


class RingError(Exception):
    """Routing is impossible (no replica on the ring)."""


class HashRing:
    def __init__(self, replicas: Iterable[str] = (), vnodes: int = 128, load_factor: float = 1.25) -> None:
        if vnodes < 1:
            raise ValueError(f"vnodes must be ≥ 1, got {vnodes}")
        if load_factor < 1.0:
            raise ValueError(f"load_factor must be ≥ 1, got {load_factor}")
        self.vnodes, self.load_factor = vnodes, load_factor
        self._points: list[tuple[int, str]] = []  # sorted (hash, replica)
        self._replicas: set[str] = set()
        for replica in replicas:
            self.add(replica)

    @property
    def replicas(self) -> frozenset[str]:
        return frozenset(self._replicas)

    def __len__(self) -> int:
        return len(self._replicas)

    def add(self, replica: str) -> None:
        if replica in self._replicas:
            return
        self._replicas.add(replica)
        for i in range(self.vnodes):
            # ties between equal hashes are broken by name, so insertion order never matters
            bisect.insort(self._points, (stable_hash(f"{replica}#{i}"), replica))

    def remove(self, replica: str) -> None:
        if replica not in self._replicas:
            return
        self._replicas.discard(replica)
        self._points = [p for p in self._points if p[1] != replica]

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

    def capacity(self, loads: Mapping[str, int]) -> int:
        """The most in-flight requests a replica may hold once one more is placed."""
        total = sum(loads.get(r, 0) for r in self._replicas)
        return math.ceil(self.load_factor * (total + 1) / len(self._replicas))

    def route(self, key: str, loads: Mapping[str, int]) -> str:
        """The first replica clockwise from the key whose load is under the bound."""
        if not self._replicas:
            raise RingError("no replica is on the ring")
        cap = self.capacity(loads)
        for replica in self.successors(key):
            if loads.get(replica, 0) < cap:
                return replica
        raise AssertionError("bounded loads: some replica is always under the cap")  # pragma: no cover

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
