"""The membership's wire form: what the controller encodes is what a coordinator decodes."""

import gc

from failover.membership import Member, Membership, StageInfo, decode, encode


def _membership(n: int) -> Membership:
    return Membership(epoch=9, members=tuple(
        Member(replica_id=f"r{i}", epoch=i, head=None, max_batch=4, accepting=i % 3 != 0,
               pipeline=f"p{i}-2", weight=0.7 if i % 2 else 1.3, weight_reason="cpu" if i % 2 else "",
               stages=tuple(StageInfo(j, f"node-{j}", f"10.0.0.{j}", 2 * j, 2 * j + 2) for j in range(3)))
        for i in range(n)))


def test_a_decoded_membership_equals_the_encoded_one():
    m = _membership(40)
    got = decode(encode(m))
    assert got == m
    assert got.ring_ids == m.ring_ids and got.weights == m.weights
    assert [g.stages for g in got.members] == [s.stages for s in m.members]


def test_decoding_leaves_the_collector_as_it_found_it():
    blob = encode(_membership(5))
    assert gc.isenabled()
    decode(blob)
    assert gc.isenabled()
    gc.disable()
    try:
        decode(blob)
        assert not gc.isenabled()
    finally:
        gc.enable()
