"""The baseline of `bench/load.py`: transformers `generate` with static batching behind a gRPC front.

    python -m bench._static_server MODEL_DIR PORT [--batch 8] [--wait-ms 50]

It speaks ringpipe's `Inference.GenerateStream` (token ids in, token ids out; greedy), so the same
client drives both systems. Static batching, as a plain server does it: requests queue; when the
generator is free it takes up to `--batch` of them, waiting up to `--wait-ms` after the first for
the batch to fill, left-pads the prompts and runs one `generate` until the batch's longest request
is done. Each request's tokens stream out as they are made and it ends at its own
`max_new_tokens`, but its row keeps computing until the whole batch ends, and requests that arrive
meanwhile wait for the next batch. A request whose client went away is dropped from the queue.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from dataclasses import dataclass, field

import grpc
import torch

from protos.ringpipe.v1 import inference_pb2 as pb
from protos.ringpipe.v1 import inference_pb2_grpc as pb_grpc


@dataclass
class _Job:
    prompt: list[int]
    max_new_tokens: int
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    gone: bool = False


class _RowStreamer:
    """transformers' streamer protocol: each new column of tokens to its rows' streams, each row
    until its own `max_new_tokens` (the batch computes on to its longest)."""

    def __init__(self, jobs: list[_Job]) -> None:
        self.jobs, self.made, self.seen_prompt = jobs, [0] * len(jobs), False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:  # generate hands over the prompt first
            self.seen_prompt = True
            return
        for row, token in enumerate(value.reshape(len(self.jobs), -1)[:, -1].tolist()):
            job = self.jobs[row]
            if self.made[row] < job.max_new_tokens:
                self.made[row] += 1
                item = ([token], self.made[row] == job.max_new_tokens)
                job.loop.call_soon_threadsafe(job.out.put_nowait, item)

    def end(self) -> None:
        pass


class StaticBatcher:
    def __init__(self, model_dir: str, batch: int, wait_s: float) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.model.generation_config.eos_token_id = None  # every request runs to its own length
        self.batch, self.wait_s = batch, wait_s
        self.queue: list[_Job] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._loop, daemon=True, name="static-batcher").start()

    def submit(self, job: _Job) -> None:
        with self.cond:
            self.queue.append(job)
            self.cond.notify()

    def _take(self) -> list[_Job]:
        with self.cond:
            while not any(not j.gone for j in self.queue):
                self.queue = []
                self.cond.wait()
            first = time.monotonic()
            while len([j for j in self.queue if not j.gone]) < self.batch:
                left = first + self.wait_s - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            live = [j for j in self.queue if not j.gone]
            jobs, rest = live[: self.batch], live[self.batch :]
            self.queue = rest
            return jobs

    def _loop(self) -> None:
        torch.set_num_threads(2)
        while True:
            jobs = self._take()
            width = max(len(j.prompt) for j in jobs)
            ids = torch.zeros(len(jobs), width, dtype=torch.long)
            mask = torch.zeros(len(jobs), width, dtype=torch.long)
            for row, j in enumerate(jobs):  # left padding: every row's last prompt token at the end
                ids[row, width - len(j.prompt) :] = torch.tensor(j.prompt)
                mask[row, width - len(j.prompt) :] = 1
            with torch.inference_mode():
                self.model.generate(ids, attention_mask=mask, max_new_tokens=max(j.max_new_tokens for j in jobs),
                                    do_sample=False, streamer=_RowStreamer(jobs), pad_token_id=0)


class Servicer(pb_grpc.InferenceServicer):
    def __init__(self, batcher: StaticBatcher) -> None:
        self.batcher = batcher

    async def GenerateStream(self, request: pb.GenerateRequest, context):
        job = _Job(list(request.token_ids.ids), request.max_new_tokens, asyncio.get_running_loop())
        self.batcher.submit(job)
        offset = 0
        try:
            while True:
                tokens, last = await job.out.get()
                msg = pb.GenerateStreamResponse(token_ids=tokens, offset=offset)
                offset += len(tokens)
                if last:
                    msg.finish_reason = pb.FINISH_REASON_LENGTH
                yield msg
                if last:
                    return
        finally:
            job.gone = True


async def serve(model_dir: str, port: int, batch: int, wait_ms: float) -> None:
    server = grpc.aio.server()
    pb_grpc.add_InferenceServicer_to_server(Servicer(StaticBatcher(model_dir, batch, wait_ms / 1000)), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("serving", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("port", type=int)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--wait-ms", type=float, default=50.0)
    a = p.parse_args()
    asyncio.run(serve(a.model_dir, a.port, a.batch, a.wait_ms))
