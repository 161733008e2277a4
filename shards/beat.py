"""Heartbeat pings as UDP datagrams: the wire format and the stage's side of it.

The controller pings every pipeline head each heartbeat interval. A Ray actor call costs its
caller about 1 ms of CPU (`bench/results/ray_call_cost.md`), so at 250 heads Ray pings alone take
half of the controller's core; a datagram each way costs about a tenth of that. This is the
probe of failure detectors such as SWIM (Consul's, Serf's): a datagram, with a reliable call as
the fallback (`failover/monitor.py` keeps Ray pings for a head until its datagrams are answered,
and sends one whenever a datagram goes unanswered for an interval, so a lost datagram or a
firewalled port costs a Ray call, never a false death).

A ping is a JSON object: `p` the pipeline, `i` the stage actor's index, `s` a sequence number, `t`
the sending controller's token. The answer is the stage's `ping()` answer with those four echoed,
so the controller matches it to its ping and drops stale or stray datagrams.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import uuid
from collections.abc import Awaitable, Callable

log = logging.getLogger("ringpipe.beat")
MAX_DATAGRAM = 8192  # a ping answer is a few hundred bytes
RECEIVE_BUFFER = 1 << 20  # answers that pile up while a loop is busy wait here, not on the floor
ECHOED = ("p", "i", "s", "t")


def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def decode(data: bytes) -> dict | None:
    """The message in a datagram, or None for anything that is not one of ours."""
    try:
        message = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(message, dict) or not all(k in message for k in ECHOED):
        return None
    return message


def bind(host: str) -> socket.socket:
    """A non-blocking UDP socket on `host` (an IPv4 or IPv6 address), on a port the OS picks."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        sock.setblocking(False)
        sock.bind((host, 0))
    except OSError:
        sock.close()
        raise
    return sock


def receive(sock: socket.socket):
    """Every datagram waiting on `sock`, as (message, sender), skipping what `decode` refuses."""
    while True:
        try:
            data, sender = sock.recvfrom(MAX_DATAGRAM)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # an ICMP error from an earlier send, or the socket closed: nothing to read
            return
        message = decode(data)
        if message is not None:
            yield message, sender


class BeatResponder:
    """A stage's side: answers each ping that reaches its socket with `answer(pipeline, index)`
    (None: no answer, as a hung stage gives none). Runs on the running event loop; `close` stops it."""

    def __init__(self, host: str, answer: Callable[[str, int], Awaitable[dict | None]]) -> None:
        self.sock = bind(host)
        self.address = (host, self.sock.getsockname()[1])
        self._answer = answer
        self._loop = asyncio.get_running_loop()
        self._replies: set[asyncio.Task] = set()
        self._loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        for ping, sender in receive(self.sock):
            task = self._loop.create_task(self._reply(ping, sender))
            self._replies.add(task)
            task.add_done_callback(self._replies.discard)

    async def _reply(self, ping: dict, sender) -> None:
        answer = await self._answer(ping["p"], ping["i"])
        if answer is None:
            return
        try:
            self.sock.sendto(encode({**answer, **{k: ping[k] for k in ECHOED}}), sender)
        except OSError as exc:  # the controller's socket is gone (it restarted): its successor pings anew
            log.debug("ping answer to %s not sent: %s", sender, exc)

    def close(self) -> None:
        self._loop.remove_reader(self.sock.fileno())
        for task in self._replies:
            task.cancel()
        self.sock.close()


class BeatPinger:
    """The controller's side: sends pings to the stages' addresses, and hands `on_answer(key,
    answer)` each answer that comes from the stage's address, carries this pinger's token, and
    answers a ping sent since the stage's last answer. A key is (pipeline, stage actor index)."""

    def __init__(self, host: str, on_answer: Callable[[tuple[str, int], dict], None]) -> None:
        self.sock = bind(host)
        self.token = uuid.uuid4().hex[:16]
        self._on_answer = on_answer
        self._addresses: dict[tuple[str, int], tuple[str, int]] = {}
        self._waiting: dict[tuple[str, int], int] = {}  # key -> first ping unanswered since its last answer
        self._seq = 0
        self.sent = self.answers = 0
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._readable)

    def add(self, key: tuple[str, int], address) -> None:
        self._addresses[key] = (str(address[0]), int(address[1]))

    def remove(self, key: tuple[str, int]) -> None:
        self._addresses.pop(key, None)
        self._waiting.pop(key, None)

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self._addresses

    def send(self, key: tuple[str, int]) -> bool:
        """Ping `key`; False when it has no address or the datagram could not be sent."""
        address = self._addresses.get(key)
        if address is None:
            return False
        self._seq += 1
        try:
            self.sock.sendto(encode({"p": key[0], "i": key[1], "s": self._seq, "t": self.token}), address)
        except OSError:  # no route, say: the caller falls back to a Ray ping
            return False
        self._waiting.setdefault(key, self._seq)
        self.sent += 1
        return True

    def _readable(self) -> None:
        for answer, sender in receive(self.sock):
            key = (answer["p"], answer["i"])
            first = self._waiting.get(key)
            if (answer["t"] != self.token or first is None or not isinstance(answer["s"], int)
                    or answer["s"] < first or tuple(sender[:2]) != self._addresses.get(key)):
                continue  # stray, stale, or an answer to a ping already answered
            del self._waiting[key]
            self.answers += 1
            self._on_answer(key, answer)

    def close(self) -> None:
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
