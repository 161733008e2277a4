"""Each tensor-parallel rank reads only its slices from safetensors: the same parameters as loading
the whole stage and keeping the rank's part, and, in a fresh process, a peak memory of about its share
(not the whole stage first). Token identity with transformers is `test_replica.py`'s (on Ray)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from shards.checkpoint import load_stage, read_model_args
from shards.tp import shard_stage

# the peak of the process's own (anonymous) memory during a load, above what it held before, sampled
# every millisecond: the file's mapped pages are the page cache's, not the rank's
PEAK = """
import sys, threading, time, torch
from shards.checkpoint import load_stage, read_model_args
from shards.model import StageModel
from shards.tp import shard_stage
def anon():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon:")) * 1024
args = read_model_args(sys.argv[1])
# warm-up, alike for every run: torch's meta-tensor kernels load on first use (~30 MB, once a process)
shard_stage(StageModel(args, 0, args.num_layers, True, True, device="meta"), 1, 2, None)
before, peak, done = anon(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.001)
sampler = threading.Thread(target=sample)
sampler.start()
model = load_stage(sys.argv[1], args, 0, args.num_layers, True, True, tp_rank=1, tp=int(sys.argv[2]))
done.set()
sampler.join()
print(max(peak[0], anon()) - before)
"""


@pytest.mark.parametrize("arch", ["llama", "qwen2", "glm"])
def test_a_rank_loads_exactly_its_share(make_checkpoint, arch):
    checkpoint = make_checkpoint(arch, vocab=128, layers=2, hidden=64, **({"head_dim": 32} if arch == "glm" else {}))
    args = read_model_args(checkpoint)
    whole = load_stage(checkpoint, args, 0, 2, True, True)
    for rank in range(2):
        expected = dict(shard_stage(load_stage(checkpoint, args, 0, 2, True, True), rank, 2, None).named_parameters())
        got = dict(load_stage(checkpoint, args, 0, 2, True, True, tp_rank=rank, tp=2).named_parameters())
        assert got.keys() == expected.keys()
        for name, tensor in got.items():
            assert torch.equal(tensor, expected[name]), name
        split = [n for n in got if got[n].shape != dict(whole.named_parameters())[n].shape]
        assert any("q_proj" in n for n in split) and any("down_proj" in n for n in split)


def test_a_rank_never_holds_the_whole_stage(make_checkpoint):
    # ~150 MB of decoder weights, almost all split: a rank of 2 should peak near half of it
    checkpoint = make_checkpoint("llama", vocab=128, layers=2, hidden=1024, intermediate=4096, heads=8, kv_heads=8)
    peaks = {}
    for tp in (1, 2):
        out = subprocess.run([sys.executable, "-c", PEAK, str(checkpoint), str(tp)], capture_output=True, text=True,
                             check=True, timeout=300)
        peaks[tp] = int(out.stdout.split()[-1])
    assert peaks[2] < 0.6 * peaks[1], peaks
