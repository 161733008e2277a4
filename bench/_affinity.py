"""Affinity: a multi-turn chat workload routed by session (KV stays put) against random routing.

Each session starts from a random prompt; every later turn sends the whole conversation again:
the previous prompt, the previous completion and a few new "user" tokens (random ids from a
fixed seed, so both modes send the same turns). Completions are greedy with eos ignored, so their
lengths are fixed. `concurrency` client threads each take a session and play its turns one after
another, the next session when it is done, as chat users do.

The replicas keep a finished sequence's KV in its slot (`pipeline.prefix_cache`, on in both modes)
for a later prompt that extends it. Only a turn that lands on the replica holding the previous
turn can skip re-reading the conversation: `routing.key=session` sends every turn of a session to
the same replica (unless bounded loads divert it), `random` to any of them. Each mode runs on its
own fresh service (Serve runs one application per cluster; its ports are freed in between), after
one warm-up request per replica head, sent to it directly so that every stage has paged in its
weights before the clock starts. Cache evidence is the heads' `reused_tokens` counters (prompt
tokens whose KV came from the cache), read from the controller before and after the run.
"""

from __future__ import annotations

import queue
import random
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench._foreign_load import ForeignLoad
from bench._front import free_port, percentiles
from bench._results import table
from shards.create import RandomModelSpec, create_random_checkpoint

MODEL = RandomModelSpec(arch="llama", layers=8, hidden=512, heads=8, kv_heads=4, vocab=2048, seed=0)
STAGES, MAX_BATCH, MAX_QUEUE, MAX_SEQ_LEN, PREFILL_CHUNK = 2, 16, 16, 1024, 512
MODES = ("session", "random")


@dataclass(frozen=True)
class Workload:
    sessions: int = 16
    turns: int = 4
    first_prompt_tokens: int = 300
    user_tokens: int = 32  # new tokens a later turn adds after the previous completion
    new_tokens: int = 16
    concurrency: int = 8
    seed: int = 0

    def scripts(self) -> list[tuple[list[int], list[list[int]]]]:
        """Per session: the first prompt and the user tokens of turns 2, 3, …"""
        rng = random.Random(self.seed)

        def ids(n: int) -> list[int]:
            return [rng.randrange(3, MODEL.vocab) for _ in range(n)]

        return [
            (ids(self.first_prompt_tokens), [ids(self.user_tokens) for _ in range(self.turns - 1)])
            for _ in range(self.sessions)
        ]


@dataclass
class Turn:
    session: int
    turn: int  # 1-based
    prompt_tokens: int
    client_ttft_ms: float  # stream call → first token, at the client
    server_ttft_ms: float  # the coordinator's time_to_first_token_ms
    queue_ms: float
    total_ms: float
    replica_id: str
    completion: list[int] = field(default_factory=list)


def drive(target: str, work: Workload) -> tuple[list[Turn], float]:
    """Play every session's turns; the turns and the wall time of the whole workload."""
    from coordinator.client import Client

    sessions: queue.Queue[int] = queue.Queue()
    for s in range(work.sessions):
        sessions.put(s)
    scripts, turns, errors, lock = work.scripts(), [], [], threading.Lock()

    def player() -> None:
        with Client(target) as client:
            while True:
                try:
                    s = sessions.get_nowait()
                except queue.Empty:
                    return
                history, users = scripts[s]
                for t in range(work.turns):
                    prompt, completion, first, timings, replica = list(history), [], None, {}, ""
                    t0 = time.perf_counter()
                    for piece in client.stream(
                        prompt, work.new_tokens, session_id=f"session-{s}", ignore_eos=True
                    ):
                        if piece.token_ids and first is None:
                            first = time.perf_counter()
                        completion += piece.token_ids
                        timings, replica = piece.timings or timings, piece.replica_id or replica
                    done = time.perf_counter()
                    with lock:
                        turns.append(
                            Turn(
                                s,
                                t + 1,
                                len(prompt),
                                (first - t0) * 1e3,
                                timings["time_to_first_token_ms"],
                                timings["queue_ms"],
                                (done - t0) * 1e3,
                                replica,
                                completion,
                            )
                        )
                    if t + 1 < work.turns:
                        history = prompt + completion + users[t]

    def guarded() -> None:
        try:
            player()
        except Exception as exc:  # noqa: BLE001 — raised again in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, daemon=True) for _ in range(work.concurrency)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return sorted(turns, key=lambda x: (x.session, x.turn)), time.perf_counter() - t0


