"""The slow rule, driven by a fake clock: who is paused from new work, and never too many."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from failover.slow import SlowPolicy, SlowSettings

SETTINGS = SlowSettings(threshold_s=0.2, count=5, pause_s=5.0, max_paused_fraction=0.5, peer_factor=1.5)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def rounds(policy, clock, latencies: dict[str, float], n: int) -> None:
    for _ in range(n):
        for name, latency in latencies.items():
            policy.observe(name, latency)
        clock.now += 0.5


def test_one_replica_slower_than_its_peers_is_paused_then_resumed():
    clock = Clock()
    p = SlowPolicy(SETTINGS, clock)
    rounds(p, clock, {"a": 0.01, "b": 0.01, "c": 0.01}, 3)
    rounds(p, clock, {"a": 0.4, "b": 0.01, "c": 0.01}, SETTINGS.count)
    assert p.paused(["a", "b", "c"]) == {"a"}
    assert "slower than 200 ms" in p.reason("a")
    clock.now += SETTINGS.pause_s
    assert p.paused(["a", "b", "c"]) == set()


def test_a_cluster_wide_slowdown_pauses_nobody():
    """Every replica over the threshold, none slower than its peers: the ring stays whole."""
    clock = Clock()
    p = SlowPolicy(SETTINGS, clock)
    rounds(p, clock, {"a": 0.5, "b": 0.55, "c": 0.6}, 20)
    assert p.paused(["a", "b", "c"]) == set()


def test_never_more_than_the_fraction_even_when_all_want_a_pause():
    clock = Clock()
    p = SlowPolicy(SETTINGS, clock)
    rounds(p, clock, {"a": 0.01, "b": 0.01, "c": 0.01, "d": 0.01}, 3)
    rounds(p, clock, {"a": 2.0, "b": 1.0, "c": 0.01, "d": 0.01}, SETTINGS.count)
    assert p.paused(["a", "b", "c", "d"]) == {"a", "b"}  # 2 of 4 = the 0.5 cap
    assert p.paused(["a", "b"]) == {"a"}  # the cap is a fraction of those serving: 1 of 2
    assert p.paused(["a"]) == set()  # a ring of one is never emptied


def test_a_slow_standby_promoted_stays_paused():
    """A standby's slowness is tracked while it waits; promoted into the ring, it is paused."""
    clock = Clock()
    p = SlowPolicy(SETTINGS, clock)
    rounds(p, clock, {"a": 0.01, "b": 0.01, "spare": 0.01}, 3)
    rounds(p, clock, {"a": 0.01, "b": 0.01, "spare": 0.5}, SETTINGS.count)
    assert p.paused(["a", "b"]) == set()
    assert p.paused(["spare", "b"]) == {"spare"}


def test_those_paused_keep_their_place_before_newcomers():
    clock = Clock()
    p = SlowPolicy(SETTINGS, clock)
    rounds(p, clock, {"a": 0.01, "b": 0.01}, 3)
    rounds(p, clock, {"a": 0.5, "b": 0.01}, SETTINGS.count)
    assert p.paused(["a", "b"]) == {"a"}
    rounds(p, clock, {"a": 0.01, "b": 3.0}, SETTINGS.count)  # b now wants one too, and is slower
    assert p.paused(["a", "b"]) == {"a"}


@given(
    st.integers(1, 8),
    st.floats(0.0, 1.0),
    st.lists(st.lists(st.floats(0.0, 3.0), min_size=8, max_size=8), min_size=1, max_size=30),
)
def test_property_the_paused_set_never_exceeds_the_fraction(n, fraction, history):
    clock = Clock()
    p = SlowPolicy(SlowSettings(max_paused_fraction=fraction), clock)
    names = [f"r{i}" for i in range(n)]
    for latencies in history:
        for name, latency in zip(names, latencies, strict=False):
            p.observe(name, latency)
        paused = p.paused(names)
        assert paused <= set(names)
        assert len(paused) <= math.floor(fraction * n + 1e-9)
        clock.now += 0.5


@given(st.lists(st.floats(0.0, 0.2), min_size=1, max_size=50))
def test_property_answers_under_the_threshold_never_pause(latencies):
    clock = Clock()
    p = SlowPolicy(SETTINGS, clock)
    for latency in latencies:
        p.observe("a", latency)
        p.observe("b", 0.001)
        assert p.paused(["a", "b"]) == set()
