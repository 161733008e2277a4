"""The report: markdown tables, the targets' verdicts, the machine, and `results/shards.md` itself.

Hand-written findings about a run live in `results/shards-findings.md`, which this never writes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from bench._generation import Row
from bench._results import describe, table

MiB = 1 << 20
# libgomp reads these when torch loads; Ray workers inherit them from the driver. They decide whether
# idle OpenMP threads spin or sleep, which on a shared machine decides more than the code does.
OMP_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def generation_table(rows: list[Row]) -> str:
    return table(
        [
            "system",
            "B",
            "TTFT ms",
            "TTFT ms, last request",
            "TPOT ms",
            "decode tok/s",
            "e2e tok/s",
            "other procs, cores",
            "tokens = transformers",
        ],
        [
            [
                r.system,
                r.batch,
                f"{r.ttft_ms:.0f}",
                f"{r.ttft_last_ms:.0f}",
                f"{r.tpot_ms:.1f}",
                f"{r.decode_tok_s:.1f}",
                f"{r.e2e_tok_s:.1f}",
                f"{r.foreign_cores:.2f}",
                r.same_as_transformers,
            ]
            for r in rows
        ],
    )


def hop_table(hops: list[dict]) -> str:
    return table(
        ["path", "payload", "round trip, median µs", "p90 µs", "samples", "other procs, cores"],
        [
            [
                h["path"],
                f"{h['bytes'] // 1024} KiB",
                f"{h['median_us']:.0f}",
                f"{h['p90_us']:.0f}",
                h["samples"],
                f"{h['foreign_cores']:.2f}",
            ]
            for h in hops
        ],
    )


def memory_table(memory: list[dict]) -> str:
    def mib(x: int) -> str:
        return f"{x / MiB:.1f}"

    return table(
        [
            "replica",
            "stage",
            "planned weights MiB",
            "planned KV MiB",
            "load() RSS delta MiB (start() report)",
            "RSS after start − bare MiB",
            "RSS after bench − bare MiB",
            "… checkpoint mmap resident MiB",
            "… anonymous MiB",
            "after bench / planned",
        ],
        [
            [
                m["replica"],
                m["stage"],
                mib(m["planned_weight_bytes"]),
                mib(m["planned_kv_bytes"]),
                mib(m["load_rss_delta_bytes"]),
                mib(m["start_minus_bare_bytes"]),
                mib(m["bench_minus_bare_bytes"]),
                mib(m["checkpoint_resident_bytes"]),
                mib(m["anon_minus_bare_bytes"]),
                f"{m['ratio']:.2f}×",
            ]
            for m in memory
        ],
    )


def targets(rows: list[Row], memory: list[dict]) -> list[list[str]]:
    by = {(r.system, r.batch): r for r in rows}

    def ratio(a: tuple[str, int], b: tuple[str, int], goal: float, what: str) -> list[str]:
        if a not in by or b not in by:
            return [what, f"≥ {goal}×", "not measured", "—"]
        x = by[a].decode_tok_s / by[b].decode_tok_s
        return [
            what,
            f"≥ {goal}×",
            f"{x:.2f}× ({by[a].decode_tok_s:.1f} / {by[b].decode_tok_s:.1f})",
            "met" if x >= goal else "MISSED",
        ]

    def first_token(a: tuple[str, int], b: tuple[str, int], what: str) -> list[str]:
        if a not in by or b not in by:
            return [what, "≤ 1.0×", "not measured", "—"]
        x = by[a].ttft_last_ms / by[b].ttft_last_ms
        return [what, "≤ 1.0×", f"{x:.2f}× ({by[a].ttft_last_ms:.0f} / {by[b].ttft_last_ms:.0f} ms)",
                "met" if x <= 1.0 else "MISSED"]

    worst = max(memory, key=lambda m: abs(m["ratio"] - 1))
    bf16 = ("transformers bf16", 8) in by
    if bf16:  # the precision's own target; the float32 ones are judged in a float32 run
        return [
            ratio(("replica S=1", 8), ("transformers", 8), 1.7,
                  "bf16 replica S=1 vs transformers float32, decode tok/s, B=8"),
            ratio(("replica S=1", 8), ("transformers bf16", 8), 1.0,
                  "bf16 replica S=1 vs transformers bf16, decode tok/s, B=8 (for reference)"),
        ]
    return [
        ratio(("replica S=1", 8), ("transformers", 8), 1.0, "S=1 vs transformers, decode tok/s, B=8"),
        ratio(("replica S=1", 32), ("transformers", 32), 1.0, "S=1 vs transformers, decode tok/s, B=32"),
        ratio(
            ("replica S=2", 32),
            ("in-process", 32),
            0.9,
            "S=2 vs one-process ceiling, decode tok/s, B=32",
        ),
        first_token(("replica S=1", 32), ("transformers", 32),
                    "S=1 last of 32 requests' first token vs transformers' batched one"),
        [
            "stage RSS after bench − bare stage, vs planned weights + KV",
            "within ±10%",
            f"worst {worst['ratio']:.2f}× ({worst['replica']} stage {worst['stage']})",
            "met" if all(abs(m["ratio"] - 1) <= 0.10 for m in memory) else "MISSED",
        ],
    ]


def machine() -> dict:
    import ray
    import transformers

    info = describe(
        ["shards"], torch=torch.__version__, transformers=transformers.__version__, ray=ray.__version__
    )
    return {**info, "omp_env": {k: os.environ[k] for k in OMP_ENV if k in os.environ}}


def write_report(path: Path, r: dict) -> None:
    info, model = r["machine"], r["model"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""# shards: ringpipe replicas vs transformers and the one-process ceiling

Written by `bench/shards.py` in {r["elapsed_s"] / 60:.1f} min:

```
{r["command"]}
```

**Machine:** {info["cpu"]}, {info["cores"]} cores, {info["ram_gib"]} GiB RAM, no GPU; Python {info["python"]},
torch {info["torch"]}, transformers {info["transformers"]}, Ray {info["ray"]}; commit {info["commit"]}.
OpenMP settings: {", ".join(f"{k}={v}" for k, v in info["omp_env"].items()) or "none (libgomp defaults)"}.
The machine is shared: "other procs, cores" is the CPU other processes used during each measurement
(of {info["cores"]} cores).{r["contention_note"]}

**Model:** random Llama-shaped checkpoint, {model["params"] / 1e6:.1f}M parameters, {model.get("dtype", "float32")} ({model["spec"]}).
{model["prompt_len"]}-token random prompts, distinct per request and the same for every system; greedy, eos off,
{model["new_tokens"]} new tokens each; KV slots = largest batch, max_seq_len = prompt + new tokens.
Torch threads: transformers and in-process 2; a replica stage cores // stages (S=1: 2, S=2: 1 each).

## Targets

{table(["target", "goal", "measured", "verdict"], r["targets"])}

## Generation (medians of {model["repeats"]} repeats)

{generation_table(r["rows"])}

## Activation hop between two stage processes

{hop_table(r["hop"])}

## Memory per stage

{memory_table(r["memory"])}

## How to read this

- Every request of a batch is submitted at once. **TTFT** is the median over the batch of the time to its
  first token; the next column is the slowest request's. transformers prefills the batch in one forward,
  so its requests share one TTFT. A replica packs the prompts waiting into micro-batches of up to
  `prefill_chunk` tokens (the `--prefill-chunk` above), beside the decode steps of the requests already
  admitted, so TTFT grows along the batch in steps; the in-process ceiling prefills one prompt at a time.
- **TPOT**: median over the batch of (last − first token) / (new tokens − 1), what one stream sees.
- **decode tok/s** = B·(new − 1) / (T(new) − T(1)), T(n) the time to finish a batch asking for n tokens:
  prefill cancels out whatever the schedule. The targets use it. **e2e tok/s** = B·new / T(new).
- Repeats run round-robin over the four systems, after one warm-up of each, so background load is shared.
  "tokens = transformers" counts requests whose greedy tokens equal transformers' (batched fp32 arithmetic
  may flip a near-tie).
- **Hop**: round trip, payload both ways, between two Ray actors on this machine. Gloo is plain
  `torch.distributed` send/recv over 127.0.0.1 (`GLOO_SOCKET_IFNAME=lo`); "ray.put + ref" puts the tensor and
  passes the ref to the peer, whose method returns the tensor; "actor call arg" passes the tensor itself.
  Medians after a tenth of the trips as warm-up.
- **Memory**: "planned" is `plan_stages` (shapes only). "bare" is a stage actor built with the same spec and plan
  that never connected or loaded, so "RSS − bare" is what connecting, loading and serving added. The target is
  judged after the benchmark: weights are mapped from the safetensors file and only become resident (as
  file-backed pages of the checkpoint, "checkpoint mmap resident") when a forward first touches them, so right
  after start they are mostly absent — and so is most of them in `loaded_rss_bytes`, which `start()` reports.
  Embedding rows no prompt used stay unread. The anonymous part holds the KV slots (zeroed, so resident),
  thread pools and allocator caches.
""")
