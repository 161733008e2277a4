"""`ringpipe chaos`'s durations and fault gaps, and its usage errors (no cluster needed)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.durations import duration, interval
from cluster.load import make_pool


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("30s", 30), ("10m", 600), ("1.5h", 5400), (" 2 m ", 120)])
def test_duration(text, seconds):
    assert duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "10 minutes", "-5s", "1e3"])
def test_bad_duration_says_what_it_expected(text):
    with pytest.raises(ValueError, match="duration like 30s"):
        duration(text)


@given(st.integers(1, 10_000), st.integers(0, 10_000), st.sampled_from(["", "s", "m"]))
def test_interval_is_the_range_in_one_unit(low, extra, unit):
    scale = {"": 1, "s": 1, "m": 60}[unit]
    assert interval(f"{low}-{low + extra}{unit}") == (low * scale, (low + extra) * scale)
    assert interval(f"{low}{unit}") == (low * scale, low * scale)


def test_backwards_interval_is_refused():
    with pytest.raises(ValueError, match="range"):
        interval("60-30s")


def test_pool_is_seeded_and_mixed():
    pool = make_pool(200, seed=3, sampled_fraction=0.25)
    assert pool == make_pool(200, seed=3, sampled_fraction=0.25) != make_pool(200, seed=4, sampled_fraction=0.25)
    sampled = [e for e in pool if e.sampling]
    assert 25 < len(sampled) < 75  # a quarter of 200, give or take
    assert all(3 <= t < 256 and 4 <= len(e.prompt) <= 24 for e in pool for t in e.prompt)
    assert [e.prompt for e in make_pool(3, 0, prompts=["a", "b"])] == ["a", "b", "a"]


def test_bad_arguments_exit_2_naming_them(tmp_path):
    run = subprocess.run([sys.executable, "-m", "cluster.cli", "chaos", "--report", str(tmp_path), "--every", "soon"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "soon" in run.stderr
    run = subprocess.run([sys.executable, "-m", "cluster.cli", "chaos", "--report", str(tmp_path), "--fault", "x"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "invalid choice: 'x'" in run.stderr
