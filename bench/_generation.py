"""Generation: four systems decode the same greedy prompts, timed per token.

transformers `generate`, `InProcessModel` (no Ray: the ceiling) and replicas of 1 and 2 stages are
loaded once (`load_systems`); `measure` runs them round-robin and reduces each (system, batch) to a
`Row` of medians: TTFT, TPOT, decode and end-to-end tokens/s, and the CPU other processes used.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench._foreign_load import ForeignLoad
from shards.inprocess import InProcessModel
from shards.sampling import SamplingParams, sample

SYSTEMS = ("transformers", "transformers bf16", "in-process", "replica S=1", "replica S=2")


def median(xs: list[float]) -> float:
    finite = [x for x in xs if math.isfinite(x)]
    return statistics.median(finite) if finite else float("nan")


# -- one timed batch ----------------------------------------------------------------------------


@dataclass
class Timeline:
    """When each request of a batch got its first and its last token (perf_counter seconds)."""

    n: int
    t0: float = 0.0
    first: list[float] = field(default_factory=list)
    last: list[float] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.first, self.last, self.tokens = (
            [0.0] * self.n,
            [0.0] * self.n,
            [[] for _ in range(self.n)],
        )

    def record(self, row: int, new: list[int], now: float) -> None:
        if not new:
            return
        if not self.tokens[row]:
            self.first[row] = now
        self.tokens[row].extend(new)
        self.last[row] = now

    @property
    def makespan_s(self) -> float:
        return max(self.last) - self.t0


def time_transformers(model, prompts: list[list[int]], n: int) -> Timeline:
    from transformers.generation.streamers import BaseStreamer

    tl = Timeline(len(prompts))

    class Clock(BaseStreamer):
        seen_prompt = False

        def put(self, value: torch.Tensor) -> None:
            now = time.perf_counter()
            if not self.seen_prompt:  # generate hands over the prompt first
                self.seen_prompt = True
                return
            for row, token in enumerate(value.reshape(len(prompts), -1)[:, -1].tolist()):
                tl.record(row, [token], now)

        def end(self) -> None:
            pass

    ids = torch.tensor(prompts)
    tl.t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            use_cache=True,
            streamer=Clock(),
            pad_token_id=0,
        )
    return tl


def time_inprocess(model: InProcessModel, prompts: list[list[int]], n: int) -> Timeline:
    """`InProcessModel.generate`'s schedule (each prompt prefilled alone, then all decode), timed per token."""
    tl, greedy, last = Timeline(len(prompts)), SamplingParams(), []
    tl.t0 = time.perf_counter()
    for slot, p in enumerate(prompts):
        logits = model.forward(torch.tensor([p]), torch.arange(len(p))[None], torch.tensor([slot]))
        last.append(sample(logits, [greedy], [len(p)])[0])
        tl.record(slot, [last[-1]], time.perf_counter())
    slots = torch.arange(len(prompts))
    for step in range(1, n):
        positions = torch.tensor([[len(p) + step - 1] for p in prompts])
        logits = model.forward(torch.tensor(last)[:, None], positions, slots)
        last = sample(logits, [greedy] * len(prompts), [len(p) + step for p in prompts])
        now = time.perf_counter()
        for row, token in enumerate(last):
            tl.record(row, [token], now)
    return tl


def time_replica(replica, prompts: list[list[int]], n: int) -> Timeline:
    """One client thread per request, all released at once: the head batches them as they come."""
    from shards.replica import make_request

    tl, errors, gate = Timeline(len(prompts)), [], threading.Barrier(len(prompts) + 1)

    def client(row: int) -> None:
        try:
            gate.wait()
            for item in replica.stream(make_request(prompts[row], n)):
                tl.record(row, item["tokens"], time.perf_counter())
        except Exception as exc:  # noqa: BLE001 — raised again in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(prompts))]
    for t in threads:
        t.start()
    tl.t0 = time.perf_counter()
    gate.wait()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return tl


# -- generation: the four systems, loaded once --------------------------------------------------


