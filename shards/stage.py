"""One pipeline stage: its layers, its KV slots, and its step loop.

`Stage` is plain Python (testable without Ray): it loads its own tensors,
joins the replica's process group and runs its step loop in a background
thread, so `ping`, `stats` and `shutdown` answer while it computes.

- Stage 0 (the head) owns the `Scheduler`: it takes requests, forms
  micro-batches, computes its layers and sends activations on; it receives the
  sampled tokens back from the last stage and hands them to each request's sink.
- Every other stage relays: receive, compute its layers, send on; the last one
  samples and sends the tokens to the head.

A transport failure ends the loop, marks the stage FAILED, fails every request
at the head with `ReplicaFailed`, and closes the process group so that peers
blocked on this stage fail too instead of hanging.
"""

from __future__ import annotations

import collections
import concurrent.futures
import enum
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil
import torch

from shards.checkpoint import load_stage, stage_shapes
from shards.errors import (
    DoesNotFit,
    NonFiniteLogits,
    Overloaded,
    ReplicaFailed,
    RequestError,
    ShardsError,
)
from shards.kv import StageCache, to_device
from shards.model import ModelArgs, Packed, StageModel
from shards.partition import StagePlan, activation_bytes
from shards.sampling import sample
from shards.scheduler import NON_FINITE, GenerationRequest, MicroBatch, Scheduler, TokenEvent
from shards.spec import ReplicaSpec
from shards.tp import rank_numel, use_deepspeed
from shards.transport import Header, Kind, PipeLink, open_rendezvous

Sink = Callable[[TokenEvent | BaseException], None]


