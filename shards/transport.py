"""Stage-to-stage transport: torch.distributed point-to-point inside one replica.

Every replica has its own process group (Gloo on CPU, NCCL on CUDA) whose
rendezvous is a TCPStore opened by stage 0 on a free port of its node. Messages:

- stage i -> i+1: a fixed-size int64 header (`Header`), then, for data, the
  activations [N, H] of the micro-batch's N tokens, row after row (`shards.model.Packed`);
- last stage -> stage 0: a fixed-size int64 result (mb id, batch size, tokens).

The results travel on a process group of their own (the head and the last
stage), apart from the activations (the default group): so that no two ranks
ever send to each other on one communicator. NCCL runs a communicator's
operations between a pair in the order they were posted, and a send larger than
its internal buffer completes only once the peer has posted the matching
receive. With 2 stages on one group, the head sends micro-batch k+1 (an 8 MiB
prefill chunk of a large model) while the last stage sends the tokens of k back,
each before its receive: each waits for the other forever. Gloo buffers sends,
so only a transport with NCCL's discipline shows it on CPU
(`tests/shards/strict_pg.py`). Grouping each exchange (`batch_isend_irecv`)
would also avoid it, but the head's send and its receive are not one exchange:
the receive waits on a result that may be several micro-batches behind. With
the split, every pair's traffic on every communicator goes one way only.

Only tensors ride here; control (setup, ping, stats, shutdown) goes over Ray
calls. Every wait is bounded by the group timeout, and a peer that dies closes
its sockets, so survivors see a `TransportError` instead of hanging.

On NCCL a wait does not raise by default: torch's watchdog tears the process
down at the group timeout (TORCH_NCCL_ASYNC_ERROR_HANDLING=3), so the stage's
own clean-up (`ReplicaFailed` to its requests) and its answers to ping and
shutdown would never happen, and destroying a broken communicator can hang.
So an NCCL link runs with TORCH_NCCL_BLOCKING_WAIT=1 (`Work.wait(timeout)`
raises at the timeout, as Gloo's does) and TORCH_NCCL_ASYNC_ERROR_HANDLING=0
(the watchdog leaves errors to us), unless the environment sets them; `close`
aborts every communicator (`_abort_process_group`) before destroying the
groups. Unverified on a GPU so far (README, "GPU status").

The interface: every stage sets GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME to
the interface of its own node's Ray address (or `transport.socket_ifname`).
"""

from __future__ import annotations

import enum
import os
import socket
import struct
from dataclasses import dataclass
from datetime import timedelta

import psutil
import torch
import torch.distributed as dist

from shards.errors import TransportError
from shards.sampling import SamplingParams


class Kind(enum.IntEnum):
    DATA = 1
    NOOP = 2  # keepalive: travels the pipeline and comes back as an empty result
    STOP = 3


_FIXED = 4  # kind, mb_id, batch, seq_len
_SEND_WINDOW = 16  # sends kept in flight per stage before the oldest is waited on
_PER_ROW = 9  # slot, start, sample, seed, top_k, position, temperature bits, top_p bits, length


