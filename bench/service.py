"""Through the whole service against transformers `generate`, side by side in one run.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python bench/service.py             # ~100M Llama, ~4 min
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python bench/service.py --quick     # smoke run

As a user tries it: one checkpoint served by `ringpipe serve` (1 replica x 1 stage, one
coordinator, Serve's gRPC proxy, local Ray on 127.0.0.1), B greedy streams of N tokens sent at
once over gRPC from this process (`AsyncClient`, one event loop), against transformers `generate`
at batch B in this same process, the two alternating repeat by repeat so that background load
falls on both. The service is up (idle) while transformers runs, as it would be.

- decode tok/s = B·(N − 1) / (T(N) − T(1)), T(n) the time until the last of the B streams has n
  tokens: prefill cancels out however each system schedules it;
- TTFT of the last request: when the slowest of the B streams got its first token;
- CPU per process while the service decodes (stage actor, coordinator, proxy, this client).

Writes `results/service.md` and `.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [str(_BENCH.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _BENCH]

import psutil  # noqa: E402
import torch  # noqa: E402

from bench._foreign_load import ForeignLoad  # noqa: E402
from bench._generation import Timeline, time_transformers  # noqa: E402
from bench._results import describe, table  # noqa: E402
from bench._serve import CpuMeter, ray_processes, served  # noqa: E402
from shards.create import RandomModelSpec, create_random_checkpoint  # noqa: E402


async def _streams(target: str, prompts: list[list[int]], n: int) -> Timeline:
    from coordinator.client import AsyncClient

    tl = Timeline(len(prompts))
    async with AsyncClient(target) as client:

        async def one(row: int) -> None:
            async for piece in client.stream(prompts[row], n, ignore_eos=True, timeout_s=600):
                tl.record(row, list(piece.token_ids), time.perf_counter())

        tl.t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(len(prompts))))
    return tl


def time_service(target: str, prompts: list[list[int]], n: int) -> Timeline:
    return asyncio.run(_streams(target, prompts, n))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="8,32")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--batch-window-ms", type=float, default=0.0)
    p.add_argument("--model-dir", type=Path, help="use (or first write) the checkpoint here")
    p.add_argument("--out", type=Path, default=_BENCH / "results" / "service.md")
    p.add_argument("--quick", action="store_true", help="tiny model, one repeat: a smoke run")
    args = p.parse_args(argv)
    args.spec = RandomModelSpec(arch="llama", layers=12, hidden=768, heads=12, kv_heads=4, vocab=16000,
                                intermediate=2048, seed=0)
    if args.quick:
        args.spec = RandomModelSpec(arch="llama", layers=2, hidden=64, heads=4, kv_heads=2, vocab=256, seed=0)
        args.batches, args.prompt_len, args.new_tokens, args.repeats = "4", 8, 8, 1
    args.batch_list = [int(b) for b in args.batches.split(",")]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    began = time.perf_counter()
    torch.set_num_threads(2)
    model_dir = args.model_dir or Path(tempfile.mkdtemp(prefix="ringpipe-bench-"))
    if not (model_dir / "config.json").is_file():
        create_random_checkpoint(model_dir, args.spec)
    rng = random.Random(0)
    n, biggest = args.new_tokens, max(args.batch_list)
    fresh = lambda: [[rng.randrange(3, args.spec.vocab) for _ in range(args.prompt_len)]  # noqa: E731
                     for _ in range(biggest)]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    config = {
        "model": {"path": str(model_dir), "dtype": args.dtype},
        "pipeline": {"stages": 1, "max_batch": biggest, "max_seq_len": args.prompt_len + n + 8,
                     "prefill_chunk": args.prefill_chunk, "batch_window_ms": args.batch_window_ms,
                     "prefix_cache": False},
        "replicas": {"count": 1},
    }
    runs: dict[tuple[str, int], list[dict]] = {}
    try:
        with served(config) as (target, _):
            procs = ray_processes()
            procs["client (this process)"] = psutil.Process()
            warm = fresh()[:4]
            time_service(target, warm, 4)
            time_transformers(hf, warm, 4)
            for rep in range(args.repeats):
                for b in args.batch_list:
                    # fresh prompts every repeat: no prefix cache hit flatters the service
                    prompts = fresh()[:b]
                    for name in ("service", "transformers") if rep % 2 == 0 else ("transformers", "service"):
                        load = ForeignLoad()
                        if name == "service":
                            one = time_service(target, prompts, 1)
                            meter = CpuMeter(procs)
                            full = time_service(target, prompts, n)
                            cpu = meter.cores()
                        else:
                            one, full, cpu = time_transformers(hf, prompts, 1), time_transformers(hf, prompts, n), {}
                        decode = b * (n - 1) / (full.makespan_s - one.makespan_s)
                        runs.setdefault((name, b), []).append({
                            "decode_tok_s": decode, "ttft_last_ms": 1e3 * (max(full.first) - full.t0),
                            "tokens": full.tokens, "cpu": cpu, "foreign_cores": load.cores(),
                        })
                        print(f"  repeat {rep + 1}/{args.repeats} B={b:<3} {name:<12} decode {decode:7.1f} tok/s  "
                              f"last TTFT {runs[name, b][-1]['ttft_last_ms']:7.0f} ms  "
                              f"other processes {runs[name, b][-1]['foreign_cores']:.2f} cores", flush=True)
    finally:
        if args.model_dir is None:
            shutil.rmtree(model_dir, ignore_errors=True)
    write(args, runs, time.perf_counter() - began, argv)


def write(args: argparse.Namespace, runs: dict, elapsed_s: float, argv: list[str] | None) -> None:
    import ray
    import transformers

    med = lambda xs: statistics.median(xs)  # noqa: E731
    rows, summary = [], {}
    for (name, b), rs in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        d, t = med([r["decode_tok_s"] for r in rs]), med([r["ttft_last_ms"] for r in rs])
        summary[name, b] = (d, t)
        same = sum(x == y for x, y in zip(rs[-1]["tokens"], runs["transformers", b][-1]["tokens"], strict=True))
        rows.append([name, b, f"{d:.1f}", f"{t:.0f}", f"{med([r['foreign_cores'] for r in rs]):.2f}", f"{same}/{b}"])
    targets = []
    for b in args.batch_list:
        (sd, st), (td, tt) = summary["service", b], summary["transformers", b]
        goal = "≥ 1.0×" if b == 8 else "(reported)"
        targets.append([f"service vs transformers, decode tok/s, B={b}", goal, f"{sd / td:.2f}× ({sd:.1f} / {td:.1f})",
                        ("met" if sd >= td else "MISSED") if b == 8 else "—"])
        targets.append([f"service vs transformers, last request's first token, B={b}", "≤ 1.0×" if b == 32 else "(reported)",
                        f"{st / tt:.2f}× ({st:.0f} / {tt:.0f} ms)", ("met" if st <= tt else "MISSED") if b == 32 else "—"])
    cpu_rows = []
    for b in args.batch_list:
        per = [r["cpu"] for r in runs["service", b]]
        cpu_rows.append([b, *(f"{med([c[k] for c in per]):.2f}" for k in per[0])])
    cpu_head = ["B", *(f"{k}, cores" for k in runs["service", args.batch_list[0]][0]["cpu"])]
    info = describe(["shards", "coordinator", "cluster"], torch=torch.__version__,
                    transformers=transformers.__version__, ray=ray.__version__)
    command = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python bench/service.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    s = args.spec
    text = f"""# The service end to end against transformers `generate`