class StageState(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class _Submit:
    request: GenerationRequest
    sink: Sink


@dataclass(frozen=True)
class _Cancel:
    request_id: str


class _Stop:
    pass


class _TorchThread:
    """The one thread that runs a stage's torch work: loading, then the step loop.

    libgomp keeps a pool of worker threads per thread that ever ran a parallel region, and when
    the process holds more pool threads than it has CPUs it stops spinning between regions: every
    matmul then waits for its workers to wake. Loading in one thread and stepping in another made
    a stage on 2 cores decode 30 % slower than the same model in one thread (58 vs 45 ms a step).
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, done = job
            if done.set_running_or_notify_cancel():
                try:
                    done.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 — handed to whoever waits on it
                    done.set_exception(exc)

    def submit(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fn, done))
        return done

    def close(self) -> None:
        self._jobs.put(None)


class Stage:
    def __init__(
        self, spec: ReplicaSpec, plan: StagePlan, args: ModelArgs, replica: str, tp_rank: int = 0
    ) -> None:
        self.spec, self.plan, self.args, self.replica = spec, plan, args, replica
        self.tp, self.tp_rank = spec.tensor_parallel, tp_rank
        self.global_rank = plan.index * self.tp + tp_rank
        self.state = StageState.STARTING
        self.error: str | None = None
        self.device = torch.device("cuda" if spec.device == "cuda" else "cpu")
        threads = spec.torch_threads or max(1, (os.cpu_count() or 1) // (spec.stages * self.tp))
        self._torch = _TorchThread(self.name)
        self._torch.submit(lambda: torch.set_num_threads(threads)).result()
        self._store = None
        self._link: PipeLink | None = None
        self.model: StageModel | None = None
        self.cache: StageCache | None = None
        self._inbox: queue.Queue = queue.Queue()
        self._sinks: dict[str, Sink] = {}
        # requests accepted and not yet finished, counted where they are accepted (the actor's
        # threads) so that the bound holds before the step loop has seen them
        self._outstanding: set[str] = set()
        self._outstanding_lock = threading.Lock()
        self._loop: concurrent.futures.Future | None = None  # the step loop, on the torch thread
        self.scheduler = Scheduler(
            spec.max_batch, spec.max_seq_len, spec.prefill_chunk, spec.stages, args.vocab_size,
            prefix_cache=spec.prefix_cache, max_prefill_tokens=spec.max_prefill_tokens,
        )
        self.steps = 0
        # the head's view of its pipeline, read by `ping` (from the actor's thread, without a lock):
        # when it began waiting for a result (None: not waiting), and recent micro-batch round trips
        self._waiting_since: float | None = None
        self._sent_at: dict[int, float] = {}
        self._round_trips: collections.deque[tuple[float, float]] = collections.deque(maxlen=64)
        self.tokens_out = 0
        self.loaded_rss_bytes = 0

    @property
    def name(self) -> str:
        suffix = f".tp{self.tp_rank}" if self.tp > 1 else ""
        return f"{self.replica}/stage-{self.plan.index}{suffix}"

    # -- setup
    def open_rendezvous(self, host: str) -> int:
        self._store = open_rendezvous(host, self.spec.stages * self.tp, self.spec.transport_timeout_s)
        return self._store.port

    def connect(self, host: str, port: int, local_address: str | None = None) -> None:
        """Join the replica's process group at stage 0's `host:port`; `local_address`: this node's own."""
        if self.spec.stages * self.tp == 1:
            return
        self._link = PipeLink(
            self.global_rank,
            self.spec.stages * self.tp,
            host,
            port,
            self.spec.backend,
            self.spec.transport_timeout_s,
            self.spec.max_batch,
            self.device,
            store=self._store,
            tp=self.tp,
            local_address=local_address,
            socket_ifname=self.spec.socket_ifname,
        )

    def free_bytes(self) -> int:
        """Memory this stage's device has free now: the GPU's (CUDA), else the host's available RAM."""
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0]
        return psutil.virtual_memory().available

    def check_fits(self) -> None:
        """Refuse (DoesNotFit) a stage whose weights and KV slots exceed the device's free memory.

        A tensor-parallel rank needs its share: its slices of the split tensors, the replicated ones
        whole, and its share of the KV slots."""
        p, gib = self.plan, 1 << 30
        shapes = stage_shapes(self.args, p.layer_start, p.layer_end, p.first, p.last)
        weights = self.spec.torch_dtype.itemsize * sum(
            rank_numel(name, shape, self.args, self.tp_rank, self.tp) for name, shape in shapes.items())
        kv = p.kv_bytes // self.tp
        s = self.spec
        tokens = max(s.prefill_chunk, s.max_prefill_tokens) + s.max_batch  # the largest micro-batch
        act = activation_bytes(self.args, tokens, s.torch_dtype, self.tp, p.last, s.max_batch)
        needed, free = weights + kv + act, self.free_bytes()
        if needed > free:
            raise DoesNotFit(
                f"{self.name} needs {needed / gib:.2f} GiB ({weights / gib:.2f} GiB of weights for "
                f"layers {p.layer_start}-{p.layer_end - 1} + {kv / gib:.2f} GiB of KV slots for "
                f"pipeline.max_batch {s.max_batch} x pipeline.max_seq_len {s.max_seq_len} + {act / gib:.2f} GiB "
                f"of activations for a forward of {tokens} tokens, pipeline.max_prefill_tokens "
                f"{s.max_prefill_tokens} / pipeline.prefill_chunk {s.prefill_chunk}) but its {self.device.type} has "
                f"{free / gib:.2f} GiB free: lower those settings, cut the model into more stages (pipeline.stages), "
                f"or split each stage over more ranks (pipeline.tensor_parallel)"
            )

    def load(self) -> dict:
        """Read this stage's tensors and allocate its KV slots (refused first if they cannot fit,
        `check_fits`); returns planned vs measured bytes. Runs on the stage's torch thread."""
        return self._torch.submit(self._load).result()

    def _load(self) -> dict:
        self.check_fits()
        rss_before = psutil.Process().memory_info().rss
        p = self.plan
        self.model = load_stage(
            self.spec.model_dir, self.args, p.layer_start, p.layer_end, p.first, p.last,
            self.spec.torch_dtype, self.device, self.tp_rank, self.tp, self._link.tp_group if self.tp > 1 else None,
        )
        if self.tp > 1 and self.spec.tp_engine == "deepspeed":
            self.model = use_deepspeed(self.model, self._link.tp_group, self.spec.backend)
        self.cache = StageCache(
            range(p.layer_start, p.layer_end), self.spec.max_batch, self.spec.max_seq_len,
            self.args.num_kv_heads // self.tp, self.args.head_dim, self.spec.torch_dtype, self.device,
        )
        self.loaded_rss_bytes = psutil.Process().memory_info().rss - rss_before
        return self.memory()

    def memory(self) -> dict:
        weights = sum(t.nbytes for t in self.model.parameters()) if self.model else 0
        return {
            "planned_weight_bytes": self.plan.weight_bytes,
            "planned_kv_bytes": self.plan.kv_bytes,
            "weight_bytes": weights,
            "kv_bytes": self.cache.nbytes() if self.cache else 0,
            "loaded_rss_bytes": self.loaded_rss_bytes,
            # what the GPU holds for this process (tensors, not the caching allocator's spare)
            "device_bytes": torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0,
        }

    @property
    def is_head(self) -> bool:
        return self.plan.first and self.tp_rank == 0

    def start(self) -> None:
        if self.tp_rank > 0:
            loop = self._follower_loop
        else:
            loop = self._head_loop if self.plan.first else self._relay_loop
        self.state = StageState.SERVING
        self._loop = self._torch.submit(lambda: self._run(loop))

    # -- requests (head only)
    def submit(self, request: GenerationRequest, sink: Sink) -> None:
        if not self.is_head:
            raise ShardsError(f"{self.name} is not the head stage")
        if self.state is not StageState.SERVING:
            raise ReplicaFailed(f"{self.name} is {self.state.value}: {self.error or 'not serving'}")
        self.scheduler.validate(request)  # bad input fails here, before it touches the loop
        limit = self.spec.max_batch + self.spec.max_queue
        with self._outstanding_lock:
            if request.request_id in self._outstanding:
                raise RequestError("request_id", f"{request.request_id!r} is already running")
            if len(self._outstanding) >= limit:
                raise Overloaded(
                    f"replica {self.replica} is full: {self.spec.max_batch} requests generating "
                    f"and {self.spec.max_queue} waiting (pipeline.max_batch + pipeline.max_queue)"
                )
            self._outstanding.add(request.request_id)
        self._inbox.put(_Submit(request, self._counted(request.request_id, sink)))

    def _counted(self, request_id: str, sink: Sink) -> Sink:
        """Wraps a sink so that the request stops counting against the queue bound when it ends."""

        def deliver(event: TokenEvent | BaseException) -> None:
            if isinstance(event, BaseException) or event.finish_reason:
                with self._outstanding_lock:
                    self._outstanding.discard(request_id)
            sink(event)

        return deliver

    def cancel(self, request_id: str) -> None:
        self._inbox.put(_Cancel(request_id))

    def ping(self) -> dict:
        """Liveness, and the head's load (read without the loop's lock: a snapshot, not a contract)."""
        s = self.scheduler
        return {
            "stage": self.plan.index, "state": self.state.value, "error": self.error, "time": time.time(),
            "running": len(s.running), "waiting": len(s.waiting),
        }

    def stats(self) -> dict:
        s = self.scheduler
        return {
            "replica": self.replica,
            "stage": self.plan.index,
            "layers": [self.plan.layer_start, self.plan.layer_end],
            "state": self.state.value,
            "error": self.error,
            "steps": self.steps,
            "tokens_out": self.tokens_out,
            "running": len(s.running),
            "waiting": len(s.waiting),
            "outstanding": len(self._outstanding),
            "free_slots": s.free_slots if self.is_head else None,
            "cached_prefixes": len(s.cached),
            "reused_tokens": s.reused_tokens,
            "rss_bytes": psutil.Process().memory_info().rss,
            # the class computing a row-parallel linear: which tensor-parallel engine runs (None: no layers)
            "row_layer": next((type(d.self_attn.o_proj).__name__ for d in self.model.layers.values()), None)
            if self.model else None,
            **self.memory(),
        }

    def shutdown(self, timeout_s: float = 5.0) -> None:
        if self.is_head:
            self._inbox.put(_Stop())
        if self._loop is not None:
            concurrent.futures.wait([self._loop], timeout_s)
        self._torch.close()
        if self._link:
            self._link.close()
        if self.state is StageState.SERVING:
            self.state = StageState.STOPPED

    # -- the loops
    def _run(self, loop: Callable[[], None]) -> None:
        try:
            loop()
            self.state = StageState.STOPPED
        except Exception as exc:  # noqa: BLE001 — every failure ends the loop and is reported
            self.error = f"{self.name}: {exc}"
            self.state = StageState.FAILED
            if self.is_head:
                self._fail_requests(ReplicaFailed(f"replica {self.replica} failed: {exc}"))
            if self._link:
                self._link.close()

    def _fail_requests(self, error: ReplicaFailed) -> None:
        for rid in self.scheduler.fail_all():
            sink = self._sinks.pop(rid, None)
            if sink:
                sink(error)
        while True:  # requests still in the inbox
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd, _Submit):
                cmd.sink(error)

    def _forward(self, inputs: torch.Tensor, header: Header) -> torch.Tensor:
        """This stage's layers over a micro-batch: hidden states [N, H], or on the last stage the
        logits [R, V] of the rows that sample."""
        if self.tp > 1 and self.tp_rank == 0:
            self._link.share(header, inputs)  # the stage's other ranks compute with us
        rows = header.rows
        packed = Packed.of([r.slot for r in rows], [r.start for r in rows], [r.length for r in rows],
                           self.args.sliding_window, self.device)
        logits_at = (to_device([packed.ends[i] for i, r in enumerate(rows) if r.sample], self.device)
                     if self.plan.last else None)
        with torch.inference_mode():
            return self.model.forward_packed(inputs.to(self.device), packed, self.cache, logits_at)

    def _sample(self, logits: torch.Tensor, header: Header) -> list[int]:
        rows = [r for r in header.rows if r.sample]
        if not rows:
            return []
        picked = logits.cpu()  # the one transfer per step; checked and sampled on the host
        finite = torch.isfinite(picked).all(dim=-1).tolist()  # a NaN row must not reach the sampler
        if all(finite):
            return sample(picked, [r.params for r in rows], [r.position for r in rows])
        keep = [i for i, ok in enumerate(finite) if ok]
        drawn = iter(sample(picked[keep], [rows[i].params for i in keep], [rows[i].position for i in keep])
                     if keep else [])
        return [next(drawn) if ok else NON_FINITE for ok in finite]

    def _handle(self, cmd: object) -> bool:
        """Apply one inbox command; False means stop."""
        if isinstance(cmd, _Stop):
            return False
        if isinstance(cmd, _Cancel):
            event = self.scheduler.cancel(cmd.request_id)
            sink = self._sinks.pop(cmd.request_id, None)
            if event and sink:
                sink(event)
            return True
        try:
            self.scheduler.submit(cmd.request)
            self._sinks[cmd.request.request_id] = cmd.sink
        except RequestError as exc:
            cmd.sink(exc)
        return True

    def _deliver(self, events: list[TokenEvent]) -> None:
        for ev in events:
            self.tokens_out += ev.token is not None
            sink = self._sinks.get(ev.request_id)
            if sink:
                sink(NonFiniteLogits(f"{self.name}: {ev.error}") if ev.error else ev)
            if ev.finish_reason:
                self._sinks.pop(ev.request_id, None)

    def _head_loop(self) -> None:
        sched, link = self.scheduler, self._link
        pipelined = self.spec.stages > 1
        last_traffic = time.monotonic()
        window_s = self.spec.batch_window_ms / 1000
        while True:
            gather = sched.gather_until(window_s)
            wait_s = self.spec.keepalive_s if sched.idle else max(0.0, gather - time.monotonic()) if gather else 0
            try:
                cmd = self._inbox.get(timeout=wait_s) if wait_s else self._inbox.get_nowait()
            except queue.Empty:
                cmd = None
            while cmd is not None:
                if not self._handle(cmd):
                    self._pass_on(Header(Kind.STOP, -1, 0))
                    if link:
                        link.flush()
                    return
                try:
                    cmd = self._inbox.get_nowait()
                except queue.Empty:
                    cmd = None
            gather = sched.gather_until(window_s)
            if gather and time.monotonic() < gather:
                continue  # gathering prompts for one prefill: wait (above) for more, up to the window
            sent = False
            while (mb := sched.next_microbatch()) is not None:
                self._step_head(mb)
                sent = True
                if not pipelined:
                    break  # one stage: its result is already in, so take new requests between steps
            if sched.in_flight and pipelined:
                self._waiting_since = time.monotonic()
                mb_id, tokens = link.recv_result()
                last_traffic = self._received(mb_id)
                self._deliver(sched.on_result(mb_id, tokens))
            elif link and not sent and time.monotonic() - last_traffic >= self.spec.keepalive_s:
                # idle: prove the pipeline is whole, so a dead peer is found now, not at the next request
                self._pass_on(Header(Kind.NOOP, -1, 0))
                if pipelined:
                    self._waiting_since = time.monotonic()
                    link.recv_result()
                    self._waiting_since = None
                last_traffic = time.monotonic()

    def _pass_on(self, header: Header) -> None:
        """A control header (NOOP, STOP) to this stage's other ranks and down the pipeline."""
        if self.tp > 1:
            self._link.share(header, None)
        if self._link and not self.plan.last:
            self._link.send_forward(header, None)

    def _step_head(self, mb: MicroBatch) -> None:
        started = time.monotonic()
        out = self._forward(to_device(mb.input_ids, self.device), mb.header)
        self.steps += 1
        if self.spec.stages == 1:  # single stage: sample here
            self._deliver(self.scheduler.on_result(mb.mb_id, self._sample(out, mb.header)))
            self._round_trips.append((time.monotonic(), time.monotonic() - started))
        else:
            self._sent_at[mb.mb_id] = started
            self._link.send_forward(mb.header, out)

    def _received(self, mb_id: int) -> float:
        """A micro-batch's result came back: record its round trip through the pipeline."""
        now = time.monotonic()
        self._waiting_since = None
        sent = self._sent_at.pop(mb_id, None)
        if sent is not None:
            self._round_trips.append((now, now - sent))
        return now

    def pipeline_view(self, window_s: float = 1.0) -> dict:
        """The head's view of its pipeline: how long it has been waiting for a result now, the mean
        round trip of the micro-batches that came back in the last `window_s`, the slowest recent one."""
        now = time.monotonic()
        waiting = self._waiting_since
        trips = list(self._round_trips)
        latest = [rt for t, rt in trips if t >= now - window_s]
        return {
            "pipeline_wait_s": now - waiting if waiting is not None else 0.0,
            "step_s": sum(latest) / len(latest) if latest else None,
            "slowest_step_s": max((rt for _, rt in trips), default=0.0),
        }

    def _relay_loop(self) -> None:
        link, last = self._link, self.plan.last
        while True:
            header, payload = link.recv_forward(self.args.hidden_size, self.spec.torch_dtype)
            if header.kind == Kind.STOP:
                self._pass_on(header)
                link.flush()
                return
            if header.kind == Kind.NOOP:
                self._pass_on(header)
                if last:
                    link.send_result(header.mb_id, [])
                continue
            out = self._forward(payload, header)
            self.steps += 1
            if last:
                link.send_result(header.mb_id, self._sample(out, header))
            else:
                link.send_forward(header, out)

    def _follower_loop(self) -> None:
        """A tensor-parallel rank > 0: compute whatever the stage's leader shares, send nothing."""
        link = self._link
        while True:
            header, inputs = link.receive_shared(self.args.hidden_size, self.spec.torch_dtype, self.plan.first)
            if header.kind == Kind.STOP:
                return
            if header.kind == Kind.DATA:
                self._forward(inputs, header)
                self.steps += 1
