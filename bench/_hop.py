"""The activation hop between two stage processes: Gloo send/recv against the Ray object store."""

from __future__ import annotations

import os
import statistics
import time

import torch

from bench._foreign_load import ForeignLoad


def hop_latencies(sizes: list[int], iters: int) -> list[dict]:
    """Round trips (payload both ways) between two Ray actors: Gloo send/recv, ray.put + ref, call argument."""
    import ray

    @ray.remote(num_cpus=1)
    class Peer:
        def __init__(self) -> None:
            torch.set_num_threads(1)
            self.store = None

        def open_store(self) -> int:
            from shards.transport import open_rendezvous

            self.store = open_rendezvous("127.0.0.1", 2, 60.0)
            return self.store.port

        def join(self, rank: int, port: int) -> None:
            import torch.distributed as dist

            os.environ["GLOO_SOCKET_IFNAME"] = "lo"
            store = self.store or dist.TCPStore("127.0.0.1", port, 2, is_master=False)
            dist.init_process_group("gloo", store=store, rank=rank, world_size=2)

        def gloo_round_trips(self, rank: int, nbytes: int, iters: int) -> list[float]:
            import torch.distributed as dist

            buf, times = torch.zeros(nbytes // 4), []
            for _ in range(iters):
                t = time.perf_counter()
                if rank == 0:
                    dist.send(buf, 1)
                    dist.recv(buf, 1)
                else:
                    dist.recv(buf, 0)
                    dist.send(buf, 0)
                times.append(time.perf_counter() - t)
            return times

        def echo(self, x: torch.Tensor) -> torch.Tensor:
            return x

        def ray_round_trips(self, peer, nbytes: int, iters: int, by_ref: bool) -> list[float]:
            x, times = torch.zeros(nbytes // 4), []
            for _ in range(iters):
                t = time.perf_counter()
                ray.get(peer.echo.remote(ray.put(x) if by_ref else x))
                times.append(time.perf_counter() - t)
            return times

    a, b = Peer.remote(), Peer.remote()
    port = ray.get(a.open_store.remote())
    ray.get([a.join.remote(0, port), b.join.remote(1, port)])
    out = []
    for nbytes in sizes:
        k = max(20, iters if nbytes <= 64 * 1024 else iters // 5)
        for path, refs in (
            (
                "gloo send/recv",
                [a.gloo_round_trips.remote(0, nbytes, k), b.gloo_round_trips.remote(1, nbytes, k)],
            ),
            ("ray.put + ref", [a.ray_round_trips.remote(b, nbytes, k, True)]),
            ("actor call arg", [a.ray_round_trips.remote(b, nbytes, k, False)]),
        ):
            load = ForeignLoad()
            times = sorted(ray.get(refs)[0][k // 10 :])  # rank 0's times; the first tenth warms up
            out.append(
                {
                    "path": path,
                    "bytes": nbytes,
                    "samples": len(times),
                    "foreign_cores": load.cores(),
                    "median_us": 1e6 * statistics.median(times),
                    "p90_us": 1e6 * times[int(0.9 * len(times))],
                }
            )
            print(
                f"  hop {path:<15} {nbytes // 1024:>5} KiB  median {out[-1]['median_us']:8.0f} us",
                flush=True,
            )
    for actor in (a, b):
        ray.kill(actor)
    return out
