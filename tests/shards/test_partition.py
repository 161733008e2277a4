"""Cutting layers into stages: optimal balance (against brute force) and exact memory plans."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from shards.checkpoint import load_stage, read_model_args
from shards.errors import CheckpointError
from shards.kv import StageCache
from shards.partition import balanced_layers, plan_stages


def compositions(n: int, parts: int):
    """Every way to write n as an ordered sum of `parts` positive integers."""
    for cuts in itertools.combinations(range(1, n), parts - 1):
        bounds = (0, *cuts, n)
        yield [b - a for a, b in itertools.pairwise(bounds)]


def max_stage_cost(counts: list[int], layer_cost: int, first_extra: int, last_extra: int) -> int:
    costs = [c * layer_cost for c in counts]
    costs[0] += first_extra
    costs[-1] += last_extra
    return max(costs)


@st.composite
def partition_problems(draw):
    n_layers = draw(st.integers(1, 9))
    n_stages = draw(st.integers(1, n_layers))
    layer_cost = draw(st.integers(0, 60))
    first_extra = draw(st.integers(0, 300))
    last_extra = draw(st.integers(0, 300))
    return layer_cost, n_layers, first_extra, last_extra, n_stages


@settings(max_examples=300, deadline=None)
@given(partition_problems())
def test_balanced_layers_is_optimal(problem) -> None:
    layer_cost, n_layers, first_extra, last_extra, n_stages = problem
    counts = balanced_layers(layer_cost, n_layers, first_extra, last_extra, n_stages)

    assert len(counts) == n_stages
    assert sum(counts) == n_layers
    assert all(c >= 1 for c in counts)
    optimum = min(
        max_stage_cost(c, layer_cost, first_extra, last_extra)
        for c in compositions(n_layers, n_stages)
    )
    assert max_stage_cost(counts, layer_cost, first_extra, last_extra) == optimum


@pytest.mark.parametrize(("n_layers", "n_stages"), [(3, 4), (1, 2), (4, 0), (4, -1)])
def test_balanced_layers_rejects_impossible_cuts(n_layers: int, n_stages: int) -> None:
    with pytest.raises(CheckpointError, match="stages"):
        balanced_layers(10, n_layers, 5, 5, n_stages)


CHECKPOINTS = {
    "llama": dict(arch="llama", layers=5),
    "llama-tied": dict(arch="llama", layers=5, tie_word_embeddings=True),
    "qwen2-tied": dict(arch="qwen2", layers=5, tie_word_embeddings=True),
    "glm": dict(arch="glm", layers=5),
}


@pytest.fixture(params=list(CHECKPOINTS), ids=list(CHECKPOINTS))
def model_dir(request: pytest.FixtureRequest, make_checkpoint) -> Path:
    overrides = dict(CHECKPOINTS[request.param])
    return make_checkpoint(overrides.pop("arch"), vocab=300, **overrides)


def file_param_counts(model_dir: Path) -> tuple[dict[int, int], int, int]:
    """(params per layer, embedding params, norm+head params) read from the safetensors file."""
    per_layer: dict[int, int] = {}
    sizes: dict[str, int] = {}
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        for name in f.keys():
            numel = 1
            for dim in f.get_slice(name).get_shape():
                numel *= dim
            sizes[name] = numel
            layer = re.match(r"model\.layers\.(\d+)\.", name)
            if layer:
                per_layer[int(layer.group(1))] = per_layer.get(int(layer.group(1)), 0) + numel
    embed = sizes["model.embed_tokens.weight"]
    head = sizes.get("lm_head.weight", embed) + sizes["model.norm.weight"]  # a tied head is a copy
    return per_layer, embed, head


@pytest.mark.parametrize("n_stages", [1, 2, 3, 4, 5])
def test_plan_covers_layers_contiguously(model_dir: Path, n_stages: int) -> None:
    args = read_model_args(model_dir)
    plans = plan_stages(args, n_stages, n_slots=2, max_seq_len=16, dtype=torch.float32)

    assert [p.index for p in plans] == list(range(n_stages))
    assert plans[0].layer_start == 0 and plans[-1].layer_end == args.num_layers
    for before, after in itertools.pairwise(plans):
        assert before.layer_end == after.layer_start
    assert all(p.layer_end > p.layer_start for p in plans)
    assert [p.first for p in plans] == [i == 0 for i in range(n_stages)]
    assert [p.last for p in plans] == [i == n_stages - 1 for i in range(n_stages)]


@pytest.mark.parametrize("n_stages", [1, 2, 3, 4, 5])
def test_plan_is_balanced_by_the_parameters_each_token_multiplies(model_dir: Path, n_stages: int) -> None:
    """A stage's params are all of its tensors; its compute per token is its matmuls' weights: its
    layers', and the LM head's on the last stage (the embedding is a lookup). The plan minimises
    the largest stage's compute, checked against every possible cut."""
    args = read_model_args(model_dir)
    plans = plan_stages(args, n_stages, n_slots=2, max_seq_len=16, dtype=torch.float32)
    per_layer, embed, head = file_param_counts(model_dir)

    def stage_params(start: int, end: int, first: bool, last: bool) -> int:
        return (
            sum(per_layer[i] for i in range(start, end))
            + (embed if first else 0)
            + (head if last else 0)
        )

    def stage_compute(start: int, end: int, last: bool) -> int:
        return sum(per_layer[i] for i in range(start, end)) + (head if last else 0)

    for p in plans:
        assert p.params == stage_params(p.layer_start, p.layer_end, p.first, p.last)

    def worst(counts: list[int]) -> int:
        bounds = list(itertools.accumulate(counts, initial=0))
        return max(stage_compute(a, b, i == n_stages - 1) for i, (a, b) in enumerate(itertools.pairwise(bounds)))

    optimum = min(worst(c) for c in compositions(args.num_layers, n_stages))
    assert max(stage_compute(p.layer_start, p.layer_end, p.last) for p in plans) == optimum


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n_stages", [1, 2, 3])
def test_plan_bytes_equal_the_loaded_stage_and_its_cache(
    model_dir: Path, n_stages: int, dtype: torch.dtype
) -> None:
    args = read_model_args(model_dir)
    n_slots, max_seq_len = 3, 24
    plans = plan_stages(args, n_stages, n_slots=n_slots, max_seq_len=max_seq_len, dtype=dtype)
    for p in plans:
        stage = load_stage(
            model_dir, args, p.layer_start, p.layer_end, p.first, p.last, dtype=dtype
        )
        weights = sum(t.numel() * t.element_size() for t in stage.parameters())
        assert p.weight_bytes == weights

        cache = StageCache(
            range(p.layer_start, p.layer_end),
            n_slots,
            max_seq_len,
            args.num_kv_heads,
            args.head_dim,
            dtype,
        )
        layers = [cache.layer(i) for i in range(p.layer_start, p.layer_end)]
        assert p.kv_bytes == sum(
            c.k.numel() * c.k.element_size() + c.v.numel() * c.v.element_size() for c in layers
        )
        assert p.total_bytes == weights + p.kv_bytes


@pytest.mark.parametrize("n_stages", [0, 6, 9])
def test_plan_rejects_impossible_stage_counts(make_checkpoint, n_stages: int) -> None:
    args = read_model_args(make_checkpoint("llama", layers=5, vocab=300))
    with pytest.raises(CheckpointError):
        plan_stages(args, n_stages, n_slots=2, max_seq_len=16, dtype=torch.float32)
