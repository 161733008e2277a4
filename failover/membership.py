"""Membership: which pipeline replicas are on the ring, under which epoch. Plain data.

The controller publishes a `Membership`; every coordinator replica builds its
hash ring from `members` alone, so equal memberships give equal rings. The epoch
goes up by one each time a replica joins or leaves.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class Membership:
    epoch: int = 0
    members: tuple[Member, ...] = ()

    @property
    def replica_ids(self) -> tuple[str, ...]:
        return tuple(m.replica_id for m in self.members)

    def get(self, replica_id: str) -> Member | None:
        return next((m for m in self.members if m.replica_id == replica_id), None)
