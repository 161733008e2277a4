"""The heartbeat monitor's liveness state machine, driven by a fake clock."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from failover.heartbeat import Health, HeartbeatMonitor, HeartbeatSettings

SETTINGS = HeartbeatSettings(interval_s=0.5, timeout_s=3.0)


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


def test_an_unanswered_ping_is_overdue_each_interval_and_resending_keeps_the_silence_clock():
    m, clock = monitor("a")
    m.sent("a")
    clock.now += 0.4
    assert m.overdue() == []
    clock.now += 0.1
    assert m.overdue() == ["a"]  # a lost datagram: send it again
    m.resent("a")
    assert m.overdue() == [] and m.due() == []  # still one ping outstanding, not a new one
    assert m.next_event() == clock.now + SETTINGS.interval_s
    for _ in range(4):  # resent every interval, 2.5 s after the first send in all
        clock.now += SETTINGS.interval_s
        assert m.overdue() == ["a"]
        m.resent("a")
        assert m.check() == []
    clock.now += SETTINGS.timeout_s - 2.5
    (verdict,) = m.check()  # the silence counts from the first send, not the last resend
    assert verdict.key == "a" and verdict.silent_s >= SETTINGS.timeout_s


def test_an_answer_to_a_resent_ping_ends_the_silence():
    m, clock = monitor("a")
    m.sent("a")
    for _ in range(4):
        clock.now += SETTINGS.interval_s
        m.resent("a")
    clock.now += 0.1
    assert m.answered("a") is None  # which send it answers is unknown: no round trip for the slow rule
    assert m.overdue() == []
    assert advance(m, clock, 2 * SETTINGS.timeout_s) == []  # no ping outstanding: no silence


def advance(m, clock, seconds, step=0.1):
    """Time passes with the monitor checking every `step`, as its loop does; the verdicts seen."""
    out = []
    for _ in range(round(seconds / step)):
        clock.now += step
        out += m.check()
    return out


def test_silence_past_the_timeout_is_death_and_reports_how_long():
    m, clock = monitor("a", "b")
    m.sent("a")
    m.sent("b")
    assert advance(m, clock, 1.0) == []
    m.answered("b")
    assert advance(m, clock, 1.9) == []  # "a" silent 2.9 s
    (verdict,) = advance(m, clock, 0.2)
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


def test_forgotten_stages_get_no_verdicts():
    m, clock = monitor("a")
    m.forget("a")
    clock.now += 10
    assert m.check() == [] and m.due() == [] and m.health("a") is None


@given(st.lists(st.tuples(st.floats(0.0, 2.9), st.floats(0.01, 8.0)), min_size=1, max_size=60))
def test_property_a_stage_that_answers_every_ping_within_the_timeout_never_dies(schedule):
    """However slow its answers (under `timeout_s`) and however irregular the monitor's own rounds
    (a starved or stopped controller), a stage that answers every ping in time is never declared
    dead. A round takes in every answer that has arrived, sends what is due, then checks."""
    m, clock = monitor("a")
    answer_at = None
    for latency, gap in schedule:
        if answer_at is not None and answer_at <= clock.now:
            m.answered("a")
            answer_at = None
        if "a" in m.due():
            m.sent("a")
            answer_at = clock.now + latency
        assert m.check() == []
        clock.now += gap


def test_a_stalled_controller_declares_nobody_dead():
    """The issue's case: the controller SIGSTOPped for 5 s. On waking it pings (its last answer
    was 5 s ago) and checks 50 ms later, before the new answer is in: silence is counted from the
    ping it sent, so nobody is dead."""
    m, clock = monitor("a", "b")
    beat(m, clock, "a", 0.01)
    beat(m, clock, "b", 0.01)
    clock.now += 5.0  # stalled
    assert set(m.due()) == {"a", "b"}
    m.sent("a")
    m.sent("b")
    clock.now += 0.05
    assert m.check() == []
    m.answered("a")
    m.answered("b")
    assert m.check() == [] and m.health("a") is Health.HEALTHY


def test_answers_not_yet_taken_in_after_a_stall_do_not_condemn():
    """Pings were outstanding when the controller stopped; it wakes and checks before it has taken
    in the answers that arrived meanwhile: the stall restarts every silence clock."""
    m, clock = monitor("a")
    m.sent("a")
    clock.now += 5.0
    assert m.check() == [] and m.stalls == 1
    clock.now += 0.1
    m.answered("a")
    assert m.check() == []


def test_after_a_stall_a_stage_that_stays_silent_still_dies():
    m, clock = monitor("a")
    m.sent("a")
    clock.now += 5.0
    assert m.check() == []  # stalled: no verdict yet
    for _ in range(int(SETTINGS.timeout_s / 0.1) + 1):
        clock.now += 0.1
        verdicts = m.check()
    assert [v.health for v in verdicts] == [Health.DEAD]
    assert SETTINGS.timeout_s <= verdicts[0].silent_s < SETTINGS.timeout_s + 0.2


def test_a_stage_watched_without_pings_dies_only_by_the_fast_path():
    m, clock = monitor()
    m.watch("quiet", pinged=False)
    assert m.due() == []
    clock.now += 100
    assert m.check() == []
    m.died("quiet", "stage actor died")
    assert [v.health for v in m.check()] == [Health.DEAD]
    m.watch("later", pinged=False)
    m.set_pinged("later", True)
    assert m.due() == ["later"]


@given(
    latencies=st.lists(st.floats(0.0, 0.4), min_size=1, max_size=20),
    hang_after=st.floats(0.0, 0.49),
)
def test_a_loop_woken_at_next_event_finds_a_hang_within_timeout_plus_interval(latencies, hang_after):
    """The monitor loop sleeps until `next_event()`, a tick at most: pings go out when due and a
    silence is judged the moment it reaches the timeout, so a hang is found by hang + interval +
    timeout (the issue's bound): the ping due next is sent at most an interval after the hang, and
    is found unanswered a timeout later."""
    m, clock = monitor("a")
    for latency in latencies:  # answered rounds, the loop woken only at its events
        while m.due() != ["a"]:
            wake(m, clock)
        m.sent("a")
        clock.now += latency
        m.answered("a")
        assert m.check() == []
    hang = clock.now + hang_after  # before the next ping is due (interval after the last one sent)
    verdicts = []
    while not verdicts:
        wake(m, clock)
        for key in m.due():
            m.sent(key)
        for key in m.overdue():  # as the monitor loop does: a lost datagram is sent again
            m.resent(key)
        verdicts = m.check()
    (verdict,) = verdicts
    assert verdict.health is Health.DEAD and verdict.silent_s >= SETTINGS.timeout_s
    assert clock.now <= hang + SETTINGS.interval_s + SETTINGS.timeout_s + 1e-9


def wake(m, clock, tick=0.1):
    """The controller's loop: asleep until the monitor's next event, a tick at most."""
    clock.now = max(clock.now, min(clock.now + tick, m.next_event()))
