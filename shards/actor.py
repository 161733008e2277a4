"""The Ray actor around a `Stage`: it only moves messages.

Async methods run on the actor's event loop while the stage's step loop runs in
its own thread; `generate` is a streaming generator that yields each request's
tokens as the head's scheduler produces them (several per item when they pile
up), and cancels the request if the caller goes away.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import ray

from shards.beat import BeatResponder
from shards.load import NodeCpu
from shards.model import ModelArgs
from shards.partition import StagePlan
from shards.scheduler import GenerationRequest, TokenEvent
from shards.spec import ReplicaSpec
from shards.stage import Stage


@ray.remote(max_restarts=0, max_task_retries=0)
class StageActor:
    def __init__(self, spec: ReplicaSpec, plan: StagePlan, args: ModelArgs, replica: str, tp_rank: int = 0) -> None:
        self.stage = Stage(spec, plan, args, replica, tp_rank)
        self._cpu = NodeCpu(os.getppid())  # a worker's parent is its node's raylet
        self._cpu_at, self._cpu_value = 0.0, None
        self._beats: BeatResponder | None = None
        # events from the step loop's thread on their way to the streams on the event loop: one wake-up
        # of the loop per batch of them (a step's tokens for every request), not one per token
        self._mail: list[tuple[asyncio.Queue, object]] = []
        self._mail_lock = threading.Lock()

    def _post(self, loop: asyncio.AbstractEventLoop, events: asyncio.Queue, event: object) -> None:
        """Any thread: hand `event` to a stream's queue on the event loop."""
        with self._mail_lock:
            wake = not self._mail
            self._mail.append((events, event))
        if wake:
            loop.call_soon_threadsafe(self._deliver_mail)

    def _deliver_mail(self) -> None:
        with self._mail_lock:
            mail, self._mail = self._mail, []
        for events, event in mail:
            events.put_nowait(event)

    async def rendezvous(self) -> tuple[str, int]:
        host = ray.util.get_node_ip_address()
        return host, self.stage.open_rendezvous(host)

    async def node(self) -> dict:
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(), "pid": os.getpid()}

    async def connect(self, host: str, port: int) -> None:
        await asyncio.to_thread(self.stage.connect, host, port, ray.util.get_node_ip_address())

    async def load(self) -> dict:
        return await asyncio.to_thread(self.stage.load)

    async def start(self) -> None:
        self.stage.start()

    async def ping(self) -> dict:
        """Liveness and load: the stage's state, its node's CPU utilisation, and on the head its
        queue and its view of the pipeline (see `Stage.pipeline_view`)."""
        answer = self.stage.ping()
        if time.monotonic() - self._cpu_at >= 1.0:  # a window long enough to mean something
            self._cpu_at, self._cpu_value = time.monotonic(), self._cpu.sample()
        answer["node_cpu"] = self._cpu_value
        if self.stage.is_head:
            answer.update(self.stage.pipeline_view())
        return answer

    async def beat_address(self) -> tuple[str, int]:
        """Where this stage answers ping datagrams (`shards/beat.py`), on its node's address."""
        if self._beats is None:
            self._beats = BeatResponder(ray.util.get_node_ip_address(), self._beat_answer)
        return self._beats.address

    async def _beat_answer(self, pipeline: str, index: int) -> dict | None:
        return await self.ping() if pipeline == self.stage.replica else None

    async def vigil(self, stall_after_s: float | None = None, poll_s: float = 0.05) -> dict:
        """Returns when the stage stops serving (its pipeline broke, or it shut down), or, on the
        head given `stall_after_s`, when its pipeline stalled: it has waited that long, plus its
        slowest recent step, for a result (the answer's state is then "stalled").

        The controller keeps one call of this outstanding per stage: Ray fails it the moment
        the actor dies, and it returns the moment the stage fails or stalls — seen in
        milliseconds, not at the next heartbeat.
        """
        watch_stall = stall_after_s is not None and self.stage.is_head
        while self.stage.state.value in ("starting", "serving"):
            if watch_stall:
                view = self.stage.pipeline_view()
                if view["pipeline_wait_s"] >= stall_after_s + view["slowest_step_s"]:
                    return {**self.stage.ping(), **view, "state": "stalled"}
            await asyncio.sleep(poll_s)
        return self.stage.ping()

    async def stats(self) -> dict:
        return self.stage.stats()

    async def shutdown(self) -> None:
        if self._beats is not None:
            self._beats.close()
            self._beats = None
        await asyncio.to_thread(self.stage.shutdown)

    async def generate(self, request: GenerationRequest):
        """Yields dicts {"tokens": [...], "finish_reason": str | None} until the request ends.

        The item with the first token also has "queued_s": how long the request waited for a slot.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        self.stage.submit(request, lambda ev: self._post(loop, events, ev))
        finished = False
        try:
            while not finished:
                batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                tokens, reason, extra = [], None, {}
                for ev in batch:
                    if isinstance(ev, BaseException):
                        finished = True
                        raise ev
                    assert isinstance(ev, TokenEvent)
                    if ev.token is not None:
                        tokens.append(ev.token)
                    reason = ev.finish_reason or reason
                    if ev.queued_s is not None:
                        extra["queued_s"] = ev.queued_s
                finished = reason is not None
                yield {"tokens": tokens, "finish_reason": reason, **extra}
        finally:
            if not finished:  # the caller went away: free the slot now
                self.stage.cancel(request.request_id)
