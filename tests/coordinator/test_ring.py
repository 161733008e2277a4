"""The hash ring, checked against brute force and the properties consistent hashing promises."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.ring import HashRing, RingError, stable_hash
from coordinator.routing import routing_key

names = st.lists(st.text("abcdefghij0123456789-", min_size=1, max_size=8), min_size=1, max_size=8, unique=True)
keys = st.lists(st.text(min_size=0, max_size=20), min_size=1, max_size=50)


def brute_owner(ring: HashRing, key: str) -> str:
    """The replica of the smallest point ≥ the key's hash, wrapping around: computed from scratch."""
    points = sorted((stable_hash(f"{r}#{i}"), r) for r in ring.replicas for i in range(ring.vnodes))
    h = stable_hash(key)
    return next((r for p, r in points if p >= h), points[0][1])


@given(replicas=names, keys=keys)
@settings(max_examples=50, deadline=None)
def test_owner_matches_brute_force_and_ignores_insertion_order(replicas, keys):
    a = HashRing(replicas, vnodes=16)
    b = HashRing(list(reversed(replicas)), vnodes=16)
    for key in keys:
        assert a.owner(key) == b.owner(key) == brute_owner(a, key)
        assert list(a.successors(key)) == list(b.successors(key))
        assert sorted(a.successors(key)) == sorted(replicas)


@given(replicas=st.lists(st.text("abcxyz", min_size=1, max_size=5), min_size=2, max_size=8, unique=True),
       keys=keys, data=st.data())
@settings(max_examples=50, deadline=None)
def test_removing_a_replica_moves_only_its_keys(replicas, keys, data):
    ring = HashRing(replicas, vnodes=16)
    gone = data.draw(st.sampled_from(replicas))
    before = {k: ring.owner(k) for k in keys}
    ring.remove(gone)
    for k in keys:
        if before[k] != gone:
            assert ring.owner(k) == before[k]
        else:  # its keys go to their next successor
            assert ring.owner(k) == next(r for r in HashRing(replicas, vnodes=16).successors(k) if r != gone)


def test_about_one_nth_of_keys_move():
    ring = HashRing([f"replica-{i}" for i in range(8)])
    sample = [f"session-{i}" for i in range(20_000)]
    before = [ring.owner(k) for k in sample]
    ring.remove("replica-3")
    moved = sum(a != ring.owner(k) for a, k in zip(before, sample, strict=True)) / len(sample)
    assert 0.5 / 8 < moved < 1.6 / 8
    shares = ring.shares()
    assert math.isclose(sum(shares.values()), 1.0)
    assert max(shares.values()) < 1.6 / 7 and min(shares.values()) > 0.5 / 7


@given(loads_seq=st.lists(st.text(max_size=6), min_size=1, max_size=200), c=st.sampled_from([1.0, 1.25, 2.0]))
@settings(max_examples=60, deadline=None)
def test_bounded_loads_never_exceed_c_times_mean(loads_seq, c):
    ring = HashRing(["a", "b", "c", "d"], vnodes=8, load_factor=c)
    loads: dict[str, int] = {}
    for key in loads_seq:
        chosen = ring.route(key, loads)
        loads[chosen] = loads.get(chosen, 0) + 1
        total = sum(loads.values())
        assert max(loads.values()) <= math.ceil(c * total / 4)
        # the choice is the first successor under the cap: brute force
        cap = math.ceil(c * total / 4)
        prior = dict(loads)
        prior[chosen] -= 1
        expected = next(r for r in ring.successors(key) if prior.get(r, 0) < cap)
        assert chosen == expected


def test_unloaded_route_is_the_owner_and_empty_ring_errors():
    ring = HashRing(["x", "y"])
    assert ring.route("k", {}) == ring.owner("k")
    with pytest.raises(RingError):
        HashRing().owner("k")
    with pytest.raises(ValueError):
        HashRing(load_factor=0.5)


