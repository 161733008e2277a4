"""Fixtures shared by every test package."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from shards.create import RandomModelSpec, create_random_checkpoint


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`make_checkpoint(arch, **spec_overrides) -> Path`: a random-weight HF checkpoint.

    Built once per distinct arguments for the whole session, so callers must treat the
    directory as read-only (copy it first to damage it). `max_shard_bytes` is passed to
    `create_random_checkpoint`; every other keyword overrides a `RandomModelSpec` field.
    """
    built: dict[tuple, Path] = {}

    def make(arch: str, max_shard_bytes: int | None = None, **spec_overrides: object) -> Path:
        key = (arch, max_shard_bytes, tuple(sorted(spec_overrides.items())))
        if key not in built:
            spec = RandomModelSpec(arch=arch, **spec_overrides)
            directory = tmp_path_factory.mktemp(f"{arch}-checkpoint")
            built[key] = create_random_checkpoint(directory, spec, max_shard_bytes)
        return built[key]

    return make
