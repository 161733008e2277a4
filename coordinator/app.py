"""The coordinator as a Serve application, and what Serve's gRPC proxy must register for it."""

from __future__ import annotations

from ray import serve

from coordinator.service import Coordinator, CoordinatorSettings

APP_NAME = "ringpipe"
# Serve's proxy calls the deployment method named like each RPC of these services, passing the
# request's bytes (coordinator/servicers.py: invalid bytes become INVALID_ARGUMENT, not UNKNOWN)
SERVICER_FUNCTIONS = [
    "coordinator.servicers.add_inference",
    "coordinator.servicers.add_admin",
    "coordinator.servicers.add_health",
]


def build_app(settings: CoordinatorSettings, replicas: int = 2, max_ongoing_requests: int = 1024,
              resources: dict | None = None):
    """The Serve application: `replicas` coordinators, each taking up to `max_ongoing_requests` calls
    (and needing the custom `resources`, if any: a node they must run on)."""
    deployment = serve.deployment(
        Coordinator,
        name="Coordinator",
        num_replicas=replicas,
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": 0, **({"resources": resources} if resources else {})},
    )
    return deployment.bind(settings)