def test_hash_is_stable_across_processes():
    code = "from coordinator.ring import HashRing; print(HashRing(['a','b','c']).owner('session:42'), end='')"
    runs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={"PYTHONHASHSEED": str(seed), "PATH": ""}, check=True).stdout
        for seed in (0, 1, 2)
    }
    assert runs == {HashRing(["a", "b", "c"]).owner("session:42")}


def test_routing_keys():
    prompt = list(range(100))
    assert routing_key(prompt, "s1") == routing_key([9, 9], "s1")  # session wins
    assert routing_key(prompt, None) == routing_key(prompt[:32] + [7], None)  # same prefix, same key
    assert routing_key(prompt, "s1", mode="prefix") != routing_key(prompt, "s2", mode="session")
    assert routing_key(prompt, mode="random") != routing_key(prompt, mode="random")


def insort_points(replicas: list[str], vnodes: int) -> list[tuple[int, str]]:
    """The ring's points as the old build made them: one bisect.insort per point, in the given order."""
    import bisect

    points: list[tuple[int, str]] = []
    for r in dict.fromkeys(replicas):
        for i in range(vnodes):
            bisect.insort(points, (stable_hash(f"{r}#{i}"), r))
    return points


@given(replicas=names, data=st.data(), vnodes=st.integers(1, 32))
@settings(max_examples=50, deadline=None)
def test_build_by_one_sort_equals_build_by_repeated_insort(replicas, data, vnodes):
    order = data.draw(st.permutations(replicas))
    expected = insort_points(order, vnodes)
    assert HashRing(order, vnodes=vnodes)._points == expected
    assert HashRing(order + order[:2], vnodes=vnodes)._points == expected  # duplicates are one replica
    grown = HashRing(order[:1], vnodes=vnodes)
    for r in order[1:]:  # adding one at a time ends at the same ring
        grown.add(r)
    assert grown._points == expected
    grown.remove(order[0])
    assert grown._points == insort_points(order[1:], vnodes)


def brute_cap(c: float, loads: dict[str, int], weights: dict[str, float], replica: str) -> int:
    """ceil(c × (total + 1) × w_r / Σw) in exact rational arithmetic."""
    from fractions import Fraction

    total = sum(loads.get(r, 0) for r in weights)
    exact = Fraction(c) * (total + 1) * Fraction(weights[replica]) / sum(map(Fraction, weights.values()))
    return math.ceil(exact)


# multiples of 1/4 and c in {1, 1.25, 1.5, 2}: the ring's float arithmetic is exact on them
quarter_weights = st.integers(1, 8).map(lambda q: q / 4)
factors = st.sampled_from([1.0, 1.25, 1.5, 2.0])
FOUR = ["a", "b", "c", "d"]


@given(weights=st.fixed_dictionaries({r: quarter_weights for r in FOUR}), c=factors,
       loads=st.dictionaries(st.sampled_from(FOUR), st.integers(0, 50)))
@settings(max_examples=100, deadline=None)
def test_weighted_caps_match_brute_force(weights, c, loads):
    ring = HashRing(FOUR, vnodes=8, load_factor=c)
    caps = ring.capacities(loads, weights)
    assert caps == {r: brute_cap(c, loads, weights, r) for r in FOUR}
    assert all(ring.capacity(loads, weights, r) == caps[r] for r in FOUR)
    assert sum(caps.values()) > sum(loads.values())  # somebody is always under its cap


@given(keys_seq=st.lists(st.text(max_size=6), min_size=1, max_size=200), c=factors,
       weights=st.fixed_dictionaries({r: quarter_weights for r in FOUR}))