def _warm_up(controller, prompt_tokens: int) -> None:
    """One request to every replica head at once, straight through Ray (routing cannot aim)."""
    import ray

    from shards.replica import make_request

    rng = random.Random(12345)
    heads = [m.head for m in ray.get(controller.membership.remote()).members]
    gens = [
        h.generate.options(num_returns="streaming").remote(
            make_request([rng.randrange(3, MODEL.vocab) for _ in range(prompt_tokens)], 4)
        )
        for h in heads
    ]
    for gen in gens:
        for ref in gen:
            ray.get(ref)


def _reused_tokens(controller) -> dict[str, int]:
    import ray

    return {
        rid: stages[0]["reused_tokens"]
        for rid, stages in ray.get(controller.stats.remote()).items()
    }


def run_mode(model_dir: Path, mode: str, work: Workload, replicas: int, coordinators: int) -> dict:
    from cluster.config import parse_config
    from cluster.serve import start_service

    cfg = parse_config(
        {
            "model": {"path": str(model_dir)},
            "pipeline": {
                "stages": STAGES,
                "max_batch": MAX_BATCH,
                "max_queue": MAX_QUEUE,
                "max_seq_len": MAX_SEQ_LEN,
                "prefill_chunk": PREFILL_CHUNK,
                "prefix_cache": True,
            },
            "replicas": {"count": replicas},
            "routing": {"key": mode},
            "server": {"port": free_port(), "http_port": free_port(), "metrics_port": 0,
                       "coordinators": coordinators},
        }
    )
    began = time.perf_counter()
    service = start_service(cfg, progress=False)
    try:
        started_s = time.perf_counter() - began
        _warm_up(service.controller, work.first_prompt_tokens)
        before = _reused_tokens(service.controller)
        load = ForeignLoad()
        turns, wall_s = drive(service.target, work)
        cores = load.cores()
        after = _reused_tokens(service.controller)
    finally:
        service.shutdown()
    return {
        "mode": mode,
        "start_s": started_s,
        "wall_s": wall_s,
        "foreign_cores": cores,
        "reused_tokens": {rid: after[rid] - before.get(rid, 0) for rid in after},
        "turns": [asdict(t) for t in turns],
    }


def summarise(m: dict, work: Workload) -> dict:
    """Percentiles per turn group, throughput, and the cache evidence, from one mode's raw turns."""
    turns = m["turns"]
    by = {(t["session"], t["turn"]): t for t in turns}
    groups = {
        "turn 1": [t for t in turns if t["turn"] == 1],
        "turns ≥ 2": [t for t in turns if t["turn"] >= 2],
        "all turns": turns,
    }
    later = groups["turns ≥ 2"]
    # the most a cache can give a later turn: every token of the previous turn that has KV
    # (its prompt and completion, less the last sampled token, which was never fed back)
    reusable = sum(
        by[t["session"], t["turn"] - 1]["prompt_tokens"] + work.new_tokens - 1 for t in later
    )
    completion_tokens = sum(len(t["completion"]) for t in turns)
    return {
        "groups": {
            name: {
                "server_ttft": percentiles([t["server_ttft_ms"] for t in g]),
                "client_ttft": percentiles([t["client_ttft_ms"] for t in g]),
                "queue": percentiles([t["queue_ms"] for t in g]),
            }
            for name, g in groups.items()
        },
        "completion_tok_s": completion_tokens / m["wall_s"],
        "turns_s": len(turns) / m["wall_s"],
        "prompt_tokens": sum(t["prompt_tokens"] for t in turns),
        "reused_tokens": sum(m["reused_tokens"].values()),
        "reusable_tokens": reusable,
        "stayed": sum(
            t["replica_id"] == by[t["session"], t["turn"] - 1]["replica_id"] for t in later
        ),
        "later_turns": len(later),
        "turns_per_replica": {
            rid: sum(t["replica_id"] == rid for t in turns) for rid in sorted(m["reused_tokens"])
        },
    }


