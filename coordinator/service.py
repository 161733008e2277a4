"""The coordinator: ringpipe's gRPC services, run as a Ray Serve deployment behind Serve's gRPC proxy.

Serve's proxy terminates gRPC and calls the method of this class named like the
RPC (`Generate`, `GenerateStream`, `ClusterStatus`, and `Check`/`Watch` of
grpc.health.v1) with the bytes the client sent (coordinator/servicers.py), which
each method decodes first: bytes that are no valid request are INVALID_ARGUMENT.
Serve's HTTP proxy calls `__call__`, the OpenAI API (`coordinator/openai_api.py`),
which joins the same path at `run(job)`. Each coordinator replica holds the same membership (read from
the controller, then watched) and so the same hash ring: a key routes to the
same pipeline replica whichever coordinator takes the call.

A request's path: check the token and every field → routing key → the ring's
first replica under the bounded-load cap, then its successors → the replica
head's streaming `generate` → token ids and text deltas back to the client. A
replica whose queue is full refuses at once (nothing started), and the next on
the ring is tried; all full is RESOURCE_EXHAUSTED. A client that cancels,
disconnects or runs past its deadline cancels this coroutine; the `finally`
cancels the replica stream, and the head frees the slot on its next step.

While no replica can take a request (every ring member lost at once, a standby
or a rebuilt pipeline on its way) the request waits, up to
`failover.takeover.wait_s`, trying again at every membership change: a stream
pauses, it does not fail, and a raw gRPC client that does not retry sees a
slower token, not UNAVAILABLE. The client's deadline or cancellation ends the
wait sooner. `max_retries` counts replicas a request lost, not tries to open it
on a ring with nobody to take it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import ray
from grpc_health.v1 import health_pb2

from coordinator.chat import load_chat_template
from coordinator.errors import (
    REPLICA_LOST,
    ClusterFull,
    Fenced,
    NoReplica,
    Unauthenticated,
    cause_of,
    status_for,
)
from coordinator.follow import MembershipFollower
from coordinator.openai_api import respond
from coordinator.request import Job, Limits, decode, parse_request
from coordinator.routing import ReplicaStream, Router, next_unfenced, routing_key
from coordinator.text import IncrementalText
from failover.controller import CONTROLLER_NAME, NAMESPACE
from failover.membership import Member, Membership
from failover.metrics import count_request, metrics
from protos.ringpipe.v1 import admin_pb2
from protos.ringpipe.v1 import inference_pb2 as pb
from shards.checkpoint import load_tokenizer, read_model_args
from shards.errors import Overloaded, RequestError

log = logging.getLogger("ringpipe.coordinator")

FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "cancelled": pb.FINISH_REASON_CANCELLED}
GAUGE_REFRESH_S = 5.0  # Ray's metrics agent drops a gauge not set for a while (Ray 2.60: some 30 s)
SERVICES = ("", "ringpipe.v1.Inference", "ringpipe.v1.Admin")  # names grpc.health.v1 answers for


@dataclass(frozen=True)
class Takeover:
    max_retries: int = 3  # replicas one request may lose (a replica that took it, then failed)
    retry_interval_s: float = 0.1
    max_resume_tokens: int = 8192
    wait_s: float = 30.0  # how long a request waits while no replica can take it
    poll_s: float = 0.5  # while waiting: tries again this often, and at every membership change


@dataclass(frozen=True)
class CoordinatorSettings:
    """Plain data from the validated config (`cluster.config`)."""

    model_dir: str
    max_seq_len: int
    max_new_tokens: int
    max_request_bytes: int = 1 << 20
    routing_key: str = "session"  # session | prefix | random
    prefix_tokens: int = 32
    load_factor: float = 1.25
    vnodes: int = 128
    auth_token: str | None = None
    controller: str = CONTROLLER_NAME
    namespace: str = NAMESPACE
    watch_timeout_s: float = 10.0
    max_health_watches: int = 64  # Watch streams held open at once; each holds a call slot while it lasts
    takeover: Takeover = Takeover()
    dtype: str = "float32"  # what the replicas compute in (model.dtype), reported by ClusterStatus
    model_name: str = "model"  # the id the OpenAI API serves the model under (model.name)
    request_timeout_s: float | None = None  # the OpenAI API's deadline (gRPC's is Serve's proxy's)


@dataclass
class Chunk:
    """What one stream message carries."""

    token_ids: list[int]
    text_delta: str
    offset: int
    replica_id: str
    epoch: int
    finish_reason: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


class Coordinator:
    def __init__(self, settings: CoordinatorSettings) -> None:
        self.settings = settings
        args = read_model_args(settings.model_dir)
        self.tokenizer = load_tokenizer(settings.model_dir)
        self.chat_template = load_chat_template(settings.model_dir)
        self.limits = Limits(
            vocab_size=args.vocab_size,
            max_seq_len=settings.max_seq_len,
            max_new_tokens=settings.max_new_tokens,
            max_request_bytes=settings.max_request_bytes,
            eos_token_ids=frozenset(args.eos_token_ids),
        )
        self.controller = ray.get_actor(settings.controller, namespace=settings.namespace)
        self.router = Router(ray.get(self.controller.membership.remote()), settings.vnodes, settings.load_factor)
        self._watcher: asyncio.Task | None = None
        self._gauges: asyncio.Task | None = None  # sets this coordinator's gauges again every GAUGE_REFRESH_S
        self._changed = asyncio.Event()  # set, and replaced, at every membership change: what waiters wait on
        self._health_watches = 0  # grpc.health.v1 Watch streams open now

    # -- membership
    def _watch_membership(self) -> None:
        if self._watcher is None or self._watcher.done():
            follower = MembershipFollower(self.controller, self._apply, self.router.membership.epoch,
                                          self.settings.watch_timeout_s)
            self._watcher = asyncio.get_running_loop().create_task(follower.run())
        if self._gauges is None or self._gauges.done():
            self._gauges = asyncio.get_running_loop().create_task(self._record_gauges())

    async def _record_gauges(self) -> None:
        while True:
            self.router.record_in_flight()
            await asyncio.sleep(GAUGE_REFRESH_S)

    def _apply(self, membership: Membership) -> None:
        self.router.apply(membership)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # -- checks
    def _authorize(self, grpc_context) -> None:
        metadata = dict(grpc_context.invocation_metadata()) if grpc_context is not None else {}
        self.check_token(metadata.get("authorization", ""), "'authorization' metadata")

    def check_token(self, given: str, where: str) -> None:
        """Raise Unauthenticated unless `given` is 'Bearer <server.auth token>' (or no token is set)."""
        token = self.settings.auth_token
        if not token:
            return
        if not given:
            raise Unauthenticated(f"missing {where}: send 'Bearer <token>'")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise Unauthenticated(f"the token in the {where} is not valid")

    def _admit(self, request: bytes | pb.GenerateRequest, grpc_context) -> Job:
        """The request's job once its token and every field pass; a request refused here is counted."""
        try:
            self._authorize(grpc_context)
            return parse_request(decode(request, pb.GenerateRequest), self.limits, self.tokenizer)
        except Exception as exc:
            count_request(status_for(exc)[0].name)
            raise

    # -- generation
    async def run(self, job: Job) -> AsyncIterator[Chunk]:
        """`_generate`'s chunks, the path both fronts share; the request counted once, at its end, by the
        gRPC status it ends with (OK; CANCELLED when the client went or its deadline passed; else
        `status_for` the failure)."""
        status = "OK"
        try:
            async with contextlib.aclosing(self._generate(job)) as chunks:
                async for chunk in chunks:
                    yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            status = "CANCELLED"
            raise
        except BaseException as exc:
            status = status_for(exc)[0].name
            raise
        finally:
            count_request(status)

    async def _generate(self, job: Job) -> AsyncIterator[Chunk]:
        """The generation's chunks, routed, streamed and taken over on failure; raises when it cannot go on.

        A replica that fails mid-stream (its actor died, its pipeline broke) or is fenced (it left
        the membership: declared dead) loses the request: the tokens already yielded become the
        resume tokens of the same job, sent to the next replica on the ring with the same seed, so
        the continuation is the one the lost replica would have produced. At most `max_retries`
        times, `retry_interval_s` apart and doubling.
        """
        received_at = time.monotonic()
        text = IncrementalText(self.tokenizer, job.stops)
        text.push(job.received)  # the client holds the text these settle: continue after it
        delivered = list(job.received)
        done = job.finished_already(self.limits.max_seq_len)
        if done:
            yield Chunk([], "", len(delivered), "", self.router.membership.epoch, done)
            return
        m = metrics()
        attempt, avoid, first_token_at, produced = 0, set(), None, 0
        while True:
            member, stream, item, sent_at = await self._take(job, avoid, resuming=attempt > 0)
            reader = ReplicaStream(stream, self.router.fence(member))
            replica_done = False
            self.router.count(member.replica_id, +1)
            try:
                while True:
                    tokens, reason = item["tokens"], item["finish_reason"]
                    timings = {}
                    if first_token_at is None and tokens:
                        first_token_at = time.monotonic()
                        m.time_to_first_token_s.observe(first_token_at - received_at)
                        timings = {
                            "queue_ms": (sent_at - received_at + item.get("queued_s", 0.0)) * 1000,
                            "time_to_first_token_ms": (first_token_at - received_at) * 1000,
                        }
                    replica_done = reason is not None
                    delta = text.push(tokens)
                    if text.stopped:
                        reason = "stop"
                    elif reason:
                        delta += text.flush()
                    yield Chunk(tokens, delta, len(delivered), member.replica_id, member.epoch, reason, timings)
                    delivered.extend(tokens)
                    produced += len(tokens)
                    if reason:
                        if produced > 1:
                            m.time_per_output_token_s.observe((time.monotonic() - first_token_at) / (produced - 1))
                        return
                    item = await reader.next()
            except (Fenced, *REPLICA_LOST) as exc:
                lost = exc
            except BaseException as exc:
                if isinstance(cause_of(exc), REPLICA_LOST):
                    lost = cause_of(exc)
                else:
                    raise
            finally:
                self.router.count(member.replica_id, -1)
                if not replica_done:  # lost, a stop string, the client gone: the head frees the slot
                    ray.cancel(stream)
            avoid.add(member.key)
            attempt += 1
            why = f"{type(lost).__name__}: {lost}"
            takeover = self.settings.takeover
            if attempt > takeover.max_retries:
                raise NoReplica(
                    f"the generation was lost {attempt} times, the last: {why}; gave up after "
                    f"{takeover.max_retries} resumes (failover.takeover.max_retries); resend with `resume`"
                )
            if len(delivered) > takeover.max_resume_tokens:
                raise NoReplica(
                    f"{why}; {len(delivered)} tokens streamed is over failover.takeover.max_resume_tokens "
                    f"({takeover.max_resume_tokens}): resend with `resume`"
                )
            m.resumed_requests.inc(tags={"reason": "fenced" if isinstance(lost, Fenced) else "failed"})
            log.warning("request %s: %s; resuming after %d tokens (try %d)", job.request_id, why, len(delivered), attempt)
            await asyncio.sleep(takeover.retry_interval_s * 2 ** (attempt - 1))
            job = job.resumed(tuple(delivered))
            if job.finished_already(self.limits.max_seq_len):  # cannot happen unless the budget ran out
                yield Chunk([], text.flush(), len(delivered), "", self.router.membership.epoch, "length")
                return

    async def _take(self, job: Job, avoid: set[tuple[str, int]], resuming: bool):
        """`_open`, waiting up to `takeover.wait_s` while no replica can take the job.

        It tries again at every membership change (a standby promoted, a pipeline rebuilt) and
        every `poll_s`. A new request on a cluster whose queues are all full is refused at once
        (RESOURCE_EXHAUSTED, back-pressure); a resumed one waits for a slot like the rest.
        """
        takeover = self.settings.takeover
        until = time.monotonic() + takeover.wait_s
        while True:
            changed = self._changed
            try:
                return await self._open(job, avoid)
            except ClusterFull:
                if not resuming:
                    raise
                why = "every replica's queue is full"
            except NoReplica as exc:
                why = str(exc)
            left = until - time.monotonic()
            if left <= 0:
                raise NoReplica(f"{why}; waited {takeover.wait_s:g}s for one (failover.takeover.wait_s)")
            try:
                await asyncio.wait_for(changed.wait(), min(left, takeover.poll_s))
            except TimeoutError:
                pass

    async def _open(self, job: Job, avoid: set[tuple[str, int]] | None = None):
        """Submit to the first replica on the ring that takes it, skipping the members in `avoid`.

        Returns that replica, its stream, the stream's first item and when the request was sent.
        """
        self._watch_membership()
        avoid = set() if avoid is None else avoid
        key = routing_key(job.prompt, job.session_id, self.settings.routing_key, self.settings.prefix_tokens)
        members = self.router.candidates(key, avoid)
        if not members:
            raise NoReplica("no live pipeline replica is on the ring")
        full, failed = [], []
        request = job.generation()
        for member in members:
            sent_at = time.monotonic()
            stream = member.head.generate.options(num_returns="streaming").remote(request)
            self.router.count(member.replica_id, +1)
            try:
                return member, stream, await next_unfenced(stream, self.router.fence(member)), sent_at
            except BaseException as exc:
                ray.cancel(stream)
                cause = cause_of(exc)
                if isinstance(cause, Overloaded):
                    full.append(member.replica_id)
                elif isinstance(cause, (Fenced, *REPLICA_LOST)):
                    failed.append(f"{member.replica_id}: {cause}")
                    avoid.add(member.key)
                else:
                    raise
            finally:
                self.router.count(member.replica_id, -1)
        if full:
            raise ClusterFull(
                f"every replica is busy ({', '.join(full)} have full queues); retry later or raise pipeline.max_queue"
            )
        raise NoReplica("no replica could take the request: " + "; ".join(failed))

    # -- the OpenAI HTTP API, through Serve's HTTP proxy
    async def __call__(self, request):
        return await respond(self, request)

    # -- the RPCs
    async def Generate(self, request: bytes | pb.GenerateRequest, grpc_context=None) -> pb.GenerateResponse:
        try:
            job = self._admit(request, grpc_context)
            out = pb.GenerateResponse(request_id=job.request_id)
            if job.sampling.temperature > 0:
                out.seed = job.sampling.seed
            out.token_ids.extend(job.received)
            text = []
            async for chunk in self.run(job):
                out.token_ids.extend(chunk.token_ids)
                text.append(chunk.text_delta)
                _served(out.served_by, chunk)
                if chunk.timings:
                    out.timings.CopyFrom(pb.Timings(**chunk.timings))
                if chunk.finish_reason:
                    out.finish_reason = FINISH[chunk.finish_reason]
            if self.tokenizer is not None:
                out.text = _prefix_text(self.tokenizer, job.received) + "".join(text)
            out.usage.prompt_tokens = len(job.prompt)
            out.usage.completion_tokens = len(out.token_ids)
            return out
        except Exception as exc:  # noqa: BLE001 — every failure becomes a status
            _fail(grpc_context, exc)
            return pb.GenerateResponse()

    async def GenerateStream(self, request: bytes | pb.GenerateRequest, grpc_context=None):
        try:
            job = self._admit(request, grpc_context)
            completion, first = len(job.received), True
            async for chunk in self.run(job):
                completion += len(chunk.token_ids)
                msg = pb.GenerateStreamResponse(
                    request_id=job.request_id, token_ids=chunk.token_ids, text_delta=chunk.text_delta,
                    offset=chunk.offset,
                )
                _served(msg.served_by, chunk)
                if first and job.sampling.temperature > 0:
                    msg.seed = job.sampling.seed
                first = False
                if chunk.timings:
                    msg.timings.CopyFrom(pb.Timings(**chunk.timings))
                if chunk.finish_reason:
                    msg.finish_reason = FINISH[chunk.finish_reason]
                    msg.usage.prompt_tokens = len(job.prompt)
                    msg.usage.completion_tokens = completion
                yield msg
        except Exception as exc:  # noqa: BLE001 — every failure becomes a status
            _fail(grpc_context, exc)
            # A stream that has sent nothing carries no context to Serve's proxy: only an
            # exception does, and the proxy then answers with the code set on the context.
            raise

    async def ClusterStatus(self, request: bytes | admin_pb2.ClusterStatusRequest, grpc_context=None):
        try:
            self._authorize(grpc_context)
            decode(request, admin_pb2.ClusterStatusRequest)  # no fields yet: only checked
            self._watch_membership()
            membership, shares = self.router.membership, self.router.ring.shares()
            failovers, standbys, health, *stats = await asyncio.gather(
                self.controller.failovers.remote(),
                self.controller.standbys.remote(),
                self.controller.health.remote(),
                *(asyncio.wait_for(_head_stats(m), 5.0) for m in membership.members),
                return_exceptions=True,
            )
            out = admin_pb2.ClusterStatusResponse(epoch=membership.epoch, dtype=self.settings.dtype)
            if isinstance(standbys, list):
                out.standbys = len(standbys)
            if isinstance(health, dict):
                out.control_plane.registry_ok = health["registry_ok"]
                out.control_plane.registry_error = health["registry_error"]
                out.control_plane.monitor_stalls = health["monitor_stalls"]
            else:
                out.control_plane.registry_error = f"the controller did not answer: {health}"
            for f in failovers if isinstance(failovers, list) else []:
                out.failovers.add(
                    at_unix_s=f["at"], replica_id=f["replica_id"], stage=f["stage"], reason=f["reason"],
                    silent_s=f["silent_s"], action=f["action"], restored_at_unix_s=f["restored_at"] or 0.0,
                )
            for member, st in zip(membership.members, stats, strict=True):
                r = out.replicas.add(
                    replica_id=member.replica_id, epoch=member.epoch, ring_share=shares.get(member.replica_id, 0.0),
                    total_slots=member.max_batch, weight=member.weight, weight_reason=member.weight_reason,
                )
                if isinstance(st, dict):
                    r.state = admin_pb2.REPLICA_STATE_SERVING if member.accepting else admin_pb2.REPLICA_STATE_PAUSED
                    r.in_flight, r.queue_depth = st["running"], st["waiting"]
                    r.free_slots, r.cached_prefixes = st["free_slots"], st["cached_prefixes"]
                    r.reused_tokens = st["reused_tokens"]
                else:
                    r.state = admin_pb2.REPLICA_STATE_DEAD
                nodes = {s.node_id for s in member.stages}
                r.shares_nodes_with.extend(o.replica_id for o in membership.members
                                           if o is not member and nodes & {s.node_id for s in o.stages})
                for s in member.stages:
                    r.stages.add(
                        index=s.index, node_id=s.node_id, address=s.address,
                        layer_start=s.layer_start, layer_end=s.layer_end,
                    )
            return out
        except Exception as exc:  # noqa: BLE001
            _fail(grpc_context, exc)
            return admin_pb2.ClusterStatusResponse()

    # grpc.health.v1: no token needed, so that load balancers and probes can ask
    async def Check(self, request: bytes | health_pb2.HealthCheckRequest, grpc_context=None):
        try:
            request = decode(request, health_pb2.HealthCheckRequest)
        except RequestError as exc:
            _fail(grpc_context, exc)
            return health_pb2.HealthCheckResponse()
        if request.service not in SERVICES:
            if grpc_context is not None:
                grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
                grpc_context.set_details(f"unknown service {request.service!r}")
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=self._health())

    async def Watch(self, request: bytes | health_pb2.HealthCheckRequest, grpc_context=None):
        """The health status now, and again at each change, until the client goes.

        Needs no token and never ends, and each open stream holds one of this replica's
        `max_ongoing_requests` while it lasts: past `max_health_watches` open here, a Watch is
        refused with RESOURCE_EXHAUSTED, so idle watchers can never take the slots generation
        needs (`Check` answers at once and is never refused)."""
        try:
            request = decode(request, health_pb2.HealthCheckRequest)
        except RequestError as exc:
            _fail(grpc_context, exc)
            raise  # a stream that has sent nothing reaches the proxy only by raising
        if request.service not in SERVICES:
            yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            return
        if self._health_watches >= self.settings.max_health_watches:
            full = ClusterFull(f"this coordinator holds {self._health_watches} health Watch streams, its most "
                               "(server.max_health_watches); use Check, or retry later")
            _fail(grpc_context, full)
            raise full  # a stream that has sent nothing reaches the proxy only by raising
        self._health_watches += 1
        try:
            last = None
            while True:
                status = self._health()
                if status != last:
                    yield health_pb2.HealthCheckResponse(status=status)
                    last = status
                await asyncio.sleep(1.0)
        finally:
            self._health_watches -= 1

    def _health(self) -> int:
        self._watch_membership()
        serving = len(self.router.ring) > 0
        return health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING


async def _head_stats(member: Member) -> dict:
    return await member.head.stats.remote()


def _served(served_by: pb.ServedBy, chunk: Chunk) -> None:
    if chunk.replica_id:
        served_by.replica_id, served_by.epoch = chunk.replica_id, chunk.epoch


def _prefix_text(tokenizer, ids: tuple[int, ...]) -> str:
    """The text a client holds for the tokens it received: what a stream settled for them."""
    return IncrementalText(tokenizer).push(ids) if ids else ""


def _fail(grpc_context, exc: BaseException) -> None:
    code, message = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("request failed")
    if grpc_context is None:
        raise exc
    grpc_context.set_code(code)
    grpc_context.set_details(message)