def _f2i(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _i2f(x: int) -> float:
    return struct.unpack("<d", struct.pack("<q", x))[0]


def _u2i(x: int) -> int:
    """A uint64 (a seed) as the int64 with the same bits; `% 2**64` turns it back."""
    return x - 2**64 if x >= 2**63 else x


@dataclass(frozen=True)
class RowMeta:
    """What every stage needs to know about one row of a micro-batch."""

    slot: int
    start: int  # position of the row's first token
    sample: bool  # does the last stage sample a token for this row?
    position: int  # absolute position of the token to sample
    params: SamplingParams
    length: int = 1  # the row's tokens in this micro-batch (a decode step: 1)


@dataclass(frozen=True)
class Header:
    kind: Kind
    mb_id: int
    tokens: int  # N: every row's tokens together
    rows: tuple[RowMeta, ...] = ()

    @staticmethod
    def size(max_batch: int) -> int:
        return _FIXED + _PER_ROW * max_batch

    def pack(self, max_batch: int) -> torch.Tensor:
        if len(self.rows) > max_batch:
            raise ValueError(f"micro-batch of {len(self.rows)} rows exceeds max_batch={max_batch}")
        values = [int(self.kind), self.mb_id, len(self.rows), self.tokens]
        for r in self.rows:
            p = r.params
            values += [r.slot, r.start, int(r.sample), _u2i(p.seed), p.top_k, r.position, _f2i(p.temperature),
                       _f2i(p.top_p), r.length]
        values += [0] * (Header.size(max_batch) - len(values))
        return torch.tensor(values, dtype=torch.int64)

    @staticmethod
    def unpack(t: torch.Tensor) -> Header:
        v = t.tolist()
        kind, mb_id, batch, tokens = v[:_FIXED]
        rows = []
        for b in range(batch):
            slot, start, samp, seed, top_k, position, temp, top_p, length = v[
                _FIXED + _PER_ROW * b : _FIXED + _PER_ROW * (b + 1)]
            params = SamplingParams(temperature=_i2f(temp), top_k=top_k, top_p=_i2f(top_p), seed=seed % 2**64)
            rows.append(RowMeta(slot, start, bool(samp), position, params, length))
        return Header(Kind(kind), mb_id, tokens, tuple(rows))


def pack_result(mb_id: int, tokens: list[int], max_batch: int) -> torch.Tensor:
    return torch.tensor([mb_id, len(tokens), *tokens] + [0] * (max_batch - len(tokens)), dtype=torch.int64)


def unpack_result(t: torch.Tensor) -> tuple[int, list[int]]:
    v = t.tolist()
    return v[0], v[2 : 2 + v[1]]


def interface_for(host: str) -> str | None:
    """The network interface that owns `host` (loopback stays loopback); None if none here does."""
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == host for a in addrs):
            return name
    return None


