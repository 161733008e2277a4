"""Recovery and rebuild: a restarted controller finds its pipelines again; lost ones are rebuilt.

`take_over` hands a dead pipeline's ring position to a standby, or leaves it
empty for `rebuild`, and records the failover (a death verdict's, from
`failover/rounds.py`, or a pipeline found gone at a restart).

`load_state` reads the registry, retrying in the background while it cannot
(the controller runs meanwhile and says the registry is degraded). `recover`
attaches to every pipeline the previous incarnation saved; one that cannot be
attached (an actor dead, a stage that does not answer in `timeout_s`) is
discarded — its remaining actors killed and its placement group removed, so no
GPU is left held — and its ring position taken over as after a death. Half
built or half retired pipelines are discarded too. Then `rebuild` runs for every
empty position and every missing standby: it builds a pipeline until one starts,
which fills the first empty position, else becomes a standby.

These functions drive the controller (`failover.controller.Controller`) through
its `positions`, `monitor`, `placement` and `registry`, on its event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time

from failover.metrics import metrics
from failover.positions import Failover, Slot

log = logging.getLogger("ringpipe.recovery")


async def load_state(ctl) -> dict | None:
    """The saved state (None for a first start); retried until the registry answers."""
    backoff = 0.5
    while True:
        try:
            state = await asyncio.get_running_loop().run_in_executor(None, ctl.registry.registry.load)
            ctl.registry.failed(None)
            return state
        except Exception as exc:  # noqa: BLE001 — the registry may come back: keep trying, say so
            why = f"cannot read the saved state: {type(exc).__name__}: {exc}"
            ctl.registry.failed(why)
            log.warning("registry: %s; retrying in %.1fs", why, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)


async def recover(ctl, state: dict) -> None:
    """Take over what a previous incarnation left: attach, discard what cannot be used, rebuild."""
    positions, placement = ctl.positions, ctl.placement
    positions.epoch, positions.next_pipeline = state["epoch"], state["next_pipeline"]
    positions.failovers.extend(Failover(**f) for f in state.get("failovers", []))
    ctl.started = True
    timeout_s = ctl.settings.heartbeat.timeout_s
    # half built, or half shut down, when the controller died
    await asyncio.gather(*(placement.discard(name) for name in state.get("unsettled", [])))
    standbys = state["standbys"]
    slots = list(state["slots"].items())
    found = await asyncio.gather(*(placement.attach(name, timeout_s) for name in standbys),
                                 *(placement.attach(saved["pipeline"], timeout_s) for _, saved in slots))
    gone = []
    for name, got in zip(standbys, found[: len(standbys)], strict=True):
        if isinstance(got, tuple):
            positions.add_standby(*got)
            ctl.monitor.watch(*got)
        else:
            gone.append(name)
    lost = []
    for (sid, saved), got in zip(slots, found[len(standbys):], strict=True):
        if isinstance(got, tuple):
            pipeline, stages = got
            positions.slots[sid] = Slot(pipeline, saved["epoch"], stages)
            positions.pipelines[pipeline.name], positions.stages[pipeline.name] = pipeline, stages
            ctl.monitor.watch(pipeline, stages)
        else:
            positions.slots[sid] = Slot(None, saved["epoch"])
            if saved["pipeline"] is not None:
                lost.append((sid, saved["pipeline"], got))
                gone.append(saved["pipeline"])
    await asyncio.gather(*(placement.discard(name) for name in gone))
    for sid, name, why in lost:
        take_over(ctl, sid, name, 0, f"pipeline gone when the controller restarted: {why}", 0.0)
    ctl.publish()
    missing = len(positions.empty_slots()) + max(0, ctl.settings.standby - len(positions.standbys))
    log.warning("controller restarted: recovered epoch %d, %d positions, %d lost, %d standbys gone, %d to rebuild",
                positions.epoch, len(positions.slots), len(lost), len(gone) - len(lost), missing)
    for _ in range(missing):
        ctl.spawn(rebuild(ctl))


async def rebuild(ctl) -> None:
    """Build a pipeline until one starts; it fills the first empty position, else becomes a standby."""
    positions, backoff = ctl.positions, ctl.settings.rebuild_backoff_s
    while not ctl.stopped:
        name = positions.new_name()
        ctl.save()
        try:
            pipeline, stages = await ctl.placement.build(name, positions.nodes_in_use())
            break
        except Exception as exc:  # noqa: BLE001 — try again: a node may come back
            log.warning("rebuilding %s failed (%s); retrying in %.0fs", name, exc, backoff)
            positions.unsettled.discard(name)
            ctl.save()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 60.0)
    else:
        return
    if ctl.stopped:
        await ctl.placement.retire(pipeline)
        return
    slot = positions.fill(pipeline, stages, time.time())
    ctl.monitor.watch(pipeline, stages)
    if slot is not None:
        ctl.registry.replica_up(slot, stages[0].address if stages else "")
    ctl.publish()


def take_over(ctl, slot: str | None, pipeline: str, stage: int, reason: str, silent_s: float) -> Failover:
    """Hand a dead pipeline's ring position to a standby (or leave it for the rebuild); record it."""
    record = ctl.positions.take_over(slot, pipeline, stage, reason, silent_s, time.time())
    m = metrics()
    if slot is not None:
        ctl.registry.replica_down(slot)
        if record.action == "standby promoted":
            stages = ctl.positions.slots[slot].stages
            ctl.registry.replica_up(slot, stages[0].address if stages else "")
        m.takeovers.inc(tags={"action": record.action})
    m.failures_detected.inc(tags={"replica": slot or "standby", "kind": _kind(reason)})
    m.detection_latency_s.observe(silent_s)
    log.warning("%s (%s) stage %d dead after %.2fs silent: %s → %s",
                slot or "standby", pipeline, stage, silent_s, reason, record.action)
    return record

def _kind(reason: str) -> str:
    if reason.startswith(("no heartbeat", "pipeline stalled")):
        return "hung"
    if "actor died" in reason:
        return "crashed"
    return "broken"
