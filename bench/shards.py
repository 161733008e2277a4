"""Ringpipe replicas against transformers and our one-process ceiling; the stage hop; stage memory.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python bench/shards.py           # ~100M Llama, B=1,8,32
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python bench/shards.py --quick   # tiny model, smoke run

Four systems decode the same greedy prompts to the same length from one random
checkpoint: transformers `generate`, `InProcessModel` (no Ray: the ceiling), and
replicas of 1 and 2 stages. For every request we note when its first and last
token arrived. Repeats go round-robin over the systems so that load from other
processes on a shared machine falls on all of them alike; medians are reported,
with the CPU other processes used meanwhile.

- TTFT: median over the batch of (first token - batch submitted).
- TPOT: median over the batch of (last token - first token) / (new_tokens - 1).
- decode tok/s: B * (new_tokens - 1) / (T(new_tokens) - T(1)), T(n) the time to
  finish a batch asking for n tokens: the difference removes prefill however a
  system schedules it (batched, one prompt at a time, interleaved with decode).
- e2e tok/s: B * new_tokens / T(new_tokens).

The measurements live beside this file: `_generation.py`, `_hop.py`, `_stage_memory.py`, with
`_report.py` for the tables and `results/shards.md`; this script parses the settings, runs them in
order and writes the results.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on 127.0.0.1
# This file is named shards.py: drop its folder from the path so that `shards` is the package,
# here and in the Ray workers (they inherit the driver's path); the repository root instead, so
# that the pieces of this benchmark import as `bench._…` (and `shards` is still the package).
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [str(_BENCH.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _BENCH]

import torch  # noqa: E402

from bench._generation import load_systems, measure  # noqa: E402
from bench._hop import hop_latencies  # noqa: E402
from bench._report import (  # noqa: E402
    OMP_ENV,
    generation_table,
    hop_table,
    machine,
    memory_table,
    table,
    targets,
    write_report,
)
from bench._stage_memory import replica_memory, stage_memory  # noqa: E402
from shards.create import RandomModelSpec, create_random_checkpoint  # noqa: E402

MODEL_FIELDS = (
    "arch",
    "num_layers",
    "hidden_size",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=16000)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prefill-chunk", type=int, default=256, help="pipeline.prefill_chunk of the replicas")
    p.add_argument("--batch-window-ms", type=float, default=0.0, help="pipeline.batch_window_ms of the replicas")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="in-process and replicas; transformers runs in float32 and, if not float32, in this too")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--hop-iters",
        type=int,
        default=500,
        help="round trips at 16 KiB (a fifth as many at 4 MiB)",
    )
    p.add_argument(
        "--model-dir",
        type=Path,
        help="use this checkpoint, written there first if missing "
        "(default: a fresh one in a temporary directory)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench/results/shards.md"),
        help="also writes the .json beside it",
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny model, batches 1,4, one repeat: a smoke run"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.heads, args.kv_heads, args.vocab, args.intermediate = (
            4,
            64,
            4,
            2,
            256,
            128,
        )
        args.batches, args.prompt_len, args.new_tokens, args.repeats, args.hop_iters = (
            "1,4",
            8,
            8,
            1,
            50,
        )
    args.batch_list = [int(b) for b in args.batches.split(",")]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    began = time.perf_counter()
    torch.set_num_threads(2)
    spec = RandomModelSpec(
        arch="llama",
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        kv_heads=args.kv_heads,
        vocab=args.vocab,
        intermediate=args.intermediate,
        seed=0,
    )
    model_dir = args.model_dir or Path(tempfile.mkdtemp(prefix="ringpipe-bench-"))
    if not (model_dir / "config.json").is_file():
        create_random_checkpoint(model_dir, spec)
    rng = random.Random(0)
    prompts = [
        [rng.randrange(3, args.vocab) for _ in range(args.prompt_len)]
        for _ in range(max(args.batch_list))
    ]

    import ray

    from cluster.local import init_ray

    init_ray(num_cpus=16)
    try:
        print("loading transformers, in-process, replicas S=1 and S=2", flush=True)
        systems, reports = load_systems(
            model_dir, max(args.batch_list), args.prompt_len + args.new_tokens, args.prefill_chunk, args.dtype,
            args.batch_window_ms,
        )
        after_start = replica_memory(systems, model_dir)
        print("generation", flush=True)
        rows = measure(systems, args.batch_list, prompts, args.new_tokens, args.repeats)
        print("memory per stage", flush=True)
        memory = stage_memory(systems, reports, after_start, model_dir)
        for stages in (1, 2):
            systems[f"replica S={stages}"][1].shutdown()
        print("activation hop", flush=True)
        hop = hop_latencies([16 * 1024, 4 * 1024 * 1024], args.hop_iters)
    finally:
        ray.shutdown()
        if args.model_dir is None:
            shutil.rmtree(model_dir, ignore_errors=True)
    params = sum(p.numel() for p in systems["in-process"][1].stages[0].parameters())
    margs = systems["in-process"][
        1
    ].args  # what the checkpoint holds, which --model-dir may have chosen
    env = [f"{k}={os.environ[k]}" for k in OMP_ENV if k in os.environ]
    command = " ".join(
        [
            *env,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python bench/shards.py",
            *(sys.argv[1:] if argv is None else argv),
        ]
    )
    busy = max(r.foreign_cores for r in rows)
    note = (
        ""
        if busy < 0.25 or "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ
        else (
            f"\n\n**Warning:** other processes used up to {busy:.2f} cores. A two-thread torch team then loses "
            "much of its time waiting for a descheduled partner, more or less in each system as the load came: "
            "re-run on a quieter machine."
        )
    )
    result = {
        "command": command,
        "machine": machine(),
        "elapsed_s": time.perf_counter() - began,
        "model": {
            "params": params,
            "spec": ", ".join(f"{k}={getattr(margs, k)}" for k in MODEL_FIELDS),
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "dtype": args.dtype,
        },
        "targets": targets(rows, memory),
        "rows": rows,
        "hop": hop,
        "memory": memory,
        "contention_note": note,
    }
    write_report(args.out, result)
    args.out.with_suffix(".json").write_text(
        json.dumps({**result, "rows": [asdict(r) for r in rows]}, indent=1) + "\n"
    )
    print(
        f"\n{generation_table(rows)}\n\n{hop_table(hop)}\n\n{memory_table(memory)}\n\n"
        f"{table(['target', 'goal', 'measured', 'verdict'], result['targets'])}{note}\n\nwrote {args.out} and .json"
    )


if __name__ == "__main__":
    main()
