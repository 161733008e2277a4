"""Goodput under open-loop load: ringpipe against a static-batching transformers server.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python bench/load.py            # ~100M Llama, ~12 min
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python bench/load.py --quick    # smoke run

Requests arrive as a Poisson process at each rate in turn, for `--duration` seconds each; prompt
lengths (16–512) and output lengths (16–256) are log-uniform, and prompts random token ids, all
drawn from fixed seeds, so both systems get the same requests at the same offsets. Every request
is a greedy gRPC stream (`AsyncClient`, one event loop: an open-loop client never waits for one
request to send the next). The systems, one after the other on this machine:

- ringpipe: `ringpipe serve`, 2 replicas x 2 stages (defaults otherwise: continuous batching,
  packed prefill);
- static: `bench/_static_server.py`, transformers `generate` behind a gRPC server speaking the same
  `Inference.GenerateStream`, batching statically (up to `--static-batch` requests or
  `--static-wait-ms` after the first, then the batch runs to its longest request).

Per rate: output tokens/s, TTFT and TPOT p50/p99 (TPOT: a request's (last − first token) / (n − 1)),
and goodput: requests per second that finished within the SLO (TTFT ≤ 2 s and TPOT ≤ 250 ms). A
request still running `--drain` seconds after the last arrival is cut off and counts as missing
the SLO. Writes `results/load.md`, `.json` and `load.png`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [str(_BENCH.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _BENCH]

from bench._foreign_load import ForeignLoad  # noqa: E402
from bench._results import describe, table  # noqa: E402
from bench._serve import ROOT, free_port, served, stop  # noqa: E402
from shards.create import RandomModelSpec, create_random_checkpoint  # noqa: E402

TTFT_SLO_S, TPOT_SLO_S = 2.0, 0.250


@dataclass
class Outcome:
    arrival_s: float
    prompt_len: int
    new_tokens: int
    ttft_s: float = math.inf
    tpot_s: float = math.inf
    received: int = 0
    done: bool = False

    @property
    def in_slo(self) -> bool:
        return self.done and self.ttft_s <= TTFT_SLO_S and self.tpot_s <= TPOT_SLO_S


def workload(rate: float, duration_s: float, vocab: int, seed: int, max_prompt: int, max_new: int):
    """(arrival offset, prompt, new tokens) for one rate: the same for every system."""
    rng = random.Random(f"{seed}:{rate}")
    t, out = 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= duration_s:
            return out
        prompt_len = round(math.exp(rng.uniform(math.log(16), math.log(max_prompt))))
        new = round(math.exp(rng.uniform(math.log(16), math.log(max_new))))
        out.append((t, [rng.randrange(3, vocab) for _ in range(prompt_len)], new))


async def run_rate(target: str, requests: list, drain_s: float) -> tuple[list[Outcome], float]:
    from coordinator.client import AsyncClient

    outcomes = [Outcome(at, len(p), n) for at, p, n in requests]
    async with AsyncClient(target, retries=0) as client:
        t0 = time.perf_counter()

        async def one(i: int) -> None:
            at, prompt, n = requests[i]
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            sent = time.perf_counter()
            first = last = None
            o = outcomes[i]
            with contextlib.suppress(Exception):  # an error or a cut-off: the request misses the SLO
                async for piece in client.stream(prompt, n, ignore_eos=True, timeout_s=600):
                    now = time.perf_counter()
                    if piece.token_ids and first is None:
                        first = now
                        o.ttft_s = now - sent
                    if piece.token_ids:
                        last = now
                        o.received += len(piece.token_ids)
                    if piece.finish_reason:
                        o.done = o.received == n
                if first is not None and o.received > 1:
                    o.tpot_s = (last - first) / (o.received - 1)
                elif o.done:
                    o.tpot_s = 0.0

        tasks = [asyncio.ensure_future(one(i)) for i in range(len(requests))]
        last_arrival = requests[-1][0] if requests else 0.0
        done, pending = await asyncio.wait(tasks, timeout=last_arrival + drain_s)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        elapsed = time.perf_counter() - t0
    return outcomes, elapsed


def summarise(rate: float, outcomes: list[Outcome], elapsed_s: float, duration_s: float, foreign: float) -> dict:
    def pct(xs: list[float], q: float) -> float:
        """Nearest rank: a cut-off request (inf) is a value like any other, not a NaN."""
        if not xs:
            return math.inf
        ranked = sorted(xs)
        return ranked[max(0, math.ceil(q / 100 * len(ranked)) - 1)]

    ttft = [o.ttft_s for o in outcomes]
    tpot = [o.tpot_s for o in outcomes if o.new_tokens > 1]
    return {
        "rate": rate,
        "requests": len(outcomes),
        "finished": sum(o.done for o in outcomes),
        "tokens_s": sum(o.received for o in outcomes) / elapsed_s,
        "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
        "tpot_p50": pct(tpot, 50), "tpot_p99": pct(tpot, 99),
        "goodput": sum(o.in_slo for o in outcomes) / duration_s,
        "elapsed_s": elapsed_s,
        "slo_p99_met": pct(ttft, 99) <= TTFT_SLO_S and pct(tpot, 99) <= TPOT_SLO_S,
        "foreign_cores": foreign,
    }


@contextlib.contextmanager
def static_server(model_dir: Path, batch: int, wait_ms: float):
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench._static_server", str(model_dir), str(port), "--batch", str(batch),
         "--wait-ms", str(wait_ms)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while "serving" not in Path(log.name).read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"static server did not start:\n{Path(log.name).read_text()[-2000:]}")
            time.sleep(0.3)
        yield f"127.0.0.1:{port}"
    finally:
        stop(proc, 10)
        os.unlink(log.name)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="0.25,0.5,1,2", help="arrival rates, requests/s")
    p.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals per rate")
    p.add_argument("--drain", type=float, default=30.0, help="seconds after the last arrival before cutting off")
    p.add_argument("--max-prompt", type=int, default=512)
    p.add_argument("--max-new", type=int, default=256)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--static-batch", type=int, default=8)
    p.add_argument("--static-wait-ms", type=float, default=50.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--out", type=Path, default=_BENCH / "results" / "load.md")
    p.add_argument("--quick", action="store_true", help="tiny model, short rates: a smoke run")
    p.add_argument("--rewrite", action="store_true",
                   help="measure nothing: summarise the outcomes in the .json beside --out again and rewrite the report")
    args = p.parse_args(argv)
    args.spec = RandomModelSpec(arch="llama", layers=12, hidden=768, heads=12, kv_heads=4, vocab=16000,
                                intermediate=2048, seed=0)
    if args.quick:
        args.spec = RandomModelSpec(arch="llama", layers=2, hidden=64, heads=4, kv_heads=2, vocab=256, seed=0)
        args.rates, args.duration, args.drain, args.max_prompt, args.max_new = "2,4", 4.0, 10.0, 64, 32
    args.rate_list = [float(r) for r in args.rates.split(",")]
    return args


def rewrite(args: argparse.Namespace, argv: list[str] | None) -> None:
    saved = json.loads(args.out.with_suffix(".json").read_text())
    results = {
        name: [{**summarise(r["rate"], [Outcome(**o) for o in r["outcomes"]],
                            r.get("elapsed_s") or sum(o["received"] for o in r["outcomes"]) / r["tokens_s"], args.duration,
                            r["foreign_cores"]), "outcomes": r["outcomes"]} for r in rs]
        for name, rs in saved["results"].items()
    }
    write(args, results, saved["elapsed_s"], saved["command"].split("bench/load.py", 1)[1].split() if argv is None else argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.rewrite:
        return rewrite(args, argv)
    began = time.perf_counter()
    model_dir = args.model_dir or Path(tempfile.mkdtemp(prefix="ringpipe-bench-"))
    if not (model_dir / "config.json").is_file():
        create_random_checkpoint(model_dir, args.spec)
    loads = {r: workload(r, args.duration, args.spec.vocab, args.seed, args.max_prompt, args.max_new)
             for r in args.rate_list}
    config = {
        "model": {"path": str(model_dir)},
        "pipeline": {"stages": args.stages, "max_batch": 8, "max_seq_len": args.max_prompt + args.max_new + 8},
        "replicas": {"count": args.replicas},
    }
    results: dict[str, list[dict]] = {}

    def measure(name: str, target: str) -> None:
        asyncio.run(run_rate(target, loads[args.rate_list[0]][:4], 60))  # warm-up
        for rate in args.rate_list:
            foreign = ForeignLoad()
            outcomes, elapsed = asyncio.run(run_rate(target, loads[rate], args.drain))
            row = summarise(rate, outcomes, elapsed, args.duration, foreign.cores())
            results.setdefault(name, []).append({**row, "outcomes": [asdict(o) for o in outcomes]})
            print(f"  {name:<8} {rate:5.2f} req/s: {row['finished']}/{row['requests']} finished, "
                  f"{row['tokens_s']:6.1f} tok/s, TTFT p99 {row['ttft_p99']:6.2f} s, TPOT p99 "
                  f"{1e3 * row['tpot_p99']:6.0f} ms, goodput {row['goodput']:.2f} req/s", flush=True)
            time.sleep(3)  # cut-off requests' cancellations land before the next rate

    try:
        with served(config) as (target, _):
            measure("ringpipe", target)
        with static_server(model_dir, args.static_batch, args.static_wait_ms) as target:
            measure("static", target)
    finally:
        if args.model_dir is None:
            shutil.rmtree(model_dir, ignore_errors=True)
    write(args, results, time.perf_counter() - began, argv)


def write(args: argparse.Namespace, results: dict, elapsed_s: float, argv: list[str] | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fmt = lambda x, scale=1.0, d=2: "∞" if not math.isfinite(x) else f"{x * scale:.{d}f}"  # noqa: E731
    rows = []
    for name, rs in results.items():
        for r in rs:
            rows.append([name, f"{r['rate']:g}", f"{r['finished']}/{r['requests']}", f"{r['tokens_s']:.1f}",
                         fmt(r["ttft_p50"]), fmt(r["ttft_p99"]), fmt(r["tpot_p50"], 1e3, 0), fmt(r["tpot_p99"], 1e3, 0),
                         f"{r['goodput']:.2f}", "yes" if r["slo_p99_met"] else "no", f"{r['foreign_cores']:.2f}"])
    best = {name: max(r["goodput"] for r in rs) for name, rs in results.items()}
    ratio = best["ringpipe"] / best["static"] if best.get("static") else math.inf
    verdict = "met" if ratio >= 2 else "MISSED"
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, rs in results.items():
        rates = [r["rate"] for r in rs]
        axes[0].plot(rates, [r["goodput"] for r in rs], "o-", label=name)
        axes[1].plot(rates, [min(r["ttft_p99"], 60) for r in rs], "o-", label=name)
        axes[2].plot(rates, [min(1e3 * r["tpot_p99"], 2000) for r in rs], "o-", label=name)
    axes[0].plot(args.rate_list, args.rate_list, ":", color="grey", label="offered")
    axes[1].axhline(TTFT_SLO_S, ls="--", color="red")
    axes[2].axhline(1e3 * TPOT_SLO_S, ls="--", color="red")
    for ax, title in zip(axes, ("goodput, requests/s in SLO", "TTFT p99, s (capped at 60)",
                                "TPOT p99, ms (capped at 2000)"), strict=True):
        ax.set_xlabel("arrival rate, requests/s")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    png = args.out.with_suffix(".png")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    import ray
    import torch
    import transformers

    info = describe(["shards", "coordinator", "cluster", "bench"], torch=torch.__version__,
                    transformers=transformers.__version__, ray=ray.__version__)
    command = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python bench/load.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    s = args.spec
    text = f"""# Goodput under open-loop load: ringpipe against static batching

