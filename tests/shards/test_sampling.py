"""Sampling: greedy is argmax; seeded draws depend on (seed, position) only; top-k and top-p
never leave their brute-force support; the draws follow softmax(logits / T)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shards.sampling import SamplingParams, sample, sample_row, uniform

# Logits at least 0.01 apart keep "the k largest" and "the nucleus" unambiguous (logits
# a subnormal apart would tie after softmax).
logit_rows = st.lists(st.integers(-800, 800), min_size=2, max_size=40, unique=True).map(
    lambda xs: torch.tensor(xs, dtype=torch.float32) / 100
)
temperatures = st.floats(0.05, 3.0)
seeds = st.integers(0, 2**63 - 1)
positions = st.integers(0, 100_000)


def softmax(logits: list[float], temperature: float) -> list[float]:
    scaled = [x / temperature for x in logits]
    top = max(scaled)
    weights = [math.exp(x - top) for x in scaled]
    total = sum(weights)
    return [w / total for w in weights]


def by_descending_prob(probs: list[float]) -> list[int]:
    return sorted(range(len(probs)), key=lambda i: -probs[i])


def nucleus(probs: list[float], top_p: float) -> set[int]:
    """The smallest set of most likely tokens whose mass reaches top_p."""
    kept, mass = set(), 0.0
    for i in by_descending_prob(probs):
        kept.add(i)
        mass += probs[i]
        if mass >= top_p:
            break
    return kept


@settings(max_examples=200, deadline=None)
@given(logit_rows)
def test_greedy_is_argmax(logits: torch.Tensor) -> None:
    values = logits.tolist()
    best = max(range(len(values)), key=lambda i: values[i])
    assert sample_row(logits, SamplingParams(), position=5) == best
    # temperature 0 wins over every other knob
    assert (
        sample_row(logits, SamplingParams(temperature=0.0, top_k=3, top_p=0.5, seed=9), 5) == best
    )


def test_greedy_batch_is_rowwise_argmax() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=gen)
    expected = [max(range(50), key=lambda j, row=row: row[j]) for row in logits.tolist()]
    assert sample(logits, [SamplingParams()] * 6, list(range(6))) == expected


@settings(max_examples=100, deadline=None)
@given(logit_rows, temperatures, seeds, positions)
def test_top_k_of_one_is_greedy(
    logits: torch.Tensor, temperature: float, seed: int, position: int
) -> None:
    params = SamplingParams(temperature=temperature, top_k=1, seed=seed)
    assert sample_row(logits, params, position) == sample_row(logits, SamplingParams(), position)


@settings(max_examples=300, deadline=None)
@given(logit_rows, temperatures, st.integers(1, 45), seeds, positions)
def test_top_k_stays_in_the_k_largest(
    logits: torch.Tensor, temperature: float, k: int, seed: int, position: int
) -> None:
    values = logits.tolist()
    largest = set(sorted(range(len(values)), key=lambda i: -values[i])[:k])
    token = sample_row(
        logits, SamplingParams(temperature=temperature, top_k=k, seed=seed), position
    )
    assert token in largest


@settings(max_examples=300, deadline=None)
@given(logit_rows, temperatures, st.floats(0.01, 0.99), seeds, positions)
def test_top_p_stays_in_the_minimal_nucleus(
    logits: torch.Tensor, temperature: float, top_p: float, seed: int, position: int
) -> None:
    probs = softmax(logits.tolist(), temperature)
    # 1e-9 of slack only matters when a prefix's mass is within rounding of top_p.
    allowed = nucleus(probs, top_p + 1e-9)
    token = sample_row(
        logits, SamplingParams(temperature=temperature, top_p=top_p, seed=seed), position
    )
    assert token in allowed


def test_top_p_reaches_every_token_of_the_nucleus() -> None:
    probs = [0.35, 0.25, 0.2, 0.1, 0.06, 0.04]
    logits = torch.tensor([math.log(p) for p in probs])
    params = [SamplingParams(temperature=1.0, top_p=0.75, seed=s) for s in range(400)]
    drawn = {sample_row(logits, p, position=3) for p in params}
    assert drawn == nucleus(probs, 0.75)


def test_top_k_then_top_p_follows_the_transformers_convention() -> None:
    # transformers (TopKLogitsWarper then TopPLogitsWarper), like vLLM, applies top-p to the
    # distribution renormalised over the top k. Here the top 2 of [0.5, 0.3, 0.2] renormalise
    # to [0.625, 0.375], so with top_p=0.6 only the most likely token may ever be drawn.
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    probs = [0.5, 0.3, 0.2]
    logits = torch.tensor([math.log(p) for p in probs])
    warped = TopPLogitsWarper(top_p=0.6)(
        None, TopKLogitsWarper(top_k=2)(None, logits[None].clone())
    )
    allowed = set(torch.nonzero(torch.isfinite(warped[0])).flatten().tolist())
    assert allowed == {0}
    drawn = {
        sample_row(logits, SamplingParams(temperature=1.0, top_k=2, top_p=0.6, seed=s), 0)
        for s in range(200)
    }
    assert drawn <= allowed, f"drew {sorted(drawn)}; transformers allows only {sorted(allowed)}"


def test_seeded_draw_depends_only_on_seed_and_position() -> None:
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(8, 64, generator=gen) * 2
    params = [
        SamplingParams(temperature=0.9, top_k=20 * (i % 2), top_p=1.0 - 0.1 * (i % 3), seed=100 + i)
        for i in range(8)
    ]
    # row 5 is greedy: a mixed batch still samples every other row
    params[5] = SamplingParams()
    pos = [3, 17, 17, 250, 0, 9, 4, 1000]

    alone = [sample(rows[i : i + 1], [params[i]], [pos[i]])[0] for i in range(8)]
    assert sample(rows, params, pos) == alone

    order = list(range(8))
    for shuffle_seed in range(3):
        random.Random(shuffle_seed).shuffle(order)
        shuffled = sample(rows[order], [params[i] for i in order], [pos[i] for i in order])
        assert shuffled == [alone[i] for i in order]
    # and as part of a bigger batch with unrelated rows around it
    noise = torch.randn(3, 64, generator=gen)
    bigger = sample(
        torch.cat([noise, rows[2:3], noise]),
        [SamplingParams(temperature=1.0, seed=7)] * 3
        + [params[2]]
        + [SamplingParams(temperature=1.0, seed=8)] * 3,
        [1, 2, 3, pos[2], 4, 5, 6],
    )
    assert bigger[3] == alone[2]


def test_seeds_and_positions_change_the_draw() -> None:
    logits = torch.zeros(100)  # uniform: any fixed draw would show up as one token
    by_seed = {sample_row(logits, SamplingParams(temperature=1.0, seed=s), 7) for s in range(50)}
    by_position = {
        sample_row(logits, SamplingParams(temperature=1.0, seed=3), t) for t in range(50)
    }
    assert len(by_seed) >= 25 and len(by_position) >= 25


def chi_square(counts: list[int], probs: list[float]) -> float:
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs, strict=True))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("vary", ["seed", "position"])
def test_draws_follow_the_tempered_softmax(temperature: float, vary: str) -> None:
    logits = [1.2, 0.4, -0.3, 0.0, 0.9, -1.0]
    probs = softmax(logits, temperature)
    n = 4000
    counts = [0] * len(logits)
    row = torch.tensor(logits)
    for i in range(n):
        seed, position = (i, 11) if vary == "seed" else (5, i)
        counts[sample_row(row, SamplingParams(temperature=temperature, seed=seed), position)] += 1
    # 5 degrees of freedom: P(chi2 > 35) is about 1.5e-6; the seeds are fixed, so no flakes.
    assert chi_square(counts, probs) < 35, (counts, [round(n * p) for p in probs])


def test_top_k_draws_follow_the_renormalised_top_k() -> None:
    logits = [1.2, 0.4, -0.3, 0.0, 0.9, -1.0]
    k = 3
    top = sorted(range(len(logits)), key=lambda i: -logits[i])[:k]
    probs = softmax([logits[i] for i in top], 1.0)
    counts = dict.fromkeys(top, 0)
    row = torch.tensor(logits)
    for seed in range(3000):
        counts[sample_row(row, SamplingParams(temperature=1.0, top_k=k, seed=seed), 2)] += 1
    assert chi_square([counts[i] for i in top], probs) < 30


@settings(max_examples=500, deadline=None)
@given(st.integers(-(2**70), 2**70), st.integers(0, 2**64 + 5))
def test_uniform_is_in_unit_interval_and_deterministic(seed: int, position: int) -> None:
    u = uniform(seed, position)
    assert isinstance(u, float)
    assert 0.0 <= u < 1.0
    assert uniform(seed, position) == u


def test_uniform_is_spread_over_the_interval() -> None:
    values = [uniform(seed, position) for seed in range(40) for position in range(50)]
    assert len(set(values)) == len(values)
    bins = [0] * 10
    for u in values:
        bins[int(u * 10)] += 1
    assert chi_square(bins, [0.1] * 10) < 40
    assert abs(sum(values) / len(values) - 0.5) < 0.03


@pytest.mark.parametrize("top_k", [0, 1500])
def test_a_wide_nucleus_follows_the_renormalised_softmax(top_k: int) -> None:
    """A nucleus of hundreds of tokens in a 2,000-token vocabulary (wider than the first
    candidates the sampler looks at): draws stay in the brute-force nucleus and follow its
    renormalised probabilities, checked over 8 bins of tokens by rank."""
    gen = torch.Generator().manual_seed(3)
    row = torch.randn(2000, generator=gen) * 0.8
    logits = row.tolist()
    top_p = 0.8
    if top_k:
        cut = sorted(range(len(logits)), key=lambda i: -logits[i])[:top_k]
        probs = dict(zip(cut, softmax([logits[i] for i in cut], 1.0), strict=True))
    else:
        probs = dict(enumerate(softmax(logits, 1.0)))
    ids = sorted(probs, key=lambda i: -probs[i])
    kept = nucleus([probs[i] for i in ids], top_p)
    support = [ids[r] for r in sorted(kept)]
    assert len(support) > 300  # far beyond the first 64 candidates
    mass = sum(probs[i] for i in support)
    bins = 8
    bin_of = {tok: r * bins // len(support) for r, tok in enumerate(support)}
    expected = [0.0] * bins
    for tok in support:
        expected[bin_of[tok]] += probs[tok] / mass
    counts = [0] * bins
    n = 3000
    for t in range(n):
        token = sample_row(row, SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, seed=21), t)
        assert token in bin_of, f"token {token} is outside the nucleus"
        counts[bin_of[token]] += 1
    # 7 degrees of freedom: P(chi2 > 30) is about 1e-4; the seed is fixed, so no flakes.
    assert chi_square(counts, expected) < 30, (counts, [round(n * p) for p in expected])
