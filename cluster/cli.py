"""The `ringpipe` command line.

    ringpipe serve [--config FILE]             the service: replicas, coordinators, gRPC
    ringpipe generate TEXT [--stream] ...      one request to a running service
    ringpipe status [--json]                   membership and load of a running service
    ringpipe deploy --config FILE              onto a running Ray cluster, then return
    ringpipe undeploy                          remove it again
    ringpipe serve-config --config FILE        the same deployment as a Serve config (`serve deploy`)
    ringpipe chaos --fault kill-node ...       faults under load on a running service, with a report
    ringpipe model create DIR --arch llama     a random-weight checkpoint in HF layout
    ringpipe model demo DIR                    the small demo model, trained here
    ringpipe run --model DIR --stages 2 ...    generate through one pipeline replica, no service

Errors print one line to stderr and exit non-zero; they never print a traceback
for a mistake the user can fix or a condition they can expect (no cluster, no
service, a wrong token, a port taken, a Ray outside the tested range).
Commands that need a running cluster (`deploy`, `undeploy`, `chaos`) join
`--address`, else RAY_ADDRESS, else the one Ray cluster running on this
machine (`cluster.local.find_cluster`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path

from cluster.chaos_report import (
    FAULTS,  # not from chaos_run: Ray must not be imported before prepare_local
)
from cluster.config import (
    LOCAL_DEFAULTS,
    ConfigError,
    RingpipeConfig,
    load_config,
    merge,
    parse_config,
)
from cluster.durations import duration_arg, interval_arg

EXAMPLES = """examples:
  ringpipe serve                                   # demo model, 2 replicas x 2 stages, 127.0.0.1:50051
  ringpipe generate "The list type" --stream
  ringpipe status
  ringpipe serve --config configs/serve.yaml --address auto
  ringpipe model demo models/demo
  ringpipe run --model models/demo --stages 2 --prompt "The list type" --max-new-tokens 40
  ringpipe model create /tmp/tiny --arch qwen2 --layers 5 --hidden 128
  ringpipe run --model /tmp/tiny --stages 3 --tensor-parallel 2 --prompt-ids 1,2,3 --max-new-tokens 8 --json
