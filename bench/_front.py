"""Front overhead: what Serve's gRPC proxy and the coordinator add, against calling a replica head directly.

Two paths to a pipeline replica of the same checkpoint and `ReplicaSpec`, in one Ray cluster:

- front: `coordinator.client.Client` → Serve's gRPC proxy → a coordinator replica (Serve handle call)
  → the replica head's streaming `generate` → back the same way, as a user's request goes;
- direct: `shards.replica.Replica.stream` from the driver → the head's streaming `generate`, the call
  the coordinator itself makes. This replica is started beside the service's, not taken from it.

Unary: one request with max_new_tokens=1, timed by the client from the call to the answer. Stream:
a 64-token generation (eos ignored), and the gap between one token's arrival and the next. The two
paths alternate request by request (front first on even requests, direct first on odd ones) after a
warm-up of each, so background load falls on both alike. Every prompt is fresh random ids, the same
prompt for both paths of a pair, so neither replica's prefix cache helps.
"""

from __future__ import annotations

import random
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from bench._foreign_load import ForeignLoad
from bench._results import table
from shards.create import RandomModelSpec, create_random_checkpoint

MODEL = RandomModelSpec(arch="llama", layers=4, hidden=256, heads=4, kv_heads=2, vocab=1024, seed=0)
STAGES, MAX_BATCH, MAX_SEQ_LEN, PREFILL_CHUNK = 2, 4, 256, 128


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentiles(xs: list[float]) -> dict:
    a = np.asarray(xs, dtype=float)
    return {
        "p50": float(np.percentile(a, 50)),
        "p99": float(np.percentile(a, 99)),
        "mean": float(a.mean()),
        "samples": len(xs),
    }


def token_gaps(arrivals: list[tuple[float, int]]) -> list[float]:
    """Gaps in ms between successive tokens, from (arrival time, tokens in that message) pairs.

    A message carrying k tokens contributes its gap to the previous message, then k − 1 gaps of 0:
    those tokens reached the caller together.
    """
    gaps = []
    for (before, _), (now, k) in zip(arrivals, arrivals[1:], strict=False):
        gaps += [(now - before) * 1e3] + [0.0] * (k - 1)
    return gaps


def _timed_stream(
    pieces: Iterator, tokens_of: Callable[[object], list[int]]
) -> tuple[float, list[tuple[float, int]]]:
    """Time to the first token (ms) and every token-bearing message's (arrival, token count)."""
    t0, arrivals = time.perf_counter(), []
    for piece in pieces:
        k = len(tokens_of(piece))
        if k:
            arrivals.append((time.perf_counter(), k))
    return (arrivals[0][0] - t0) * 1e3, arrivals


