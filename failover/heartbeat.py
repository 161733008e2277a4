"""The heartbeat monitor's liveness state machine: which watched stages are alive or dead. Pure, clock injected.

The monitor loop pings every watched stage every `interval_s` (`due`), tells
this state machine what came back (`sent`, `answered`, `unanswered`, `died`)
and acts on the verdicts `check` returns. Rules:

- dead: a ping that was actually sent went unanswered for `timeout_s` (a hung
  or partitioned stage), or at once on the fast path — the actor is gone
  (`died`) or the stage says its pipeline broke (`answered(..., failed=...)`).
  A dead stage stays dead.
- Silence is counted from the send of the oldest ping not answered since the
  last answer, never from the last answer: a monitor that did not send (it was
  stalled, starved or busy) has no evidence against anyone.
- A stalled monitor declares nobody dead: when `check` finds that its previous
  call was more than `stall_s` ago, every silence clock restarts now (the
  answers that arrived during the stall may not have been taken in yet).
- A stage may be watched without pings (`pinged=False`): the monitor loop
  pings each pipeline's head and one stage per node, and sees the others
  through their head (the pipeline's traffic and keepalive) and the fast path.
- A transient failure ("actor unavailable") is not an answer: the stage is
  pinged again and its silence clock keeps running.
- A ping may be lost (a datagram): one unanswered for `interval_s` is
  `overdue`, and the loop may send it again (`resent`) — by datagram and by Ray
  call; the silence clock keeps running from the first send.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass


@dataclass(frozen=True)
class HeartbeatSettings:
    interval_s: float = 0.5
    timeout_s: float = 3.0

    @property
    def stall_s(self) -> float:
        """A gap between two checks this long means the monitor itself stalled."""
        return max(self.timeout_s / 2, 2 * self.interval_s)


class Health(enum.Enum):
    HEALTHY = "healthy"
    DEAD = "dead"


@dataclass(frozen=True)
class Verdict:
    key: Hashable
    health: Health  # the new state
    reason: str
    silent_s: float  # since the oldest unanswered ping was sent (detection latency for a hang)


@dataclass
class _Stage:
    health: Health = Health.HEALTHY
    ping_sent: float | None = None  # the outstanding ping went out at this time
    last_ping: float = float("-inf")
    silent_since: float | None = None  # send time of the oldest ping unanswered since the last answer
    dead_reason: str | None = None  # set by the fast path, reported by the next check
    pinged: bool = True  # False: watched through the fast path only (a stage seen through its head)
    resent: bool = False  # the outstanding ping was sent again: its answer's round trip means nothing


class HeartbeatMonitor:
    def __init__(self, settings: HeartbeatSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings, self.clock = settings, clock
        self._stages: dict[Hashable, _Stage] = {}
        self._last_check = clock()
        self.stalls = 0  # how many times the monitor found itself stalled (for status and logs)

    def watch(self, key: Hashable, pinged: bool = True) -> None:
        self._stages.setdefault(key, _Stage()).pinged = pinged

    def set_pinged(self, key: Hashable, pinged: bool) -> None:
        stage = self._stages.get(key)
        if stage is not None:
            stage.pinged = pinged
            if not pinged:
                stage.silent_since = None

    def forget(self, key: Hashable) -> None:
        self._stages.pop(key, None)

    def health(self, key: Hashable) -> Health | None:
        stage = self._stages.get(key)
        return stage.health if stage else None

    def __contains__(self, key: Hashable) -> bool:
        return key in self._stages

    def due(self) -> list[Hashable]:
        """Stages to ping now: live, with no ping outstanding, `interval_s` after the last one."""
        now = self.clock()
        return [
            key for key, s in self._stages.items()
            if s.pinged and s.health is not Health.DEAD and s.ping_sent is None
            and now - s.last_ping >= self.settings.interval_s
        ]

    def overdue(self) -> list[Hashable]:
        """Live stages whose ping has gone unanswered for `interval_s` since it was last sent."""
        now = self.clock()
        return [
            key for key, s in self._stages.items()
            if s.pinged and s.health is not Health.DEAD and s.ping_sent is not None
            and now - s.last_ping >= self.settings.interval_s
        ]

    def next_event(self) -> float:
        """When a ping next falls due (or overdue) or a silence reaches `timeout_s` (clock time;
        inf: never), so that the loop wakes on time rather than a tick late."""
        interval, timeout = self.settings.interval_s, self.settings.timeout_s
        soonest = float("inf")
        for s in self._stages.values():
            if s.health is Health.DEAD:
                continue
            if s.silent_since is not None:
                soonest = min(soonest, s.silent_since + timeout)
            if s.pinged:
                soonest = min(soonest, s.last_ping + interval)
        return soonest

    def sent(self, key: Hashable) -> None:
        stage = self._stages.get(key)
        if stage is not None:
            stage.ping_sent = stage.last_ping = self.clock()
            if stage.silent_since is None:
                stage.silent_since = stage.ping_sent

    def resent(self, key: Hashable) -> None:
        """The outstanding ping was sent again (or deliberately not): `overdue` again an interval
        from now. The silence clock keeps running from the first send."""
        stage = self._stages.get(key)
        if stage is not None and stage.ping_sent is not None:
            stage.last_ping, stage.resent = self.clock(), True

    def answered(self, key: Hashable, failed: str | None = None) -> float | None:
        """The stage answered its outstanding ping; `failed` is its own report of a broken pipeline.

        Returns the ping's round trip (None when no ping was outstanding, or it was sent again)."""
        stage = self._stages.get(key)
        if stage is None or stage.health is Health.DEAD:
            return None
        now = self.clock()
        latency = now - stage.ping_sent if stage.ping_sent is not None and not stage.resent else None
        stage.ping_sent = stage.silent_since = None
        stage.resent = False
        if failed:
            stage.dead_reason = failed
        return latency

    def unanswered(self, key: Hashable) -> None:
        """The ping failed without proof of death (Ray's transient 'actor unavailable'): ping again,
        the silence clock keeps running."""
        stage = self._stages.get(key)
        if stage is not None:
            stage.ping_sent, stage.resent = None, False

    def died(self, key: Hashable, reason: str) -> None:
        """The fast path: the actor is gone, or its pipeline broke or stalled."""
        stage = self._stages.get(key)
        if stage is not None and stage.health is not Health.DEAD:
            stage.dead_reason = reason

    def check(self) -> list[Verdict]:
        """Deaths since the last call. Call it after taking in every answer that has arrived."""
        now = self.clock()
        if now - self._last_check > self.settings.stall_s:
            self.stalls += 1
            for s in self._stages.values():  # no evidence was gathered while stalled: start over
                if s.silent_since is not None:
                    s.silent_since = now
        self._last_check = now
        out = []
        for key, s in self._stages.items():
            if s.health is Health.DEAD:
                continue
            silent = now - s.silent_since if s.silent_since is not None else 0.0
            if s.dead_reason is None and silent >= self.settings.timeout_s:
                s.dead_reason = f"no heartbeat answered for {silent:.1f}s (timeout {self.settings.timeout_s:g}s)"
            if s.dead_reason is not None:
                s.health = Health.DEAD
                out.append(Verdict(key, Health.DEAD, s.dead_reason, silent))
        return out
