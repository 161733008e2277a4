"""Our stages, chained in one process, against transformers as the reference model.

Every architecture is checked for greedy continuations and prefill logits, whole and
cut into 2 and 3 stages (5 layers on 3 stages is an uneven cut). transformers loads the
same checkpoint directory, so the expected values never come from `shards`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from shards.checkpoint import load_stage, read_model_args
from shards.create import RandomModelSpec, hf_config, random_tensors, write_checkpoint
from shards.inprocess import InProcessModel
from shards.model import Packed
from shards.sampling import SamplingParams

NEW_TOKENS = 24
# 12 tokens: longer than mistral's sliding window below, so the window is exercised in prefill.
PROMPT = [1, 17, 93, 5, 250, 44, 8, 120, 33, 201, 7, 64]
VOCAB = 300
LAYERS = 5

# Seeds chosen so that each random model's greedy continuation is varied (checked below).
CASES = {
    "llama": dict(arch="llama", seed=0),
    "llama-tied": dict(arch="llama", tie_word_embeddings=True, seed=0),
    "mistral-window8": dict(arch="mistral", sliding_window=8, seed=0),
    "qwen2-tied": dict(arch="qwen2", tie_word_embeddings=True, seed=0),  # q/k/v bias
    "glm": dict(arch="glm", seed=0),  # partial interleaved rotary, fused gate/up, bias
    # one KV head shared by all query heads; head_dim * heads != hidden
    "llama-mqa-wide-heads": dict(arch="llama", kv_heads=1, head_dim=24, seed=0),
    "glm-no-gqa": dict(arch="glm", kv_heads=4, seed=0),
}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These models are tiny: handing each op to a second thread costs more than it saves,
    and on a busy 2-core machine it makes this module several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_reference(model_dir: Path) -> tuple[AutoModelForCausalLM, dict]:
    """The transformers model and its loading info (missing / unexpected / mismatched keys)."""
    model, info = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, output_loading_info=True
    )
    # InProcessModel.generate always produces max_new_tokens tokens; stop transformers
    # from ending at (or, with min_new_tokens, suppressing) the EOS token.
    model.generation_config.eos_token_id = None
    return model.eval(), info


def assert_loads_cleanly(info: dict) -> None:
    # Weights transformers expects but does not find are silently initialised, and
    # extra ones ignored: either would hide a wrong tensor layout in the checkpoint.
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info[kind], (kind, info[kind])


def reference_greedy(model: AutoModelForCausalLM, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False
        )
    return out[0, len(prompt) :].tolist()


def reference_logits(model: AutoModelForCausalLM, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt]), use_cache=False).logits[0].float()


@dataclass
class Reference:
    model_dir: Path
    model: AutoModelForCausalLM
    continuation: list[int]
    logits: torch.Tensor  # [T, V] for PROMPT
    loading_info: dict


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def reference(request: pytest.FixtureRequest, make_checkpoint) -> Reference:
    overrides = dict(CASES[request.param])
    model_dir = make_checkpoint(overrides.pop("arch"), layers=LAYERS, vocab=VOCAB, **overrides)
    model, info = load_reference(model_dir)
    return Reference(
        model_dir,
        model,
        reference_greedy(model, PROMPT, NEW_TOKENS),
        reference_logits(model, PROMPT),
        info,
    )


def test_checkpoint_has_exactly_the_tensors_transformers_expects(reference: Reference) -> None:
    assert_loads_cleanly(reference.loading_info)


def test_reference_continuation_is_not_degenerate(reference: Reference) -> None:
    # A continuation that repeats one or two tokens would let most bugs through.
    assert len(reference.continuation) == NEW_TOKENS
    assert len(set(reference.continuation)) >= 8, reference.continuation


@pytest.mark.parametrize("n_stages", [1, 2, 3])
def test_greedy_continuation_matches_transformers(reference: Reference, n_stages: int) -> None:
    model = InProcessModel(reference.model_dir, n_stages=n_stages, n_slots=2, max_seq_len=64)
    assert len(model.stages) == n_stages
    assert model.generate([PROMPT], NEW_TOKENS) == [reference.continuation]


@pytest.mark.parametrize("n_stages", [1, 2, 3])
def test_prefill_logits_match_transformers(reference: Reference, n_stages: int) -> None:
    model = InProcessModel(reference.model_dir, n_stages=n_stages, n_slots=2, max_seq_len=64)
    logits = model.prefill_logits(PROMPT)
    assert logits.shape == reference.logits.shape
    torch.testing.assert_close(logits, reference.logits, atol=1e-4, rtol=1e-4)


def test_forward_without_cache_matches_transformers(reference: Reference) -> None:
    args = read_model_args(reference.model_dir)
    stage = load_stage(reference.model_dir, args, 0, args.num_layers, first=True, last=True)
    positions = torch.arange(len(PROMPT))[None]
    with torch.no_grad():
        logits = stage(torch.tensor([PROMPT]), positions, None, None, logits_for_last_only=False)
    torch.testing.assert_close(logits[0], reference.logits, atol=1e-4, rtol=1e-4)


def test_batched_prompts_of_different_lengths_match_each_alone(reference: Reference) -> None:
    # Lengths on both sides of mistral's window of 8; each row lives in its own slot.
    prompts = [PROMPT[:3], PROMPT + [11, 222], PROMPT[2:9]]
    n = 16
    expected = [reference_greedy(reference.model, p, n) for p in prompts]
    model = InProcessModel(reference.model_dir, n_stages=2, n_slots=4, max_seq_len=64)
    assert model.generate(prompts, n) == expected


@pytest.mark.parametrize("n_stages", [1, 2])
def test_packed_rows_of_mixed_lengths_match_transformers(reference: Reference, n_stages: int) -> None:
    """One forward over rows of different lengths laid end to end (prompt chunks beside decode
    steps, as the scheduler packs them): each row's logits are transformers' for its own sequence."""
    model = InProcessModel(reference.model_dir, n_stages=n_stages, n_slots=4, max_seq_len=64)
    a, b, c = PROMPT, PROMPT[2:9] + [250, 17], PROMPT[:3] + [11, 222]

    def forward(rows: list[tuple[int, list[int], int, int]]) -> torch.Tensor:
        """rows: (slot, sequence, start, length); logits [rows, V] of each row's last token."""
        packed = Packed.of([r[0] for r in rows], [r[2] for r in rows], [r[3] for r in rows],
                           model.args.sliding_window)
        x = torch.tensor([t for _, seq, start, n in rows for t in seq[start : start + n]])
        with torch.inference_mode():
            for stage, cache in zip(model.stages, model.caches, strict=True):
                x = stage.forward_packed(x, packed, cache, torch.tensor(packed.ends) if stage.last else None)
        return x

    # a's first chunk beside b's and c's prompts; then a's second chunk beside two decode steps each
    first = forward([(0, a, 0, 5), (1, b, 0, 7), (2, c, 0, 3)])
    second = forward([(1, b, 7, 1), (2, c, 3, 1), (0, a, 5, 7)])
    third = forward([(2, c, 4, 1), (1, b, 8, 1)])
    expected = [(a, 4), (b, 6), (c, 2), (b, 7), (c, 3), (a, 11), (c, 4), (b, 8)]
    got = torch.cat([first, second, third])
    for row, (seq, position) in enumerate(expected):
        torch.testing.assert_close(got[row], reference_logits(reference.model, seq)[position], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n", [0, 1, 3])
def test_generate_returns_exactly_max_new_tokens(make_checkpoint, n: int) -> None:
    model_dir = make_checkpoint("llama", layers=LAYERS, vocab=VOCAB, seed=0)
    hf = load_reference(model_dir)[0]
    prompts = [PROMPT, PROMPT[:4]]
    expected = [reference_greedy(hf, p, n) if n else [] for p in prompts]
    model = InProcessModel(model_dir, n_stages=2, n_slots=2, max_seq_len=64)
    assert model.generate(prompts, n) == expected


SAMPLED = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=1234)


