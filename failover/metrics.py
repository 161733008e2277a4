"""ringpipe's Prometheus metrics, exported through Ray's metrics agent (scrape each node's
metrics export port; Ray prefixes every name with `ray_`).

Metrics are created on first use inside the process that records them (a Ray
worker: the controller, a coordinator replica); `metrics()` is that process's set.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

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
    )