"""


FOUND = ("Ray cluster address (default: RAY_ADDRESS, else the one Ray cluster running on this machine; "
         "with several, say which: `ringpipe serve` prints its address)")


def _token_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one token id")
    return ids


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**64), got {text!r}") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64) (a uint64), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ringpipe",
        description="Pipeline-parallel LLM serving on Ray.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    model = sub.add_parser("model", help="make checkpoints (random, or the trained demo model)")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="SUBCOMMAND")
    create = model_sub.add_parser("create", help="write a random-weight checkpoint in Hugging Face layout")
    create.add_argument("dir", type=Path, help="output directory")
    create.add_argument("--arch", choices=["llama", "qwen2", "mistral", "glm"], default="llama")
    create.add_argument("--layers", type=_positive, default=4)
    create.add_argument("--hidden", type=_positive, default=128)
    create.add_argument("--heads", type=_positive, default=4)
    create.add_argument("--kv-heads", type=_positive, default=2)
    create.add_argument("--vocab", type=_positive, default=1024)
    create.add_argument("--intermediate", type=_positive, default=None, help="MLP width (default ≈ 8/3 × hidden)")
    create.add_argument("--tie-embeddings", action="store_true", help="share the embedding with the LM head")
    create.add_argument("--max-shard-mb", type=_positive, default=None, help="split tensors into shards of this size")
    create.add_argument("--seed", type=int, default=0)

    demo = model_sub.add_parser(
        "demo", help="train the demo model (byte-level BPE + small Llama on the pydoc topics); reused once built"
    )
    demo.add_argument("dir", type=Path, help="checkpoint directory (built if missing)")
    demo.add_argument("--steps", type=_positive, default=None, help="training steps (default: the full schedule)")

    serve = sub.add_parser(
        "serve",
        help="start the service: pipeline replicas, coordinators and the gRPC endpoint",
        description="Start (or join, via RAY_ADDRESS / --address) a Ray cluster and serve the model over gRPC. "
        "With no --config: the demo model (trained on first use), 2 replicas x 2 stages, local Ray on "
        "127.0.0.1, gRPC on 127.0.0.1:50051. Ctrl-C stops everything it started.",
    )
    serve.add_argument("--config", type=Path, help="YAML service config (see configs/local.yaml, configs/serve.yaml)")
    serve.add_argument("--model", type=Path, help="checkpoint directory (overrides model.path)")
    serve.add_argument("--replicas", type=_positive, default=None, help="pipeline replicas (replicas.count)")
    serve.add_argument("--stages", type=_positive, default=None, help="stages per replica (pipeline.stages)")
    serve.add_argument("--tensor-parallel", type=_positive, default=None,
                       help="processes (GPUs) per stage (pipeline.tensor_parallel)")
    serve.add_argument("--tp-engine", choices=["native", "deepspeed"], default=None,
                       help="tensor-parallel layers: ours or DeepSpeed's (pipeline.tp_engine)")
    serve.add_argument("--port", type=_positive, default=None, help="gRPC port (server.port)")
    serve.add_argument("--http-port", type=_positive, default=None,
                       help="HTTP port: the OpenAI API (server.http_port, default 8000)")
    serve.add_argument("--metrics-port", type=int, default=None,
                       help="local mode: Prometheus port of the head node, the worker nodes' next up; 0: any "
                       "(server.metrics_port, default 8080)")
    serve.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    serve.add_argument(
        "--nodes", type=_positive, default=None,
        help="local mode: start N worker nodes (real raylets on 127.0.0.1) beside the head, to try failover",
    )
    serve.add_argument(
        "--netns", action="store_true",
        help="with --nodes: each worker node in a network namespace of its own (10.231.K.x, on a bridge), so "
        "that `ringpipe chaos --fault partition-node` can cut its link (Linux, root)",
    )
    serve.add_argument("--standby", type=int, default=None, help="warm spare replicas (replicas.standby)")

    deploy = sub.add_parser(
        "deploy",
        help="deploy onto a running Ray cluster (--address, RAY_ADDRESS, or the one on this machine) and return",
        description="Join a running Ray cluster, start the controller (which starts the pipeline replicas) "
        "and the coordinators behind Serve's gRPC proxies, wait until gRPC answers SERVING, print the "
        "target and exit, leaving the service running. `ringpipe undeploy` removes it.",
    )
    deploy.add_argument("--config", type=Path, required=True, help="YAML service config (see configs/serve.yaml)")
    deploy.add_argument("--address", help=FOUND)
    deploy.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for SERVING (default 300)")
    undeploy = sub.add_parser("undeploy", help="remove what `ringpipe deploy` started from the cluster")
    undeploy.add_argument("--address", help=FOUND)
    serve_config = sub.add_parser(
        "serve-config",
        help="print the Serve config (for `serve deploy` / `serve run`) of a service config",
        description="Write the Serve config file that deploys the service of --config: proxies, gRPC options "
        "and the ringpipe application (import path cluster.deploy:app, which reads --config on the cluster).",
    )
    serve_config.add_argument("--config", type=Path, required=True, help="YAML service config")
    serve_config.add_argument("--output", "-o", type=Path, help="file to write (default: stdout)")
    serve_config.add_argument(
        "--cluster-path", help="where the service config lies on the cluster's nodes (default: --config, resolved)"
    )

    chaos = sub.add_parser(
        "chaos",
        help="inject faults into a running service under load; report what was lost (exit 1 if anything)",
        description="Join the cluster of a running service (--address, RAY_ADDRESS, or the one running on "
        "this machine), compute the failure-free "
        "answers of a request pool, run load against --target while injecting a fault every --every for "
        "--duration, then write report.json, summary.md and timeline.png to --report. Invariants: every "
        "request answered, every output equal to its failure-free reference, no streamed token repeated or "
        "lost, every fault injected; the exit status is 1 when one broke.",
    )
    chaos.add_argument("--fault", action="append", choices=FAULTS,
                       help="fault kind, repeatable: each fault is drawn from these (default: kill-node)")
    chaos.add_argument("--every", type=interval_arg, default="30s", help="time between faults: 30s, or a range 30-60s")
    chaos.add_argument("--duration", type=duration_arg, default="10m", help="how long faults are injected (s, m, h)")
    chaos.add_argument("--seed", type=int, default=0, help="draws faults, targets, gaps and requests")
    chaos.add_argument("--report", type=Path, required=True, help="directory for the report")
    chaos.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of the gRPC endpoint")
    chaos.add_argument("--address", help=FOUND)
    chaos.add_argument("--restart-nodes", action="store_true",
                       help="start a killed node again on this machine (local clusters; elsewhere the autoscaler does)")
    load = chaos.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=_positive, default=4, help="requests in flight")
    load.add_argument("--rate", type=float, default=None, help="or: requests per second (Poisson arrivals)")
    chaos.add_argument("--max-new-tokens", type=_positive, default=32)
    chaos.add_argument("--stream-fraction", type=float, default=0.5, help="share of requests that stream")
    chaos.add_argument("--sampled-fraction", type=float, default=0.25,
                       help="share of the pool sampled with a fixed seed (the rest greedy)")
    chaos.add_argument("--pool", type=_positive, default=16, help="distinct requests, each with its reference")
    chaos.add_argument("--prompts", type=Path, help="text prompts, one per line (default: random token ids < 256)")
    chaos.add_argument("--warmup", type=duration_arg, default="10s", help="load before the first fault")
    chaos.add_argument("--cooldown", type=duration_arg, default="20s", help="load after the last fault has recovered")
    chaos.add_argument("--pause", type=duration_arg, default="5s", help="how long pause-node stops a node")
    chaos.add_argument("--slow", type=duration_arg, default="10s", help="how long slow-node hogs a node's CPUs")
    chaos.add_argument("--partition", type=duration_arg, default="20s", help="how long partition-node cuts a node's links")
    chaos.add_argument("--request-timeout", type=duration_arg, default="120s", help="deadline of each request")
    for action in chaos._actions:
        if action.help and action.default not in (None, False, argparse.SUPPRESS):
            action.help += " (default: %(default)s)"

    def client_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of the gRPC endpoint")
        p.add_argument("--json", action="store_true", help="the last line of stdout is one JSON object")

    generate = sub.add_parser(
        "generate",
        help="send one request to a running service",
        description="Generate from TEXT (or --prompt-ids) on a running ringpipe service. Greedy unless "
        "--temperature > 0. Sends $RINGPIPE_TOKEN as the bearer token when set. A failed call prints the "
        "gRPC status and exits 1.",
    )
    generate.add_argument("text", nargs="?", help="prompt text")
    generate.add_argument("--prompt-ids", type=_token_ids, help="prompt as token ids: 1,2,3")
    generate.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    generate.add_argument("--session", help="session id: a conversation's turns go to the same replica")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=None, help="0 or unset = greedy")
    generate.add_argument("--top-k", type=int, default=None)
    generate.add_argument("--top-p", type=float, default=None)
    generate.add_argument("--seed", type=_seed, default=None,
                          help="sampling seed, any uint64 (default: one picked for you, kept across resumes)")
    generate.add_argument("--stop", action="append", help="stop string (repeatable)")
    generate.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    client_flags(generate)

    status = sub.add_parser("status", help="membership, ring shares, load and KV slots of a running service")
    client_flags(status)

    run = sub.add_parser(
        "run",
        help="generate through one pipeline replica on Ray",
        description="Start (or join, via RAY_ADDRESS / --address) a Ray cluster, build one pipeline "
        "replica of S stages and print the continuation. Greedy unless --temperature > 0.",
    )
    run.add_argument("--model", type=Path, help="checkpoint directory (or model.path in --config)")
    run.add_argument("--config", type=Path, help="YAML service config; flags override it")
    run.add_argument("--stages", type=_positive, default=None, help="pipeline stages (default 2)")
    prompt = run.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs the checkpoint's tokenizer.json)")
    prompt.add_argument("--prompt-ids", type=_token_ids, help="prompt as token ids: 1,2,3")
    run.add_argument("--max-new-tokens", type=_positive, default=32)
    run.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    run.add_argument("--top-k", type=int, default=0, help="0 = off")
    run.add_argument("--top-p", type=float, default=1.0)
    run.add_argument("--seed", type=int, default=0, help="sampling seed: same seed, same tokens")
    run.add_argument("--ignore-eos", action="store_true", help="do not stop at the model's EOS token")
    run.add_argument("--tensor-parallel", type=_positive, default=None, help="processes (GPUs) per stage")
    run.add_argument("--tp-engine", choices=["native", "deepspeed"], default=None,
                     help="tensor-parallel layers: ours or DeepSpeed's (pipeline.tp_engine)")
    run.add_argument("--max-batch", type=_positive, default=None, help="KV slots per stage")
    run.add_argument("--max-seq-len", type=_positive, default=None)
    run.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    run.add_argument("--device", choices=["cpu", "cuda"], default=None)
    run.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    run.add_argument("--json", action="store_true", help='print one object {"token_ids": [...], "text": ...}')
    return parser


@contextlib.contextmanager
def _spinner(what: str):
    """An elapsed-time bar on stderr while a long step runs (quiet when stderr is not a terminal)."""
    from tqdm import tqdm

    stop = threading.Event()
    bar = tqdm(desc=what, bar_format="{desc}: {elapsed}", file=sys.stderr, disable=not sys.stderr.isatty())

    def tick() -> None:
        while not stop.wait(0.5):
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()


def _fail(message: str, code: int = 2) -> int:
    print(f"ringpipe: error: {message}", file=sys.stderr)
    return code


def _run_config(args: argparse.Namespace) -> RingpipeConfig:
    overrides: dict = {"model": {}, "pipeline": {}}
    if args.model:
        overrides["model"]["path"] = str(args.model)
    for key in ("dtype", "device"):
        if getattr(args, key):
            overrides["model"][key] = getattr(args, key)
    for key in ("stages", "tensor_parallel", "tp_engine", "max_batch", "max_seq_len"):
        if getattr(args, key):
            overrides["pipeline"][key] = getattr(args, key)
    if args.config:
        return load_config(args.config, overrides)
    if not args.model:
        raise ConfigError("give --model DIR (or --config FILE with model.path)")
    return parse_config(overrides, "command line")


def cmd_model_create(args: argparse.Namespace) -> int:
    from shards.create import RandomModelSpec, create_random_checkpoint

    if args.hidden % args.heads or args.heads % args.kv_heads:
        return _fail("--hidden must be a multiple of --heads, and --heads a multiple of --kv-heads")
    spec = RandomModelSpec(
        arch=args.arch, layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
        vocab=args.vocab, intermediate=args.intermediate, tie_word_embeddings=args.tie_embeddings, seed=args.seed,
    )
    shard = args.max_shard_mb * 2**20 if args.max_shard_mb else None
    path = create_random_checkpoint(args.dir, spec, shard)
    print(f"wrote a random {args.arch} checkpoint to {path}")
    return 0


def cmd_model_demo(args: argparse.Namespace) -> int:
    from cluster.demo import build_demo

    path = build_demo(args.dir, steps=args.steps)
    print(f"demo model ready in {path}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from shards.checkpoint import load_tokenizer, read_model_args
    from shards.errors import ShardsError
    from shards.replica import Replica, make_request
    from shards.sampling import SamplingParams

    cfg = _run_config(args)
    spec = cfg.replica_spec()
    model_args = read_model_args(spec.model_dir)
    tokenizer = load_tokenizer(spec.model_dir)
    if args.prompt is not None:
        if tokenizer is None:
            return _fail(f"{spec.model_dir} has no tokenizer.json: pass the prompt as --prompt-ids 1,2,3")
        prompt = tokenizer.encode(args.prompt).ids
    else:
        prompt = args.prompt_ids
    if args.temperature < 0:
        return _fail(f"--temperature must be ≥ 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        return _fail(f"--top-p must be in (0, 1], got {args.top_p}")
    sampling = SamplingParams(args.temperature, max(args.top_k, 0), args.top_p, args.seed)
    stops = set() if args.ignore_eos else set(model_args.eos_token_ids)

    from cluster.local import init_ray

    mode = init_ray(args.address)
    import ray

    replica = Replica(spec, name="run")
    for plan in replica.plans:  # known from shapes alone, before any stage starts
        print(
            f"stage {plan.index}: layers {plan.layer_start}-{plan.layer_end - 1}, "
            f"weights {plan.weight_bytes / 2**20:.1f} MiB + KV {plan.kv_bytes / 2**20:.1f} MiB",
            file=sys.stderr,
        )
    try:
        started = time.monotonic()
        with _spinner("loading stages"):
            replica.start()
        print(f"replica ready in {time.monotonic() - started:.1f}s ({mode} Ray)", file=sys.stderr)
        request = make_request(prompt, args.max_new_tokens, sampling, stops)
        tokens: list[int] = []
        shown = ""
        t0 = time.monotonic()
        for item in replica.stream(request):
            tokens.extend(item["tokens"])
            if not args.json and tokenizer is not None:
                text = tokenizer.decode(tokens)
                sys.stdout.write(text[len(shown) :])
                sys.stdout.flush()
                shown = text
            elif not args.json:
                print(" ".join(map(str, item["tokens"])), end=" ", flush=True)
        elapsed = time.monotonic() - t0
        text = tokenizer.decode(tokens) if tokenizer is not None else None
        if args.json:
            print(json.dumps({"token_ids": tokens, "text": text}))
        else:
            print()
        print(f"{len(tokens)} tokens in {elapsed:.2f}s ({len(tokens) / max(elapsed, 1e-9):.1f} tok/s)", file=sys.stderr)
        return 0
    except ShardsError as exc:
        return _fail(str(exc), 1)
    finally:
        replica.shutdown()
        if mode == "local":
            ray.shutdown()


def _serve_config(args: argparse.Namespace) -> RingpipeConfig:
    overrides: dict = {"model": {}, "pipeline": {}, "replicas": {}, "server": {}}
    if args.model:
        overrides["model"] = {"path": str(args.model), "demo": False}
    for key in ("stages", "tensor_parallel", "tp_engine"):
        if getattr(args, key):
            overrides["pipeline"][key] = getattr(args, key)
    if args.replicas:
        overrides["replicas"]["count"] = args.replicas
    if args.standby is not None:
        overrides["replicas"]["standby"] = args.standby
    if args.port:
        overrides["server"]["port"] = args.port
    if args.http_port:
        overrides["server"]["http_port"] = args.http_port
    if args.metrics_port is not None:
        overrides["server"]["metrics_port"] = args.metrics_port
    if args.config:
        return load_config(args.config, overrides)
    return parse_config(merge(LOCAL_DEFAULTS, overrides), "built-in local config")


def cmd_serve(args: argparse.Namespace) -> int:
    import signal

    from cluster.local import LOOPBACK
    from cluster.serve import check_ports_free, start_service

    cfg = _serve_config(args)
    joining = bool(args.address or os.environ.get("RAY_ADDRESS"))
    if args.nodes and joining:
        return _fail("--nodes starts a local cluster: it cannot be used with --address or RAY_ADDRESS")
    if args.netns:
        from cluster.netns import unavailable

        if not args.nodes:
            return _fail("--netns puts the worker nodes of --nodes in namespaces: give --nodes N")
        if unavailable():
            return _fail(f"--netns: {unavailable()}")
    elif not joining:  # the proxy will listen on this machine: a taken port is said before anything starts
        check_ports_free(cfg, LOOPBACK if cfg.server.host == "auto" else cfg.server.host)
    # Ctrl-C and SIGTERM both end in a clean shutdown (SIGINT explicitly: a process started in
    # the background of a script inherits it ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.monotonic()
    with _spinner("starting replicas and coordinators"):
        service = start_service(cfg, args.address, nodes=args.nodes, netns=args.netns)
    try:
        p = cfg.pipeline
        print(
            f"ringpipe serving {cfg.model.directory} on {service.target} (gRPC) — {cfg.replicas.count} replicas "
            f"x {p.stages} stages (+{cfg.replicas.standby} standby), {cfg.server.coordinators} coordinators, "
            f"{service.mode} Ray{f' with {args.nodes} worker nodes' if args.nodes else ''}"
            f"{' in network namespaces' if args.netns else ''}; "
            f"ready in {time.monotonic() - started:.0f}s",
            flush=True,
        )
        print(f'try:  ringpipe generate "The list type" --stream --target {service.target}', flush=True)
        print(f"OpenAI API: {service.openai_base_url} (model \"{cfg.model.served_name}\")", flush=True)
        # a cluster ray.init starts has Ray's token auth on (Ray 2.60): say what a second command needs
        auth = ", with RAY_AUTH_MODE=token: its token is ~/.ray/auth_token" if os.environ.get(
            "RAY_AUTH_MODE", "").lower() == "token" and service.mode == "local" else ""
        print(f"Ray cluster: {service.ray_address} (for --address / RAY_ADDRESS{auth})", flush=True)
        urls = service.metrics_urls
        print(f"Prometheus metrics: {' '.join(urls)}{' (one per node: scrape them all)' if len(urls) > 1 else ''}",
              flush=True)
        print("Ctrl-C to stop.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down…", file=sys.stderr, flush=True)
        return 0
    finally:
        service.shutdown()


USES_RAY = {"serve", "run", "deploy", "undeploy", "chaos"}  # the others need no Ray (gRPC, files)
JOINS_CLUSTER = {"deploy", "undeploy", "chaos"}  # need a running cluster: found when no address is given


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cluster.local import (
        NoRayCluster,
        RayAuthFailed,
        UnsupportedRay,
        check_ray,
        find_cluster,
        prepare_local,
    )

    try:
        if args.command in USES_RAY:
            check_ray()
        if args.command in JOINS_CLUSTER:
            args.address = find_cluster(args.address)
    except (UnsupportedRay, NoRayCluster) as exc:
        return _fail(str(exc))
    prepare_local(getattr(args, "address", None))  # before anything imports Ray
    from cluster.errors import NoService, NotServing, PortTaken
    from cluster.netns import NetnsError
    from shards.errors import ShardsError

    try:
        if args.command == "model":
            return cmd_model_create(args) if args.model_command == "create" else cmd_model_demo(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "chaos":
            from cluster.chaos_run import cmd_chaos

            return cmd_chaos(args)
        if args.command in ("deploy", "undeploy", "serve-config"):
            from cluster import deploy

            return {"deploy": deploy.cmd_deploy, "undeploy": deploy.cmd_undeploy,
                    "serve-config": deploy.cmd_serve_config}[args.command](args)
        if args.command in ("generate", "status"):
            from cluster.call import cmd_generate, cmd_status

            return cmd_generate(args) if args.command == "generate" else cmd_status(args)
        return cmd_run(args)
    except (ConfigError, ShardsError, NoRayCluster, RayAuthFailed, NetnsError, NoService, PortTaken) as exc:
        return _fail(str(exc))
    except NotServing as exc:
        return _fail(str(exc), 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
