"""Fixtures shared by every test package, among them the one local Ray cluster of the session."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on 127.0.0.1

from collections.abc import Callable
from pathlib import Path

import pytest

from shards.create import RandomModelSpec, create_random_checkpoint


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`make_checkpoint(arch, **spec_overrides) -> Path`: a random-weight HF checkpoint.

    Built once per distinct arguments for the whole session, so callers must treat the
    directory as read-only (copy it first to damage it). `max_shard_bytes` is passed to
    `create_random_checkpoint`, and so is `tokenizer` (True adds a tokenizer.json); every other keyword overrides a `RandomModelSpec` field.
    """
    built: dict[tuple, Path] = {}

    def make(arch: str, max_shard_bytes: int | None = None, tokenizer: bool = False, **spec_overrides: object) -> Path:
        key = (arch, max_shard_bytes, tokenizer, tuple(sorted(spec_overrides.items())))
        if key not in built:
            spec = RandomModelSpec(arch=arch, **spec_overrides)
            directory = tmp_path_factory.mktemp(f"{arch}-checkpoint")
            built[key] = create_random_checkpoint(directory, spec, max_shard_bytes, tokenizer)
        return built[key]

    return make


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster on 127.0.0.1, shared by every test that needs one."""
    import ray

    from cluster.local import init_ray

    init_ray(num_cpus=16)
    yield ray
    ray.shutdown()
