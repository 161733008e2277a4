"""The heartbeat monitor's state machine: which stages are alive, slow or dead. Pure, clock injected.

The controller pings every watched stage every `interval_s` (`due`), tells the
monitor what came back (`sent`, `answered`, `died`), and acts on the verdicts
`check` returns. Rules:

- dead: no ping answered for `timeout_s` (a hung or partitioned stage), or at
  once on the fast path — the actor is gone (`died`) or the stage says its
  pipeline broke (`answered(..., failed=True)`). A dead stage stays dead.
- slow: `slow_count` answers in a row slower than `slow_threshold_s` pause the
  stage from new work for `slow_pause_s`; the pause ends when that time has
  passed (a new run of slow answers starts another).
- A transient "actor unavailable" is neither: the stage keeps its clock running
  and is dead only if it stays silent past `timeout_s`.
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
    slow_threshold_s: float = 0.2
    slow_count: int = 5
    slow_pause_s: float = 5.0


class Health(enum.Enum):
    HEALTHY = "healthy"
    SLOW = "slow"  # answering, but paused from new work
    DEAD = "dead"


@dataclass(frozen=True)
class Verdict:
    key: Hashable
    health: Health  # the new state
    reason: str
    silent_s: float  # since the stage last answered (detection latency for a hang)


@dataclass
class _Stage:
    last_answer: float
    health: Health = Health.HEALTHY
    ping_sent: float | None = None  # an unanswered ping went out at this time
    last_ping: float = float("-inf")
    slow_run: int = 0
    paused_until: float = 0.0
    dead_reason: str | None = None  # set by the fast path, reported by the next check


class HeartbeatMonitor:
    def __init__(self, settings: HeartbeatSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings, self.clock = settings, clock
        self._stages: dict[Hashable, _Stage] = {}

    def watch(self, key: Hashable) -> None:
        self._stages[key] = _Stage(last_answer=self.clock())

    def forget(self, key: Hashable) -> None:
        self._stages.pop(key, None)

    def health(self, key: Hashable) -> Health | None:
        stage = self._stages.get(key)
        return stage.health if stage else None

    def due(self) -> list[Hashable]:
        """Stages to ping now: live, with no ping outstanding, `interval_s` after the last one."""
        now = self.clock()
        return [
            key for key, s in self._stages.items()
            if s.health is not Health.DEAD and s.ping_sent is None and now - s.last_ping >= self.settings.interval_s
        ]

    def sent(self, key: Hashable) -> None:
        stage = self._stages.get(key)
        if stage is not None:
            stage.ping_sent = stage.last_ping = self.clock()

    def answered(self, key: Hashable, failed: str | None = None) -> None:
        """The stage answered its outstanding ping; `failed` is its own report of a broken pipeline."""
        stage = self._stages.get(key)
        if stage is None or stage.health is Health.DEAD:
            return
        now = self.clock()
        latency = now - stage.ping_sent if stage.ping_sent is not None else 0.0
        stage.ping_sent, stage.last_answer = None, now
        if failed:
            stage.dead_reason = failed
            return
        if latency > self.settings.slow_threshold_s:
            stage.slow_run += 1
            if stage.slow_run >= self.settings.slow_count:
                stage.slow_run = 0
                stage.paused_until = now + self.settings.slow_pause_s
        else:
            stage.slow_run = 0

    def unanswered(self, key: Hashable) -> None:
        """The ping failed without proof of death (Ray's transient 'actor unavailable'): ping again."""
        stage = self._stages.get(key)
        if stage is not None:
            stage.ping_sent = None

    def died(self, key: Hashable, reason: str) -> None:
        """The fast path: the actor is gone, or its transport broke."""
        stage = self._stages.get(key)
        if stage is not None and stage.health is not Health.DEAD:
            stage.dead_reason = reason

    def check(self) -> list[Verdict]:
        """State changes since the last call."""
        now = self.clock()
        out = []
        for key, s in self._stages.items():
            if s.health is Health.DEAD:
                continue
            silent = now - s.last_answer
            if s.dead_reason is None and silent >= self.settings.timeout_s:
                s.dead_reason = f"no heartbeat answered for {silent:.1f}s (timeout {self.settings.timeout_s:g}s)"
            if s.dead_reason is not None:
                s.health = Health.DEAD
                out.append(Verdict(key, Health.DEAD, s.dead_reason, silent))
            elif s.health is Health.HEALTHY and now < s.paused_until:
                s.health = Health.SLOW
                reason = (
                    f"{self.settings.slow_count} heartbeats in a row slower than "
                    f"{self.settings.slow_threshold_s * 1000:.0f} ms: no new work for {self.settings.slow_pause_s:g}s"
                )
                out.append(Verdict(key, Health.SLOW, reason, silent))
            elif s.health is Health.SLOW and now >= s.paused_until:
                s.health = Health.HEALTHY
                out.append(Verdict(key, Health.HEALTHY, "pause over", silent))
        return out
