"""The report of a chaos run: from its record to report.json, summary.md and timeline.png.

`ringpipe chaos` drives load at a service while it injects faults, and records every
fault and every request (a plain dict, `version` 1). This module only reads that record.

Phases. Each injected fault has a window [t, window_end]: from its injection until the
latest of the fault's own end (`duration_s`, for pauses and slowdowns), the system being
whole again (`recovered_s`), and a grace of `grace_s` after `t` (a fault's effects outlive
an instant recovery: retried calls, resumed streams, refilled batches). A fault that never
recovered within the run keeps its window open to `load_end`; a fault that could not be
injected (`error`) has no window. A request, as the closed interval [t_start, t_end], is
  - "during" when it overlaps any window,
  - "before" when it ends before the first window opens (a run without faults is all
    "before"),
  - "after" when it starts after the last window closes,
  - "between" otherwise: entirely inside a gap between windows;
and "steady" is every request not "during".

Invariants (`violations`): every request succeeds with the failure-free reference's
output, no streamed token is repeated or lost, every fault was injected. Latency under
faults (`p99_during_over_steady`) is reported, not checked. The output check holds in
float32 only: a service computing in bfloat16 or float16 (the record's `dtype`, from
`ringpipe status`) promises no repeated or lost token, not the same continuation (its
kernels depend on the batch's shape), so there differing outputs are reported
in the summary, not as violations.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

Record = dict[str, Any]
Window = tuple[float, float]

GRACE_S = 5.0
FAULTS = ("kill-node", "kill-actor", "kill-coordinator", "pause-node", "slow-node", "partition-node")  # what `ringpipe chaos` injects
PHASES = ("before", "during", "between", "after")
KIND_COLOURS = {"kill-node": "tab:red", "kill-actor": "tab:orange", "pause-node": "tab:brown",
                "kill-coordinator": "tab:purple", "slow-node": "tab:olive",
                "partition-node": "tab:cyan"}  # others: grey


def window_end(fault: Record, grace_s: float = GRACE_S, load_end: float = math.inf) -> float:
    """When the fault's window closes (module docstring); `load_end` if it never recovered."""
    lasted_s = max(fault["duration_s"] or 0.0, grace_s)
    if fault["recovered_s"] is None:
        return max(load_end, fault["t"] + lasted_s)
    return fault["t"] + max(lasted_s, fault["recovered_s"])


def fault_windows(record: Record, grace_s: float = GRACE_S) -> list[Window]:
    """[t, window_end] of every injected fault, in order of injection."""
    return sorted((f["t"], window_end(f, grace_s, record["load_end"]))
                  for f in record["faults"] if f["error"] is None)


def _phase_in(request: Record, windows: list[Window]) -> str:
    start, end = request["t_start"], request["t_end"]
    if any(start <= w_end and end >= w_start for w_start, w_end in windows):
        return "during"
    if not windows or end < windows[0][0]:
        return "before"
    return "after" if start > max(w_end for _, w_end in windows) else "between"


def phase(request: Record, record: Record, grace_s: float = GRACE_S) -> str:
    """Where `request` falls among the record's faults: before, during, between or after."""
    return _phase_in(request, fault_windows(record, grace_s))


