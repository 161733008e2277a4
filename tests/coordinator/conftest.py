"""One running ringpipe service for the coordinator's end-to-end tests (real Ray, Serve, gRPC)."""

from __future__ import annotations

import random
import socket

import pytest

from cluster.config import parse_config

VOCAB = 512
MAX_BATCH, MAX_QUEUE, REPLICAS = 4, 28, 2  # 2 × (4 + 28) = 64 requests fit at once


def free_port() -> int:
    """A free loopback port from 20000-32767: below the kernel's ephemeral range (where bind(0) and
    every outgoing connection draw from, so a port picked there can be taken before Serve binds it)
    and above Ray's worker ports (10002-19999)."""
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 32768)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


@pytest.fixture(scope="session")
def service_checkpoint(make_checkpoint):
    return make_checkpoint("llama", tokenizer=True, vocab=VOCAB, layers=4, hidden=64)


@pytest.fixture(scope="session")
def service(ray_cluster, service_checkpoint):
    """2 replicas × 2 stages, 2 coordinators, gRPC on a free loopback port; no auth."""
    from cluster.serve import start_service

    cfg = parse_config({
        "model": {"path": str(service_checkpoint)},
        "pipeline": {"stages": 2, "max_batch": MAX_BATCH, "max_queue": MAX_QUEUE, "max_seq_len": 512,
                     "prefill_chunk": 32},
        "replicas": {"count": REPLICAS},
        "server": {"port": free_port(), "http_port": free_port(), "coordinators": 2, "max_new_tokens": 480},
    })
    svc = start_service(cfg, progress=False)
    yield svc
    svc.shutdown()
