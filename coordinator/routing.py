"""Routing keys: which ring position a request hashes to.

`session` (the default) keeps a conversation on the replica that holds its KV
cache: the session id when the client gives one, else the prompt's first
`prefix_tokens` tokens, so repeated prefixes meet their cached prefix. `prefix`
always uses the prompt prefix; `random` spreads requests blindly (the baseline
the routing benchmark compares against).

`Router` is one coordinator's view of the membership: the ring built from the
members taking new work, its own in-flight count per replica (for the load
bound; a member's adaptive weight scales its cap, not the keys it owns), and a
fence per member, set when that member leaves the membership.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Literal

from coordinator.errors import Fenced
from coordinator.ring import HashRing
from failover.membership import Member, Membership
from failover.metrics import metrics

RoutingMode = Literal["session", "prefix", "random"]


def routing_key(
    prompt: Sequence[int], session_id: str | None = None, mode: RoutingMode = "session", prefix_tokens: int = 32
) -> str:
    if mode == "random":
        return f"random:{uuid.uuid4().hex}"
    if mode == "session" and session_id:
        return f"session:{session_id}"
    return "prefix:" + ",".join(map(str, prompt[:prefix_tokens]))


class Router:
    def __init__(self, membership: Membership, vnodes: int = 128, load_factor: float = 1.25) -> None:
        self.vnodes, self.load_factor = vnodes, load_factor
        self.in_flight: Counter[str] = Counter()
        self._fences: dict[tuple[str, int], asyncio.Event] = {}
        self.ring: HashRing | None = None
        self.apply(membership)

    def apply(self, membership: Membership) -> None:
        """Route by `membership` from now on; fence every member that left."""
        if self.ring is None or self.ring.replicas != frozenset(membership.ring_ids):
            self.ring = HashRing(membership.ring_ids, self.vnodes, self.load_factor)  # a weight change keeps it
        self.membership = membership
        self.weights = membership.weights
        current = self._member_keys()
        for key in [k for k in self._fences if k not in current]:
            self._fences.pop(key).set()  # streams from that member are dropped from now on

    def candidates(self, key: str, avoid: set[tuple[str, int]]) -> list[Member]:
        """Members to try for `key`, in order: the bounded-load choice, then the ring's successors."""
        if not len(self.ring):
            return []
        first = self.ring.route(key, self.in_flight, self.weights)
        order = [first, *(r for r in self.ring.successors(key) if r != first)]
        return [m for r in order if (m := self.membership.get(r)) is not None and m.key not in avoid]

    def count(self, replica_id: str, change: int) -> None:
        self.in_flight[replica_id] += change
        metrics().in_flight.set(self.in_flight[replica_id], tags={"replica": replica_id})

    def record_in_flight(self) -> None:
        """Set the in-flight gauge of every member again (Ray's metrics agent drops a gauge its
        process has not set for a while)."""
        for member in self.membership.members:
            metrics().in_flight.set(self.in_flight[member.replica_id], tags={"replica": member.replica_id})

    def fence(self, member: Member) -> asyncio.Event:
        """Set when `member` leaves the membership (at once if it already has)."""
        fence = self._fences.get(member.key)
        if fence is None:
            fence = self._fences[member.key] = asyncio.Event()
            if member.key not in self._member_keys():
                fence.set()
        return fence

    def _member_keys(self) -> set[tuple[str, int]]:
        return {m.key for m in self.membership.members}


async def next_unfenced(stream, fence: asyncio.Event) -> dict:
    """A replica stream's next item, unless its replica is fenced first (the item is then dropped)."""
    if fence.is_set():
        raise Fenced("the replica was declared dead and left the membership")
    if stream.next_ready():  # already here: no race to set up
        return await _next(stream)
    item = asyncio.ensure_future(_next(stream))
    fenced = asyncio.ensure_future(fence.wait())
    try:
        await asyncio.wait((item, fenced), return_when=asyncio.FIRST_COMPLETED)
    finally:
        fenced.cancel()
        if not item.done():
            item.cancel()
    if fence.is_set():
        raise Fenced("the replica was declared dead and left the membership")
    return item.result()


async def _next(stream) -> dict:
    ref = await stream.__anext__()
    return await ref


class ReplicaStream:
    """A replica head's stream of items, each read merged with the ones that arrived behind it.

    When this coordinator (or the client behind it) falls behind the replica, the tokens that
    piled up go on as one message instead of one each: fewer messages through Serve, its proxy
    and gRPC exactly when they are the bottleneck, and no delay when they are not (an item
    that is alone goes at once). An error met while merging is raised by the next `next`,
    after the tokens read before it have gone out.
    """

    def __init__(self, stream, fence: asyncio.Event) -> None:
        self.stream, self.fence = stream, fence
        self._error: BaseException | None = None

    async def next(self) -> dict:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        item = await next_unfenced(self.stream, self.fence)
        while item["finish_reason"] is None and not self.fence.is_set() and self.stream.next_ready():
            try:
                more = await _next(self.stream)
            except Exception as exc:  # noqa: BLE001 — the replica's failure, raised after these tokens
                self._error = exc
                break
            item = {**item, "tokens": item["tokens"] + more["tokens"], "finish_reason": more["finish_reason"]}
        return item
