"""`ringpipe generate` and `ringpipe status`: calls to a running server over gRPC.

A failed call prints the gRPC status name and the server's message on stderr
and exits 1. With `--json`, the last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

import grpc

from coordinator.client import Client, RingpipeError

TOKEN_ENV = "RINGPIPE_TOKEN"  # the bearer token, when the server asks for one
STATES = {0: "unspecified", 1: "starting", 2: "serving", 3: "draining", 4: "dead", 5: "paused"}


def _client(args: argparse.Namespace) -> Client:
    return Client(args.target, token=os.environ.get(TOKEN_ENV) or None)


def _failed(exc: RingpipeError, target: str) -> int:
    """Print a failed call in one line, with what to do next where the status alone does not say it."""
    hint = ""
    if exc.code is grpc.StatusCode.UNAVAILABLE and not _listening(target):
        hint = (f" (nothing listens at {target}: start the service with `ringpipe serve`, or pass the --target "
                "HOST:PORT that `ringpipe serve` or `ringpipe deploy` printed)")
    elif exc.code is grpc.StatusCode.UNAUTHENTICATED:
        hint = f" (put the server's token in {TOKEN_ENV}{'' if os.environ.get(TOKEN_ENV) else ', which is unset'})"
    print(f"ringpipe: {exc.code.name}: {exc.details}{hint}", file=sys.stderr)
    return 1


def _listening(target: str) -> bool:
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=2.0).close()
    except (OSError, ValueError):
        return False
    return True


def _sampling(args: argparse.Namespace) -> dict:
    options = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
    return {k: v for k, v in options.items() if v is not None}


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = args.prompt_ids if args.prompt_ids is not None else args.text
    if prompt is None:
        print("ringpipe: error: give TEXT or --prompt-ids", file=sys.stderr)
        return 2
    options = dict(
        session_id=args.session or "", stop=args.stop or (), timeout_s=args.timeout, **_sampling(args)
    )
    try:
        with _client(args) as client:
            if args.stream:
                ids, text = [], []
                for piece in client.stream(prompt, args.max_new_tokens, **options):
                    ids.extend(piece.token_ids)
                    text.append(piece.text)
                    if not args.json:
                        sys.stdout.write(piece.text)
                        sys.stdout.flush()
                    reason = piece.finish_reason
                result = {"token_ids": ids, "text": "".join(text), "finish_reason": reason}
            else:
                done = client.generate(prompt, args.max_new_tokens, **options)
                result = {
                    "token_ids": done.token_ids, "text": done.text, "finish_reason": done.finish_reason,
                    "replica_id": done.replica_id, "time_to_first_token_ms": round(done.time_to_first_token_ms, 2),
                }
                if done.seed is not None:
                    result["seed"] = done.seed  # the sampling seed used: --seed it to get this completion again
                if not args.json:
                    sys.stdout.write(done.text)
    except RingpipeError as exc:
        return _failed(exc, args.target)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"\n[{len(result['token_ids'])} tokens, finish: {result['finish_reason']}]", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    try:
        with _client(args) as client:
            status = client.status()
    except RingpipeError as exc:
        return _failed(exc, args.target)
    replicas = [
        {
            "replica_id": r.replica_id, "state": STATES.get(r.state, str(r.state)), "epoch": r.epoch,
            "ring_share": round(r.ring_share, 4), "in_flight": r.in_flight, "queue_depth": r.queue_depth,
            "free_slots": r.free_slots, "total_slots": r.total_slots, "cached_prefixes": r.cached_prefixes,
            "reused_tokens": r.reused_tokens,
            "weight": round(r.weight, 3), "weight_reason": r.weight_reason,
            "shares_nodes_with": list(r.shares_nodes_with),
            "stages": [
                {"index": s.index, "node_id": s.node_id, "address": s.address, "layers": [s.layer_start, s.layer_end]}
                for s in r.stages
            ],
        }
        for r in status.replicas
    ]
    failovers = [
        {
            "at_unix_s": f.at_unix_s, "replica_id": f.replica_id, "stage": f.stage, "reason": f.reason,
            "silent_s": round(f.silent_s, 3), "action": f.action,
            "restored_at_unix_s": f.restored_at_unix_s or None,
        }
        for f in status.failovers
    ]
    cp = status.control_plane
    control_plane = {"registry_ok": cp.registry_ok, "registry_error": cp.registry_error,
                     "monitor_stalls": cp.monitor_stalls}
    if args.json:
        print(json.dumps({"epoch": status.epoch, "dtype": status.dtype, "standbys": status.standbys,
                          "replicas": replicas, "failovers": failovers, "control_plane": control_plane}))
        return 0
    print(f"epoch {status.epoch}, {len(replicas)} replicas, {status.standbys} standby, {status.dtype or 'float32'}")
    if not cp.registry_ok:
        print(f"  registry degraded: {cp.registry_error} (serving goes on; the state is saved once it answers)")
    for r in replicas:
        nodes = ", ".join(f"stage {s['index']} {s['address']} ({s['node_id'][:8]})" for s in r["stages"])
        print(
            f"  {r['replica_id']:<12} {r['state']:<8} epoch {r['epoch']:<4} share {r['ring_share']:.3f}"
            f"  in-flight {r['in_flight']}  queued {r['queue_depth']}  free slots {r['free_slots']}/{r['total_slots']}"
            f"  weight {r['weight']:.2f}{' (' + r['weight_reason'] + ')' if r['weight_reason'] else ''}"
            f"  [{nodes}]"
        )
        if r["shares_nodes_with"]:
            print(f"  {'':<12} shares a node with {', '.join(r['shares_nodes_with'])}: one node failure takes both"
                  " (the cluster has too few free nodes to keep replicas apart)")
    if failovers:
        print(f"recent failovers ({len(failovers)}):")
    for f in failovers[-10:]:
        when = time.strftime("%H:%M:%S", time.localtime(f["at_unix_s"]))
        restored = f["restored_at_unix_s"]
        back = f"back after {restored - f['at_unix_s']:.1f}s" if restored else "not yet restored"
        print(f"  {when} {f['replica_id']} stage {f['stage']}: {f['reason']} → {f['action']}, {back}")
    return 0
