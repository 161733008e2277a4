"""Expected values from independent sources, shared by the test packages.

`hf_greedy` is transformers' forward pass in a plain greedy loop: the reference
every greedy output of ours is compared with.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch


@functools.cache
def hf_greedy(model_dir: Path, prompt: tuple[int, ...], n: int) -> list[int]:
    """Greedy tokens from transformers' full forward pass, one step at a time.

    (Not `generate(min_new_tokens=...)`: that masks EOS, which a plain greedy
    decoder — ours — may rightly pick.)
    """
    model = _hf_model(model_dir)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt) :]


@functools.cache
def _hf_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def wait_for(condition, timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def stop_started(proc, started, sig: int, timeout_s: float = 120.0) -> None:
    """Stop `proc` (started with `start_new_session=True`) with `sig`, its whole group if it does not
    exit within `timeout_s`, then SIGKILL whatever of `started` (pids it started) is still there."""
    import os
    import signal
    import subprocess

    import psutil

    proc.send_signal(sig)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(1)
    for pid in started:
        if psutil.pid_exists(pid):
            os.kill(pid, signal.SIGKILL)