def test_seeded_sampling_resumes_exactly(reference: Reference) -> None:
    """A generation resubmitted as prompt + tokens so far continues as it would have (the
    takeover contract), and a row samples the same whatever batch it shares."""
    model = InProcessModel(reference.model_dir, n_stages=2, n_slots=4, max_seq_len=64)
    full = model.generate([PROMPT], NEW_TOKENS, SAMPLED)[0]
    assert full != reference.continuation  # it really sampled
    for done in (1, 10):
        resumed = model.generate([PROMPT + full[:done]], NEW_TOKENS - done, SAMPLED)[0]
        assert resumed == full[done:], done
    batched = model.generate([PROMPT[:5], PROMPT, PROMPT[3:]], NEW_TOKENS, SAMPLED)
    assert batched[1] == full


def test_sharded_checkpoint_matches_transformers(make_checkpoint) -> None:
    # Tied embeddings: the last stage's head comes from the embedding, which sits in
    # another shard file than the last layers.
    model_dir = make_checkpoint(
        "qwen2",
        max_shard_bytes=64 * 1024,
        layers=LAYERS,
        vocab=VOCAB,
        tie_word_embeddings=True,
        seed=0,
    )
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shard_files = set(index["weight_map"].values())
    assert len(shard_files) >= 3
    assert not (model_dir / "model.safetensors").exists()
    assert all((model_dir / f).is_file() for f in shard_files)

    hf, info = load_reference(model_dir)
    assert_loads_cleanly(info)
    expected = reference_greedy(hf, PROMPT, NEW_TOKENS)
    assert len(set(expected)) >= 8, expected
    for n_stages in (1, 3):
        model = InProcessModel(model_dir, n_stages=n_stages, n_slots=2, max_seq_len=64)
        assert model.generate([PROMPT], NEW_TOKENS) == [expected]
        torch.testing.assert_close(
            model.prefill_logits(PROMPT), reference_logits(hf, PROMPT), atol=1e-4, rtol=1e-4
        )