def load_systems(
    model_dir: Path, max_batch: int, max_seq_len: int, prefill_chunk: int, dtype: str = "float32",
    batch_window_ms: float = 0.0,
) -> tuple[dict, dict]:
    """{name: (timer, target)}, and each replica's per-stage memory report from `start()`.

    transformers runs in float32 always (the reference), and in `dtype` too when that is not
    float32; in-process and the replicas run in `dtype`."""
    from transformers import AutoModelForCausalLM

    from shards.replica import Replica
    from shards.spec import DTYPES, ReplicaSpec

    systems: dict = {}
    for name, hf_dtype in (("transformers", "float32"), ("transformers bf16", "bfloat16")):
        if hf_dtype in ("float32", dtype):
            hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[hf_dtype]).eval()
            hf.generation_config.eos_token_id = None  # run the full length, as the others do
            systems[name] = (time_transformers, hf)
    ours = InProcessModel(model_dir, n_stages=1, n_slots=max_batch, max_seq_len=max_seq_len, dtype=DTYPES[dtype])
    systems["in-process"] = (time_inprocess, ours)
    reports: dict[str, list[dict]] = {}
    for stages in (1, 2):
        spec = ReplicaSpec(
            model_dir=str(model_dir),
            stages=stages,
            max_batch=max_batch,
            max_seq_len=max_seq_len,
            prefill_chunk=prefill_chunk,
            dtype=dtype,
            batch_window_ms=batch_window_ms,
            prefix_cache=False,  # every repeat sends the same prompts: a cache hit would skip their prefill
        )
        replica = Replica(spec, name=f"bench-s{stages}")
        reports[f"S={stages}"] = replica.start()
        systems[f"replica S={stages}"] = (time_replica, replica)
    return systems, reports


@dataclass
class Row:
    system: str
    batch: int
    ttft_ms: float
    ttft_last_ms: float
    tpot_ms: float
    decode_tok_s: float  # nan when T(new) <= T(1): a model too small to time
    e2e_tok_s: float
    foreign_cores: float
    same_as_transformers: str = ""


def measure(
    systems: dict, batches: list[int], prompts: list[list[int]], n: int, repeats: int
) -> list[Row]:
    runs: dict[tuple[str, int], list[tuple[Timeline, Timeline, float]]] = {}
    for timer, target in systems.values():  # warm-up: kernels, thread pools, Ray paths, Gloo
        timer(target, prompts[: min(4, max(batches))], min(4, n))
    for rep in range(repeats):
        for b in batches:
            for name, (timer, target) in systems.items():
                load = ForeignLoad()
                one, full = timer(target, prompts[:b], 1), timer(target, prompts[:b], n)
                runs.setdefault((name, b), []).append((one, full, load.cores()))
                print(
                    f"  repeat {rep + 1}/{repeats} B={b:<3} {name:<13} T(1) {one.makespan_s:6.2f}s  "
                    f"T({n}) {full.makespan_s:6.2f}s  other processes {runs[name, b][-1][2]:.2f} cores",
                    flush=True,
                )
    rows = []
    for (name, b), triples in runs.items():
        ms = [1e3 * statistics.median(f - full.t0 for f in full.first) for _, full, _ in triples]
        last_ms = [1e3 * (max(full.first) - full.t0) for _, full, _ in triples]
        tpot = [
            1e3
            * statistics.median(
                (lt - f) / max(1, n - 1) for f, lt in zip(full.first, full.last, strict=True)
            )
            for _, full, _ in triples
        ]
        gap = [full.makespan_s - one.makespan_s for one, full, _ in triples]
        decode = [b * (n - 1) / g if g > 0 else float("nan") for g in gap]
        e2e = [b * n / full.makespan_s for _, full, _ in triples]
        rows.append(
            Row(
                name,
                b,
                median(ms),
                median(last_ms),
                median(tpot),
                median(decode),
                median(e2e),
                median([c for _, _, c in triples]),
            )
        )
        same = "transformers bf16" if ("transformers bf16", b) in runs else "transformers"  # same precision
        reference, got = runs[same, b][-1][1].tokens, triples[-1][1].tokens
        rows[
            -1
        ].same_as_transformers = f"{sum(r == g for r, g in zip(reference, got, strict=True))}/{b}"
    return sorted(rows, key=lambda r: (r.batch, SYSTEMS.index(r.system)))
