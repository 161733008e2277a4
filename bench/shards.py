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
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on 127.0.0.1
# This file is named shards.py: drop its folder from the path so that `shards` is the package,
# here and in the Ray workers (they inherit the driver's path).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import psutil  # noqa: E402
import torch  # noqa: E402

from shards.create import RandomModelSpec, create_random_checkpoint  # noqa: E402
from shards.inprocess import InProcessModel  # noqa: E402
from shards.sampling import SamplingParams, sample  # noqa: E402

SYSTEMS = ("transformers", "in-process", "replica S=1", "replica S=2")
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
MiB = 1 << 20
# libgomp reads these when torch loads; Ray workers inherit them from the driver. They decide whether
# idle OpenMP threads spin or sleep, which on a shared machine decides more than the code does.
OMP_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


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


class ForeignLoad:
    """Cores the rest of the machine kept busy since construction: /proc/stat busy time minus our tree's.

    On a 2-core box one busy neighbour makes a 2-thread torch team wait for its second core at
    every op, so every timed run carries this figure.
    """

    def __init__(self) -> None:
        self._me = psutil.Process()
        self._start = (time.perf_counter(), self._busy_s(), self._ours_s())

    @staticmethod
    def _busy_s() -> float:
        user, nice, system, _, _, irq, softirq = (
            int(x) for x in Path("/proc/stat").read_text().split()[1:8]
        )
        return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")

    def _ours_s(self) -> float:
        total = 0.0
        for proc in [self._me, *self._me.children(recursive=True)]:
            try:
                t = proc.cpu_times()  # children_*: our descendants that have exited
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.Error:  # ended meanwhile
                continue
        return total

    def cores(self) -> float:
        wall, busy, ours = self._start
        return max(0.0, (self._busy_s() - busy) - (self._ours_s() - ours)) / (
            time.perf_counter() - wall
        )


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
    model_dir: Path, max_batch: int, max_seq_len: int, prefill_chunk: int
) -> tuple[dict, dict]:
    """{name: (timer, target)}, and each replica's per-stage memory report from `start()`."""
    from transformers import AutoModelForCausalLM

    from shards.replica import Replica
    from shards.spec import ReplicaSpec

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # run the full length, as the others do
    ours = InProcessModel(model_dir, n_stages=1, n_slots=max_batch, max_seq_len=max_seq_len)
    systems: dict = {"transformers": (time_transformers, hf), "in-process": (time_inprocess, ours)}
    reports: dict[str, list[dict]] = {}
    for stages in (1, 2):
        spec = ReplicaSpec(
            model_dir=str(model_dir),
            stages=stages,
            max_batch=max_batch,
            max_seq_len=max_seq_len,
            prefill_chunk=prefill_chunk,
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
        reference, got = runs["transformers", b][-1][1].tokens, triples[-1][1].tokens
        rows[
            -1
        ].same_as_transformers = f"{sum(r == g for r, g in zip(reference, got, strict=True))}/{b}"
    return sorted(rows, key=lambda r: (r.batch, SYSTEMS.index(r.system)))


# -- the activation hop between two stage processes ---------------------------------------------


def hop_latencies(sizes: list[int], iters: int) -> list[dict]:
    """Round trips (payload both ways) between two Ray actors: Gloo send/recv, ray.put + ref, call argument."""
    import ray

    @ray.remote(num_cpus=1)
    class Peer:
        def __init__(self) -> None:
            torch.set_num_threads(1)
            self.store = None

        def open_store(self) -> int:
            from shards.transport import open_rendezvous

            self.store = open_rendezvous("127.0.0.1", 2, 60.0)
            return self.store.port

        def join(self, rank: int, port: int) -> None:
            import torch.distributed as dist

            os.environ["GLOO_SOCKET_IFNAME"] = "lo"
            store = self.store or dist.TCPStore("127.0.0.1", port, 2, is_master=False)
            dist.init_process_group("gloo", store=store, rank=rank, world_size=2)

        def gloo_round_trips(self, rank: int, nbytes: int, iters: int) -> list[float]:
            import torch.distributed as dist

            buf, times = torch.zeros(nbytes // 4), []
            for _ in range(iters):
                t = time.perf_counter()
                if rank == 0:
                    dist.send(buf, 1)
                    dist.recv(buf, 1)
                else:
                    dist.recv(buf, 0)
                    dist.send(buf, 0)
                times.append(time.perf_counter() - t)
            return times

        def echo(self, x: torch.Tensor) -> torch.Tensor:
            return x

        def ray_round_trips(self, peer, nbytes: int, iters: int, by_ref: bool) -> list[float]:
            x, times = torch.zeros(nbytes // 4), []
            for _ in range(iters):
                t = time.perf_counter()
                ray.get(peer.echo.remote(ray.put(x) if by_ref else x))
                times.append(time.perf_counter() - t)
            return times

    a, b = Peer.remote(), Peer.remote()
    port = ray.get(a.open_store.remote())
    ray.get([a.join.remote(0, port), b.join.remote(1, port)])
    out = []
    for nbytes in sizes:
        k = max(20, iters if nbytes <= 64 * 1024 else iters // 5)
        for path, refs in (
            (
                "gloo send/recv",
                [a.gloo_round_trips.remote(0, nbytes, k), b.gloo_round_trips.remote(1, nbytes, k)],
            ),
            ("ray.put + ref", [a.ray_round_trips.remote(b, nbytes, k, True)]),
            ("actor call arg", [a.ray_round_trips.remote(b, nbytes, k, False)]),
        ):
            load = ForeignLoad()
            times = sorted(ray.get(refs)[0][k // 10 :])  # rank 0's times; the first tenth warms up
            out.append(
                {
                    "path": path,
                    "bytes": nbytes,
                    "samples": len(times),
                    "foreign_cores": load.cores(),
                    "median_us": 1e6 * statistics.median(times),
                    "p90_us": 1e6 * times[int(0.9 * len(times))],
                }
            )
            print(
                f"  hop {path:<15} {nbytes // 1024:>5} KiB  median {out[-1]['median_us']:8.0f} us",
                flush=True,
            )
    for actor in (a, b):
        ray.kill(actor)
    return out


# -- memory per stage ---------------------------------------------------------------------------


def proc_memory(pid: int, model_dir: Path) -> dict[str, int]:
    """RSS of a process on this machine, its anonymous part, and what is resident of the checkpoint's mmap."""
    out = {"rss": 0, "anon": 0, "checkpoint": 0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            out["rss" if key == "VmRSS" else "anon"] = int(value.split()[0]) * 1024
    in_checkpoint, root = False, str(model_dir.resolve())
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and not head[0].endswith(
            ":"
        ):  # a mapping's header line: range perms offset dev inode [path]
            in_checkpoint = len(head) >= 6 and head[5].startswith(root)
        elif in_checkpoint and head[0] == "Rss:":
            out["checkpoint"] += int(head[1]) * 1024
    return out


def replica_memory(systems: dict, model_dir: Path) -> dict[str, list[dict]]:
    return {
        f"S={s}": [proc_memory(n["pid"], model_dir) for n in systems[f"replica S={s}"][1].nodes()]
        for s in (1, 2)
    }


def bare_memory(replica, model_dir: Path) -> list[dict]:
    """Memory of stage actors built like `replica`'s stages (same spec and plan) that never connect or load."""
    import ray

    from shards.actor import StageActor

    actors = [
        StageActor.options(num_cpus=0).remote(replica.spec, p, replica.args, "bare")
        for p in replica.plans
    ]
    pids = [node["pid"] for node in ray.get([a.node.remote() for a in actors])]
    out = [proc_memory(pid, model_dir) for pid in pids]
    for actor in actors:
        ray.kill(actor)
    return out


def stage_memory(systems: dict, reports: dict, after_start: dict, model_dir: Path) -> list[dict]:
    out, after_bench = [], replica_memory(systems, model_dir)
    for key in ("S=1", "S=2"):
        bare = bare_memory(systems[f"replica {key}"][1], model_dir)
        for i, (rep, b, start, bench) in enumerate(
            zip(reports[key], bare, after_start[key], after_bench[key], strict=True)
        ):
            weights, kv = rep["planned_weight_bytes"], rep["planned_kv_bytes"]
            out.append(
                {
                    "replica": key,
                    "stage": i,
                    "planned_weight_bytes": weights,
                    "planned_kv_bytes": kv,
                    "load_rss_delta_bytes": rep["loaded_rss_bytes"],  # what Replica.start() reports
                    "start_minus_bare_bytes": start["rss"] - b["rss"],
                    "bench_minus_bare_bytes": bench["rss"] - b["rss"],
                    "checkpoint_resident_bytes": bench["checkpoint"],
                    "anon_minus_bare_bytes": bench["anon"] - b["anon"],
                    "ratio": (bench["rss"] - b["rss"]) / (weights + kv),
                }
            )
    return out


# -- report -------------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(str(c) for c in r) + " |" for r in rows)])


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

    worst = max(memory, key=lambda m: abs(m["ratio"] - 1))
    return [
        ratio(
            ("replica S=1", 8), ("transformers", 8), 1.5, "S=1 vs transformers, decode tok/s, B=8"
        ),
        ratio(
            ("replica S=2", 32),
            ("in-process", 32),
            0.8,
            "S=2 vs one-process ceiling, decode tok/s, B=32",
        ),
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

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "shards"], capture_output=True, text=True
    ).stdout.split()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ray": ray.__version__,
        "omp_env": {k: os.environ[k] for k in OMP_ENV if k in os.environ},
        "commit": git + (f" + uncommitted changes in {', '.join(dirty[1::2])}" if dirty else ""),
    }


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

**Model:** random Llama-shaped checkpoint, {model["params"] / 1e6:.1f}M parameters, fp32 ({model["spec"]}).
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
  so its requests share one TTFT; ours prefill one prompt at a time (the replica interleaves those
  prefills with decode steps of the requests already admitted), so TTFT grows along the batch.
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


# -- main ---------------------------------------------------------------------------------------


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
    p.add_argument("--prefill-chunk", type=int, default=128)
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
            model_dir, max(args.batch_list), args.prompt_len + args.new_tokens, args.prefill_chunk
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
            f"\n\n**Warning:** other processes used up to {busy:.2f} cores. With libgomp's default spinning a "
            "two-thread torch team in the driver (transformers, in-process) then loses most of its time waiting "
            "for a descheduled partner, while replica stages, which own more OpenMP teams than there are cores, "
            "spin briefly and sleep: the comparison is skewed in the replicas' favour. Re-run with "
            "`GOMP_SPINCOUNT=1000` to give every system the same policy."
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
