"""What the OpenAI HTTP front costs against the gRPC front, side by side on one service.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python bench/http_front.py            # about 2 min on two cores
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python bench/http_front.py --quick    # smoke run

One service (1 replica x 2 stages of a small random Llama with a tokenizer, 2 coordinators); the
same greedy request through each front, the fronts alternating request by request (gRPC first on
even requests, HTTP first on odd ones) after a warm-up, each prompt fresh random ids so that no
prefix cache helps:

- gRPC: `coordinator.client.Client` → Serve's gRPC proxy → a coordinator;
- HTTP: the official `openai` client → Serve's HTTP proxy → the same coordinators (`/v1/completions`).

Unary: max_tokens=1, the client's wall time from call to answer. Stream: 64 tokens, the time to the
first token and the mean time per token after it (last arrival − first, over tokens − 1: text
deltas carry no token count, so per-message gaps would not compare). Writes `results/http_front.md`
and `.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# the repository root on the path (and so in the Ray workers', which inherit it): `bench._…` imports
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._front import MODEL, free_port, percentiles  # noqa: E402
from bench._results import describe, table  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
STAGES, MAX_BATCH, MAX_SEQ_LEN = 2, 4, 256


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=100, help="unary requests per front")
    p.add_argument("--streams", type=int, default=20, help="64-token streams per front")
    p.add_argument("--stream-tokens", type=int, default=64)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="a smoke run: 6 requests, 2 streams")
    p.add_argument("--out", type=Path, default=RESULTS / "http_front.md")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.streams, args.warmup = 6, 2, 2
    return args


def run(args: argparse.Namespace) -> dict:
    import openai

    from cluster.config import parse_config
    from cluster.serve import start_service
    from coordinator.client import Client
    from shards.create import create_random_checkpoint

    model_dir = Path(tempfile.mkdtemp(prefix="ringpipe-http-front-")) / "bench-model"
    create_random_checkpoint(model_dir, MODEL, tokenizer=True)
    cfg = parse_config({
        "model": {"path": str(model_dir)},
        "pipeline": {"stages": STAGES, "max_batch": MAX_BATCH, "max_seq_len": MAX_SEQ_LEN},
        "replicas": {"count": 1},
        "server": {"port": free_port(), "http_port": free_port(), "coordinators": 2},
    })
    service = start_service(cfg, progress=False)
    grpc_client = Client(service.target)
    api = openai.OpenAI(base_url=service.openai_base_url, api_key="unused", max_retries=0, timeout=120)
    name = cfg.model.served_name
    rng = random.Random(1)

    def prompt() -> list[int]:
        return [rng.randrange(3, MODEL.vocab) for _ in range(16)]

    def unary(front: str, p: list[int]) -> float:
        t0 = time.perf_counter()
        if front == "grpc":
            grpc_client.generate(p, 1)
        else:
            api.completions.create(model=name, prompt=p, max_tokens=1, temperature=0)
        return (time.perf_counter() - t0) * 1e3

    def stream(front: str, p: list[int]) -> tuple[float, float, int]:
        """(time to first token ms, ms per token after it, tokens)."""
        t0, arrivals, tokens = time.perf_counter(), [], 0
        if front == "grpc":
            for piece in grpc_client.stream(p, args.stream_tokens):
                if piece.token_ids:
                    arrivals.append(time.perf_counter())
                tokens += len(piece.token_ids)
        else:
            for chunk in api.completions.create(model=name, prompt=p, max_tokens=args.stream_tokens, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
                if chunk.choices and chunk.choices[0].text:
                    arrivals.append(time.perf_counter())
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
        per_token = (arrivals[-1] - arrivals[0]) * 1e3 / max(tokens - 1, 1)
        return (arrivals[0] - t0) * 1e3, per_token, tokens

    fronts = ("grpc", "http")
    try:
        for _ in range(args.warmup):
            p = prompt()
            for front in fronts:
                unary(front, p)
                stream(front, p)
        lat: dict[str, list[float]] = {f: [] for f in fronts}
        for i in range(args.requests):
            p = prompt()
            for front in fronts if i % 2 == 0 else fronts[::-1]:
                lat[front].append(unary(front, p))
        ttft: dict[str, list[float]] = {f: [] for f in fronts}
        tpot: dict[str, list[float]] = {f: [] for f in fronts}
        lengths: dict[str, list[int]] = {f: [] for f in fronts}
        for i in range(args.streams):
            p = prompt()
            for front in fronts if i % 2 == 0 else fronts[::-1]:
                first, per_token, n = stream(front, p)
                ttft[front].append(first)
                tpot[front].append(per_token)
                lengths[front].append(n)
        assert lengths["grpc"] == lengths["http"], "the same greedy request gave different lengths"
    finally:
        grpc_client.close()
        service.shutdown()
    import openai as openai_module
    import ray

    return {
        "machine": describe(["coordinator", "cluster", "bench"], ray=ray.__version__,
                            openai=openai_module.__version__),
        "setup": {"replicas": 1, "stages": STAGES, "coordinators": 2, "model": str(MODEL),
                  "requests": args.requests, "streams": args.streams, "stream_tokens": args.stream_tokens},
        "unary_ms": {f: percentiles(lat[f]) for f in fronts},
        "ttft_ms": {f: percentiles(ttft[f]) for f in fronts},
        "ms_per_token": {f: percentiles(tpot[f]) for f in fronts},
        "stream_tokens_mean": sum(lengths["grpc"]) / max(len(lengths["grpc"]), 1),
    }


def render(result: dict, command: str) -> str:
    rows = []
    for what, key in (("unary request, max_tokens=1 (ms)", "unary_ms"), ("stream: time to first token (ms)", "ttft_ms"),
                      ("stream: time per token after the first (ms)", "ms_per_token")):
        g, h = result[key]["grpc"], result[key]["http"]
        rows.append([what, f"{g['p50']:.2f}", f"{h['p50']:.2f}", f"{h['p50'] - g['p50']:+.2f}",
                     f"{h['p50'] / g['p50']:.2f}x", f"{g['p99']:.2f}", f"{h['p99']:.2f}"])
    m = result["machine"]
    return "\n".join([
        "# The OpenAI HTTP front against the gRPC front",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB; Python {m['python']}, Ray {m['ray']}, "
        f"openai {m['openai']}; commit {m['commit']}.",
        f"Setup: {json.dumps(result['setup'])}; streams averaged {result['stream_tokens_mean']:.1f} tokens "
        "(greedy, the same on both fronts).",
        "",
        table(["what", "gRPC p50", "HTTP p50", "HTTP − gRPC", "HTTP / gRPC", "gRPC p99", "HTTP p99"], rows),
        "",
    ])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    command = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python bench/http_front.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    text = render(result, command.strip())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
