"""Membership: which pipeline replicas are on the ring, under which epoch. Plain data.

The controller publishes a `Membership`; every coordinator replica builds its
hash ring from it alone, so equal memberships give equal rings. The epoch goes
up by one at every change: a replica joins or leaves, or is paused from new work
(slow: still a member, so its in-flight requests go on, but off the ring).

A member is one pipeline at one ring position (`replica_id`, a slot name that
survives rebuilds) since `epoch`. Fencing keys on both: output from a member
whose (replica_id, epoch) is no longer in the membership is dropped.

On the wire (`encode`, `decode`) a membership is bytes made once per epoch by
the controller and carried in the answer to every coordinator's watch.
"""

from __future__ import annotations

import gc
import pickle
from dataclasses import dataclass, field


@dataclass(frozen=True)
class StageInfo:
    index: int
    node_id: str
    address: str
    layer_start: int
    layer_end: int  # exclusive


@dataclass(frozen=True)
class Member:
    replica_id: str  # also its name on the hash ring
    epoch: int  # the membership epoch at which it joined
    head: object = field(compare=False, repr=False)  # the head stage's Ray actor handle
    stages: tuple[StageInfo, ...] = ()
    max_batch: int = 0  # KV slots
    accepting: bool = True  # False while paused (slow): no new work, in-flight work goes on
    pipeline: str = ""  # the name of the stage actors' group now serving this position
    weight: float = 1.0  # adaptive weight: scales its bounded-load cap on the ring, not the keys it owns
    weight_reason: str = ""  # why the weight is what it is (for `ringpipe status`); "" at 1.0

    @property
    def key(self) -> tuple[str, int]:
        return (self.replica_id, self.epoch)


@dataclass(frozen=True)
class Membership:
    epoch: int = 0
    members: tuple[Member, ...] = ()

    @property
    def replica_ids(self) -> tuple[str, ...]:
        return tuple(m.replica_id for m in self.members)

    @property
    def ring_ids(self) -> tuple[str, ...]:
        """The members new work may be routed to."""
        return tuple(m.replica_id for m in self.members if m.accepting)

    @property
    def weights(self) -> dict[str, float]:
        """Each ring member's weight, for the ring's bounded-load caps."""
        return {m.replica_id: m.weight for m in self.members if m.accepting}

    def get(self, replica_id: str) -> Member | None:
        return next((m for m in self.members if m.replica_id == replica_id), None)


def encode(membership: Membership) -> bytes:
    """The membership as bytes (the heads' actor handles included), made once per epoch."""
    return pickle.dumps(membership, protocol=pickle.HIGHEST_PROTOCOL)


def decode(blob: bytes) -> Membership:
    """The membership `encode` made, decoded with the cyclic garbage collector paused.

    A membership of 250 pipelines is some 2,500 small objects, none in a cycle. Made with
    the collector on, in a process that already holds many objects (a coordinator), the
    collections they trigger cost more than the decoding itself: 256 followers in 4 processes
    took a new epoch in 1.03 s p99 with it on and 0.40 s with it paused
    (`bench/results/membership_watch.md`).
    """
    was_on = gc.isenabled()
    gc.disable()
    try:
        return pickle.loads(blob)
    finally:
        if was_on:
            gc.enable()
