"""The controller's rounds: the loop that drives the monitor and acts on what it finds.

`run` wakes at the next ping due or silence deadline (at most a tick away) and
each time: lets `Monitor.round` send the pings due and return its death verdicts,
starts `on_death` for each, applies the slow rule's pauses and the adaptive
weights (`pace`, which publishes a new membership when either changed) and,
once an interval, renews the registry's TTL checks and the ping metrics (`renew`).

`on_death` hands the dead pipeline's ring position to a standby
(`recovery.take_over`) and publishes at once; only then does it ask which stage was the culprit (a remote call that may
wait) and retire the dead pipeline. No verdict ever waits on a remote call.

These functions drive the controller (`failover.controller.Controller`) through
its `positions`, `monitor`, `placement` and `registry`, on its event loop: they
take no lock because nothing else runs while they do, and they never block.
"""

from __future__ import annotations

import asyncio
import logging
import time

from failover import recovery
from failover.heartbeat import Verdict
from failover.metrics import metrics, record_membership

log = logging.getLogger("ringpipe.controller")
MIN_SLEEP_S = 0.01  # the shortest sleep: events closer than this are taken together


GAUGE_REFRESH_S = 5.0  # well inside the ~30 s after which Ray's agent dropped a gauge not set again


async def run(ctl) -> None:
    hb = ctl.settings.heartbeat
    tick, renewed, woke = min(0.1, hb.interval_s / 4), 0.0, time.monotonic()
    # renew every heartbeat interval, or more often where the registry's TTL asks it
    renew_every = min(hb.interval_s, ctl.registry.renew_every_s or hb.interval_s)
    while not ctl.stopped:
        try:
            for verdict in ctl.monitor.round(lag_s=time.monotonic() - woke):
                ctl.spawn(on_death(ctl, verdict))
            pace(ctl)
            if time.monotonic() - renewed >= renew_every:
                renewed = time.monotonic()
                renew(ctl)
        except Exception:  # noqa: BLE001 — the monitor must outlive any one bad round
            log.exception("monitor round failed")
        # wake at the next ping due or silence deadline, at most a tick away (weights, pauses,
        # CPU samples and the registry's renewals keep the tick's pace)
        pause = min(tick, max(MIN_SLEEP_S, ctl.monitor.liveness.next_event() - time.monotonic()))
        woke = time.monotonic() + pause
        await asyncio.sleep(pause)


def pace(ctl) -> None:
    """Pauses and weights from what the monitor saw; publish when they change."""
    serving = ctl.positions.serving()
    paused = ctl.monitor.slow.paused(serving)
    for name in paused ^ ctl.positions.paused:
        why = ctl.monitor.slow.reason(name) if name in paused else "pause over"
        log.warning("%s %s: %s", name, "paused" if name in paused else "resumed", why)
    changed = ctl.positions.set_paused(paused)
    weights = ctl.monitor.weights
    for name in serving:
        cpu = ctl.monitor.cpu_of(name)
        if cpu is not None:
            weights.observe(name, cpu)
    for name in weights.changed() & set(serving):
        log.warning("%s weight %.2f: %s", name, weights.weight(name), weights.reason(name) or "back to normal")
    current = {n: (weights.weight(n), weights.reason(n)) for n in serving}
    if ctl.positions.set_weights({n: w for n, w in current.items() if w != (1.0, "")}):
        changed = True
    if changed:
        ctl.publish()


def renew(ctl) -> None:
    """Tell the registry which ring positions passed their heartbeats (Consul's TTL checks; queued,
    not waited on), add the pings sent since the last renewal to the metric, and set each position's
    queue depth and KV slots in use from its head's last heartbeat. The membership's gauges are set
    again too, every GAUGE_REFRESH_S: Ray's metrics agent drops a gauge its process has not set for a while (seen with Ray
    2.60: a gauge set only at a publish was missing from every third scrape or so)."""
    m = metrics()
    if time.monotonic() - ctl.gauges_recorded_at >= GAUGE_REFRESH_S:
        ctl.gauges_recorded_at = time.monotonic()
        record_membership(ctl.positions, ctl.membership_now)
    counts = ctl.monitor.ping_counts()
    for way, key in (("datagram", "datagrams"), ("ray", "ray_calls")):
        if counts[key] > ctl.pings_counted.get(key, 0):
            m.pings.inc(counts[key] - ctl.pings_counted.get(key, 0), tags={"way": way})
    ctl.pings_counted = counts
    for sid, slot in ctl.positions.slots.items():
        if slot.pipeline is None:
            continue
        name = slot.pipeline.name
        m.queue_depth.set(ctl.monitor.queue_depth.get(name, 0), tags={"replica": sid})
        m.kv_slots_used.set(ctl.monitor.kv_slots_used.get(name, 0), tags={"replica": sid})
        if name not in ctl.positions.paused:
            ctl.registry.replica_alive(sid)


async def on_death(ctl, verdict: Verdict) -> None:
    name, actor = verdict.key
    pipeline = ctl.positions.pipelines.get(name)
    if pipeline is None:  # its death was handled already (another stage's verdict came first)
        return
    slot = ctl.positions.slot_of(name)
    ctl.monitor.forget(name)
    ctl.positions.drop(pipeline)
    tp = ctl.spec.tensor_parallel
    record = recovery.take_over(ctl, slot, name, actor // tp, verdict.reason, verdict.silent_s)
    ctl.positions.set_paused(ctl.monitor.slow.paused(ctl.positions.serving()))  # a slow standby stays paused
    ctl.publish()
    ctl.spawn(recovery.rebuild(ctl))
    try:
        if verdict.reason.startswith(("stage failed", "pipeline stalled")):  # which peer was it? after the
            record.stage = await ctl.placement.culprit(pipeline, actor) // tp  # takeover, which does not wait
            ctl.save()
    finally:
        await retire(ctl, pipeline)


async def retire(ctl, pipeline) -> None:
    """Shut a pipeline down; until it is gone a restart would discard it."""
    ctl.positions.unsettled.add(pipeline.name)
    ctl.save()
    try:
        await ctl.placement.retire(pipeline)
    finally:
        ctl.positions.unsettled.discard(pipeline.name)
        ctl.save()

