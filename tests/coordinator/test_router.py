"""The coordinator's router: the ring it builds from a membership, and fencing. No Ray needed."""

from __future__ import annotations

import asyncio
import math

import pytest

from coordinator.errors import Fenced
from coordinator.ring import HashRing
from coordinator.routing import ReplicaStream, Router, next_unfenced
from failover.membership import Member, Membership


def membership(epoch: int, *members: tuple[str, int, bool]) -> Membership:
    return Membership(epoch, tuple(Member(r, e, None, accepting=a) for r, e, a in members))


def test_ring_holds_only_members_taking_new_work():
    router = Router(membership(3, ("replica-0", 1, True), ("replica-1", 2, False), ("replica-2", 3, True)))
    assert sorted(router.ring.shares()) == ["replica-0", "replica-2"]
    for k in range(50):  # the paused member is never a candidate; the order follows an independent ring
        key = f"session:{k}"
        want = HashRing(["replica-0", "replica-2"]).successors(key)
        assert [m.replica_id for m in router.candidates(key, set())] == list(want)


def test_candidates_skip_avoided_members_but_not_a_newer_member_at_the_same_position():
    router = Router(membership(4, ("replica-0", 4, True), ("replica-1", 2, True)))
    got = {m.key for m in router.candidates("session:x", {("replica-0", 1)})}  # an older replica-0: dead
    assert got == {("replica-0", 4), ("replica-1", 2)}
    got = {m.key for m in router.candidates("session:x", {("replica-0", 4)})}
    assert got == {("replica-1", 2)}


def test_members_that_leave_are_fenced_others_are_not():
    old = membership(2, ("replica-0", 1, True), ("replica-1", 2, True))
    router = Router(old)
    fences = {m.key: router.fence(m) for m in old.members}
    assert not any(f.is_set() for f in fences.values())
    router.apply(membership(3, ("replica-0", 3, True), ("replica-1", 2, False)))  # replica-0 replaced, 1 paused
    assert fences[("replica-0", 1)].is_set()
    assert not fences[("replica-1", 2)].is_set()  # paused is not dead: its streams go on
    assert router.fence(old.members[0]).is_set()  # asking again after it left: fenced at once


class _Stream:
    """A replica stream whose items arrive when the test says."""

    def __init__(self) -> None:
        self.items: asyncio.Queue = asyncio.Queue()

    def __aiter__(self):
        return self

    def next_ready(self) -> bool:
        return not self.items.empty()

    async def __anext__(self):
        item = await self.items.get()

        async def ref():
            if isinstance(item, Exception):  # the replica failed: its ref holds the error
                raise item
            return item

        return ref()


def test_next_unfenced_returns_items_until_the_fence_then_drops_them():
    async def scenario():
        stream, fence = _Stream(), asyncio.Event()
        stream.items.put_nowait({"tokens": [1]})
        assert await next_unfenced(stream, fence) == {"tokens": [1]}
        waiting = asyncio.ensure_future(next_unfenced(stream, fence))
        await asyncio.sleep(0.01)
        fence.set()
        with pytest.raises(Fenced):
            await waiting
        stream.items.put_nowait({"tokens": [2]})  # the fenced replica speaks again: never read
        with pytest.raises(Fenced):
            await next_unfenced(stream, fence)

    asyncio.run(scenario())


def test_a_reader_that_fell_behind_gets_the_piled_up_tokens_as_one_item():
    def item(tokens, reason=None):
        return {"tokens": tokens, "finish_reason": reason}

    async def scenario():
        stream, fence = _Stream(), asyncio.Event()
        reader = ReplicaStream(stream, fence)
        stream.items.put_nowait(item([1]))
        assert await reader.next() == item([1])  # alone: at once
        for t in ([2], [3, 4], [5]):
            stream.items.put_nowait(item(t))
        assert await reader.next() == item([2, 3, 4, 5])  # behind: merged, in order
        stream.items.put_nowait(item([6]))
        stream.items.put_nowait(item([7], "length"))
        stream.items.put_nowait(item([99]))  # nothing follows a finish in a real stream; never merged past it
        assert await reader.next() == item([6, 7], "length")
        # a failure behind tokens: the tokens first, then the failure
        stream, fence = _Stream(), asyncio.Event()
        reader = ReplicaStream(stream, fence)
        stream.items.put_nowait(item([1]))
        stream.items.put_nowait(item([2]))
        stream.items.put_nowait(RuntimeError("replica died"))
        assert await reader.next() == item([1, 2])
        with pytest.raises(RuntimeError, match="replica died"):
            await reader.next()
        # fenced: what was read before goes out, nothing after
        stream, fence = _Stream(), asyncio.Event()
        reader = ReplicaStream(stream, fence)
        stream.items.put_nowait(item([1]))
        fence.set()
        stream.items.put_nowait(item([2]))
        with pytest.raises(Fenced):
            await reader.next()

    asyncio.run(scenario())


def test_a_low_weight_member_gets_less_new_work_under_load():
    ids = [f"replica-{i}" for i in range(4)]
    weights = {"replica-0": 1.0, "replica-1": 0.3, "replica-2": 1.0, "replica-3": 1.0}
    weighted = Router(Membership(1, tuple(Member(r, 1, None, weight=weights[r]) for r in ids)))
    equal = Router(Membership(1, tuple(Member(r, 1, None) for r in ids)))
    assert weighted.weights == weights
    for router in (weighted, equal):
        for k in range(400):  # nothing finishes: in-flight work only grows
            router.count(router.candidates(f"session:{k}", set())[0].replica_id, +1)
    got = weighted.in_flight
    assert sum(got.values()) == 400
    assert got["replica-1"] <= math.ceil(1.25 * 400 * 0.3 / 3.3)  # its weighted cap (mean: 100)
    assert got["replica-1"] < min(got[r] for r in ids if r != "replica-1")
    assert got["replica-1"] < equal.in_flight["replica-1"]
    # an unloaded key still goes to its owner, whatever the owner's weight: affinity survives
    fresh = Router(Membership(1, tuple(Member(r, 1, None, weight=weights[r]) for r in ids)))
    for k in range(50):
        key = f"session:{k}"
        assert fresh.candidates(key, set())[0].replica_id == HashRing(ids).owner(key)


def test_paused_members_weights_are_off_the_ring():
    m = Membership(2, (Member("a", 1, None, weight=0.5), Member("b", 2, None, accepting=False, weight=2.0)))
    assert m.weights == {"a": 0.5}
    assert Router(m).candidates("k", set())[0].replica_id == "a"
