"""Memory per stage: each replica stage's RSS (and its parts) against its planned weights + KV.

"bare" is a stage actor built with the same spec and plan that never connected or loaded, so
"RSS − bare" is what connecting, loading and serving added.
"""

from __future__ import annotations

from pathlib import Path


def proc_memory(pid: int, model_dir: Path) -> dict[str, int]:
    """RSS of a process on this machine, its anonymous part, and what is resident of the checkpoint's mmap."""
    out = {"rss": 0, "anon": 0, "checkpoint": 0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            out["rss" if key == "VmRSS" else "anon"] = int(value.split()[0]) * 1024
    in_checkpoint, root = False, str(model_dir.resolve())
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and not head[0].endswith(
            ":"
        ):  # a mapping's header line: range perms offset dev inode [path]
            in_checkpoint = len(head) >= 6 and head[5].startswith(root)
        elif in_checkpoint and head[0] == "Rss:":
            out["checkpoint"] += int(head[1]) * 1024
    return out


def replica_memory(systems: dict, model_dir: Path) -> dict[str, list[dict]]:
    return {
        f"S={s}": [proc_memory(n["pid"], model_dir) for n in systems[f"replica S={s}"][1].nodes()]
        for s in (1, 2)
    }


def bare_memory(replica, model_dir: Path) -> list[dict]:
    """Memory of stage actors built like `replica`'s stages (same spec and plan) that never connect or load."""
    import ray

    from shards.actor import StageActor

    actors = [
        StageActor.options(num_cpus=0).remote(replica.spec, p, replica.args, "bare")
        for p in replica.plans
    ]
    pids = [node["pid"] for node in ray.get([a.node.remote() for a in actors])]
    out = [proc_memory(pid, model_dir) for pid in pids]
    for actor in actors:
        ray.kill(actor)
    return out


def stage_memory(systems: dict, reports: dict, after_start: dict, model_dir: Path) -> list[dict]:
    out, after_bench = [], replica_memory(systems, model_dir)
    for key in ("S=1", "S=2"):
        bare = bare_memory(systems[f"replica {key}"][1], model_dir)
        for i, (rep, b, start, bench) in enumerate(
            zip(reports[key], bare, after_start[key], after_bench[key], strict=True)
        ):
            weights, kv = rep["planned_weight_bytes"], rep["planned_kv_bytes"]
            out.append(
                {
                    "replica": key,
                    "stage": i,
                    "planned_weight_bytes": weights,
                    "planned_kv_bytes": kv,
                    "load_rss_delta_bytes": rep["loaded_rss_bytes"],  # what Replica.start() reports
                    "start_minus_bare_bytes": start["rss"] - b["rss"],
                    "bench_minus_bare_bytes": bench["rss"] - b["rss"],
                    "checkpoint_resident_bytes": bench["checkpoint"],
                    "anon_minus_bare_bytes": bench["anon"] - b["anon"],
                    "ratio": (bench["rss"] - b["rss"]) / (weights + kv),
                }
            )
    return out
