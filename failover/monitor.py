"""The monitor loop: what the controller learns about its pipelines, on its event loop.

Work grows with pipelines and nodes, not with stages: each round pings every
pipeline's head (a UDP datagram, `shards/beat.py`, once the head has answered
one; a Ray call until then, and whenever a datagram goes unanswered for an
interval: a Ray call costs the controller ten times a datagram's CPU); every `CPU_SAMPLE_S` one stage per node (the node's probe) is
asked for its node's CPU, unless a head there has just said it; and every stage
has one `vigil` call outstanding that Ray fails the moment its actor dies and
that returns the moment its stage fails (the fast path; nothing periodic). A
stage other than a head is seen through its head: a wait for a result from its
pipeline past `timeout_s` (plus the slowest recent step, so a long step is no
stall) is a stalled pipeline, which the head's vigil returns at once (its ping
answers say it too).

Answers feed three pure cores: `HeartbeatMonitor` (alive or dead),
`SlowPolicy` (paused or not: ping round trip and the head's inference step
latency) and `AdaptiveWeights` (node CPU). A datagram's answer is taken in by
the socket's reader, a Ray ping's by a task, the moment either arrives; `round()` sends the pings due and returns the
death verdicts. Everything here runs on the controller's event loop: nothing
blocks, and there is no lock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import ray

from failover.adaptive import AdaptiveSettings, AdaptiveWeights
from failover.heartbeat import HeartbeatMonitor, HeartbeatSettings, Verdict
from failover.membership import StageInfo
from failover.slow import SlowPolicy, SlowSettings
from shards.beat import BeatPinger

log = logging.getLogger("ringpipe.monitor")
CPU_SAMPLE_S = 2.0  # how often each node's probe is asked for its node's CPU


@dataclass
class _Watched:
    pipeline: object
    actor_nodes: list[str]  # the node of every stage actor, in actor order
    vigils: list[asyncio.Task]


class Monitor:
    def __init__(self, heartbeat: HeartbeatSettings, slow: SlowSettings, adaptive: AdaptiveSettings,
                 tensor_parallel: int = 1) -> None:
        self.settings, self.tp = heartbeat, tensor_parallel
        self.liveness = HeartbeatMonitor(heartbeat)
        self.slow = SlowPolicy(slow)
        self.weights = AdaptiveWeights(adaptive)
        self.node_cpu: dict[str, tuple[float, float]] = {}  # node -> (fraction, when)
        self.queue_depth: dict[str, int] = {}  # pipeline -> requests its head has waiting
        self.kv_slots_used: dict[str, int] = {}  # pipeline -> requests its head has running (each holds a slot)
        self._watched: dict[str, _Watched] = {}
        self._probes: dict[str, tuple[str, int]] = {}  # node -> the stage actor pinged for it
        self._pings: dict[tuple[str, int], asyncio.Task] = {}  # Ray pings outstanding
        self._beats: BeatPinger | None = None  # opened at the first watch (it needs the running loop)
        self._beats_failed = False
        self._lookups: dict[str, asyncio.Task] = {}  # pipeline -> the ask for its head's ping address
        self._by_datagram: set[str] = set()  # pipelines whose head has answered a datagram
        self._sampled = 0.0
        self.lagging = False
        self.ray_pings = 0  # Ray ping calls sent (datagrams: `self._beats.sent`)

    # -- what is watched
    def watch(self, pipeline, stages: tuple[StageInfo, ...]) -> None:
        name = pipeline.name
        nodes = [stages[i // self.tp].node_id if stages else "" for i in range(len(pipeline.actors))]
        refs = pipeline.send_vigils(self.settings.timeout_s)
        vigils = [asyncio.ensure_future(self._vigil((name, i), ref)) for i, ref in enumerate(refs)]
        self._watched[name] = _Watched(pipeline, nodes, vigils)
        for i, node in enumerate(nodes):
            if node not in self._probes:
                self._probes[node] = (name, i)
            self.liveness.watch((name, i), pinged=i == 0)  # heads: they answer for their whole pipeline
        if self._open_beats() and hasattr(pipeline, "send_beat_address"):
            self._lookups[name] = asyncio.ensure_future(self._look_up(name, pipeline))

    def _open_beats(self) -> bool:
        if self._beats is None and not self._beats_failed:
            try:
                self._beats = BeatPinger(ray.util.get_node_ip_address(), self._answered_datagram)
            except OSError as exc:
                self._beats_failed = True
                log.warning("no UDP socket for ping datagrams (%s): heads are pinged by Ray calls", exc)
        return self._beats is not None

    async def _look_up(self, name: str, pipeline) -> None:
        try:
            address = await pipeline.send_beat_address(0)
        except ray.exceptions.RayError as exc:  # an old stage, or going away: Ray pings it is
            log.debug("%s: no ping address (%s)", name, short(exc))
            return
        finally:
            self._lookups.pop(name, None)
        if name in self._watched and self._beats is not None:
            self._beats.add((name, 0), address)

    def _answered_datagram(self, key: tuple[str, int], answer: dict) -> None:
        self._by_datagram.add(key[0])
        self._take(key, answer)

    def forget(self, name: str) -> None:
        watched = self._watched.pop(name, None)
        if watched is None:
            return
        for task in watched.vigils:
            task.cancel()
        if (lookup := self._lookups.pop(name, None)) is not None:
            lookup.cancel()
        if self._beats is not None:
            self._beats.remove((name, 0))
        self._by_datagram.discard(name)
        for i in range(len(watched.actor_nodes)):
            self.liveness.forget((name, i))
        self.slow.forget(name)
        self.weights.forget(name)
        self.queue_depth.pop(name, None)
        self.kv_slots_used.pop(name, None)
        for node, key in list(self._probes.items()):  # another live stage on that node is its probe now
            if key[0] != name:
                continue
            del self._probes[node]
            other = next(((n, i) for n, w in self._watched.items() for i, nd in enumerate(w.actor_nodes)
                          if nd == node and self.liveness.health((n, i)) is not None), None)
            if other is not None:
                self._probes[node] = other

    @property
    def watched(self) -> list[str]:
        return list(self._watched)

    def stop(self) -> None:
        for name in list(self._watched):
            self.forget(name)
        for task in list(self._pings.values()):
            task.cancel()
        if self._beats is not None:
            self._beats.close()
            self._beats = None

    # -- one round
    def round(self, lag_s: float = 0.0) -> list[Verdict]:
        """Send the pings that are due; the deaths found since the last round. `lag_s`: how late
        this round is; while the loop lags, round trips measure the controller, not the pipelines,
        and the slow rule is not fed."""
        self.lagging = lag_s > self.settings.interval_s / 2
        for key in self.liveness.due():
            watched = self._watched.get(key[0])
            if watched is not None:
                self._send(key, watched)
                self.liveness.sent(key)
        for key in self.liveness.overdue():  # a datagram lost, or a head hung: again, and by Ray too
            if (watched := self._watched.get(key[0])) is not None:
                if self._beats is not None:
                    self._beats.send(key)
                self._send_ray(key, watched)
            self.liveness.resent(key)
        now = time.monotonic()
        if now - self._sampled >= CPU_SAMPLE_S:  # each node's CPU, from its probe
            self._sampled = now
            for node, key in self._probes.items():
                seen = self.node_cpu.get(node)
                if seen is not None and now - seen[1] < CPU_SAMPLE_S:
                    continue  # a head there answered with its node's CPU this round already
                if (watched := self._watched.get(key[0])) is not None and key[1] != 0:
                    self._send_ray(key, watched)
        return self.liveness.check()

    def _send(self, key: tuple[str, int], watched: _Watched) -> None:
        """A datagram where the head has an address; a Ray call as well until it has answered one."""
        by_datagram = self._beats is not None and self._beats.send(key)
        if not by_datagram or key[0] not in self._by_datagram:
            self._send_ray(key, watched)

    def _send_ray(self, key: tuple[str, int], watched: _Watched) -> None:
        if key in self._pings:  # one Ray ping at a time (a hung stage's stays pending)
            return
        task = asyncio.ensure_future(self._ping(key, watched.pipeline.send_ping(key[1])))
        self.ray_pings += 1
        self._pings[key] = task
        task.add_done_callback(lambda _, key=key: self._pings.pop(key, None))

    def ping_counts(self) -> dict[str, int]:
        """Pings sent so far, by way: datagrams (and how many were answered) and Ray calls."""
        beats = self._beats
        return {"datagrams": beats.sent if beats else 0, "datagram_answers": beats.answers if beats else 0,
                "ray_calls": self.ray_pings}

    def cpu_of(self, name: str, fresh_s: float = 5.0) -> float | None:
        """The busiest node's CPU utilisation among those `name` runs on (recent samples only)."""
        watched = self._watched.get(name)
        if watched is None:
            return None
        now = time.monotonic()
        samples = [cpu for node in set(watched.actor_nodes)
                   if (seen := self.node_cpu.get(node)) and now - seen[1] <= fresh_s for cpu in (seen[0],)]
        return max(samples) if samples else None

    # -- answers
    async def _ping(self, key: tuple[str, int], ref) -> None:
        try:
            answer = await ref
        except ray.exceptions.ActorUnavailableError:
            self.liveness.unanswered(key)
        except ray.exceptions.RayActorError as exc:
            self.liveness.died(key, f"stage actor died: {short(exc)}")
        except ray.exceptions.RayError:  # no proof of death (a node going away, say): the timeout decides
            self.liveness.unanswered(key)
        else:
            self._take(key, answer)

    def _take(self, key: tuple[str, int], answer: dict) -> None:
        failed = None
        if answer["state"] in ("failed", "stopped"):
            failed = f"stage {answer['state']}: {answer['error']}"
        latency = self.liveness.answered(key, failed)
        watched = self._watched.get(key[0])
        if watched is None or failed:
            return
        if answer.get("node_cpu") is not None:
            self.node_cpu[watched.actor_nodes[key[1]]] = (answer["node_cpu"], time.monotonic())
        if key[1] != 0:
            return
        self.queue_depth[key[0]] = answer.get("waiting", 0)
        self.kv_slots_used[key[0]] = answer.get("running", 0)
        if answer.get("pipeline_wait_s", 0.0) >= self.settings.timeout_s + answer.get("slowest_step_s", 0.0):
            self.liveness.died(key, self._stalled(answer))  # (the head's vigil says so first, as a rule)
            return
        if latency is not None and not self.lagging:
            self.slow.observe(key[0], max(latency, answer.get("step_s") or 0.0))

    async def _vigil(self, key: tuple[str, int], ref) -> None:
        try:
            answer = await ref
        except asyncio.CancelledError:  # forgotten: the stage is being retired
            raise
        except ray.exceptions.RayActorError as exc:
            if not isinstance(exc, ray.exceptions.ActorUnavailableError):
                self.liveness.died(key, f"stage actor died: {short(exc)}")
        except ray.exceptions.RayError:
            return  # no proof of death: the heartbeat decides
        else:
            stalled = answer["state"] == "stalled"
            self.liveness.died(key, self._stalled(answer) if stalled else f"stage {answer['state']}: {answer['error']}")

    def _stalled(self, answer: dict) -> str:
        return (f"pipeline stalled: its head has waited {answer['pipeline_wait_s']:.1f}s for a result "
                f"(timeout {self.settings.timeout_s:g}s + slowest recent step {answer['slowest_step_s']:.2f}s)")


def short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
