"""The demo checkpoint, built with a tiny training run (a few steps, a few seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from cluster import demo
from cluster.demo import END_OF_TEXT, DemoRecipe, build_demo, learning_rate
from shards.checkpoint import read_model_args
from shards.inprocess import InProcessModel

TINY_STEPS = 5
PROMPTS = ["The list type", 'The "if" statement is used']


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo(tmp_path_factory.mktemp("built") / "demo", progress=False, steps=TINY_STEPS)


def _tokenizer(directory: Path) -> Tokenizer:
    return Tokenizer.from_file(str(directory / "tokenizer.json"))


def test_hugging_face_layout(demo_dir: Path) -> None:
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "demo.json",
    ):
        assert (demo_dir / name).is_file(), name
    eot = _tokenizer(demo_dir).token_to_id(END_OF_TEXT)
    args = read_model_args(demo_dir)
    assert args.arch == "llama" and args.vocab_size == DemoRecipe().vocab_size
    assert args.bos_token_id == eot and args.eos_token_ids == (eot,)
    generation = json.loads((demo_dir / "generation_config.json").read_text())
    assert generation["bos_token_id"] == generation["eos_token_id"] == eot
    assert json.loads((demo_dir / "demo.json").read_text())["recipe"]["steps"] == TINY_STEPS
    # the build wrote into a sibling temp directory and renamed it: nothing else is left
    assert [p.name for p in demo_dir.parent.iterdir()] == ["demo"]


def test_transformers_agrees_with_inprocess(demo_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(demo_dir).float().eval()
    ours = InProcessModel(demo_dir)
    tokenizer = _tokenizer(demo_dir)
    prompts = [tokenizer.encode(p).ids for p in PROMPTS]
    n = 12
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            ids = list(prompt)
            hf_logits = hf(torch.tensor([ids])).logits[0]
            torch.testing.assert_close(hf_logits, ours.prefill_logits(ids), atol=1e-4, rtol=1e-4)
            for _ in range(n):  # greedy, no KV cache: the plainest reference there is
                ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
            expected.append(ids[len(prompt) :])
    assert InProcessModel(demo_dir).generate(prompts, n) == expected


def test_tokenizer_round_trips_text(demo_dir: Path) -> None:
    tokenizer = _tokenizer(demo_dir)
    text = (
        'The list type — "list(iterable)"\n\n    >>> [x * 2 for x in range(3)]\n\tdone. ünïcode ✓'
    )
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(demo_dir)
    assert auto.bos_token == auto.eos_token == END_OF_TEXT
    assert auto(text)["input_ids"] == ids


def test_second_build_reuses_without_training(
    demo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in demo_dir.iterdir()}

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished demo was trained again")

    monkeypatch.setattr(demo, "train_model", no_training)
    assert build_demo(demo_dir, progress=False) == demo_dir
    assert {p.name: p.stat().st_mtime_ns for p in demo_dir.iterdir()} == before


def test_builds_are_deterministic(
    demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    again = build_demo(tmp_path / "again", progress=True, steps=TINY_STEPS)
    assert "loss=" in capsys.readouterr().err  # the progress bar, on stderr
    assert (again / "tokenizer.json").read_bytes() == (demo_dir / "tokenizer.json").read_bytes()
    first, second = (
        load_file(demo_dir / "model.safetensors"),
        load_file(again / "model.safetensors"),
    )
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_interrupted_build_leaves_nothing_that_looks_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "train_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_demo(tmp_path / "demo", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_directory_holding_something_else(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(FileExistsError, match="remove it or pick another directory"):
        build_demo(tmp_path, progress=False, steps=1)


def test_rejects_a_step_count_below_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="steps must be at least 1"):
        build_demo(tmp_path / "demo", progress=False, steps=0)


def test_learning_rate_warms_up_then_decays_to_the_floor() -> None:
    recipe = DemoRecipe(peak_lr=1e-3, warmup_fraction=0.1, final_lr_fraction=0.1)
    rates = [learning_rate(step, 100, recipe) for step in range(101)]
    assert rates[0] == pytest.approx(1e-4)
    assert max(rates) == pytest.approx(1e-3) == rates[9]
    assert all(a >= b for a, b in zip(rates[9:-1], rates[10:], strict=True))
    assert rates[100] == pytest.approx(1e-4)