def run(
    requests: int = 100,
    streams: int = 10,
    stream_tokens: int = 64,
    prompt_len: int = 16,
    coordinators: int = 2,
    warmup: int = 10,
) -> dict:
    """Both paths measured side by side; plain data for `render` and coordinator.json."""
    from cluster.config import parse_config
    from cluster.serve import start_service
    from coordinator.client import Client
    from shards.replica import Replica, make_request

    model_dir = Path(tempfile.mkdtemp(prefix="ringpipe-front-"))
    create_random_checkpoint(model_dir, MODEL)
    cfg = parse_config(
        {
            "model": {"path": str(model_dir)},
            "pipeline": {
                "stages": STAGES,
                "max_batch": MAX_BATCH,
                "max_seq_len": MAX_SEQ_LEN,
                "prefill_chunk": PREFILL_CHUNK,
            },
            "replicas": {"count": 1},
            "server": {"port": free_port(), "http_port": free_port(), "metrics_port": 0,
                       "coordinators": coordinators},
        }
    )
    began = time.perf_counter()
    service = start_service(cfg, progress=False)
    direct = Replica(cfg.replica_spec(), name="bench-direct")
    client = Client(service.target)
    rng = random.Random(1)

    def prompt() -> list[int]:
        return [rng.randrange(3, MODEL.vocab) for _ in range(prompt_len)]

    def unary_front(p: list[int]) -> tuple[float, float]:
        t0 = time.perf_counter()
        done = client.generate(p, 1, ignore_eos=True)
        return (time.perf_counter() - t0) * 1e3, done.time_to_first_token_ms

    def unary_direct(p: list[int]) -> tuple[float, float]:
        t0 = time.perf_counter()
        direct.generate(make_request(p, 1))
        return (time.perf_counter() - t0) * 1e3, float("nan")

    def stream_front(p: list[int]) -> tuple[float, list[tuple[float, int]]]:
        return _timed_stream(
            client.stream(p, stream_tokens, ignore_eos=True), lambda x: x.token_ids
        )

    def stream_direct(p: list[int]) -> tuple[float, list[tuple[float, int]]]:
        return _timed_stream(direct.stream(make_request(p, stream_tokens)), lambda x: x["tokens"])

    try:
        direct.start()
        started_s = time.perf_counter() - began
        for _ in range(warmup):
            p = prompt()
            unary_front(p), unary_direct(p)
        stream_front(prompt()), stream_direct(prompt())

        unary: dict[str, list[float]] = {"front": [], "direct": [], "coordinator": []}
        load = ForeignLoad()
        for i in range(requests):
            p = prompt()
            order = ("front", "direct") if i % 2 == 0 else ("direct", "front")
            for path in order:
                wall_ms, coordinator_ms = (unary_front if path == "front" else unary_direct)(p)
                unary[path].append(wall_ms)
                if path == "front":
                    unary["coordinator"].append(coordinator_ms)
        unary_cores = load.cores()

        stream: dict[str, dict[str, list]] = {
            path: {"ttft_ms": [], "gaps_ms": [], "messages": []} for path in ("front", "direct")
        }
        load = ForeignLoad()
        for i in range(streams):
            p = prompt()
            for path in ("front", "direct") if i % 2 == 0 else ("direct", "front"):
                ttft_ms, arrivals = (stream_front if path == "front" else stream_direct)(p)
                stream[path]["ttft_ms"].append(ttft_ms)
                stream[path]["gaps_ms"] += token_gaps(arrivals)
                stream[path]["messages"].append(len(arrivals))
        stream_cores = load.cores()
    finally:
        client.close()
        direct.shutdown()
        service.shutdown()
        shutil.rmtree(model_dir, ignore_errors=True)
    return {
        "model": f"random llama, layers={MODEL.layers}, hidden={MODEL.hidden}, heads={MODEL.heads}, "
        f"kv_heads={MODEL.kv_heads}, vocab={MODEL.vocab}",
        "pipeline": f"1 replica × {STAGES} stages, max_batch={MAX_BATCH}, max_seq_len={MAX_SEQ_LEN}, "
        f"{coordinators} coordinator(s)",
        "prompt_len": prompt_len,
        "stream_tokens": stream_tokens,
        "warmup": warmup,
        "start_s": started_s,
        "elapsed_s": time.perf_counter() - began,
        "unary": {path: percentiles(xs) for path, xs in unary.items()},
        "unary_foreign_cores": unary_cores,
        "stream": {
            path: {
                "ttft": percentiles(s["ttft_ms"]),
                "gap": percentiles(s["gaps_ms"]),
                "messages_per_stream": float(np.mean(s["messages"])),
            }
            for path, s in stream.items()
        },
        "streams": streams,
        "stream_foreign_cores": stream_cores,
    }


def _row(what: str, front: dict, direct: dict, cores: float) -> list:
    cells = [what]
    for q in ("p50", "p99"):
        f, d = front[q], direct[q]
        cells += [f"{f:.2f}", f"{d:.2f}", f"{f - d:+.2f}", f"{f / d:.2f}×" if d > 0 else "—"]
    return [*cells, front["samples"], f"{cores:.2f}"]


def render(r: dict) -> str:
    """The front-overhead section of `bench/results/coordinator.md`."""
    u, s = r["unary"], r["stream"]
    headers = [
        "measure",
        "front p50 ms",
        "direct p50 ms",
        "overhead p50 ms",
        "ratio p50",
        "front p99 ms",
        "direct p99 ms",
        "overhead p99 ms",
        "ratio p99",
        "samples each",
        "other procs, cores",
    ]
    rows = [
        _row(
            "unary, max_new_tokens=1: call → answer",
            u["front"],
            u["direct"],
            r["unary_foreign_cores"],
        ),
        _row(
            f"stream of {r['stream_tokens']}: call → first token",
            s["front"]["ttft"],
            s["direct"]["ttft"],
            r["stream_foreign_cores"],
        ),
        _row(
            f"stream of {r['stream_tokens']}: gap between tokens",
            s["front"]["gap"],
            s["direct"]["gap"],
            r["stream_foreign_cores"],
        ),
    ]
    coord, front = u["coordinator"], u["front"]
    return f"""## Front overhead: Serve's gRPC proxy + coordinator vs the replica head called directly

**Service:** {r["model"]}; {r["pipeline"]}; {r["prompt_len"]}-token random prompts. Started in
{r["start_s"]:.0f} s (service, then the direct replica); this section took {r["elapsed_s"]:.0f} s.

{table(headers, rows)}

The coordinator's own figure for the unary calls (`timings.time_to_first_token_ms`: from the
coordinator receiving the call to the replica's token reaching it): p50 {coord["p50"]:.2f} ms,
p99 {coord["p99"]:.2f} ms. What is left of the front path's p50 ({front["p50"] - coord["p50"]:.2f} ms)
is the gRPC client, Serve's proxy and the proxy → coordinator handle call, both ways.
Messages per stream of {r["stream_tokens"]} tokens: front {s["front"]["messages_per_stream"]:.1f},
direct {s["direct"]["messages_per_stream"]:.1f}.
"""
