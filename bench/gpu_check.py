"""ringpipe on a GPU, against transformers on the same GPU, in one run (at most ~8 min on one GPU).

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python bench/gpu_check.py              # a CUDA machine
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python bench/gpu_check.py --device cpu --small   # smoke run, no GPU

On a random Llama-shaped checkpoint (~1.5B parameters, 128k vocabulary; `--small`: a tiny one),
built once under `--work`:

1. identity: an S = 1 replica (Ray actors, the production path) in float32 and bfloat16 against
   transformers' greedy loop in the same dtype on the same device (8 prompts); and the prefill
   logits of our model (in one process) against transformers': max |difference|, argmax agreement;
2. speed, bfloat16: decode tok/s (B·(N−1) / (T(N) − T(1))) and TPOT of the replica and of
   transformers `generate`, at B = 1, 8, 32; the sampling step's time (top-p at B = 32);
3. memory: what the stage's process holds on the device after loading, against the plan
   (weights + KV slots);
4. with two or more GPUs: S = 2 and S = 3 replicas over NCCL (greedy identity; a stage killed
   mid-stream fails the replica within `transport.timeout_s`, timed) and tensor parallelism 2
   (native engine; DeepSpeed is not in the project yet).

A part that fails is reported with its error and the run goes on. Results: `results/gpu.md`
(and `.json`); `--out` writes elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

from bench._results import describe, table  # noqa: E402

BIG = dict(layers=16, hidden=2048, heads=32, kv_heads=8, intermediate=8192, vocab=128256,
           max_position_embeddings=4096)
SMALL = dict(layers=4, hidden=64, heads=4, kv_heads=2, vocab=512)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def prompts(n: int, vocab: int, length: int = 16) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(1, vocab, (length,), generator=g).tolist() for _ in range(n)]


def hf_model(model_dir: Path, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None  # the full length, as the replica runs it
    return model


def hf_greedy(model, prompt: list[int], n: int, device: str) -> list[int]:
    """Greedy tokens from full forward passes, one step at a time (as tests/reference.py does)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq], device=device)).logits[0, -1].argmax()))
    return seq[len(prompt):]


def prefill_logits(model_dir: Path, prompt: list[int], dtype: torch.dtype, device: str) -> torch.Tensor:
    """Our model's logits [T, V] for every prompt position: the whole model as one stage, on `device`."""
    from shards.checkpoint import load_stage, read_model_args
    from shards.kv import StageCache

    args = read_model_args(model_dir)
    stage = load_stage(model_dir, args, 0, args.num_layers, True, True, dtype, device)
    cache = StageCache(range(args.num_layers), 1, len(prompt), args.num_kv_heads, args.head_dim, dtype, device)
    ids = torch.tensor([prompt], device=device)
    positions = torch.arange(len(prompt), device=device)[None]
    return stage(ids, positions, torch.tensor([0], device=device), cache, logits_for_last_only=False)[0]


def replica_spec(model_dir: Path, device: str, dtype: str, stages: int = 1, tp: int = 1, batch: int = 32):
    from shards.spec import ReplicaSpec

    return ReplicaSpec(model_dir=str(model_dir), stages=stages, tensor_parallel=tp, max_batch=batch,
                       max_seq_len=512, prefill_chunk=128, dtype=dtype, device=device,
                       placement_strategy="PACK", transport_timeout_s=10.0)


def start(spec, name: str):
    from shards.replica import Replica

    replica = Replica(spec, name=name)
    report = replica.start()
    return replica, report


# -- parts ------------------------------------------------------------------------------------