ROPE_SCALINGS = {
    # original_max_position_embeddings small enough that all three llama3 bands are hit
    "llama3": {
        "rope_type": "llama3",
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
    "linear": {"rope_type": "linear", "factor": 2.0},
}


@pytest.mark.parametrize("scaling", list(ROPE_SCALINGS))
def test_rope_scaling_matches_transformers(tmp_path: Path, scaling: str) -> None:
    spec = RandomModelSpec(arch="llama", layers=4, vocab=VOCAB, seed=0)
    cfg = hf_config(spec)
    tensors = random_tensors(cfg, spec.seed)
    cfg["rope_parameters"] = {**cfg["rope_parameters"], **ROPE_SCALINGS[scaling]}
    scaled_dir = write_checkpoint(tmp_path / "scaled", cfg, tensors)
    plain_dir = write_checkpoint(tmp_path / "plain", hf_config(spec), tensors)
    prompt = [(7 * i + 3) % VOCAB for i in range(40)]

    hf, info = load_reference(scaled_dir)
    assert_loads_cleanly(info)
    expected_logits = reference_logits(hf, prompt)
    # The scaling must change the model, or this test would not test it.
    plain_logits = reference_logits(load_reference(plain_dir)[0], prompt)
    assert (expected_logits - plain_logits).abs().max() > 1e-2

    model = InProcessModel(scaled_dir, n_stages=2, n_slots=2, max_seq_len=128)
    torch.testing.assert_close(model.prefill_logits(prompt), expected_logits, atol=1e-4, rtol=1e-4)
    assert model.generate([prompt], 16) == [reference_greedy(hf, prompt, 16)]