Written by `bench/load.py` in {elapsed_s / 60:.1f} min:

```
{command.strip()}
```

**Machine:** {info["cpu"]}, {info["cores"]} cores, {info["ram_gib"]} GiB RAM, no GPU; Python {info["python"]},
torch {info["torch"]}, transformers {info["transformers"]}, Ray {info["ray"]}; commit {info["commit"]}.

**Model:** random Llama checkpoint ({s.layers} layers, hidden {s.hidden}, {s.heads} heads / {s.kv_heads} KV heads,
vocab {s.vocab}), float32.

**Load:** Poisson arrivals for {args.duration:g} s per rate; prompts {16}–{args.max_prompt} tokens and outputs
16–{args.max_new} tokens, log-uniform, seeded (the same requests at the same offsets for both systems); greedy
gRPC streams, eos ignored; a request still running {args.drain:g} s after the last arrival is cut off.

**Systems:** ringpipe = `ringpipe serve`, {args.replicas} replicas x {args.stages} stages, `max_batch` 8, other keys at
their defaults; static = transformers `generate` (2 torch threads) behind a gRPC server, static batches of up to
{args.static_batch} requests, formed within {args.static_wait_ms:g} ms of the first (`bench/_static_server.py`).

**SLO:** TTFT ≤ {TTFT_SLO_S:g} s and TPOT ≤ {1e3 * TPOT_SLO_S:g} ms. Goodput = requests per second of arrivals that
finished within both; "p99 SLO" says whether the p99s of the rate are within both.

## Target

| target | goal | measured | verdict |
|---|---|---|---|
| goodput, best rate, ringpipe vs static batching | ≥ 2× | {fmt(ratio)}× ({best["ringpipe"]:.2f} / {best.get("static", 0):.2f} req/s) | {verdict} |

## Per rate

{table(["system", "rate, req/s", "finished", "tok/s", "TTFT p50 s", "TTFT p99 s", "TPOT p50 ms", "TPOT p99 ms",
        "goodput, req/s", "p99 SLO", "other procs, cores"], rows)}

![goodput, TTFT p99 and TPOT p99 against the arrival rate]({png.name})
"""
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({
        "command": command, "machine": info, "elapsed_s": elapsed_s, "best_goodput": best, "ratio": ratio,
        "results": results}, indent=1, default=lambda x: None) + "\n")
    print(text)


if __name__ == "__main__":
    main()
