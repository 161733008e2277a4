"""What sampling one row costs: ours (the top candidates only) against a float64 sort of the whole
vocabulary per row (how ringpipe sampled before), side by side in one run.

    .venv/bin/python bench/sampling.py          # seconds

Logits are random normal × 3 (a peaked distribution, as a trained model's). Each setting draws 300
tokens (positions 0..299, one seed) per vocabulary size; the table gives the median µs per row and
the ratio. Writes `results/sampling.md`.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
sys.path[:] = [str(_BENCH.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _BENCH]

import torch  # noqa: E402

from bench._results import describe, table  # noqa: E402
from shards.sampling import SamplingParams, sample_row, uniform  # noqa: E402


def full_sort(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    """The previous sampler: softmax and a stable float64 sort of every token, then the cut."""
    scores = logits.double() / params.temperature
    probs, order = torch.sort(torch.softmax(scores, dim=-1), descending=True, stable=True)
    if params.top_k > 0:
        probs = probs[: params.top_k]
        probs = probs / probs.sum()
    if params.top_p < 1.0:
        cum = torch.cumsum(probs, dim=-1)
        keep = int(torch.searchsorted(cum, torch.tensor([params.top_p], dtype=cum.dtype))) + 1
        probs = probs[: min(keep, probs.numel())]
    cum = torch.cumsum(probs, dim=-1)
    target = uniform(params.seed, position) * float(cum[-1])
    index = int(torch.searchsorted(cum, torch.tensor([target], dtype=cum.dtype), right=True))
    return int(order[min(index, probs.numel() - 1)])


def per_row_us(fn, row: torch.Tensor, params: SamplingParams, n: int = 300) -> float:
    times = []
    for t in range(n):
        start = time.perf_counter()
        fn(row, params, t)
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    settings = {
        "temperature 1.0": SamplingParams(1.0, 0, 1.0, 7),
        "top-k 50": SamplingParams(0.8, 50, 1.0, 7),
        "top-p 0.9": SamplingParams(1.0, 0, 0.9, 7),
        "top-k 50 + top-p 0.9": SamplingParams(0.8, 50, 0.9, 7),
    }
    rows = []
    for vocab in (16_000, 32_000, 128_000):
        row = torch.randn(vocab, generator=torch.Generator().manual_seed(vocab)) * 3
        for name, params in settings.items():
            old, new = per_row_us(full_sort, row, params), per_row_us(sample_row, row, params)
            rows.append([f"{vocab:,}", name, f"{old:.0f}", f"{new:.0f}", f"{old / new:.1f}×"])
    info = describe(["shards"], torch=torch.__version__)
    text = f"""# Sampling one row: top candidates against a whole-vocabulary sort

Written by `bench/sampling.py`:

```
.venv/bin/python bench/sampling.py
```

**Machine:** {info["cpu"]}, {info["cores"]} cores; Python {info["python"]}, torch {info["torch"]}; commit
{info["commit"]}. One torch thread; median over 300 draws of one row (random normal × 3 logits).

{table(["vocabulary", "setting", "whole sort, µs", "ours, µs", "speed-up"], rows)}

Ours: top-k takes `torch.topk(k)`; top-p takes the 64 likeliest tokens and doubles while their mass is
short of `top_p`; plain temperature sampling sorts nothing (the inverse CDF in token-id order). Greedy
is an argmax in both.
"""
    out = _BENCH / "results" / "sampling.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
