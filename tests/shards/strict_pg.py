"""A FAKE torch.distributed backend for tests, "strict": NCCL's point-to-point discipline, on CPU.

NCCL (no GPU here) runs each communicator's operations in the order they were posted, on one stream,
and a send larger than its internal buffer completes only once the peer has posted the matching
receive. Gloo buffers sends, so a pipeline in which two stages both send to each other before they
receive runs on Gloo and hangs on NCCL. Under this backend it hangs here too, until the timeout:

- each process keeps one "stream" per (group, peer): a thread running that pair's operations in order;
- a send first waits for the peer's "ready" (its matching receive has started), then transfers;
- a receive says "ready", then takes the data.

Transfers and collectives ride on a Gloo group of the same members. `register()` it in every process,
then `init_process_group("strict", ...)` and `new_group(...)` as with any backend.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

READY_TAG = 1 << 20  # a tag of its own for the "ready" messages, apart from the data's


class _Work(dist.Work):
    def __init__(self, future: concurrent.futures.Future) -> None:
        super().__init__()
        self._future = future

    def wait(self, timeout: timedelta = timedelta(0)) -> bool:
        seconds = timeout.total_seconds() or None
        try:
            self._future.result(seconds)
        except concurrent.futures.TimeoutError:
            raise RuntimeError(f"strict: operation timed out after {seconds}s") from None
        return True

    def is_completed(self) -> bool:
        return self._future.done()

    def is_success(self) -> bool:
        return self._future.done() and self._future.exception() is None


class _Stream:
    """One pair's operations, run one after another in the order they were posted."""

    def __init__(self, name: str) -> None:
        self._ops: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def post(self, op) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._ops.put((op, future))
        return future

    def _run(self) -> None:
        while True:
            op, future = self._ops.get()
            try:
                future.set_result(op())
            except BaseException as exc:  # noqa: BLE001 — handed to whoever waits on the work
                future.set_exception(exc)


class StrictProcessGroup(dist.ProcessGroup):
    def __init__(self, store, rank: int, size: int, timeout: timedelta) -> None:
        super().__init__(rank, size)
        self._gloo = dist.ProcessGroupGloo(store, rank, size, timeout)
        self._streams: dict[int, _Stream] = {}
        self._lock = threading.Lock()

    def getBackendName(self) -> str:  # noqa: N802 — torch's name
        return "strict"

    def _stream(self, peer: int) -> _Stream:
        with self._lock:
            if peer not in self._streams:
                self._streams[peer] = _Stream(f"strict-{self.rank()}-{peer}")
            return self._streams[peer]

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int = 0) -> dist.Work:
        (tensor,) = tensors

        def op() -> None:
            ready = torch.empty(1, dtype=torch.int64)
            self._gloo.recv([ready], dst, READY_TAG).wait()  # the peer's receive has started
            self._gloo.send([tensor], dst, tag).wait()

        return _Work(self._stream(dst).post(op))

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int = 0) -> dist.Work:
        (tensor,) = tensors

        def op() -> None:
            self._gloo.send([torch.ones(1, dtype=torch.int64)], src, READY_TAG).wait()
            self._gloo.recv([tensor], src, tag).wait()

        return _Work(self._stream(src).post(op))

    # collectives (a stage's tensor-parallel ranks, barriers): as Gloo does them
    def broadcast(self, tensors, opts=None):
        return self._gloo.broadcast(tensors, opts or dist.BroadcastOptions())

    def allreduce(self, tensors, opts=None):
        return self._gloo.allreduce(tensors, opts or dist.AllreduceOptions())

    def barrier(self, opts=None):
        return self._gloo.barrier(opts or dist.BarrierOptions())


def _create(store, rank: int, size: int, timeout: timedelta) -> StrictProcessGroup:
    return StrictProcessGroup(store, rank, size, timeout)


def register() -> None:
    if "strict" not in dist.Backend.backend_list:
        dist.Backend.register_backend("strict", _create, devices=["cpu"])
