"""Tensor-parallel engines side by side: ours (`native`) and DeepSpeed's layers (`deepspeed`), in one run.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python bench/tp_engines.py            # ~5 min on 2 cores
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python bench/tp_engines.py --quick    # smoke run

A replica of one stage split over 2 tensor-parallel ranks (Gloo all-reduce on CPU; NCCL on CUDA with
`--device cuda`) on a random Llama (default ~100M parameters, as `bench/shards.py`), once per engine,
the engines alternated over `--repeats` rounds: decode tok/s (B·(N−1) / (T(N) − T(1)), medians) at
B = 8 and 32. Both must give the same greedy tokens (checked). Results: `results/tp_engines.md`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._generation import time_replica  # noqa: E402
from bench._results import describe, table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/tp_engines")
    args = ap.parse_args()
    import ray
    import torch

    from cluster.local import init_ray
    from shards.create import RandomModelSpec, create_random_checkpoint
    from shards.replica import Replica, make_request
    from shards.spec import ReplicaSpec

    shape = (dict(layers=2, hidden=64, heads=4, kv_heads=2, vocab=256) if args.quick else
             dict(layers=12, hidden=768, heads=12, kv_heads=4, vocab=32000, intermediate=2048))
    batches = [8, 32]
    model_dir = Path(tempfile.mkdtemp(prefix="ringpipe-tp-"))
    create_random_checkpoint(model_dir, RandomModelSpec(arch="llama", **shape))
    init_ray(num_cpus=16)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, shape["vocab"], (16,), generator=g).tolist() for _ in range(max(batches))]
    replicas = {}
    try:
        for engine in ("native", "deepspeed"):
            spec = ReplicaSpec(model_dir=str(model_dir), stages=1, tensor_parallel=2, tp_engine=engine,
                               max_batch=max(batches), max_seq_len=16 + args.tokens + 8, prefill_chunk=128,
                               device=args.device, torch_threads=1)
            replicas[engine] = Replica(spec, name=f"tp-{engine}")
            replicas[engine].start()
        tokens = {e: r.generate(make_request(prompts[0], args.tokens)).token_ids for e, r in replicas.items()}
        same = tokens["native"] == tokens["deepspeed"]
        runs: dict[tuple[str, int], list[float]] = {}
        for r in replicas.values():
            time_replica(r, prompts[:4], 4)  # warm-up
        for rep in range(args.repeats):
            for b in batches:
                for engine, r in replicas.items():
                    one, full = time_replica(r, prompts[:b], 1), time_replica(r, prompts[:b], args.tokens)
                    tok_s = b * (args.tokens - 1) / max(1e-9, full.makespan_s - one.makespan_s)
                    runs.setdefault((engine, b), []).append(tok_s)
                    print(f"  repeat {rep + 1} B={b:<3} {engine:<10} decode {tok_s:8.1f} tok/s", flush=True)
    finally:
        for r in replicas.values():
            r.shutdown()
        ray.shutdown()
    rows, ratio = [], {}
    for b in batches:
        nat, ds = statistics.median(runs[("native", b)]), statistics.median(runs[("deepspeed", b)])
        ratio[b] = ds / nat
        rows += [["native", b, f"{nat:.1f}", ""], ["deepspeed", b, f"{ds:.1f}", f"{ds / nat:.2f}x"]]
    import deepspeed

    machine = describe(["shards", "bench/tp_engines.py"], torch=torch.__version__, deepspeed=deepspeed.__version__)
    command = " ".join(["bench/tp_engines.py", *sys.argv[1:]])
    text = "\n".join([
        "# Tensor-parallel engines, side by side", "",
        f"Command: `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python {command}`", "",
        "```", json.dumps(machine, indent=1), "```", "",
        f"One stage, tensor parallelism 2, {args.device}, model {shape}, {args.tokens} new tokens, "
        f"medians of {args.repeats} rounds; the same greedy tokens from both engines: **{same}**.", "",
        table(["engine", "batch", "decode tok/s", "deepspeed / native"], rows), "",
        "## How to read this", "",
        "- Both engines hold the same slices and sum over the same group (DeepSpeed's inference all-reduce",
        "  falls back to torch.distributed once its CPU shared-memory op is off, `shards/tp.py`), so on CPU",
        "  they differ only in their layers' Python: the ratio should be near 1. On GPUs the question is",
        "  DeepSpeed's kernels and NCCL all-reduce: not measured here (no GPU).", "",
    ])
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "runs": {f"{e} B={b}": v for (e, b), v in
                                                         runs.items()}, "same_tokens": same}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