def identity(model_dir: Path, device: str, out: dict, n: int) -> None:
    from shards.replica import make_request

    ps = prompts(8, out["vocab"])
    rows = []
    for dtype in DTYPES:
        hf = hf_model(model_dir, DTYPES[dtype], device)
        expected = [hf_greedy(hf, p, n, device) for p in ps]
        replica, _ = start(replica_spec(model_dir, device, dtype, batch=8), f"gpu-{dtype}")
        try:
            got = [replica.generate(make_request(p, n)).token_ids for p in ps]
        finally:
            replica.shutdown()
        with torch.no_grad():
            theirs = hf(torch.tensor([ps[0]], device=device)).logits[0].float()
            mine = prefill_logits(model_dir, ps[0], DTYPES[dtype], device).float()
        diff = float((mine - theirs).abs().max())
        agree = float((mine.argmax(-1) == theirs.argmax(-1)).float().mean())
        logits = (f"{diff:.3g}", f"{agree:.3f}")
        same = sum(a == b for a, b in zip(got, expected, strict=True))
        first_diff = [next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
                      for a, b in zip(got, expected, strict=True)]
        rows.append([dtype, f"{same}/{len(ps)}", str([d for d in first_diff if d is not None][:4]), *logits])
        del hf
    out["identity"] = rows


def speed(model_dir: Path, device: str, out: dict, n: int, batches: list[int]) -> None:
    from bench._generation import Timeline, time_replica
    from shards.sampling import SamplingParams, sample

    ps = prompts(max(batches), out["vocab"])
    hf = hf_model(model_dir, torch.bfloat16, device)
    replica, report = start(replica_spec(model_dir, device, "bfloat16", batch=max(batches)), "gpu-speed")
    out["memory"] = [[r.get("weight_bytes", 0) + r.get("kv_bytes", 0), r.get("planned_weight_bytes", 0)
                      + r.get("planned_kv_bytes", 0), r.get("device_bytes", 0)] for r in report]

    def hf_timeline(b: int, steps: int) -> Timeline:
        tl = Timeline(b)
        ids = torch.tensor(ps[:b], device=device)
        sync()
        tl.t0 = time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                        pad_token_id=0, min_new_tokens=steps)
        sync()
        end = time.perf_counter()
        for row in range(b):
            tl.record(row, [0] * steps, end)
        return tl

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    rows = []
    try:
        time_replica(replica, ps[:2], 4)  # warm-up
        hf_timeline(2, 4)
        for b in batches:
            for name, timer in (("replica S=1", lambda b, k: time_replica(replica, ps[:b], k)),
                                ("transformers", hf_timeline)):
                one, full = timer(b, 1), timer(b, n)
                decode = b * (n - 1) / max(1e-9, full.makespan_s - one.makespan_s)
                rows.append([name, b, f"{decode:.1f}", f"{1000 * (full.makespan_s - one.makespan_s) / (n - 1):.2f}"])
                print(f"  speed {name:<13} B={b:<3} decode {decode:8.1f} tok/s", flush=True)
    finally:
        replica.shutdown()
    logits = torch.randn(32, out["vocab"], device=device)
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=i) for i in range(32)]
    sample(logits, params, list(range(32)))
    started = time.perf_counter()
    for _ in range(5):
        sample(logits, params, list(range(32)))
    out["sampling_ms"] = round(1000 * (time.perf_counter() - started) / 5, 2)
    out["speed"] = rows


def pipelines(model_dir: Path, device: str, out: dict, n: int) -> None:
    from shards.errors import ReplicaFailed
    from shards.replica import make_request

    gpus = torch.cuda.device_count() if device == "cuda" else 0
    if gpus < 2 and device == "cuda":
        out["pipelines"] = [["(skipped)", "one GPU only", "", ""]]
        return
    ps = prompts(4, out["vocab"])
    hf = hf_model(model_dir, torch.float32, device if device == "cpu" else "cuda")
    expected = [hf_greedy(hf, p, n, "cuda" if device == "cuda" else "cpu") for p in ps]
    del hf
    rows = []
    for stages, tp in ((2, 1), (3, 1), (1, 2)):
        if device == "cuda" and stages * tp > gpus:
            rows.append([f"S={stages} tp={tp}", "skipped", f"needs {stages * tp} GPUs", ""])
            continue
        replica, _ = start(replica_spec(model_dir, device, "float32", stages, tp, batch=4), f"gpu-s{stages}-tp{tp}")
        try:
            got = [replica.generate(make_request(p, n)).token_ids for p in ps]
            same = f"{sum(a == b for a, b in zip(got, expected, strict=True))}/{len(ps)}"
            failed_after = ""
            if stages > 1:  # a stage killed mid-stream: how long until the replica fails the stream
                stream = replica.stream(make_request(ps[0], 400))
                next(stream)
                killed = time.perf_counter()
                replica.kill_stage(stages - 1)
                try:
                    for _ in stream:
                        pass
                    failed_after = "not failed"
                except ReplicaFailed:
                    failed_after = f"{time.perf_counter() - killed:.2f} s"
            rows.append([f"S={stages} tp={tp}", same, failed_after, "nccl" if device == "cuda" else "gloo"])
        finally:
            replica.shutdown()
    out["pipelines"] = rows


