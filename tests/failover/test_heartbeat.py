"""The heartbeat monitor's state machine, driven by a fake clock."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from failover.heartbeat import Health, HeartbeatMonitor, HeartbeatSettings

SETTINGS = HeartbeatSettings(interval_s=0.5, timeout_s=3.0, slow_threshold_s=0.2, slow_count=5, slow_pause_s=5.0)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def monitor(*keys):
    clock = Clock()
    m = HeartbeatMonitor(SETTINGS, clock)
    for k in keys:
        m.watch(k)
    return m, clock


def beat(m, clock, key, latency_s, failed=None):
    """One heartbeat round for `key`: wait until it is due, ping, answer after `latency_s`."""
    while key not in m.due():
        clock.now += 0.05
    m.sent(key)
    clock.now += latency_s
    m.answered(key, failed)
    return m.check()


def test_fast_answers_keep_a_stage_healthy_forever():
    m, clock = monitor("a")
    for _ in range(100):
        assert beat(m, clock, "a", 0.01) == []
    assert m.health("a") is Health.HEALTHY


def test_pings_are_spaced_by_the_interval_and_one_at_a_time():
    m, clock = monitor("a")
    assert m.due() == ["a"]
    m.sent("a")
    assert m.due() == []  # outstanding
    clock.now += 0.1
    m.answered("a")
    assert m.due() == []  # answered, but the interval has not passed
    clock.now += 0.4
    assert m.due() == ["a"]


def test_silence_past_the_timeout_is_death_and_reports_how_long():
    m, clock = monitor("a", "b")
    m.sent("a")
    m.sent("b")
    clock.now += 1.0
    m.answered("b")
    clock.now += 1.99
    assert m.check() == []  # "a" silent 2.99 s
    clock.now += 0.01
    (verdict,) = m.check()
    assert (verdict.key, verdict.health) == ("a", Health.DEAD)
    assert verdict.silent_s >= SETTINGS.timeout_s and "timeout" in verdict.reason
    assert m.health("b") is Health.HEALTHY
    assert m.check() == []  # said once
    assert "a" not in m.due()  # a dead stage is not pinged


def test_actor_death_is_reported_on_the_next_check_without_waiting():
    m, clock = monitor("a")
    m.sent("a")
    m.died("a", "ActorDiedError")
    (verdict,) = m.check()
    assert verdict.health is Health.DEAD and verdict.reason == "ActorDiedError"
    assert verdict.silent_s < SETTINGS.timeout_s


def test_a_stage_reporting_its_pipeline_broken_is_dead_at_once():
    m, clock = monitor("a")
    (verdict,) = beat(m, clock, "a", 0.01, failed="transport to stage 1 broke")
    assert verdict.health is Health.DEAD and "transport" in verdict.reason


def test_transient_unavailability_is_not_death_but_does_not_stop_the_clock():
    m, clock = monitor("a")
    for _ in range(5):  # unavailable for 2.5 s: still alive
        m.sent("a")
        clock.now += 0.5
        m.unanswered("a")
        assert m.check() == []
    m.sent("a")
    clock.now += 0.6  # silent 3.1 s in all
    m.unanswered("a")
    assert [v.health for v in m.check()] == [Health.DEAD]


def test_slow_count_answers_in_a_row_pause_the_stage_then_the_pause_ends():
    m, clock = monitor("a")
    for _ in range(SETTINGS.slow_count - 1):
        assert beat(m, clock, "a", 0.3) == []
    (verdict,) = beat(m, clock, "a", 0.3)
    assert verdict.health is Health.SLOW
    paused_at = clock.now
    while clock.now < paused_at + SETTINGS.slow_pause_s - 0.6:  # fast answers do not end the pause early
        assert beat(m, clock, "a", 0.01) == []
    clock.now = paused_at + SETTINGS.slow_pause_s
    (verdict,) = m.check()
    assert verdict.health is Health.HEALTHY


def test_a_fast_answer_breaks_a_run_of_slow_ones():
    m, clock = monitor("a")
    for _ in range(10):
        for _ in range(SETTINGS.slow_count - 1):
            assert beat(m, clock, "a", 0.25) == []
        assert beat(m, clock, "a", 0.01) == []
    assert m.health("a") is Health.HEALTHY


def test_forgotten_stages_get_no_verdicts():
    m, clock = monitor("a")
    m.forget("a")
    clock.now += 10
    assert m.check() == [] and m.due() == [] and m.health("a") is None


@given(st.lists(st.floats(min_value=0.0, max_value=2.9), min_size=1, max_size=60))
def test_property_a_stage_that_always_answers_within_the_timeout_never_dies(latencies):
    """However slow, a stage that answers every ping before `timeout_s` is never declared dead;
    it is paused exactly when `slow_count` answers in a row were slow."""
    m, clock = monitor("a")
    run = 0
    for latency in latencies:
        m.sent("a")
        clock.now += latency
        m.answered("a")
        run = run + 1 if latency > SETTINGS.slow_threshold_s else 0
        verdicts = m.check()
        assert all(v.health is not Health.DEAD for v in verdicts)
        if run == SETTINGS.slow_count and m.health("a") is not Health.SLOW:
            raise AssertionError("a full run of slow answers did not pause the stage")
        if run == SETTINGS.slow_count:
            run = 0
        clock.now += SETTINGS.interval_s