def run(work: Workload, replicas: int = 4, coordinators: int = 2) -> dict:
    model_dir = Path(tempfile.mkdtemp(prefix="ringpipe-affinity-"))
    began = time.perf_counter()
    try:
        create_random_checkpoint(model_dir, MODEL)
        modes = {mode: run_mode(model_dir, mode, work, replicas, coordinators) for mode in MODES}
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    summary = {mode: summarise(m, work) for mode, m in modes.items()}
    completions = {
        mode: {(t["session"], t["turn"]): t["completion"] for t in m["turns"]}
        for mode, m in modes.items()
    }
    same = sum(
        completions["session"][k] == completions["random"].get(k) for k in completions["session"]
    )
    p50 = {mode: summary[mode]["groups"]["all turns"]["server_ttft"]["p50"] for mode in MODES}
    return {
        "model": f"random llama, layers={MODEL.layers}, hidden={MODEL.hidden}, heads={MODEL.heads}, "
        f"kv_heads={MODEL.kv_heads}, vocab={MODEL.vocab}",
        "pipeline": f"{replicas} replicas × {STAGES} stages, max_batch={MAX_BATCH}, max_queue={MAX_QUEUE}, "
        f"max_seq_len={MAX_SEQ_LEN}, prefill_chunk={PREFILL_CHUNK}, prefix_cache on, "
        f"{coordinators} coordinators",
        "workload": asdict(work),
        "elapsed_s": time.perf_counter() - began,
        "modes": modes,
        "summary": summary,
        "same_completions": f"{same}/{len(completions['session'])}",
        "ttft_p50_ratio": p50["random"] / p50["session"],
        "target_met": p50["random"] / p50["session"] >= 2.0,
    }


def _ms(p: dict) -> str:
    return f"{p['p50']:.0f} / {p['p99']:.0f}"


def render(r: dict) -> str:
    """The affinity section of `bench/results/coordinator.md`."""
    w, s, modes = r["workload"], r["summary"], r["modes"]
    ttft_rows = [
        [
            mode,
            group,
            g["server_ttft"]["samples"],
            _ms(g["server_ttft"]),
            _ms(g["client_ttft"]),
            _ms(g["queue"]),
        ]
        for mode in MODES
        for group, g in s[mode]["groups"].items()
    ]

    def ratio(group: str, side: str) -> str:
        return f"{s['random']['groups'][group][side]['p50'] / s['session']['groups'][group][side]['p50']:.2f}×"

    ratio_rows = [
        [group, ratio(group, "server_ttft"), ratio(group, "client_ttft")]
        for group in s["session"]["groups"]
    ]
    run_rows = [
        [
            mode,
            f"{modes[mode]['wall_s']:.1f}",
            f"{s[mode]['completion_tok_s']:.1f}",
            f"{s[mode]['turns_s']:.2f}",
            f"{s[mode]['reused_tokens']:,} / {s[mode]['reusable_tokens']:,} "
            f"({s[mode]['reused_tokens'] / s[mode]['reusable_tokens']:.0%})",
            f"{s[mode]['reused_tokens'] / s[mode]['prompt_tokens']:.0%}",
            f"{s[mode]['stayed']} / {s[mode]['later_turns']}",
            ", ".join(str(n) for n in s[mode]["turns_per_replica"].values()),
            f"{modes[mode]['foreign_cores']:.2f}",
        ]
        for mode in MODES
    ]
    verdict = "met" if r["target_met"] else "MISSED"
    started = f"{modes['session']['start_s']:.0f} s and {modes['random']['start_s']:.0f} s"
    ttft_headers = ["routing", "turns", "samples", "server TTFT", "client TTFT", "queue for a slot"]
    run_headers = [
        "routing",
        "wall s",
        "completion tok/s",
        "turns/s",
        "prompt tokens from cache / reusable",
        "of all prompt tokens",
        "later turns on the previous turn's replica",
        "turns per replica",
        "other procs, cores",
    ]
    return f"""## Affinity: session routing with prefix reuse vs random routing

**Service:** {r["model"]}; {r["pipeline"]}. Each mode on a fresh service (started in {started});
this section took {r["elapsed_s"]:.0f} s.

**Workload:** {w["sessions"]} sessions × {w["turns"]} turns, {w["concurrency"]} sessions in flight,
each session's turns one after another. Turn 1: {w["first_prompt_tokens"]} random token ids;
turn k+1: turn k's prompt + its {w["new_tokens"]}-token completion (greedy, eos ignored) +
{w["user_tokens"]} new ids (seed {w["seed"]}).
Completions identical in both modes: {r["same_completions"]} turns.

**Target:** session routing + prefix reuse gives ≥ 2× lower TTFT p50 (server-measured, all turns)
than random routing: **{r["ttft_p50_ratio"]:.2f}× — {verdict}**.

### Time to first token, ms (p50 / p99)

{table(ttft_headers, ttft_rows)}

### Random ÷ session, TTFT p50

{table(["turns", "server TTFT", "client TTFT"], ratio_rows)}

### Throughput and cache evidence

{table(run_headers, run_rows)}
"""