def open_rendezvous(host: str, world_size: int, timeout_s: float) -> dist.TCPStore:
    """Stage 0's store on a free port of its node's address only (TCPStore alone binds every interface)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    return dist.TCPStore(
        host, port, world_size, is_master=True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False,
        master_listen_fd=sock.detach(), use_libuv=False,  # the store owns the socket now (libuv takes no fd)
    )


class PipeLink:
    """One stage's end of its replica's process group."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        host: str,
        port: int,
        backend: str,
        timeout_s: float,
        max_batch: int,
        device: torch.device,
        store: dist.TCPStore | None = None,
        tp: int = 1,
        local_address: str | None = None,
        socket_ifname: str = "",
    ) -> None:
        # ranks: stage s, tensor-parallel rank t -> s * tp + t; stage leaders (t = 0)
        # carry the pipeline traffic, so neighbours are `tp` ranks apart
        self.rank, self.world_size, self.max_batch, self.device = rank, world_size, max_batch, device
        self.stride = tp
        self.leader = rank - rank % tp
        self.timeout_s = timeout_s
        # this stage's traffic on the interface of its own node's address (the one Ray knows the node
        # by), not whatever the host name resolves to, or on the one the config names (Gloo and
        # NCCL's bootstrap read these when the group is made)
        iface = socket_ifname or interface_for(local_address or host)
        if iface:
            os.environ["GLOO_SOCKET_IFNAME"] = os.environ["NCCL_SOCKET_IFNAME"] = iface
        self.backend = backend
        if backend == "nccl":  # a dead or silent peer fails a wait; it does not end the process
            os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
        if store is None:
            store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timedelta(seconds=timeout_s))
        try:
            dist.init_process_group(
                backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
            )
        except Exception as exc:  # noqa: BLE001 — any rendezvous failure is a transport failure
            raise TransportError(f"stage {rank}: could not join the replica's process group: {exc}") from exc
        self._store = store
        self._pending: list[tuple[dist.Work, torch.Tensor]] = []
        self._header_len = Header.size(max_batch)
        self.last = world_size - tp  # the last stage's leader
        # every rank creates every group, in the same order (new_group is collective)
        self._results = dist.new_group([0, self.last]) if self.last > 0 else None
        self.tp_group = None
        if tp > 1:
            for first in range(0, world_size, tp):
                group = dist.new_group(list(range(first, first + tp)))
                if first == self.leader:
                    self.tp_group = group

    # -- sending (non-blocking; tensors are kept alive until their send completes)
    def _isend(self, tensor: torch.Tensor, dst: int, group=None) -> None:
        tensor = tensor.to(self.device).contiguous()
        try:
            work = dist.isend(tensor, dst, group=group)
        except Exception as exc:  # noqa: BLE001
            raise TransportError(f"stage {self.rank}: send to stage {dst} failed: {exc}") from exc
        self._pending.append((work, tensor))
        self._reap()

    def _reap(self) -> None:
        # Gloo's send Work reports completion only once waited on, so keep a short
        # window of sends in flight and wait on the oldest beyond it (they are long
        # done by then); without this the list — and its tensors — grows forever.
        while len(self._pending) > _SEND_WINDOW:
            work, _ = self._pending.pop(0)
            self._wait(work, "send")

    def _wait(self, work: dist.Work, what: str) -> None:
        try:
            work.wait(timedelta(seconds=self.timeout_s))
        except Exception as exc:  # noqa: BLE001
            raise TransportError(f"stage {self.rank}: {what} failed or timed out: {exc}") from exc

    def _recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int, group=None) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        try:
            work = dist.irecv(buf, src, group=group)
        except Exception as exc:  # noqa: BLE001
            raise TransportError(f"stage {self.rank}: receive from stage {src} failed: {exc}") from exc
        self._wait(work, f"receive from stage {src}")
        return buf

    # -- within a stage: the leader shares each micro-batch with its tensor-parallel ranks
    def _broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.device).contiguous()
        try:
            work = dist.broadcast(tensor, src=self.leader, group=self.tp_group, async_op=True)
        except Exception as exc:  # noqa: BLE001
            raise TransportError(f"rank {self.rank}: broadcast in its stage failed: {exc}") from exc
        self._wait(work, "broadcast in its stage")
        return tensor

    def share(self, header: Header, inputs: torch.Tensor | None) -> None:
        self._broadcast(header.pack(self.max_batch))
        if header.kind == Kind.DATA:
            self._broadcast(inputs)

    def receive_shared(self, hidden_size: int, dtype: torch.dtype, first: bool) -> tuple[Header, torch.Tensor | None]:
        header = Header.unpack(self._broadcast(torch.empty(self._header_len, dtype=torch.int64)).cpu())
        if header.kind != Kind.DATA:
            return header, None
        shape = (header.tokens,) + (() if first else (hidden_size,))
        return header, self._broadcast(torch.empty(shape, dtype=torch.int64 if first else dtype))

    def send_forward(self, header: Header, payload: torch.Tensor | None) -> None:
        nxt = self.rank + self.stride
        self._isend(header.pack(self.max_batch), nxt)
        if payload is not None:
            self._isend(payload, nxt)

    def recv_forward(self, hidden_size: int, dtype: torch.dtype) -> tuple[Header, torch.Tensor | None]:
        prev = self.rank - self.stride
        header = Header.unpack(self._recv((self._header_len,), torch.int64, prev).cpu())
        if header.kind != Kind.DATA:
            return header, None
        payload = self._recv((header.tokens, hidden_size), dtype, prev)
        return header, payload

    def send_result(self, mb_id: int, tokens: list[int]) -> None:
        self._isend(pack_result(mb_id, tokens, self.max_batch), 0, self._results)

    def recv_result(self) -> tuple[int, list[int]]:
        return unpack_result(self._recv((2 + self.max_batch,), torch.int64, self.last, self._results).cpu())

    def flush(self) -> None:
        for work, _ in self._pending:
            self._wait(work, "send")
        self._pending = []

    def close(self) -> None:
        """Leave the group; peers blocked on us see their connection close."""
        self._pending = []
        if dist.is_initialized():
            try:
                if self.backend == "nccl":  # destroying a broken communicator waits on it: abort first
                    dist.distributed_c10d._abort_process_group()
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 — closing a broken group may fail; it is closed either way
                pass
