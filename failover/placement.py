"""Placement and lifecycle of pipelines: build, attach, retire, discard.

Every call here blocks on Ray (placement groups, actor creation, loading
weights, shutdown), so each runs in this object's thread pool and is awaited
from the controller's event loop, which never blocks. The pipelines are made by
`factory` (`shards.replica.Replica`, or a stand-in with the same methods, such
as the control-plane benchmark's simulated pipelines).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import ray

from failover.membership import StageInfo
from failover.monitor import short

log = logging.getLogger("ringpipe.placement")


class Placement:
    def __init__(self, spec, namespace: str, start_timeout_s: float, factory, threads: int = 16) -> None:
        self.spec, self.namespace, self.start_timeout_s, self.factory = spec, namespace, start_timeout_s, factory
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="placement")

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def new(self, name: str):
        return self.factory(self.spec, name, namespace=self.namespace, detached=True)

    async def place(self, pipeline, avoid: frozenset[str]) -> list[str]:
        """Reserve its resources, kept off the nodes in `avoid` where it fits; the node of each bundle."""
        return await self._run(pipeline.place, self.start_timeout_s, avoid)

    async def start(self, pipeline) -> tuple[StageInfo, ...]:
        """Create, connect, load and start its stages; where they run. On failure nothing is left."""
        try:
            await self._run(pipeline.start, self.start_timeout_s)
            return await self._run(stage_infos, pipeline, None)
        except BaseException:
            await self._run(pipeline.shutdown)
            raise

    async def build(self, name: str, avoid: frozenset[str]):
        pipeline = self.new(name)
        try:
            await self.place(pipeline, avoid)
        except BaseException:
            await self._run(pipeline.shutdown)
            raise
        return pipeline, await self.start(pipeline)

    async def retire(self, pipeline, timeout_s: float = 5.0) -> None:
        await self._run(pipeline.shutdown, timeout_s)

    async def discard(self, name: str) -> None:
        """Kill whatever is left of pipeline `name`: its actors and its placement group."""
        await self._run(self.factory.discard, self.spec, name, self.namespace)

    async def attach(self, name: str | None, timeout_s: float):
        """The running pipeline `name` and where its stages are; else why it cannot be used."""
        if name is None:
            return "no pipeline"
        try:
            pipeline = await self._run(self.factory.attach, self.spec, name, self.namespace)
            return pipeline, await self._run(stage_infos, pipeline, timeout_s)
        except (ValueError, ray.exceptions.RayError) as exc:
            log.warning("pipeline %s cannot be attached (%s): it will be discarded and rebuilt", name, short(exc))
            return short(exc)

    async def culprit(self, pipeline, reporter: int, timeout_s: float = 0.5) -> int:
        """The actor of `pipeline` that is dead or does not answer, when `reporter` saw its pipeline
        break or stall; `reporter` itself when every other one answers."""
        refs = pipeline.send_pings()
        others = [(i, ref) for i, ref in enumerate(refs) if i != reporter]
        results = await asyncio.gather(*(asyncio.wait_for(_awaited(ref), timeout_s) for _, ref in others),
                                       return_exceptions=True)
        for (i, _), result in zip(others, results, strict=True):
            if isinstance(result, BaseException):
                return i
        return reporter

    async def nodes(self, pipeline, timeout_s: float | None = None) -> list[dict]:
        return await self._run(pipeline.nodes, timeout_s)

    async def stats(self, pipeline, timeout_s: float) -> list[dict | None]:
        return await self._run(pipeline.stats, timeout_s)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


async def _awaited(ref):
    return await ref


def stage_infos(pipeline, timeout_s: float | None = None) -> tuple[StageInfo, ...]:
    nodes = pipeline.nodes(timeout_s)
    tp = pipeline.spec.tensor_parallel
    return tuple(
        StageInfo(p.index, nodes[p.index * tp]["node_id"], nodes[p.index * tp]["ip"], p.layer_start, p.layer_end)
        for p in pipeline.plans
    )
