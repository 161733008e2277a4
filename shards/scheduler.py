"""The head stage's scheduler: continuous batching over static KV slots. Pure Python.

Requests wait for a free KV slot; admitted sequences are prefilled, several
prompts packed into one micro-batch and long ones split, at most `prefill_chunk`
prompt tokens per micro-batch, beside the decode steps of sequences already
generating (one token per step). Up to `n_stages` micro-batches are in flight at once so every
stage computes; decoding sequences are split into `n_stages` groups for that.

Results come back in the order micro-batches were sent (the pipeline is FIFO),
and `on_result` turns each into per-request events. A cancelled sequence frees
its slot at once: a micro-batch still in flight may write that slot's KV, but
only at positions the next owner overwrites (its prefill follows in FIFO order)
or masks (beyond its length).
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from shards.errors import RequestError
from shards.kv import SlotAllocator
from shards.sampling import SamplingParams
from shards.transport import Header, Kind, RowMeta


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop_token_ids: frozenset[int] = frozenset()


@dataclass(frozen=True)
class TokenEvent:
    """A token for a request, and/or its end (`finish_reason`: "stop", "length", "cancelled").

    The first token's event also says how long the request waited for a KV slot (`queued_s`).
    """

    request_id: str
    token: int | None
    finish_reason: str | None = None
    queued_s: float | None = None
    error: str | None = None  # set with finish_reason "error": why the request cannot go on


NON_FINITE = -1  # the last stage's "token" for a row whose logits were not finite


@dataclass
class Sequence:
    request: GenerationRequest
    slot: int
    tokens: list[int]  # prompt, then generated tokens
    prefill_sent: int = 0  # prompt tokens already sent for prefill
    generated: int = 0
    awaiting_token: bool = False  # a micro-batch that samples for it is in flight
    queued_s: float = 0.0  # from submit to admission into a slot

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt)

    @property
    def decoding(self) -> bool:
        return self.prefill_sent >= self.prompt_len


@dataclass(frozen=True)
class MicroBatch:
    mb_id: int
    header: Header
    input_ids: list[int]  # [N]: every row's tokens, row after row
    request_ids: tuple[str, ...]  # one per row


@dataclass
class Scheduler:
    n_slots: int
    max_seq_len: int
    prefill_chunk: int
    n_stages: int
    vocab_size: int
    prefix_cache: bool = False
    max_prefill_tokens: int = 0  # the budget when nothing is decoding (0: prefill_chunk then too)
    waiting: deque[GenerationRequest] = field(default_factory=deque)
    running: dict[str, Sequence] = field(default_factory=dict)
    in_flight: deque[MicroBatch] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.slots = SlotAllocator(self.n_slots)
        self._ids = itertools.count()
        # prefix cache: slots of finished sequences, least recently used first, with the
        # tokens whose keys/values they still hold; evicted when a slot is needed
        self.cached: OrderedDict[int, tuple[int, ...]] = OrderedDict()
        self.reused_tokens = 0
        self._arrived: dict[str, float] = {}  # waiting request -> time.monotonic() at submit

    @property
    def free_slots(self) -> int:
        """Slots a new request can take now (free, or holding an evictable cached prefix)."""
        return self.slots.free + len(self.cached)

    # -- intake
    def validate(self, request: GenerationRequest) -> None:
        """Checks that need no scheduler state, so any thread may call this."""
        if not request.prompt:
            raise RequestError("prompt", "must hold at least one token")
        if len(request.prompt) >= self.max_seq_len:
            raise RequestError(
                "prompt", f"{len(request.prompt)} tokens leave no room to generate (max_seq_len={self.max_seq_len})"
            )
        bad = [t for t in request.prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError("prompt", f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        if request.max_new_tokens <= 0:
            raise RequestError("max_new_tokens", f"must be positive, got {request.max_new_tokens}")
        p = request.sampling
        if not p.temperature >= 0:  # also catches NaN
            raise RequestError("temperature", f"must be ≥ 0 (0 = greedy), got {p.temperature}")
        if not 0 < p.top_p <= 1:
            raise RequestError("top_p", f"must be in (0, 1], got {p.top_p}")
        if p.top_k < 0:
            raise RequestError("top_k", f"must be ≥ 0 (0 = off), got {p.top_k}")
        if not 0 <= p.seed < 2**64:  # a uint64 (it travels as the int64 with the same bits)
            raise RequestError("seed", f"must be in [0, 2**64), got {p.seed}")

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request (from the step loop's thread: this reads the queues)."""
        self.validate(request)
        if request.request_id in self.running or any(r.request_id == request.request_id for r in self.waiting):
            raise RequestError("request_id", f"{request.request_id!r} is already running")
        self.waiting.append(request)
        self._arrived[request.request_id] = time.monotonic()

    def cancel(self, request_id: str) -> TokenEvent | None:
        for req in self.waiting:
            if req.request_id == request_id:
                self.waiting.remove(req)
                self._arrived.pop(request_id, None)
                return TokenEvent(request_id, None, "cancelled")
        seq = self.running.pop(request_id, None)
        if seq is None:
            return None
        self.slots.release(seq.slot)
        return TokenEvent(request_id, None, "cancelled")

    def _admit(self) -> None:
        while self.waiting and self.free_slots:
            req = self.waiting.popleft()
            slot, reuse = self._best_prefix(req.prompt)
            if slot is not None:
                del self.cached[slot]
            else:
                slot = self.slots.acquire()
                if slot is None:  # evict the least recently used cached prefix
                    slot, _ = self.cached.popitem(last=False)
            seq = Sequence(req, slot, list(req.prompt), prefill_sent=reuse)
            seq.queued_s = time.monotonic() - self._arrived.pop(req.request_id, time.monotonic())
            self.reused_tokens += reuse
            self.running[req.request_id] = seq

    def _best_prefix(self, prompt: tuple[int, ...]) -> tuple[int | None, int]:
        """The cached slot sharing the longest prefix with `prompt`, and how many tokens it saves.

        At least the prompt's last token is always prefilled: its logits give the first new token.
        """
        best, best_len = None, 0
        for slot, tokens in self.cached.items():
            n = 0
            limit = min(len(tokens), len(prompt) - 1)
            while n < limit and tokens[n] == prompt[n]:
                n += 1
            if n > best_len:
                best, best_len = slot, n
        return best, best_len

    def _finish(self, seq: Sequence) -> None:
        if self.prefix_cache:
            # keys/values exist for every token fed so far: all but the last sampled one
            self.cached[seq.slot] = tuple(seq.tokens[:-1])
        else:
            self.slots.release(seq.slot)

    # -- forming micro-batches
    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running and not self.in_flight

    def gather_until(self, window_s: float) -> float | None:
        """When an idle pipeline should stop waiting for more prompts to prefill together
        (`time.monotonic()`: `window_s` after the oldest waiting request arrived), or None to go now:
        no window, nothing waiting, work in progress, or the waiting prompts already fill a
        micro-batch (its prompt-token budget, or every free slot)."""
        if window_s <= 0 or not self.waiting or self.running or self.in_flight:
            return None
        if len(self.waiting) >= self.free_slots or sum(len(r.prompt) for r in self.waiting) >= self.prefill_budget:
            return None
        first = min(self._arrived.get(r.request_id, time.monotonic()) for r in self.waiting)
        return first + window_s

    def next_microbatch(self) -> MicroBatch | None:
        """The next micro-batch to send, or None (the pipeline is full, or nothing is ready).

        One micro-batch carries a group of decode steps and, beside them, prompt chunks up to
        `prefill_budget` tokens in all (several prompts packed, a long one split): new requests
        are prefilled without stopping the ones decoding, and the pipeline never idles while a
        long prompt is prefilled. Decode waits for a full group while others are in flight:
        sending stragglers alone would split the sequences into ever smaller micro-batches.
        """
        if len(self.in_flight) >= self.n_stages:
            return None
        self._admit()
        ready = [s for s in self.running.values() if s.decoding and not s.awaiting_token]
        group = self._group_size()
        decode = ready[:group] if ready and (len(ready) >= group or not self.in_flight) else []
        rows, inputs, ids = [], [], []
        for seq in decode:
            seq.awaiting_token = True
            rows.append(self._row(seq, len(seq.tokens) - 1, 1, True))
            inputs.append(seq.tokens[-1])
            ids.append(seq.request.request_id)
        budget = self.prefill_budget
        chunks = []
        for seq in self.running.values():
            if budget <= 0:
                break
            if seq.decoding:
                continue
            start = seq.prefill_sent
            n = min(seq.prompt_len - start, budget)
            seq.prefill_sent += n
            budget -= n
            seq.awaiting_token = seq.decoding
            chunks.append((seq, start, n))
        if not rows and not chunks:
            return None
        # equal lengths side by side: the model attends to each run of them in one call
        for seq, start, n in sorted(chunks, key=lambda c: -c[2]):
            rows.append(self._row(seq, start, n, seq.decoding))
            inputs.extend(seq.tokens[start : start + n])
            ids.append(seq.request.request_id)
        header = Header(Kind.DATA, next(self._ids), len(inputs), tuple(rows))
        mb = MicroBatch(header.mb_id, header, inputs, tuple(ids))
        self.in_flight.append(mb)
        return mb

    @property
    def prefill_budget(self) -> int:
        """Prompt tokens the next micro-batch may carry: `prefill_chunk` while any sequence is
        decoding (a longer step delays every stream's next token), `max_prefill_tokens` when none is
        (nobody waits on the step: the prompts go through in as few forwards as memory allows)."""
        if any(s.decoding for s in self.running.values()):
            return self.prefill_chunk
        return max(self.prefill_chunk, self.max_prefill_tokens)

    def _row(self, seq: Sequence, start: int, n: int, sample: bool) -> RowMeta:
        return RowMeta(seq.slot, start, sample, start + n, seq.request.sampling, n)

    def _group_size(self) -> int:
        n_decoding = sum(1 for s in self.running.values() if s.decoding)
        return max(1, -(-n_decoding // self.n_stages))  # ceil: one group per stage

    # -- results
    def on_result(self, mb_id: int, tokens: list[int]) -> list[TokenEvent]:
        mb = self.in_flight.popleft()
        if mb.mb_id != mb_id:
            raise RuntimeError(f"pipeline returned micro-batch {mb_id}, expected {mb.mb_id}")
        sampled = [rid for rid, row in zip(mb.request_ids, mb.header.rows, strict=True) if row.sample]
        events = []
        for rid, token in zip(sampled, tokens, strict=True):
            seq = self.running.get(rid)
            if seq is None:  # cancelled while in flight
                continue
            seq.awaiting_token = False
            if token == NON_FINITE:  # its slot's KV may hold NaNs too: freed, never kept as a prefix
                del self.running[rid]
                self.slots.release(seq.slot)
                events.append(TokenEvent(rid, None, "error", error=(
                    f"the model's logits at position {len(seq.tokens)} are NaN or infinite (an overflow in "
                    f"this precision, or a broken weight); the request cannot go on")))
                continue
            seq.tokens.append(token)
            seq.generated += 1
            reason = None
            if token in seq.request.stop_token_ids:
                reason = "stop"
            elif seq.generated >= seq.request.max_new_tokens or len(seq.tokens) >= self.max_seq_len:
                reason = "length"
            events.append(TokenEvent(rid, token, reason, seq.queued_s if seq.generated == 1 else None))
            if reason:
                del self.running[rid]
                self._finish(seq)
        return events

    def fail_all(self) -> list[str]:
        """Drop every request (the pipeline broke); returns their ids."""
        ids = [r.request_id for r in self.waiting] + list(self.running)
        for seq in self.running.values():
            self.slots.release(seq.slot)
        for slot in self.cached:
            self.slots.release(slot)
        self.cached.clear()
        self.waiting.clear()
        self._arrived.clear()
        self.running.clear()
        self.in_flight.clear()
        return ids