def report(out: dict, path: Path, command: str) -> None:
    lines = ["# GPU check", "", f"Command: `{command}`", "", "```", json.dumps(out["machine"], indent=1), "```", ""]
    if out.get("identity"):
        lines += ["## Identity against transformers (same device, same dtype)", "",
                  table(["dtype", "greedy prompts identical", "first differing step (those that differ)",
                         "prefill logits max abs diff", "prefill argmax agreement"], out["identity"]), ""]
    if out.get("speed"):
        lines += ["## Decode speed, bfloat16", "",
                  table(["system", "batch", "decode tok/s", "TPOT ms"], out["speed"]), "",
                  f"Sampling step (top-p 0.9, B = 32, vocab {out['vocab']}): {out.get('sampling_ms')} ms.", ""]
    if out.get("memory"):
        lines += ["## Memory", "", table(["stage bytes (weights + KV)", "planned bytes", "device bytes allocated"],
                                         out["memory"]), ""]
    if out.get("pipelines"):
        lines += ["## Pipelines and tensor parallelism", "",
                  table(["layout", "greedy identical", "stage killed: stream failed after", "backend"],
                        out["pipelines"]), ""]
    for part, error in out.get("errors", {}).items():
        lines += [f"**{part} failed**:", "", "```", error[-2000:], "```", ""]
    path.with_suffix(".md").write_text("\n".join(lines))
    path.with_suffix(".json").write_text(json.dumps(out, indent=1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--small", action="store_true", help="a tiny model (a smoke run of the script itself)")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ringpipe-gpu-check"), help="where the checkpoint is built")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/gpu")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (use --device cpu --small for a smoke run)", file=sys.stderr)
        return 2
    import ray

    from shards.create import RandomModelSpec, create_random_checkpoint

    shape = SMALL if args.small else BIG
    model_dir = args.work / ("small" if args.small else "llama-1b5")
    if not (model_dir / "config.json").exists():
        print(f"building the checkpoint in {model_dir} …", flush=True)
        create_random_checkpoint(model_dir, RandomModelSpec(arch="llama", **shape), max_shard_bytes=2 << 30)
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    ray.init(num_gpus=gpus, num_cpus=max(16, os.cpu_count() or 1), include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False)
    versions = {"torch": torch.__version__, "ray": ray.__version__}
    if gpus:
        versions["gpu"] = f"{gpus} x {torch.cuda.get_device_name(0)}"
    out: dict = {"machine": describe(["shards", "bench/gpu_check.py"], **versions), "vocab": shape["vocab"],
                 "errors": {}}
    batches = [1, 8, 32]
    for name, part in (("identity", lambda: identity(model_dir, args.device, out, min(args.tokens, 32))),
                       ("speed", lambda: speed(model_dir, args.device, out, args.tokens, batches)),
                       ("pipelines", lambda: pipelines(model_dir, args.device, out, min(args.tokens, 32)))):
        started = time.perf_counter()
        try:
            part()
        except Exception:  # noqa: BLE001 — reported, and the other parts still run
            out["errors"][name] = traceback.format_exc()
        print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    ray.shutdown()
    report(out, args.out, " ".join(["bench/gpu_check.py", *sys.argv[1:]]))
    print(f"wrote {args.out.with_suffix('.md')}")
    return 1 if out["errors"] else 0


if __name__ == "__main__":
    threading.excepthook = lambda a: None  # client threads of a killed stream end quietly
    sys.exit(main())
