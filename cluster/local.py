"""Joining a Ray cluster, or starting the embedded local one on loopback.

Ray rewrites 127.0.0.1 to the machine's outward address unless
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set before Ray is imported; the local
mode sets it, so an embedded cluster listens on 127.0.0.1 only.
"""

from __future__ import annotations

import os

LOOPBACK = "127.0.0.1"


def init_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = True) -> str:
    """Connect to `address` (or RAY_ADDRESS) when given, else start a local Ray on 127.0.0.1.

    Returns "joined" or "local"; a Ray already initialised in this process is reused.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return "joined"
    if address:
        ray.init(address=address, log_to_driver=not quiet)
        return "joined"
    cores = os.cpu_count() or 1
    ray.init(
        num_cpus=num_cpus or max(cores, 16),  # logical CPUs: stages share cores, torch threads are set per stage
        include_dashboard=False,
        _node_ip_address=LOOPBACK,
        log_to_driver=not quiet,
        configure_logging=not quiet,
    )
    return "local"
