"""Ping datagrams (`shards/beat.py`): real UDP sockets on 127.0.0.1, both sides on one event loop."""

from __future__ import annotations

import asyncio
import json
import socket

from shards.beat import BeatPinger, BeatResponder, encode

HOST = "127.0.0.1"


async def until(predicate, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_a_stage_answers_each_ping_and_the_answer_reaches_the_controller():
    async def main():
        asked, got = [], []

        async def answer(pipeline, index):
            asked.append((pipeline, index))
            return {"state": "serving", "waiting": len(asked)}

        stage = BeatResponder(HOST, answer)
        pinger = BeatPinger(HOST, lambda key, a: got.append((key, a)))
        try:
            pinger.add(("p1", 0), stage.address)
            for n in range(1, 4):
                assert pinger.send(("p1", 0))
                await until(lambda n=n: len(got) == n)
            assert asked == [("p1", 0)] * 3
            assert [(key, a["state"], a["waiting"]) for key, a in got] == [(("p1", 0), "serving", n) for n in (1, 2, 3)]
            assert pinger.send(("p2", 0)) is False  # no address: the caller pings by Ray instead
        finally:
            pinger.close()
            stage.close()

    run(main())


def test_a_stage_that_does_not_answer_is_silent_and_its_late_answer_still_counts():
    async def main():
        release, got = asyncio.Event(), []

        async def answer(pipeline, index):
            await release.wait()  # hung, then well again
            return {"state": "serving"}

        stage = BeatResponder(HOST, answer)
        pinger = BeatPinger(HOST, lambda key, a: got.append(a))
        try:
            pinger.add(("p1", 0), stage.address)
            pinger.send(("p1", 0))
            pinger.send(("p1", 0))  # sent again while silent
            await asyncio.sleep(0.3)
            assert got == []
            release.set()
            await until(lambda: got)
            await asyncio.sleep(0.2)
            assert len(got) == 1  # the second answer is to a ping already answered
        finally:
            pinger.close()
            stage.close()

    run(main())


def test_stray_stale_and_forged_datagrams_are_dropped():
    async def main():
        got = []
        pinger = BeatPinger(HOST, lambda key, a: got.append(a))
        stage = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a stage written by hand
        stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        stage.bind((HOST, 0))
        stage.settimeout(5)
        target = pinger.sock.getsockname()
        try:
            pinger.add(("p1", 0), stage.getsockname())
            pinger.send(("p1", 0))
            ping = json.loads(stage.recvfrom(8192)[0])
            assert (ping["p"], ping["i"], ping["t"]) == ("p1", 0, pinger.token)
            echo = {k: ping[k] for k in ("p", "i", "s", "t")}
            stage.sendto(b"not json", target)
            stage.sendto(encode({**echo, "t": "another controller"}), target)
            stage.sendto(encode({**echo, "s": ping["s"] - 1}), target)  # older than the ping
            stage.sendto(encode({**echo, "i": 1}), target)  # a stage never pinged
            stranger.sendto(encode(echo), target)  # right words, wrong address
            await asyncio.sleep(0.3)
            assert got == []
            stage.sendto(encode({**echo, "state": "serving"}), target)
            await until(lambda: got)
            stage.sendto(encode({**echo, "state": "again"}), target)  # answered already
            await asyncio.sleep(0.2)
            assert [a["state"] for a in got] == ["serving"]
        finally:
            pinger.close()
            stage.close()
            stranger.close()

    run(main())


def test_a_stage_from_another_pipeline_is_not_answered_for():
    """A stage answers only for itself: a ping meant for another pipeline (a reused port) gets nothing."""

    async def main():
        got = []

        async def answer(pipeline, index):
            return {"state": "serving"} if pipeline == "mine" else None

        stage = BeatResponder(HOST, answer)
        pinger = BeatPinger(HOST, lambda key, a: got.append(key))
        try:
            pinger.add(("theirs", 0), stage.address)
            pinger.add(("mine", 0), stage.address)
            pinger.send(("theirs", 0))
            pinger.send(("mine", 0))
            await until(lambda: got)
            await asyncio.sleep(0.2)
            assert got == [("mine", 0)]
        finally:
            pinger.close()
            stage.close()

    run(main())
