"""Durations as people write them on the command line: "90", "30s", "10m", "1.5h", and ranges "30-60s"."""

from __future__ import annotations

import argparse
import re


def duration(text: str) -> float:
    """Seconds from "90", "30s", "10m", "1.5h"."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match:
        raise ValueError(f"expected a duration like 30s, 10m or 1h, got {text!r}")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


def interval(text: str) -> tuple[float, float]:
    """"30s" → (30, 30); "30-60s" → (30, 60): each gap drawn uniformly from the range."""
    low, _, high = text.partition("-")
    unit = re.sub(r"[\d.\s]", "", high or low)
    bounds = (duration(low if not high else low + unit), duration(high or low))
    if bounds[0] <= 0 or bounds[0] > bounds[1]:
        raise ValueError(f"expected a positive duration or range like 30-60s, got {text!r}")
    return bounds


def duration_arg(text: str) -> float:
    """`duration` as an argparse type: a bad value is a usage error naming the flag."""
    try:
        return duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def interval_arg(text: str) -> tuple[float, float]:
    try:
        return interval(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
