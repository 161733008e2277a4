"""Token sampling: greedy, temperature, top-k, top-p, reproducible from (seed, position).

The random draw for the token at absolute position t of a request comes from a
counter-based hash of (seed, t) alone — no generator state — so a request gets
the same tokens whatever batch it shares and whichever replica runs it, and a
request resumed after a failover continues exactly as it would have.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform(seed: int, position: int) -> float:
    """A float in [0, 1) that depends only on (seed, position)."""
    bits = _splitmix64(_splitmix64(seed & _MASK64) ^ (position & _MASK64))
    return (bits >> 11) / float(1 << 53)


_FIRST_CANDIDATES = 64  # top-p looks at this many of the likeliest tokens first, doubling while short


def sample_row(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    """Pick one token from logits [V] for the token at absolute position `position`.

    Only the candidates are ever sorted: the top k with top-k, else the likeliest tokens until
    their mass reaches top_p (64, doubled while short); plain temperature sampling sorts
    nothing. Probabilities are float64, normalised over the whole vocabulary.
    """
    if params.greedy:
        return int(torch.argmax(logits))
    scores = logits.double() / params.temperature
    u = uniform(params.seed, position)
    if params.top_k <= 0 and params.top_p >= 1.0:  # the inverse CDF over the vocabulary, in id order
        cum = torch.cumsum(torch.softmax(scores, dim=-1), dim=-1)
        index = int(torch.searchsorted(cum, torch.tensor([u * float(cum[-1])], dtype=cum.dtype), right=True))
        return min(index, scores.numel() - 1)
    vocab = scores.numel()
    log_total = torch.logsumexp(scores, dim=-1)
    k = min(params.top_k, vocab) if params.top_k > 0 else min(_FIRST_CANDIDATES, vocab)
    while True:
        top, order = torch.topk(scores, k, sorted=True)
        probs = torch.exp(top - log_total)
        if params.top_k > 0:
            # renormalise before top-p, as transformers' TopK-then-TopP warpers do
            probs = probs / probs.sum()
        if params.top_p >= 1.0 or params.top_k > 0 or k == vocab or float(probs.sum()) >= params.top_p:
            break
        k = min(2 * k, vocab)  # the nucleus is wider than the candidates so far
    if params.top_p < 1.0:
        cum = torch.cumsum(probs, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = int(torch.searchsorted(cum, torch.tensor([params.top_p], dtype=cum.dtype))) + 1
        probs = probs[: min(keep, probs.numel())]
    cum = torch.cumsum(probs, dim=-1)
    target = u * float(cum[-1])
    index = int(torch.searchsorted(cum, torch.tensor([target], dtype=cum.dtype), right=True))
    return int(order[min(index, probs.numel() - 1)])


def sample(logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> list[int]:
    """One token per row of logits [B, V]."""
    if all(p.greedy for p in params):
        return torch.argmax(logits, dim=-1).tolist()
    return [sample_row(row, p, t) for row, p, t in zip(logits, params, positions, strict=True)]
