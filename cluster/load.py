"""Load that checks what it gets: the client side of `ringpipe chaos`.

A pool of requests (prompt, greedy or seeded sampling) is answered once before
any fault (`references`): that is the failure-free output each later request for
the same pool entry must equal, token for token — greedy decoding and a fixed
seed make it deterministic. `Load` then sends requests from the pool over gRPC
with the Python client (the one users have: it retries UNAVAILABLE and resumes
broken streams), unary or streaming, some with session ids, at a fixed
concurrency or a fixed rate, and records each: when, how long, the first token,
and whether the output matched, with any token the server repeated or skipped
in a stream.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from coordinator.client import Client, RingpipeError


@dataclass(frozen=True)
class PoolEntry:
    prompt: tuple[int, ...] | str
    sampling: dict = field(default_factory=dict)  # empty: greedy; else temperature, top_p, seed

    @property
    def kind(self) -> str:
        return "seeded" if self.sampling else "greedy"


@dataclass(frozen=True)
class LoadSettings:
    concurrency: int | None = 4  # requests in flight, each sent when the one before it ends
    rate: float | None = None  # or: requests started per second (Poisson arrivals), whatever is in flight
    max_new_tokens: int = 32
    stream_fraction: float = 0.5
    session_fraction: float = 0.5
    sessions: int = 8
    request_timeout_s: float = 120.0
    max_in_flight: int = 256  # rate mode: arrivals beyond this many in flight wait


def make_pool(size: int, seed: int, sampled_fraction: float = 0.25, prompts: list[str] | None = None,
              id_range: tuple[int, int] = (3, 256)) -> list[PoolEntry]:
    """`size` entries: the given text prompts in turn, else random token-id prompts of 4-24 ids
    (ids below 256 exist in every vocabulary); `sampled_fraction` of them sample with a fixed seed."""
    rng = random.Random(seed)
    pool = []
    for i in range(size):
        if prompts:
            prompt: tuple[int, ...] | str = prompts[i % len(prompts)]
        else:
            prompt = tuple(rng.randrange(*id_range) for _ in range(rng.randint(4, 24)))
        sampled = rng.random() < sampled_fraction
        sampling = {"temperature": 0.8, "top_p": 0.95, "seed": rng.randrange(1 << 31)} if sampled else {}
        pool.append(PoolEntry(prompt, sampling))
    return pool


def references(client: Client, pool: list[PoolEntry], max_new_tokens: int, parallel: int = 4) -> list[list[int]]:
    """Each entry's failure-free output, asked for before any fault."""
    def one(entry: PoolEntry) -> list[int]:
        return client.generate(entry.prompt, max_new_tokens, timeout_s=300, **entry.sampling).token_ids

    with ThreadPoolExecutor(parallel) as workers:
        return list(workers.map(one, pool))


class Load:
    """Requests from `pool` against `target` until `stop()`; `records` are the request records."""

    def __init__(self, target: str, pool: list[PoolEntry], expected: list[list[int]], settings: LoadSettings,
                 seed: int, t0: float, token: str | None = None) -> None:
        if (settings.concurrency is None) == (settings.rate is None):
            raise ValueError("give exactly one of concurrency and rate")
        self.pool, self.expected, self.settings, self.t0 = pool, expected, settings, t0
        self.client = Client(target, token=token, retries=1000, backoff_s=0.1, max_backoff_s=2.0)
        self.records: list[dict] = []
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._next_id = 0
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        if self.settings.concurrency is not None:
            self._threads = [threading.Thread(target=self._closed_loop, daemon=True)
                             for _ in range(self.settings.concurrency)]
        else:
            self._threads = [threading.Thread(target=self._open_loop, daemon=True)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """No new requests; waits for those in flight (each ends by its deadline at the latest)."""
        self._stopped.set()
        for thread in self._threads:
            thread.join()
        self.client.close()

    def _closed_loop(self) -> None:
        while not self._stopped.is_set():
            self._one(self._draw())

    def _open_loop(self) -> None:
        slots = threading.BoundedSemaphore(self.settings.max_in_flight)
        with ThreadPoolExecutor(self.settings.max_in_flight) as workers:
            while not self._stopped.wait(self._rng.expovariate(self.settings.rate)):
                slots.acquire()
                request = self._draw()
                workers.submit(self._one, request).add_done_callback(lambda _: slots.release())

    def _draw(self) -> dict:
        s = self.settings
        with self._lock:
            rng, self._next_id = self._rng, self._next_id + 1
            return {
                "id": f"r-{self._next_id:05d}",
                "prompt": rng.randrange(len(self.pool)),
                "mode": "stream" if rng.random() < s.stream_fraction else "unary",
                "session": f"s-{rng.randrange(s.sessions)}" if rng.random() < s.session_fraction else None,
            }

    def _one(self, request: dict) -> None:
        entry = self.pool[request["prompt"]]
        record = {**request, "sampling": entry.kind, "t_start": time.monotonic() - self.t0, "ttft_s": None,
                  "ok": False, "error": None, "tokens": 0, "mismatch": False, "repeated": 0, "lost": 0, "resumes": 0}
        options = dict(entry.sampling, session_id=request["session"] or "", timeout_s=self.settings.request_timeout_s)
        got: list[int] = []
        try:
            if request["mode"] == "unary":
                got = self.client.generate(entry.prompt, self.settings.max_new_tokens, **options).token_ids
            else:
                for piece in self.client.stream(entry.prompt, self.settings.max_new_tokens, **options):
                    if record["ttft_s"] is None and piece.token_ids:
                        record["ttft_s"] = time.monotonic() - self.t0 - record["t_start"]
                    if piece.offset != len(got):  # the client hands over each token once, in order
                        record["lost"] += max(0, piece.offset - len(got))
                        record["repeated"] += max(0, len(got) - piece.offset)
                    record["repeated"] += piece.repeated
                    record["resumes"] = piece.resumes
                    got.extend(piece.token_ids)
            record["ok"] = True
        except RingpipeError as exc:
            record["error"] = f"{exc.code.name}: {exc.details}"
            if exc.code.name == "DATA_LOSS":  # the server skipped tokens of a stream
                record["lost"] += 1
        except Exception as exc:  # noqa: BLE001 — a request that breaks the client is a failed request
            record["error"] = f"{type(exc).__name__}: {exc}"
        record["t_end"] = time.monotonic() - self.t0
        record["tokens"] = len(got)
        record["mismatch"] = record["ok"] and got != self.expected[request["prompt"]]
        with self._lock:
            self.records.append(record)
