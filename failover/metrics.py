"""ringpipe's Prometheus metrics, exported through Ray's metrics agent (scrape each node's
metrics export port; Ray prefixes every name with `ray_`).

Metrics are created on first use inside the process that records them (a Ray
worker: the controller, a coordinator replica); `metrics()` is that process's set.
The README's Metrics section lists every one with its labels, and
`configs/grafana-ringpipe.json` plots them (a test checks it names only these).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from failover.membership import Membership
    from failover.positions import Positions

REPLICA_STATES = ("serving", "paused", "rebuilding")  # a ring position's, in `ringpipe_replica_state`
_LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


@dataclass(frozen=True)
class Metrics:
    failures_detected: object  # Counter {replica, kind}
    detection_latency_s: object  # Histogram: last sign of life to verdict
    takeovers: object  # Counter {action}: standby promoted | rebuilding
    ring_size: object  # Gauge: replicas taking new work
    members: object  # Gauge: replicas in the membership (paused ones included)
    resumed_requests: object  # Counter {reason}: a generation moved to another replica mid-way
    in_flight: object  # Gauge {replica}: this coordinator's requests on each replica
    queue_depth: object  # Gauge {replica}: requests waiting for a KV slot, from the head's heartbeats
    time_to_first_token_s: object  # Histogram
    time_per_output_token_s: object  # Histogram
    weight: object  # Gauge {replica}: the adaptive weight scaling its share of new work
    pings: object  # Counter {way}: heartbeat pings the controller sent, by datagram or Ray call
    requests: object  # Counter {status}: generation requests ended, by gRPC status code name (OK, ...)
    replica_state: object  # Gauge {replica, state}: 1 for the ring position's state now, 0 for the others
    standbys: object  # Gauge: warm standby pipelines waiting off the ring
    kv_slots_used: object  # Gauge {replica}: KV slots holding a running request, from the head's heartbeats
    kv_slots: object  # Gauge {replica}: KV slots of the replica (pipeline.max_batch)


@functools.cache
def metrics() -> Metrics:
    from ray.util.metrics import Counter, Gauge, Histogram

    return Metrics(
        failures_detected=Counter(
            "ringpipe_failures_detected", "pipeline replicas declared dead", tag_keys=("replica", "kind")
        ),
        detection_latency_s=Histogram(
            "ringpipe_detection_latency_seconds", "time from a stage's last sign of life to its death verdict",
            boundaries=_LATENCY_S,
        ),
        takeovers=Counter("ringpipe_takeovers", "ring positions taken over after a death", tag_keys=("action",)),
        ring_size=Gauge("ringpipe_ring_size", "pipeline replicas taking new work"),
        members=Gauge("ringpipe_members", "pipeline replicas in the membership, paused ones included"),
        resumed_requests=Counter(
            "ringpipe_resumed_requests", "generations resumed on another replica", tag_keys=("reason",)
        ),
        in_flight=Gauge("ringpipe_in_flight", "requests in flight per replica (per coordinator)", tag_keys=("replica",)),
        queue_depth=Gauge("ringpipe_queue_depth", "requests waiting for a KV slot per replica", tag_keys=("replica",)),
        time_to_first_token_s=Histogram(
            "ringpipe_time_to_first_token_seconds", "request received to first token sent", boundaries=_LATENCY_S
        ),
        time_per_output_token_s=Histogram(
            "ringpipe_time_per_output_token_seconds", "mean time between output tokens of a request",
            boundaries=[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0],
        ),
        weight=Gauge("ringpipe_replica_weight", "adaptive weight of each ring position (1 = normal share)",
                     tag_keys=("replica",)),
        pings=Counter("ringpipe_heartbeat_pings", "heartbeat pings the controller sent, by way (datagram or ray)",
                      tag_keys=("way",)),
        requests=Counter("ringpipe_requests", "generation requests ended, by gRPC status code name",
                         tag_keys=("status",)),
        replica_state=Gauge("ringpipe_replica_state", "1 for each ring position's state now (serving, paused, "
                            "rebuilding), 0 for the others", tag_keys=("replica", "state")),
        standbys=Gauge("ringpipe_standbys", "warm standby pipelines waiting off the ring"),
        kv_slots_used=Gauge("ringpipe_kv_slots_used", "KV slots holding a running request per replica",
                            tag_keys=("replica",)),
        kv_slots=Gauge("ringpipe_kv_slots", "KV slots per replica (pipeline.max_batch)", tag_keys=("replica",)),
    )


def count_request(status: str) -> None:
    """One generation request ended, with the gRPC status `status` (the code's name: OK, INVALID_ARGUMENT, …)."""
    metrics().requests.inc(tags={"status": status})


def record_membership(positions: Positions, membership: Membership) -> None:
    """The controller's view at a publish: ring size, members, each position's state, weight and KV
    slots, and the standbys."""
    m = metrics()
    m.ring_size.set(len(membership.ring_ids))
    m.members.set(len(membership.members))
    m.standbys.set(len(positions.standbys))
    for member in membership.members:
        m.weight.set(member.weight, tags={"replica": member.replica_id})
        m.kv_slots.set(member.max_batch, tags={"replica": member.replica_id})
    for sid, slot in positions.slots.items():
        now = "rebuilding" if slot.pipeline is None else "paused" if slot.pipeline.name in positions.paused else "serving"
        for state in REPLICA_STATES:
            m.replica_state.set(1.0 if state == now else 0.0, tags={"replica": sid, "state": state})