def _percentiles(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    p50, p99 = np.percentile(values, [50, 99])
    return float(p50), float(p99)


def _busy_s(requests: list[Record]) -> float:
    """How long at least one of `requests` was in flight: the length of their intervals' union."""
    busy_s, reach = 0.0, -math.inf
    for start, end in sorted((r["t_start"], r["t_end"]) for r in requests):
        if end > reach:
            busy_s += end - max(start, reach)
            reach = end
    return busy_s


def _phase_stats(requests: list[Record]) -> dict[str, Any]:
    """Latency of ok requests (a failure's is its time to the error); ttft of every stream that
    got a first token; tokens/s over the time at least one of the requests was in flight."""
    ok = [r for r in requests if r["ok"]]
    p50, p99 = _percentiles([r["t_end"] - r["t_start"] for r in ok])
    ttft_p50, ttft_p99 = _percentiles(
        [r["ttft_s"] for r in requests if r["mode"] == "stream" and r["ttft_s"] is not None])
    tokens, busy_s = sum(r["tokens"] for r in requests), _busy_s(requests)
    return {"requests": len(requests), "ok": len(ok), "failed": len(requests) - len(ok),
            "mismatched": sum(bool(r["mismatch"]) for r in requests),
            "repeated": sum(r["repeated"] for r in requests),
            "lost": sum(r["lost"] for r in requests),
            "p50_s": p50, "p99_s": p99, "ttft_p50_s": ttft_p50, "ttft_p99_s": ttft_p99,
            "tokens": tokens, "busy_s": busy_s,
            "tokens_per_s": tokens / busy_s if busy_s > 0 else None}


def _fault_stats(faults: list[Record]) -> dict[str, Any]:
    injected = [f for f in faults if f["error"] is None]
    stats: dict[str, Any] = {"count": len(faults), "injected": len(injected),
                             "not_injected": len(faults) - len(injected)}
    for field in ("detected", "recovered"):
        seen = [f[f"{field}_s"] for f in injected if f[f"{field}_s"] is not None]
        stats[f"{field}_p50_s"] = float(np.median(seen)) if seen else None
        stats[f"{field}_max_s"] = float(max(seen)) if seen else None
    stats["not_recovered"] = sum(f["recovered_s"] is None for f in injected)
    return stats


def summarize(record: Record, grace_s: float = GRACE_S) -> dict[str, Any]:
    """Request stats per phase (plus "steady" and "all"), fault stats per kind, the violations."""
    windows = fault_windows(record, grace_s)
    groups: dict[str, list[Record]] = {name: [] for name in PHASES}
    for request in record["requests"]:
        groups[_phase_in(request, windows)].append(request)
    groups["steady"] = [r for r in record["requests"] if _phase_in(r, windows) != "during"]
    groups["all"] = record["requests"]
    phases = {name: _phase_stats(requests) for name, requests in groups.items()}
    during, steady = phases["during"]["p99_s"], phases["steady"]["p99_s"]
    kinds = sorted({f["kind"] for f in record["faults"]})
    return {"grace_s": grace_s, "windows": [list(w) for w in windows], "phases": phases,
            "faults": {k: _fault_stats([f for f in record["faults"] if f["kind"] == k])
                       for k in kinds},
            "p99_during_over_steady": during / steady if during is not None and steady else None,
            "violations": violations(record, grace_s)}


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _which(requests: list[Record], windows: list[Window]) -> str:
    during = sum(_phase_in(r, windows) == "during" for r in requests)
    more = f" and {len(requests) - 5} more" if len(requests) > 5 else ""
    ids = ", ".join(r["id"] for r in requests[:5])
    return f"({during} during faults, {len(requests) - during} outside): {ids}{more}"


def exact_outputs(record: Record) -> bool:
    """Does the service promise failure-free outputs (float32), or only no token repeated or lost?"""
    return record.get("dtype", "float32") in ("", "float32")


def violations(record: Record, grace_s: float = GRACE_S) -> list[str]:
    """One sentence per broken invariant, naming the requests or fault; empty when all held."""
    windows, requests = fault_windows(record, grace_s), record["requests"]
    found: list[str] = []
    failed = [r for r in requests if not r["ok"]]
    if failed:
        errors = Counter(r["error"] or "no error given" for r in failed).most_common()
        said = "; ".join(f"{error!r} ×{count}" for error, count in errors)
        found.append(f"{len(failed)} of {_n(len(requests), 'request')} failed with {said} "
                     f"{_which(failed, windows)}")
    mismatched = [r for r in requests if r["mismatch"]]
    if mismatched and exact_outputs(record):
        found.append(f"{_n(len(mismatched), 'request')} returned output that differs from the "
                     f"failure-free reference {_which(mismatched, windows)}")
    for field, what in (("repeated", "delivered twice"), ("lost", "lost (offsets skipped)")):
        hit = [r for r in requests if r[field]]
        tokens = sum(r[field] for r in hit)
        if hit:
            found.append(f"{_n(tokens, 'token')} {'was' if tokens == 1 else 'were'} {what} in "
                         f"{_n(len(hit), 'request')} {_which(hit, windows)}")
    found += [f"{f['kind']} of {f['target']} at {f['t']:.1f} s could not be injected: {f['error']}"
              for f in record["faults"] if f["error"] is not None]
    return found


def _table(columns: tuple[str, ...], rows: dict[str, dict[str, Any]]) -> list[str]:
    """A markdown table: a row per `rows` item, a column per key, named without its unit."""
    def cell(value: Any) -> str:
        return "–" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    header = [c.removesuffix("_s").replace("_", " ").replace("tokens per", "tok/s")
              for c in columns]
    return ["| | " + " | ".join(header) + " |", "|---" * (len(columns) + 1) + "|",
            *(f"| {name} | " + " | ".join(cell(row[c]) for c in columns) + " |"
              for name, row in rows.items())]


def _detection(fault: Record) -> str:
    """How the fault's detection reads. Only a pipeline the fault touched can be detected: a
    node that held no stage, or a coordinator (Serve replaces those), has nothing to detect."""
    if fault["detected_s"] is not None:
        return f"detected after {fault['detected_s']:.2f} s"
    if fault["kind"] == "kill-coordinator":
        return "no pipeline touched (Serve replaces the coordinator)"
    if fault.get("touched") == []:
        return "no pipeline touched (the node held no stage)"
    return "not detected"


def _fault_line(fault: Record, grace_s: float, load_end: float) -> str:
    said = [f"lasted {fault['duration_s']:g} s"] if fault["duration_s"] is not None else []
    if fault["error"] is not None:
        said.append(f"not injected: {fault['error']}")
    else:
        recovered = fault["recovered_s"]
        said.append(_detection(fault))
        said.append("not recovered within the run" if recovered is None
                    else f"recovered after {recovered:.2f} s")
        said.append(f"window to {window_end(fault, grace_s, load_end):.1f} s")
    return f"- {fault['t']:.1f} s **{fault['kind']}** {fault['target']}: {', '.join(said)}"


def _markdown(record: Record, summary: dict[str, Any]) -> str:
    started = datetime.fromtimestamp(record["started_at"], tz=timezone.utc)
    phases, ratio = summary["phases"], summary["p99_during_over_steady"]
    grace_s = summary["grace_s"]
    settings = ", ".join(f"`{key}={value}`" for key, value in record["settings"].items())
    lines = [f"# Chaos run against {record['target']}", "",
             f"Started {started:%Y-%m-%d %H:%M:%S} UTC. Load {record['load_start']:.1f}–"
             f"{record['load_end']:.1f} s ({record['load_end'] - record['load_start']:.0f} s), "
             f"faults {record['faults_start']:.1f}–{record['faults_end']:.1f} s; "
             f"{_n(len(record['requests']), 'request')}, {_n(len(record['faults']), 'fault')}.",
             "", f"Settings: {settings or 'none'}.", "", "## Requests by phase", "",
             "A request is *during* when it overlaps a fault's window: from injection until the "
             f"fault ended, the system recovered or {grace_s:g} s passed, whichever is last. "
             "*steady* is every request not during. Latencies in seconds, of ok requests.", ""]
    shown = {name: row for name, row in phases.items() if name != "between" or row["requests"]}
    lines += _table(("requests", "ok", "failed", "mismatched", "repeated", "lost", "p50_s", "p99_s",
                     "ttft_p50_s", "ttft_p99_s", "tokens_per_s"), shown)
    if ratio is not None:
        lines += ["", f"p99 latency during faults is {ratio:.2f}× steady "
                      f"({phases['during']['p99_s']:.3f} s vs {phases['steady']['p99_s']:.3f} s); "
                      "reported, not an invariant."]
    lines += ["", "## Faults by kind", "", "Seconds after injection.", ""]
    lines += _table(("count", "injected", "not_injected", "detected_p50_s", "detected_max_s",
                     "recovered_p50_s", "recovered_max_s", "not_recovered"), summary["faults"])
    lines += ["", "## Faults", ""]
    lines += [_fault_line(f, grace_s, record["load_end"])
              for f in sorted(record["faults"], key=lambda f: f["t"])]
    lines += ["", "## Invariants", ""]
    lines += [f"- {v}" for v in summary["violations"]] or ["All invariants held."]
    differing = sum(bool(r["mismatch"]) for r in record["requests"])
    if differing and not exact_outputs(record):
        lines += ["", f"{_n(differing, 'request')} returned output differing from the failure-free reference: "
                  f"allowed in {record['dtype']}, where a resumed (or differently batched) generation may "
                  "continue differently; none repeated or lost a token unless listed above."]
    return "\n".join(lines) + "\n"


def _plot_timeline(record: Record, summary: dict[str, Any], path: Path) -> None:
    # Imported here: only the report draws, and matplotlib is slow to import. A bare Figure
    # renders with Agg without pyplot, so no global backend is set and no display is needed.
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    requests = record["requests"]
    t0 = min([record["load_start"], *(r["t_start"] for r in requests)])
    t1 = max([record["load_end"], *(r["t_end"] for r in requests)])
    bin_s = max(1, math.ceil((t1 - t0) / 300))
    edges = t0 + bin_s * np.arange(max(1, math.ceil((t1 - t0) / bin_s)) + 1)
    ends = np.array([r["t_end"] for r in requests])
    ok = np.array([bool(r["ok"]) for r in requests], dtype=bool)
    latency = np.array([r["t_end"] - r["t_start"] for r in requests])

    fig = Figure(figsize=(16, 9), dpi=100, layout="constrained")
    top, lat = fig.subplots(2, 1, sharex=True, height_ratios=[1, 1.3])
    weights = np.array([r["tokens"] for r in requests], dtype=float)
    top.stairs(np.histogram(ends, edges, weights=weights)[0] / bin_s, edges, fill=True,
               color="tab:green", alpha=0.25, label="tokens/s (left)")
    rate = top.twinx()  # requests/s drawn over the tokens/s area, on its own scale
    for done, colour, label in ((ok, "tab:blue", "ok requests/s"),
                                (~ok, "black", "failed requests/s")):
        rate.stairs(np.histogram(ends[done], edges)[0] / bin_s, edges, color=colour, label=label)
    top.set_ylabel(f"tokens/s ({bin_s} s bins, at completion)")
    rate.set_ylabel("completed requests/s")
    lat.scatter(ends[ok], latency[ok], s=6, alpha=0.5, color="tab:blue", label="ok request")
    lat.scatter(ends[~ok], latency[~ok], s=30, marker="x", color="black", label="failed request")
    if ok.any() and latency[ok].min() > 0 and latency[ok].max() / latency[ok].min() > 20:
        lat.set_yscale("log")  # a failover spike would flatten the steady latencies otherwise
    else:
        lat.set_ylim(bottom=0)
    lat.set_ylabel("latency (s), at completion")
    lat.set_xlabel("seconds since the run started")
    lat.set_xlim(t0, t1)
    for fault in record["faults"]:
        colour = KIND_COLOURS.get(fault["kind"], "tab:gray")
        for ax in (top, lat):
            if fault["error"] is not None:
                ax.axvline(fault["t"], color=colour, linestyle=":", linewidth=1.5)
                continue
            ax.axvline(fault["t"], color=colour, linewidth=1.5)
            end = min(window_end(fault, summary["grace_s"], record["load_end"]), t1)
            ax.axvspan(fault["t"], end, color=colour, alpha=0.08)
    kinds = [Line2D([], [], color=KIND_COLOURS.get(kind, "tab:gray"), label=kind)
             for kind in summary["faults"]]
    if any(f["error"] is not None for f in record["faults"]):
        kinds.append(Line2D([], [], color="tab:gray", linestyle=":", label="not injected"))
    handles = rate.get_legend_handles_labels()[0] + top.get_legend_handles_labels()[0]
    rate.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.06, 1), frameon=False)
    lat.legend(handles=lat.get_legend_handles_labels()[0] + kinds, loc="upper left",
               bbox_to_anchor=(1.01, 1), frameon=False, title="faults: line, shaded window")
    fig.suptitle(f"Chaos run against {record['target']}: {_n(len(requests), 'request')}, "
                 f"{_n(len(record['faults']), 'fault')}, "
                 f"{_n(len(summary['violations']), 'violation')}")
    fig.savefig(path)


def write_report(record: Record, directory: Path, grace_s: float = GRACE_S) -> dict[str, Path]:
    """Write report.json (the record and its summary), summary.md and timeline.png."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    summary = summarize(record, grace_s)
    paths = {"report": directory / "report.json", "summary": directory / "summary.md",
             "timeline": directory / "timeline.png"}
    # default=str: settings are CLI options, which may hold paths or enums
    report = json.dumps({**record, "summary": summary}, indent=2, default=str)
    paths["report"].write_text(report + "\n")
    paths["summary"].write_text(_markdown(record, summary))
    _plot_timeline(record, summary, paths["timeline"])
    return paths