@settings(max_examples=60, deadline=None)
def test_weighted_bounded_loads_never_exceed_a_replicas_cap(keys_seq, c, weights):
    ring = HashRing(FOUR, vnodes=8, load_factor=c)
    loads: dict[str, int] = {}
    for key in keys_seq:
        caps = {r: brute_cap(c, loads, weights, r) for r in FOUR}
        # the choice is the first successor under its own cap: the owner keeps the key while it can
        expected = next(r for r in ring.successors(key) if loads.get(r, 0) < caps[r])
        chosen = ring.route(key, loads, weights)
        assert chosen == expected
        loads[chosen] = loads.get(chosen, 0) + 1
        assert loads[chosen] <= caps[chosen]


@given(keys_seq=st.lists(st.text(max_size=6), min_size=1, max_size=100),
       weights=st.dictionaries(st.sampled_from(FOUR), st.floats(0.1, 2.0), min_size=4),
       c=st.floats(1.0, 3.0))
@settings(max_examples=60, deadline=None)
def test_route_always_finds_a_replica_under_any_weights(keys_seq, weights, c):
    ring = HashRing(FOUR, vnodes=8, load_factor=c)
    loads: dict[str, int] = {}
    for key in keys_seq:
        caps = ring.capacities(loads, weights)
        chosen = ring.route(key, loads, weights)
        assert loads.get(chosen, 0) < caps[chosen]
        loads[chosen] = loads.get(chosen, 0) + 1


@given(w=st.floats(0.1, 2.0), c=st.floats(1.0, 3.0), keys_seq=st.lists(st.text(max_size=6), max_size=100),
       loads=st.dictionaries(st.sampled_from(FOUR + ["gone"]), st.integers(0, 30)))
@settings(max_examples=60, deadline=None)
def test_equal_weights_route_exactly_as_unweighted(w, c, keys_seq, loads):
    ring = HashRing(FOUR, vnodes=8, load_factor=c)
    equal = dict.fromkeys(FOUR, w) | {"gone": 0.5}  # a weight for a replica off the ring is ignored
    assert ring.capacities(loads, equal) == ring.capacities(loads) == dict.fromkeys(FOUR, ring.capacity(loads))
    assert ring.capacity(loads, equal) == math.ceil(c * (sum(loads.get(r, 0) for r in FOUR) + 1) / 4)
    placed, placed_equal = dict(loads), dict(loads)
    for key in keys_seq:
        a, b = ring.route(key, placed), ring.route(key, placed_equal, equal)
        assert a == b
        placed[a] = placed.get(a, 0) + 1
        placed_equal[b] = placed_equal.get(b, 0) + 1


@given(seed=st.integers(0, 10**9), low=st.sampled_from(FOUR), w=st.floats(0.1, 0.5))
@settings(max_examples=20, deadline=None)
def test_a_lower_weight_replica_takes_fewer_keys_under_load(seed, low, w):
    ring = HashRing(FOUR, vnodes=64)
    weights = dict.fromkeys(FOUR, 1.0) | {low: w}
    loads = dict.fromkeys(FOUR, 0)
    keys_seq = [f"{seed}:{i}" for i in range(400)]
    for key in keys_seq:  # nothing finishes: the load only grows
        loads[ring.route(key, loads, weights)] += 1
    assert loads[low] <= math.ceil(1.25 * 400 * w / (3 + w))  # its weighted cap, below the mean of 100
    assert loads[low] < min(loads[r] for r in FOUR if r != low)
    unweighted = dict.fromkeys(FOUR, 0)
    for key in keys_seq:
        unweighted[ring.route(key, unweighted)] += 1
    assert loads[low] < unweighted[low]


def test_capacity_of_unequal_weights_needs_the_replica_and_weights_must_be_positive():
    ring = HashRing(["x", "y"])
    with pytest.raises(ValueError, match="name the replica"):
        ring.capacity({}, {"x": 1.0, "y": 2.0})
    with pytest.raises(RingError):
        ring.capacity({}, {"x": 1.0}, "z")
    with pytest.raises(ValueError, match="weight of y"):
        ring.route("k", {}, {"x": 1.0, "y": 0.0})
    assert ring.capacities({}, {"x": 1.0}) == ring.capacities({})  # a replica left out weighs 1.0
