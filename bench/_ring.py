"""Our consistent-hash ring against uhashring's ketama ring: lookup cost, balance, movement, bounded loads.

    .venv/bin/python bench/_ring.py                  # 1,000,000 keys, about 10 s on two cores
    .venv/bin/python bench/_ring.py --keys 100000    # a smoke run

The coordinator routes every request through `coordinator.ring.HashRing`, so four properties of the
ring matter, each measured at 8 and at 64 replicas (`replica-0` … `replica-N-1`) against
`uhashring.HashRing(hash_fn="ketama")`, the libketama-compatible ring most Python code reaches for:

- lookup cost: microseconds per `owner(key)` (uhashring: `get_node(key)`), what the coordinator pays
  per request; median of round-robin repeats, with the CPU other processes used meanwhile;
- balance: max/mean (and min/mean) keys per replica over `keys` keys `key-0`, `key-1`, …: the
  busiest replica's excess over a fair share;
- movement: the share of keys whose owner changes when `replica-0` leaves, against the ideal 1/N, and
  whether every key that moved was one of `replica-0`'s (consistent hashing's promise);
- bounded loads (ours only): the first 100,000 keys placed one after another with `route(key, loads)`,
  each placement adding one to its replica's load; max/mean load, and whether a replica ever held
  more than ceil(c × (placed so far) / N), the bound of Mirrokni, Thorup and Zadimoghaddam.

Balance and movement need the owner of every key, and a million pure-Python lookups per ring would
take most of the run, so they come from the same rule done with numpy: hash every key once, then
`searchsorted` into the ring's sorted points. That reads the rings' private point lists, so every
such assignment is checked against the real lookup on a sample of keys before it is used.
`render` writes the section that `bench/results/coordinator.md` embeds; run directly, this prints it
and writes `bench/results/ring.json`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

# Run as a script, this file's folder comes first on the path; put the repository root there instead
# so that `coordinator` is the package and this benchmark's neighbours import as `bench._…`.
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [str(_BENCH.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _BENCH]

import numpy as np  # noqa: E402

from bench._foreign_load import ForeignLoad  # noqa: E402
from bench._results import describe, table  # noqa: E402
from coordinator.ring import HashRing, stable_hash  # noqa: E402

try:
    import uhashring  # type: ignore[import-untyped]
except ModuleNotFoundError as e:
    raise ModuleNotFoundError(
        "bench/_ring.py compares against uhashring: `.venv/bin/pip install uhashring`"
    ) from e

REPLICA_COUNTS = (8, 64)
LOOKUP_KEYS = 100_000  # keys per timed lookup pass
LOOKUP_REPEATS = 5  # timed passes per ring, after one warm-up pass
SAMPLE_KEYS = 20_000  # keys whose vectorised owner is checked against the real lookup
PLACEMENTS = 100_000  # sequential route() calls in the bounded-load run
UHASHRING_VERSION = importlib.metadata.version("uhashring")


class Ringpipe:
    """`coordinator.ring.HashRing`: 64-bit BLAKE2b points; a key exactly on a point belongs to it."""

    side = "left"  # for np.searchsorted

    def __init__(self, replicas: list[str], vnodes: int) -> None:
        self.ring = HashRing(replicas, vnodes=vnodes)
        self.lookup: Callable[[str], str] = self.ring.owner

    def positions(self, keys: list[str]) -> np.ndarray:
        return np.fromiter(map(stable_hash, keys), dtype=np.uint64, count=len(keys))

    def points(self) -> tuple[np.ndarray, list[str]]:
        # owner() bisects (hash, "") into the sorted (point, replica) pairs: the first point at or
        # after the key's hash (every name sorts after ""), wrapping round to the first point.
        pairs = self.ring._points
        at = np.fromiter((p for p, _ in pairs), dtype=np.uint64, count=len(pairs))
        return at, [r for _, r in pairs]

    def remove(self, replica: str) -> None:
        self.ring.remove(replica)


class UhashringKetama:
    """`uhashring.HashRing(hash_fn="ketama")` at its defaults: 40 vnodes × 4 MD5-derived 32-bit points
    per node, all weights 1; a key exactly on a point belongs to the next one (`bisect_right`)."""

    side = "right"

    def __init__(self, replicas: list[str]) -> None:
        self.ring = uhashring.HashRing(replicas, hash_fn="ketama")
        self.lookup: Callable[[str], str] = self.ring.get_node

    def positions(self, keys: list[str]) -> np.ndarray:
        return np.fromiter(map(self.ring.hashi, keys), dtype=np.uint64, count=len(keys))

    def points(self) -> tuple[np.ndarray, list[str]]:
        runtime = self.ring.runtime
        return np.array(runtime._keys, dtype=np.uint64), [runtime._ring[k] for k in runtime._keys]

    def remove(self, replica: str) -> None:
        self.ring.remove_node(replica)


SYSTEMS: dict[str, Callable[[list[str]], Ringpipe | UhashringKetama]] = {
    "ringpipe, 128 vnodes (default)": lambda names: Ringpipe(names, vnodes=128),
    "ringpipe, 160 vnodes (as many points as uhashring)": lambda names: Ringpipe(names, vnodes=160),
    f"uhashring {UHASHRING_VERSION} ketama, 40 × 4 points (default)": UhashringKetama,
}


def replica_names(n: int) -> list[str]:
    return [f"replica-{i}" for i in range(n)]


def assignment(
    ring: Ringpipe | UhashringKetama, positions: np.ndarray, keys: list[str], names: list[str]
) -> np.ndarray:
    """Every key's owner as an index into `names`, checked against `ring.lookup` on a sample."""
    at, replica_at = ring.points()
    index = {name: i for i, name in enumerate(names)}
    code = np.array([index[r] for r in replica_at])
    owners = code[np.searchsorted(at, positions, side=ring.side) % len(at)]
    for i in range(0, len(keys), max(1, len(keys) // SAMPLE_KEYS)):
        if names[owners[i]] != ring.lookup(keys[i]):
            raise AssertionError(
                f"vectorised owner {names[owners[i]]} of {keys[i]!r} is not the ring's "
                f"{ring.lookup(keys[i])}: {type(ring).__name__}.points() no longer matches the lookup"
            )
    return owners


def lookup_costs(
    rings: dict[tuple[str, int], Ringpipe | UhashringKetama], keys: list[str]
) -> list[dict]:
    """Microseconds per lookup; passes go round-robin over the rings so background load hits all alike."""
    times: dict[tuple[str, int], list[float]] = {cell: [] for cell in rings}
    foreign = dict.fromkeys(rings, 0.0)
    for repeat in range(LOOKUP_REPEATS + 1):  # pass 0 warms up
        for cell, ring in rings.items():
            lookup, load = ring.lookup, ForeignLoad()
            began = time.perf_counter()
            for key in keys:
                lookup(key)
            elapsed = time.perf_counter() - began
            if repeat:
                times[cell].append(elapsed)
                foreign[cell] = max(foreign[cell], load.cores())
    return [
        {
            "system": label,
            "replicas": n,
            "us_per_key": statistics.median(times[label, n]) / len(keys) * 1e6,
            "foreign_cores": foreign[label, n],
        }
        for label, n in rings
    ]


def bounded_loads(n: int, keys: list[str]) -> dict:
    """Place `keys` one after another with `route`, each adding one to its replica's load."""
    ring = HashRing(replica_names(n))  # defaults: 128 vnodes, load_factor 1.25
    loads = dict.fromkeys(ring.replicas, 0)
    chosen = []
    began = time.perf_counter()
    for key in keys:
        replica = ring.route(key, loads)
        loads[replica] += 1
        chosen.append(replica)
    route_s = time.perf_counter() - began
    # Replay against the bound as the paper states it, not as ring.capacity computes it: before the
    # i-th placement (from 0) the loads add up to i, so no replica may then hold more than ceil(c(i+1)/N).
    replay, over_bound = dict.fromkeys(ring.replicas, 0), 0
    for placed, replica in enumerate(chosen):
        replay[replica] += 1
        over_bound += replay[replica] > math.ceil(ring.load_factor * (placed + 1) / n)
    owners = [ring.owner(key) for key in keys]
    mean = len(keys) / n
    return {
        "replicas": n,
        "placements": len(keys),
        "load_factor": ring.load_factor,
        "max_load": max(loads.values()),
        "bound": math.ceil(ring.load_factor * mean),
        "max_over_mean": max(loads.values()) / mean,
        "min_over_mean": min(loads.values()) / mean,
        "placements_over_bound": over_bound,
        "diverted_share": sum(o != c for o, c in zip(owners, chosen, strict=True)) / len(keys),
        "owner_only_max_over_mean": max(Counter(owners).values()) / mean,
        "route_us": route_s / len(keys) * 1e6,
    }


def machine() -> dict:
    return describe(
        ["coordinator/ring.py", "bench/_ring.py"], numpy=np.__version__, uhashring=UHASHRING_VERSION
    )


def run(keys: int = 1_000_000) -> dict:
    """Every figure of the comparison, as plain data (what `render` and ring.json take)."""
    began = time.perf_counter()
    all_keys = [f"key-{i}" for i in range(keys)]
    rings = {
        (label, n): make(replica_names(n))
        for label, make in SYSTEMS.items()
        for n in REPLICA_COUNTS
    }
    lookup = lookup_costs(rings, all_keys[:LOOKUP_KEYS])
    # a key's position depends only on the hash function, not on the replicas
    positions = {label: rings[label, REPLICA_COUNTS[0]].positions(all_keys) for label in SYSTEMS}
    balance, movement = [], []
    for (label, n), ring in rings.items():  # last: removing a replica changes the ring
        names = replica_names(n)
        before = assignment(ring, positions[label], all_keys, names)
        per_replica = np.bincount(before, minlength=n)
        balance.append(
            {
                "system": label,
                "replicas": n,
                "points": len(ring.points()[0]),
                "max_over_mean": float(per_replica.max() / per_replica.mean()),
                "min_over_mean": float(per_replica.min() / per_replica.mean()),
            }
        )
        ring.remove(names[0])
        moved = before != assignment(ring, positions[label], all_keys, names)
        movement.append(
            {
                "system": label,
                "replicas": n,
                "removed": names[0],
                "moved_share": float(moved.mean()),
                "ideal_share": 1 / n,
                "removed_share": float((before == 0).mean()),
                "only_removed_moved": bool((before[moved] == 0).all()),
            }
        )
    bounded = [bounded_loads(n, all_keys[:PLACEMENTS]) for n in REPLICA_COUNTS]
    return {
        "command": ".venv/bin/python bench/_ring.py"
        + ("" if keys == 1_000_000 else f" --keys {keys}"),
        "machine": machine(),
        "elapsed_s": time.perf_counter() - began,
        "keys": keys,
        "lookup_keys": min(keys, LOOKUP_KEYS),
        "lookup_repeats": LOOKUP_REPEATS,
        "sample_keys": len(range(0, keys, max(1, keys // SAMPLE_KEYS))),
        "lookup": lookup,
        "balance": balance,
        "movement": movement,
        "bounded": bounded,
    }


def render(results: dict) -> str:
    """The ring section of `bench/results/coordinator.md`."""
    info, r = results["machine"], results
    lookup = {(x["system"], x["replicas"]): x for x in r["lookup"]}
    systems = list(dict.fromkeys(x["system"] for x in r["lookup"]))
    counts = list(dict.fromkeys(x["replicas"] for x in r["lookup"]))
    lookup_rows = [
        [
            s,
            *(f"{lookup[s, n]['us_per_key']:.2f}" for n in counts),
            f"{max(lookup[s, n]['foreign_cores'] for n in counts):.2f}",
        ]
        for s in systems
    ]
    balance_rows = [
        [
            b["system"],
            b["replicas"],
            b["points"],
            f"{b['max_over_mean']:.3f}",
            f"{b['min_over_mean']:.3f}",
        ]
        for b in r["balance"]
    ]
    movement_rows = [
        [
            m["system"],
            m["replicas"],
            f"{m['moved_share']:.2%}",
            f"{m['ideal_share']:.2%}",
            f"{m['removed_share']:.2%}",
            "yes" if m["only_removed_moved"] else "**NO**",
        ]
        for m in r["movement"]
    ]
    bounded_rows = [
        [
            b["replicas"],
            f"{b['placements']:,}",
            b["load_factor"],
            f"{b['max_over_mean']:.3f}",
            f"{b['max_load']:,} ≤ {b['bound']:,}"
            if b["max_load"] <= b["bound"]
            else f"**{b['max_load']:,} > {b['bound']:,}**",
            b["placements_over_bound"],
            f"{b['diverted_share']:.2%}",
            f"{b['owner_only_max_over_mean']:.3f}",
            f"{b['route_us']:.2f}",
        ]
        for b in r["bounded"]
    ]
    return f"""## Ring: lookup cost, balance, movement, bounded loads

Written by `bench/_ring.py` in {r["elapsed_s"]:.0f} s:

```
{r["command"]}
```

**Machine:** {info["cpu"]}, {info["cores"]} cores, {info["ram_gib"]} GiB RAM; Python {info["python"]},
numpy {info["numpy"]}, uhashring {info["uhashring"]}; commit {info["commit"]}.

Replicas are named `replica-0` … `replica-N-1`, keys `key-0` … `key-{r["keys"] - 1:,}`. uhashring is
`uhashring.HashRing(names, hash_fn="ketama")` at its defaults (40 vnodes × 4 points per node, weight 1);
ours at 160 vnodes puts as many points on the ring, so that row separates the hash from the point count.

### Lookup, µs per key (median of {r["lookup_repeats"]} passes over {r["lookup_keys"]:,} keys)

{table(["system", *(f"N={n}" for n in counts), "other procs, cores"], lookup_rows)}

### Balance over {r["keys"]:,} keys

{table(["system", "N", "points on ring", "max / mean keys", "min / mean keys"], balance_rows)}

### Movement when `replica-0` leaves

{table(["system", "N", "keys that moved", "ideal 1/N", "replica-0's share before", "only replica-0's keys moved"], movement_rows)}

### Bounded loads (ours: 128 vnodes, `route(key, loads)`, loads only grow)

{table(["N", "placements", "c", "max / mean load", "max load ≤ ceil(c·mean)", "placements over ceil(c·(i+1)/N)", "placed off their owner", "max / mean with owner() alone", "route µs"], bounded_rows)}

How to read this:

- **Lookup** times one call per key in a plain loop: `HashRing.owner(key)` for ours, `get_node(key)`
  for uhashring, both pure Python (loop overhead included, the same for both). Passes run round-robin
  over the rings after one warm-up pass each; "other procs" is the most CPU other processes used
  during any one pass.
- **Balance** and **movement** take every key's owner from the ring's sorted points with numpy
  (`searchsorted`, the rule the lookup uses), checked against the real lookup on
  {r["sample_keys"]:,} keys of every ring before and after the removal. Max/mean is the busiest
  replica's keys over the fair share; its excess over 1 shrinks roughly as 1/√(points per replica)
  and grows slowly with N (more replicas, more chances that one drew a large arc).
- **Movement**: a consistent ring moves exactly the leaving replica's keys, so "keys that moved"
  equals its share before; it is 1/N only on average over which replica leaves.
- **Bounded loads**: the first {r["bounded"][0]["placements"]:,} keys placed in order, nothing completing. `route`
  skips a replica whose load has reached ceil(c·(total+1)/N); the replay checks every placement
  against that bound computed anew, not by `capacity()`. "placed off their owner" is the share that
  went to a successor; the last column is the same keys placed by `owner()` with no bound. With
  distinct keys the ring's own imbalance is already under c, so the bound mostly binds early, while
  totals are small; this checks the invariant rather than stressing it with hot keys.
- uhashring's ketama points and key positions are 32-bit (the first 4 bytes of MD5, as libketama);
  ours are 64-bit BLAKE2b. uhashring without `hash_fn="ketama"` is a different ring (160 vnodes,
  128-bit MD5) and is not measured here.
"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--keys", type=int, default=1_000_000, help="keys for balance and movement")
    p.add_argument("--out", type=Path, default=Path("bench/results/ring.json"))
    args = p.parse_args(argv)
    results = run(args.keys)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{render(results)}\nwrote {args.out}")


if __name__ == "__main__":
    main()
