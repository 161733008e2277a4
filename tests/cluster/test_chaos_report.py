"""The chaos report on synthetic run records, against sums and overlaps worked out here by brute force."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image

from cluster.chaos_report import GRACE_S, phase, summarize, violations, window_end, write_report

KINDS = ("kill-node", "kill-actor", "kill-coordinator", "pause-node", "slow-node")


def fault(t: float, kind: str = "kill-node", duration_s: float | None = None, detected_s: float | None = 1.0,
          recovered_s: float | None = 3.0, error: str | None = None) -> dict:
    return {"kind": kind, "target": f"node {kind}@{t}", "t": t, "duration_s": duration_s,
            "detected_s": detected_s, "recovered_s": recovered_s, "error": error}


def request(i: int, t_start: float, t_end: float, **fields) -> dict:
    return {"id": f"r-{i:05d}", "mode": "unary", "session": None, "prompt": i % 7, "sampling": "greedy",
            "t_start": t_start, "t_end": t_end, "ttft_s": None, "ok": True, "error": None, "tokens": 16,
            "mismatch": False, "repeated": 0, "lost": 0, "resumes": 0, **fields}


def record(faults: list[dict], requests: list[dict], load_end: float = 120.0) -> dict:
    return {"version": 1, "started_at": 1763900000.0, "target": "127.0.0.1:50051",
            "settings": {"faults": "kill-node,pause-node", "every_s": 20, "seed": 7, "concurrency": 4},
            "load_start": 0.0, "faults_start": 10.0, "faults_end": load_end - 20, "load_end": load_end,
            "faults": faults, "requests": requests}


def random_record(seed: int, clean: bool = False) -> dict:
    rng = random.Random(seed)
    load_end = 300.0
    faults = []
    for t in sorted(rng.uniform(20, 260) for _ in range(rng.randint(1, 8))):
        kind = rng.choice(KINDS)
        faults.append(fault(
            t, kind, duration_s=rng.uniform(1, 15) if kind in ("pause-node", "slow-node") else None,
            detected_s=rng.choice([None, rng.uniform(0.1, 3)]),
            recovered_s=rng.choice([None, *(rng.uniform(0.5, 20) for _ in range(4))]),
            error=None if clean or rng.random() < 0.85 else "no such node"))
    requests = []
    for i in range(400):
        start = rng.uniform(0, load_end - 5)
        stream = rng.random() < 0.5
        ok = clean or rng.random() < 0.9
        requests.append(request(
            i, start, start + rng.lognormvariate(0, 0.8), mode="stream" if stream else "unary",
            ttft_s=rng.uniform(0.01, 0.5) if stream and rng.random() < 0.9 else None,
            ok=ok, error=None if ok else rng.choice(["UNAVAILABLE: no live replica", "DEADLINE_EXCEEDED"]),
            tokens=rng.randint(0, 64), mismatch=not clean and rng.random() < 0.03,
            repeated=0 if clean or rng.random() < 0.97 else rng.randint(1, 3),
            lost=0 if clean or rng.random() < 0.97 else rng.randint(1, 3)))
    return record(faults, requests, load_end)


def brute_phase(req: dict, rec: dict) -> str:
    """The phases written out again: every window checked one by one, never sorted or reduced."""
    windows = []
    for f in rec["faults"]:
        if f["error"] is not None:
            continue
        if f["recovered_s"] is None:
            end = rec["load_end"]
        else:
            end = f["t"] + max(f["duration_s"] or 0, f["recovered_s"], GRACE_S)
        windows.append((f["t"], end))
    start, end = req["t_start"], req["t_end"]
    if any(not (end < w_start or start > w_end) for w_start, w_end in windows):
        return "during"
    if all(end < w_start for w_start, _ in windows):
        return "before"
    if all(start > w_end for _, w_end in windows):
        return "after"
    return "between"


SEEDS = range(8)


@pytest.mark.parametrize("seed", SEEDS)
def test_phases_match_a_brute_force_overlap_check(seed):
    rec = random_record(seed)
    phases = [phase(r, rec) for r in rec["requests"]]
    assert phases == [brute_phase(r, rec) for r in rec["requests"]]
    assert {"before", "during"} <= set(phases)


def test_phase_edges():
    faults = [fault(50.0, recovered_s=2.0), fault(100.0, "pause-node", duration_s=12.0, recovered_s=8.0),
              fault(30.0, error="no such actor")]
    rec = record(faults, [])
    assert window_end(faults[0], GRACE_S, rec["load_end"]) == 55.0  # grace outlasts the recovery
    assert window_end(faults[1], GRACE_S, rec["load_end"]) == 112.0  # the pause outlasts both
    assert phase(request(0, 29.0, 31.0), rec) == "before"  # a fault never injected has no window
    assert phase(request(1, 40.0, 50.0), rec) == "during"  # touching the window's start
    assert phase(request(2, 55.0, 60.0), rec) == "during"  # touching its end
    assert phase(request(3, 55.1, 60.0), rec) == "between"
    assert phase(request(4, 112.5, 113.0), rec) == "after"
    never = record([fault(50.0, recovered_s=None)], [], load_end=120.0)
    assert window_end(never["faults"][0], GRACE_S, 120.0) == 120.0
    assert phase(request(5, 119.0, 125.0), never) == "during"  # never recovered: open to load_end


@pytest.mark.parametrize("seed", SEEDS)
def test_counts_add_up_and_percentiles_are_numpys(seed):
    rec = random_record(seed)
    phases = summarize(rec)["phases"]
    by_phase = {name: [r for r in rec["requests"] if brute_phase(r, rec) == name]
                for name in ("before", "during", "between", "after")}
    by_phase["steady"] = [r for r in rec["requests"] if brute_phase(r, rec) != "during"]
    by_phase["all"] = rec["requests"]
    assert sum(phases[name]["requests"] for name in ("before", "during", "between", "after")) == len(rec["requests"])
    assert phases["steady"]["requests"] + phases["during"]["requests"] == phases["all"]["requests"]
    for name, requests in by_phase.items():
        stats = phases[name]
        assert stats["requests"] == len(requests)
        assert stats["ok"] + stats["failed"] == stats["requests"]
        assert stats["failed"] == sum(not r["ok"] for r in requests)
        assert stats["mismatched"] == sum(r["mismatch"] for r in requests)
        assert (stats["repeated"], stats["lost"]) == (sum(r["repeated"] for r in requests),
                                                      sum(r["lost"] for r in requests))
        latency = [r["t_end"] - r["t_start"] for r in requests if r["ok"]]
        ttft = [r["ttft_s"] for r in requests if r["mode"] == "stream" and r["ttft_s"] is not None]
        for key, values, q in (("p50_s", latency, 50), ("p99_s", latency, 99),
                               ("ttft_p50_s", ttft, 50), ("ttft_p99_s", ttft, 99)):
            assert stats[key] == (pytest.approx(np.percentile(values, q)) if values else None)
    summary = summarize(rec)
    assert summary["p99_during_over_steady"] == pytest.approx(phases["during"]["p99_s"] / phases["steady"]["p99_s"])


def test_throughput_is_tokens_over_the_time_in_flight():
    # in flight over [0, 3] and [5, 6]: 4 s, whatever the overlap and the gap
    rec = record([], [request(0, 0.0, 2.0, tokens=10), request(1, 1.0, 3.0, tokens=10),
                      request(2, 1.5, 2.5, tokens=10), request(3, 5.0, 6.0, tokens=10)])
    assert summarize(rec)["phases"]["all"]["tokens_per_s"] == pytest.approx(40 / 4)


@pytest.mark.parametrize("seed", SEEDS)
def test_fault_kinds(seed):
    rec = random_record(seed)
    kinds = summarize(rec)["faults"]
    assert sum(k["count"] for k in kinds.values()) == len(rec["faults"])
    for kind, stats in kinds.items():
        mine = [f for f in rec["faults"] if f["kind"] == kind]
        injected = [f for f in mine if f["error"] is None]
        assert (stats["count"], stats["injected"], stats["not_injected"]) == (
            len(mine), len(injected), len(mine) - len(injected))
        for field in ("detected", "recovered"):
            seen = [f[f"{field}_s"] for f in injected if f[f"{field}_s"] is not None]
            assert stats[f"{field}_p50_s"] == (pytest.approx(np.percentile(seen, 50)) if seen else None)
            assert stats[f"{field}_max_s"] == (max(seen) if seen else None)
        assert stats["not_recovered"] == sum(f["recovered_s"] is None for f in injected)


def clean_record() -> dict:
    return record([fault(40.0), fault(80.0, "pause-node", duration_s=5.0, recovered_s=6.0)],
                  [request(i, i * 2.0, i * 2.0 + 1.5, mode="stream", ttft_s=0.1) for i in range(55)])


def test_a_clean_run_has_no_violations():
    assert violations(clean_record()) == []
    assert violations(random_record(3, clean=True)) == []


@pytest.mark.parametrize(("breaking", "words"), [
    (lambda rec: rec["requests"][20].update(ok=False, error="UNAVAILABLE: no live replica"),
     ["1 of 55 requests failed", "UNAVAILABLE: no live replica", "r-00020", "1 during faults"]),
    (lambda rec: rec["requests"][3].update(mismatch=True), ["differs from the failure-free reference", "r-00003"]),
    (lambda rec: rec["requests"][21].update(repeated=2), ["2 tokens were delivered twice", "r-00021"]),
    (lambda rec: rec["requests"][50].update(lost=1), ["1 token was lost", "r-00050", "0 during faults"]),
    (lambda rec: rec["faults"][0].update(error="node not found"),
     ["kill-node", "could not be injected: node not found"]),
])
def test_each_broken_invariant_is_named(breaking, words):
    rec = clean_record()
    breaking(rec)
    found = violations(rec)
    assert len(found) == 1
    for word in words:
        assert word in found[0]
    assert summarize(rec)["violations"] == found


def test_many_failures_are_grouped_by_error():
    rec = clean_record()
    for i in range(8):
        rec["requests"][i].update(ok=False, error="DEADLINE_EXCEEDED" if i % 2 else "UNAVAILABLE: x")
    (sentence,) = violations(rec)
    assert "'UNAVAILABLE: x' ×4" in sentence and "'DEADLINE_EXCEEDED' ×4" in sentence
    assert "and 3 more" in sentence


@pytest.mark.parametrize("seed", [0, 5])
def test_write_report(tmp_path, seed):
    rec = random_record(seed)
    paths = write_report(rec, tmp_path / "run")
    assert set(paths) == {"report", "summary", "timeline"}
    assert json.loads(paths["report"].read_text()) == {**rec, "summary": summarize(rec)}
    png = paths["timeline"].read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(paths["timeline"]) as image:
        assert image.size == (1600, 900)
    markdown = paths["summary"].read_text()
    phases = summarize(rec)["phases"]
    for name in ("before", "during", "after", "steady", "all"):
        row = next(line for line in markdown.splitlines() if line.startswith(f"| {name} |"))
        assert row.split(" | ")[1:3] == [str(phases[name]["requests"]), str(phases[name]["ok"])]
    assert "127.0.0.1:50051" in markdown and "every_s=20" in markdown
    for sentence in violations(rec):
        assert sentence in markdown
    assert "## Faults by kind" in markdown


def test_a_run_without_faults_or_requests(tmp_path):
    no_faults = clean_record()
    no_faults["faults"] = []
    summary = summarize(no_faults)
    assert summary["phases"]["before"]["requests"] == summary["phases"]["all"]["requests"] == 55
    assert summary["phases"]["during"] == summarize(no_faults)["phases"]["during"]
    assert summary["phases"]["during"]["p99_s"] is None and summary["p99_during_over_steady"] is None
    assert summary["faults"] == {}
    assert "All invariants held." in write_report(no_faults, tmp_path / "a")["summary"].read_text()
    empty = record([fault(10.0)], [])
    paths = write_report(empty, tmp_path / "b")
    assert summarize(empty)["phases"]["all"]["tokens_per_s"] is None
    with Image.open(paths["timeline"]) as image:
        assert image.size == (1600, 900)


def test_a_fault_with_nothing_to_detect_says_why(tmp_path):
    """Only a touched pipeline can be detected: a kill of a node that held no stage, or of a
    coordinator, says so instead of reading as a missed detection."""
    idle_node = {**fault(10.0, detected_s=None), "touched": []}
    coordinator = {**fault(40.0, "kill-coordinator", detected_s=None), "touched": []}
    missed = {**fault(70.0, detected_s=None), "touched": ["ringpipe-controller.p1"]}
    seen = {**fault(100.0, detected_s=0.25), "touched": ["ringpipe-controller.p2"]}
    rec = record([idle_node, coordinator, missed, seen], [request(0, 0.0, 1.0)])
    lines = {line.split("**")[1] + "@" + line.split(" s ")[0]: line
             for line in write_report(rec, tmp_path)["summary"].read_text().splitlines()
             if line.startswith("- ") and "**" in line}
    assert "no pipeline touched (the node held no stage)" in lines["kill-node@- 10.0"]
    assert "no pipeline touched (Serve replaces the coordinator)" in lines["kill-coordinator@- 40.0"]
    assert "not detected" in lines["kill-node@- 70.0"]
    assert "detected after 0.25 s" in lines["kill-node@- 100.0"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_in_half_precision_a_differing_output_is_reported_not_a_violation(dtype, tmp_path):
    """Below float32 a resume promises no token repeated or lost, not the same continuation."""
    rec = clean_record()
    rec["dtype"] = dtype
    rec["requests"][3].update(mismatch=True)
    assert violations(rec) == []
    write_report(rec, tmp_path)
    text = (tmp_path / "summary.md").read_text()
    assert "1 request returned output differing from the failure-free reference" in text and dtype in text
    rec["requests"][4].update(lost=1)  # lost tokens still break it
    assert len(violations(rec)) == 1
    rec["dtype"] = "float32"
    assert len(violations(rec)) == 2