Written by `bench/service.py` in {elapsed_s / 60:.1f} min:

```
{command.strip()}
```

**Machine:** {info["cpu"]}, {info["cores"]} cores, {info["ram_gib"]} GiB RAM, no GPU; Python {info["python"]},
torch {info["torch"]}, transformers {info["transformers"]}, Ray {info["ray"]}; commit {info["commit"]}.

**Setup:** random Llama checkpoint ({s.layers} layers, hidden {s.hidden}, {s.heads} heads / {s.kv_heads} KV heads,
vocab {s.vocab}); `ringpipe serve`: 1 replica x 1 stage in {args.dtype}, 1 coordinator, Serve's gRPC proxy,
`pipeline.prefill_chunk` {args.prefill_chunk}, `batch_window_ms` {args.batch_window_ms:g}, prefix cache off; B greedy streams of {args.new_tokens} tokens ({args.prompt_len}-token
fresh random prompts) sent at once over gRPC from one `AsyncClient`, against transformers `generate` (float32,
2 torch threads) at batch B in the same process, alternating, {args.repeats} repeats (medians).

## Targets

{table(["target", "goal", "measured", "verdict"], targets)}

## Runs

{table(["system", "B", "decode tok/s", "last request's TTFT ms", "other procs, cores", "tokens = transformers"], rows)}

## CPU while the service decodes (T({args.new_tokens}) runs, medians)

{table(cpu_head, cpu_rows)}

decode tok/s = B·(N − 1) / (T(N) − T(1)); T(n): until the last stream has n tokens. "tokens = transformers":
streams whose greedy tokens equal transformers' (batched float32 arithmetic may flip a near-tie).
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({
        "command": command, "machine": info, "elapsed_s": elapsed_s, "targets": targets,
        "runs": {f"{k[0]} B={k[1]}": [{x: y for x, y in r.items() if x != "tokens"} for r in v] for k, v in runs.items()},
    }, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
