"""Fixtures for tests on a real local Ray cluster (one per test session)."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on 127.0.0.1

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from cluster.local import init_ray

    init_ray(num_cpus=16)
    yield ray
    ray.shutdown()
