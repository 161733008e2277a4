"""What every results file shares: where it was measured (CPU, cores, memory, Python, commit) and its tables.

Light on purpose (no torch, no Ray): each benchmark adds the versions that matter to it.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import psutil


def cpu_name() -> str:
    return next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )


def commit(paths: list[str]) -> str:
    """The short HEAD commit, plus which of `paths` have uncommitted changes (the code measured)."""
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    status = subprocess.run(
        ["git", "status", "--porcelain", *paths], capture_output=True, text=True
    ).stdout
    dirty = sorted({line[3:] for line in status.splitlines() if line.strip()})
    return head + (f" + uncommitted changes in {', '.join(dirty)}" if dirty else "")


def describe(paths: list[str], **versions: str) -> dict:
    """The machine and the commit of `paths`, with `versions` (name → version) added."""
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        **versions,
        "commit": commit(paths),
    }


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(str(c) for c in r) + " |" for r in rows)])
