"""The stage-to-stage transport on real Gloo process groups (two OS processes, loopback)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from shards.sampling import SamplingParams
from shards.transport import Header, Kind, RowMeta, pack_result, unpack_result

rows = st.builds(
    RowMeta,
    slot=st.integers(0, 31),
    start=st.integers(0, 10_000),
    sample=st.booleans(),
    position=st.integers(0, 10_000),
    params=st.builds(
        SamplingParams,
        temperature=st.floats(0, 10, allow_nan=False),
        top_k=st.integers(0, 1000),
        top_p=st.floats(0.01, 1.0, allow_nan=False),
        seed=st.integers(0, 2**64 - 1),  # a uint64: the upper half travels as negative int64s
    ),
)


@given(kind=st.sampled_from(list(Kind)), mb_id=st.integers(-1, 2**40), seq_len=st.integers(0, 4096),
       rows=st.lists(rows, max_size=32))
def test_header_round_trips(kind, mb_id, seq_len, rows):
    header = Header(kind, mb_id, seq_len, tuple(rows))
    packed = header.pack(32)
    assert packed.shape == (Header.size(32),)  # fixed size whatever the batch
    assert Header.unpack(packed) == header


@given(tokens=st.lists(st.integers(0, 2**31), max_size=16), mb_id=st.integers(0, 2**40))
def test_result_round_trips(tokens, mb_id):
    assert unpack_result(pack_result(mb_id, tokens, 16)) == (mb_id, tokens)


def _peer(rank: int, port: int, queue, timeout_s: float) -> None:
    from shards.transport import PipeLink

    queue.put(("ready", None, None))
    link = PipeLink(rank, 2, "127.0.0.1", port, "gloo", timeout_s, 4, torch.device("cpu"))
    header, payload = link.recv_forward(8, torch.float32)
    queue.put(("got", header.mb_id, payload.sum().item()))
    link.send_result(header.mb_id, [int(payload[0, 0].item())])
    queue.put(("sent", None, None))
    time.sleep(600)  # stay alive until the test kills or stops us


@pytest.fixture
def pair():
    """Stage 0 here, stage 1 in a separate process, joined through a real Gloo group."""
    from shards.transport import PipeLink, open_rendezvous

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    store = open_rendezvous("127.0.0.1", 2, 10)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peer, args=(1, store.port, queue, 3.0), daemon=True)
    proc.start()
    # a spawned process imports torch before it can join: seconds on a loaded machine, which the
    # group's 3 s timeout (what the tests below are about) must not include
    assert queue.get(timeout=120) == ("ready", None, None)
    link = PipeLink(0, 2, "127.0.0.1", store.port, "gloo", 3.0, 4, torch.device("cpu"), store=store)
    yield link, proc, queue
    if proc.is_alive():
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
    proc.join(10)
    link.close()


def test_send_and_result(pair):
    link, _, queue = pair
    payload = torch.arange(2 * 3 * 8, dtype=torch.float32).reshape(2 * 3, 8)  # 2 rows of 3 tokens, end to end
    rows_ = tuple(RowMeta(i, 0, True, 3, SamplingParams(), length=3) for i in range(2))
    link.send_forward(Header(Kind.DATA, 7, 6, rows_), payload)
    assert queue.get(timeout=30) == ("got", 7, payload.sum().item())
    assert link.recv_result() == (7, [0])


def test_dead_peer_is_an_error_not_a_hang(pair):
    from shards.errors import TransportError

    link, proc, queue = pair
    proc.kill()
    proc.join(10)
    with pytest.raises(TransportError):  # a hang here would be stopped by pytest-timeout, failing the test
        link.recv_result()


def test_hung_peer_times_out(pair):
    from shards.errors import TransportError

    link, proc, _ = pair
    os.kill(proc.pid, signal.SIGSTOP)
    with pytest.raises(TransportError, match="timed out|failed"):
        link.recv_result()


def _sink(port: int, n: int, queue) -> None:
    from shards.transport import PipeLink

    queue.put("ready")
    link = PipeLink(1, 2, "127.0.0.1", port, "gloo", 10.0, 4, torch.device("cpu"))
    for _ in range(n):
        link.recv_forward(8, torch.float32)
    queue.put("done")
    time.sleep(600)


def test_sends_do_not_pile_up():
    """Gloo send handles only complete when waited on; the link must not keep every one (a leak)."""
    from shards.transport import _SEND_WINDOW, PipeLink, open_rendezvous

    n = 3 * _SEND_WINDOW
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    store = open_rendezvous("127.0.0.1", 2, 10)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_sink, args=(store.port, n, queue), daemon=True)
    proc.start()
    assert queue.get(timeout=120) == "ready"  # imports done (see `pair`)
    link = PipeLink(0, 2, "127.0.0.1", store.port, "gloo", 10.0, 4, torch.device("cpu"), store=store)
    try:
        for i in range(n):
            link.send_forward(Header(Kind.NOOP, i, 0), None)
            assert len(link._pending) <= _SEND_WINDOW
        assert queue.get(timeout=60) == "done"  # and every message arrived
    finally:
        proc.kill()
        proc.join(10)
        link.close()


def _iface_peer(port: int, queue) -> None:
    from shards.transport import PipeLink

    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):  # not inherited from the test process
        os.environ.pop(name, None)
    # stage 0's store on 127.0.0.2 (an address of no interface here, as stage 0's node's is on another
    # node); this stage's own node address is 127.0.0.1
    link = PipeLink(1, 2, "127.0.0.2", port, "gloo", 10.0, 4, torch.device("cpu"), local_address="127.0.0.1")
    queue.put((os.environ.get("GLOO_SOCKET_IFNAME"), os.environ.get("NCCL_SOCKET_IFNAME")))
    header, _ = link.recv_forward(8, torch.float32)
    link.send_result(header.mb_id, [1])
    time.sleep(600)


def test_every_stage_uses_the_interface_of_its_own_address():
    """A later stage binds where its own node's address is, not where stage 0's store is."""
    from shards.transport import PipeLink, open_rendezvous

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    store = open_rendezvous("127.0.0.2", 2, 10)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_iface_peer, args=(store.port, queue), daemon=True)
    proc.start()
    link = PipeLink(0, 2, "127.0.0.2", store.port, "gloo", 10.0, 4, torch.device("cpu"), store=store,
                    local_address="127.0.0.1")
    try:
        assert queue.get(timeout=120) == ("lo", "lo")
        link.send_forward(Header(Kind.DATA, 3, 1, (RowMeta(0, 0, True, 0, SamplingParams()),)), torch.zeros(1, 8))
        assert link.recv_result() == (3, [1])
    finally:
        proc.kill()
        proc.join(10)
        link.close()
