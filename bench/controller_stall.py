"""A stalled controller, tried as an operator would: does the failover machinery cause a failure?

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python bench/controller_stall.py            # ~2 min
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python bench/controller_stall.py --stall 10 --stalls 3
    .venv/bin/ringpipe model create /tmp/small --arch llama --layers 4 --hidden 128
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python bench/controller_stall.py --model /tmp/small

Starts `ringpipe serve --nodes 3` (the demo model or `--model`, 2 replicas x 2 stages) in
its own process group, runs `--clients` streaming clients through plain gRPC stubs (no resends:
a failed call counts), and SIGSTOPs the controller's process for `--stall` seconds, `--stalls`
times, with the load running. Reported: requests completed and failed, failovers the controller
recorded, monitor stalls it noticed. Before the fix of issue 12 the first try of this scenario
declared both healthy replicas dead and failed 335 of 435 requests.
Results: `results/controller_stall.md`.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._results import describe, table  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = [[5, 17, 99, 3], [8, 8, 1, 40, 41], [300, 12]]  # token ids: any checkpoint, tokenizer or not


def serve(port: int, model: str | None) -> tuple[subprocess.Popen, str, str]:
    """`ringpipe serve --nodes 3`; returns the process, the gRPC target and the Ray address."""
    proc = subprocess.Popen(
        [str(ROOT / ".venv/bin/ringpipe"), "serve", "--nodes", "3", "--port", str(port), "--metrics-port", "0",
         *(["--model", model] if model else [])],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    target = address = None
    deadline = time.monotonic() + 600
    said = []
    for line in proc.stdout:
        said.append(line)
        if m := re.search(r"--target (\S+)", line):
            target = m.group(1)
        if m := re.search(r"Ray cluster: (\S+)", line):
            address = m.group(1)
        if (target and address) or time.monotonic() > deadline:
            break
    if not (target and address):
        proc.kill()
        raise RuntimeError("ringpipe serve did not come up:\n" + "".join(said[-30:]))
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep draining
    return proc, target, address


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stall", type=float, default=5.0, help="seconds the controller stays stopped")
    parser.add_argument("--stalls", type=int, default=2, help="how many stalls, one after another")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--port", type=int, default=50061)
    parser.add_argument("--model", help="checkpoint directory (default: the demo model, trained on first use)")
    args = parser.parse_args()

    import grpc
    import ray

    from failover.controller import CONTROLLER_NAME, NAMESPACE
    from protos.ringpipe.v1 import inference_pb2 as pb
    from protos.ringpipe.v1 import inference_pb2_grpc

    proc, target, address = serve(args.port, args.model)
    done, failed, errors = [0] * args.clients, [0] * args.clients, []
    stop = threading.Event()

    def client(k: int) -> None:
        with grpc.insecure_channel(target) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            while not stop.is_set():
                req = pb.GenerateRequest(max_new_tokens=args.new_tokens, ignore_eos=True)
                req.token_ids.ids.extend(PROMPTS[k % len(PROMPTS)])
                try:
                    for _ in stub.GenerateStream(req, timeout=120):
                        pass
                    done[k] += 1
                except grpc.RpcError as exc:
                    failed[k] += 1
                    errors.append(f"{exc.code().name}: {exc.details()}")

    try:
        ray.init(address=address, namespace=NAMESPACE, logging_level="ERROR")
        controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
        before = time.time()
        pid = ray.get(controller.health.remote())["pid"]
        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(args.clients)]
        for t in threads:
            t.start()
        time.sleep(10)  # steady load first
        for _ in range(args.stalls):
            os.kill(pid, signal.SIGSTOP)
            time.sleep(args.stall)
            os.kill(pid, signal.SIGCONT)
            time.sleep(10)  # the controller runs again, under load
        stop.set()
        for t in threads:
            t.join(180)
        failovers = [f for f in ray.get(controller.failovers.remote()) if f["at"] >= before]
        stalls = ray.get(controller.health.remote())["monitor_stalls"]
    finally:
        ray.shutdown()
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)

    rows = [["stall", f"{args.stalls} x {args.stall:g} s SIGSTOP of the controller"],
            ["requests completed", str(sum(done))], ["requests failed", str(sum(failed))],
            ["failovers recorded", str(len(failovers))], ["monitor stalls noticed", str(stalls)]]
    text = table(["", "value"], rows)
    print(text)
    for e in sorted(set(errors))[:5]:
        print("  error:", e)
    cmd = " ".join(["bench/controller_stall.py", *sys.argv[1:]])
    meta = describe(["failover", "coordinator", "shards", "cluster", "bench/controller_stall.py"])
    machine = (f"{meta['cpu']}, {meta['cores']} cores, {meta['ram_gib']} GiB, Python {meta['python']}, "
               f"commit {meta['commit']}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "controller_stall.md").write_text(
        "# A stalled controller under load\n\n"
        f"Command: `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python {cmd}`\n\nMachine: {machine}\n\n"
        f"`ringpipe serve --nodes 3` ({args.model or 'the demo model'}, 2 replicas x 2 stages), {args.clients} "
        "streaming clients on "
        f"plain gRPC stubs ({args.new_tokens} tokens each, no resends), the controller's process stopped "
        "with SIGSTOP and continued with SIGCONT while they run. Wanted: no request failed, no failover "
        "recorded (the stall is the controller's, every replica is healthy).\n\n"
        f"{text}\n" + "".join(f"\n- error: {e}" for e in sorted(set(errors))[:5]) + "\n"
    )


if __name__ == "__main__":
    main()
