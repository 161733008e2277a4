"""Adaptive weights from node CPU, driven by a fake clock."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from failover.adaptive import AdaptiveSettings, AdaptiveWeights

SETTINGS = AdaptiveSettings()  # hot > 0.8 for 10 s: × 0.7; idle < 0.2 for 30 s: × 1.2; recover 10 s; [0.1, 2]
HOT, IDLE, NORMAL = 0.93, 0.05, 0.5
steps = st.sampled_from([0.5, 1.0, 2.0, 2.5, 5.0])  # sample intervals within stale_s that divide every period


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def weights(s: AdaptiveSettings = SETTINGS) -> tuple[AdaptiveWeights, Clock]:
    clock = Clock()
    return AdaptiveWeights(s, clock), clock


def feed(w: AdaptiveWeights, clock: Clock, cpu: float, seconds: float, dt: float = 1.0, replica: str = "r") -> None:
    """Samples every `dt` for `seconds`: the first now, the last `seconds` later."""
    w.observe(replica, cpu)
    for _ in range(round(seconds / dt)):
        clock.now += dt
        w.observe(replica, cpu)


def test_hot_for_10s_cuts_30_percent_and_says_why():
    w, clock = weights()
    feed(w, clock, HOT, 9.0)
    assert w.weight("r") == 1.0 and w.reason("r") == "" and w.changed() == set()
    clock.now += 1.0
    w.observe("r", HOT)
    assert w.weight("r") == pytest.approx(0.7)
    assert w.reason("r") == "node CPU 93% for 10s: -30%"
    assert w.changed() == {"r"} and w.changed() == set()  # reported once


def test_idle_for_30s_raises_20_percent_then_again():
    w, clock = weights()
    feed(w, clock, IDLE, 30.0)
    assert w.weight("r") == pytest.approx(1.2) and w.reason("r") == "node CPU 5%, idle 30s: +20%"
    feed(w, clock, IDLE, 29.0)
    assert w.weight("r") == pytest.approx(1.2)
    clock.now += 1.0
    w.observe("r", IDLE)
    assert w.weight("r") == pytest.approx(1.44)


@given(k=st.integers(1, 12), dt=steps)
@settings(max_examples=60, deadline=None)
def test_constant_hot_cpu_for_k_periods_gives_0_7_to_the_k_clamped(k, dt):
    w, clock = weights()
    feed(w, clock, HOT, k * SETTINGS.hot_s - dt, dt)
    assert math.isclose(w.weight("r"), max(0.1, 0.7 ** (k - 1)))  # not yet the k-th period
    clock.now += dt
    w.observe("r", HOT)
    assert math.isclose(w.weight("r"), max(0.1, 0.7**k))


@given(dt=steps, gap=st.floats(5.01, 100))
@settings(max_examples=30, deadline=None)
def test_a_gap_in_samples_keeps_the_weight_and_breaks_the_run(dt, gap):
    w, clock = weights()
    feed(w, clock, HOT, 10.0, dt)
    assert w.weight("r") == pytest.approx(0.7)
    feed(w, clock, HOT, 9.0 - (9.0 % dt), dt)  # hot, but not yet another 10 s
    clock.now += gap  # no sample: nothing is known about that time
    assert w.weight("r") == pytest.approx(0.7)
    feed(w, clock, HOT, 10.0 - dt, dt)  # the run starts again at the first sample after the gap
    assert w.weight("r") == pytest.approx(0.7)
    clock.now += dt
    w.observe("r", HOT)
    assert w.weight("r") == pytest.approx(0.49)


def test_samples_exactly_stale_s_apart_keep_the_run():
    """Found by hypothesis (dt=5.0, gap=5.93): at this clock, 1025.93 - 1020.93 is a hair over 5.0."""
    w, clock = weights()
    clock.now = 1020.927579751185867
    assert clock.now + SETTINGS.stale_s - clock.now > SETTINGS.stale_s  # the premise: float sums drift
    feed(w, clock, HOT, 10.0, SETTINGS.stale_s)
    assert w.weight("r") == pytest.approx(0.7)


def test_a_sample_of_another_kind_breaks_the_run():
    w, clock = weights()
    feed(w, clock, HOT, 9.0)
    clock.now += 0.5
    w.observe("r", NORMAL)
    clock.now += 0.5
    feed(w, clock, HOT, 9.0)  # 19 s of mostly hot CPU, but never 10 s in a row
    assert w.weight("r") == 1.0
    clock.now += 1.0
    w.observe("r", HOT)
    assert w.weight("r") == pytest.approx(0.7)


@given(k=st.integers(1, 12), hot=st.booleans(), dt=steps, cpu=st.floats(0.2, 0.8))
@settings(max_examples=60, deadline=None)
def test_weight_returns_to_exactly_1_once_the_condition_clears(k, hot, dt, cpu):
    w, clock = weights()
    if hot:
        feed(w, clock, HOT, k * SETTINGS.hot_s, dt)
    else:
        feed(w, clock, IDLE, k * SETTINGS.idle_s, dt)
    moved = w.weight("r")
    assert moved != 1.0 and w.reason("r")
    clock.now += dt
    trail = []
    for _ in range(round(200 / dt)):  # 200 s in between: at most 20 recovery steps
        w.observe("r", cpu)
        trail.append(w.weight("r"))
        clock.now += dt
    # each step undoes one cut (or raise), never past 1.0: monotone, then exactly 1.0 with no reason
    assert trail == sorted(trail, reverse=not hot)
    assert all((x <= 1.0) if hot else (x >= 1.0) for x in trail)
    assert trail[-1] == 1.0 and w.reason("r") == ""
    # one step per cut or raise that was not clamped away
    steps_taken = sum(1 for x, y in zip([moved, *trail], trail, strict=False) if x != y)
    to_bound = math.log(1 / SETTINGS.min_weight) / math.log(1 / 0.7) if hot else math.log(2) / math.log(1.2)
    assert steps_taken == min(k, math.ceil(to_bound))


@given(ops=st.lists(st.tuples(st.sampled_from("ab"), st.floats(0, 1), st.floats(0, 12)), max_size=300))
@settings(max_examples=80, deadline=None)
def test_weights_always_stay_within_bounds_and_explain_themselves(ops):
    s = AdaptiveSettings(min_weight=0.25, max_weight=1.5)
    w, clock = weights(s)
    seen = {"a": 1.0, "b": 1.0}
    for replica, cpu, dt in ops:
        clock.now += dt
        w.observe(replica, cpu)
        for r in "ab":
            assert s.min_weight <= w.weight(r) <= s.max_weight
            assert (w.weight(r) == 1.0) == (w.reason(r) == "")
        changed = w.changed()
        assert changed == {r for r in "ab" if w.weight(r) != seen[r]}
        seen = {r: w.weight(r) for r in "ab"}


@given(ops=st.lists(st.tuples(st.floats(0, 1), st.floats(0, 40)), max_size=100))
@settings(max_examples=30, deadline=None)
def test_disabled_weights_are_always_1(ops):
    w, clock = weights(AdaptiveSettings(enabled=False))
    for cpu, dt in ops:
        clock.now += dt
        w.observe("r", cpu)
        assert w.weight("r") == 1.0 and w.reason("r") == "" and w.changed() == set()


def test_forget_drops_a_replica_and_its_pending_change():
    w, clock = weights()
    feed(w, clock, HOT, 10.0, replica="a")
    feed(w, clock, HOT, 0.0, replica="b")
    w.forget("a")
    assert w.weight("a") == 1.0 and w.reason("a") == "" and w.changed() == set()
    assert w.weight("unknown") == 1.0


@pytest.mark.parametrize(
    "bad",
    [
        {"idle_cpu": 0.9},
        {"hot_cpu": 1.5},
        {"min_weight": 0.0},
        {"min_weight": 1.5, "max_weight": 2.0},
        {"max_weight": 0.9},
        {"hot_factor": 1.0},
        {"idle_factor": 0.9},
        {"hot_s": 0},
        {"stale_s": -1},
    ],
)
def test_settings_reject_rules_that_cannot_work(bad):
    with pytest.raises(ValueError):
        AdaptiveSettings(**bad)


def test_a_cut_replica_gone_idle_recovers_at_the_recovery_pace_not_the_idle_one():
    """A hot replica cut to the floor that then goes idle (its work went elsewhere) steps back to 1.0
    every `recover_s`, not every `idle_s`; only from 1.0 does idleness raise it."""
    clock = Clock()
    s = AdaptiveSettings()
    w = AdaptiveWeights(s, clock)
    t = 0.0
    while w.weight("r") > s.min_weight:
        w.observe("r", 0.95)
        clock.now += 1.0
        t += 1.0
        assert t < 200
    steps_back = 0
    while w.weight("r") < 1.0:
        w.observe("r", 0.01)
        clock.now += 1.0
        steps_back += 1
        assert steps_back < 30 * s.recover_s, "recovery went at the idle pace"
    assert w.weight("r") == 1.0
