"""The demo checkpoint: a byte-level BPE tokenizer and a small Llama trained here, offline.

`ringpipe model demo` and `make run` need a model that writes readable text
without downloading anything. Every Python ships ~460 kB of English about
Python in `pydoc_data.topics` (the text `help("if")` shows); a few-million-
parameter Llama trained on it for a few minutes on two CPU cores continues
"The list type" with doc-like text. Training uses the serving code's own
`StageModel`, so the weights load into the pipeline by name, and the result is a
plain Hugging Face directory (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json) that transformers loads too.

Invariants:
- A directory holds a finished demo exactly when all of `FINISHED_FILES` exist.
  The build writes into a hidden sibling directory, writes the marker
  (`demo.json`) last, and renames the whole directory into place, so an
  interrupted build never looks finished; a finished one is reused, never
  retrained (delete the directory to rebuild).
- The build is deterministic: fixed seeds, a fixed torch thread count and a
  seeded data order, so the same Python (its pydoc text) and torch give the
  same tokenizer and the same weights.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from pydoc_data.topics import topics

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

from shards.checkpoint import hf_name, parse_config
from shards.create import RandomModelSpec, hf_config, train_byte_level_bpe, write_checkpoint
from shards.model import ModelArgs, StageModel

END_OF_TEXT = "<|endoftext|>"  # separates documents; the model's BOS, EOS and pad token
MARKER = "demo.json"
FINISHED_FILES = ("config.json", "model.safetensors", "tokenizer.json", MARKER)


@dataclass(frozen=True)
class DemoRecipe:
    """Everything that decides the demo's weights; sized to train in ~3 minutes on 2 CPU cores."""

    vocab_size: int = 3072
    hidden: int = 192
    layers: int = 4
    heads: int = 6
    kv_heads: int = 3
    seq_len: int = 128  # training context, in tokens
    batch_size: int = 16
    steps: int = 650
    peak_lr: float = 4e-3
    final_lr_fraction: float = 0.1  # cosine decays to peak_lr × this
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    init_std: float = 0.02
    seed: int = 0
    torch_threads: int = 2  # fixed: matmul reduction order, hence the weights, depends on it


def corpus_documents() -> list[str]:
    """The pydoc topics, in a fixed (sorted) order."""
    return [topics[name] for name in sorted(topics)]


def train_tokenizer(documents: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE, GPT-2 style: no BOS is added, so a prompt reads as text to continue."""
    return train_byte_level_bpe(documents, vocab_size, (END_OF_TEXT,))


def token_stream(tokenizer: Tokenizer, documents: list[str]) -> torch.Tensor:
    """All documents as one 1-D tensor of ids: END_OF_TEXT doc END_OF_TEXT doc … END_OF_TEXT."""
    eot = tokenizer.token_to_id(END_OF_TEXT)
    ids = [eot]
    for encoding in tokenizer.encode_batch(documents):
        ids.extend(encoding.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


def model_config(recipe: DemoRecipe, eot: int) -> dict:
    """The Hugging Face Llama config.json of the demo model."""
    spec = RandomModelSpec(
        arch="llama",
        layers=recipe.layers,
        hidden=recipe.hidden,
        heads=recipe.heads,
        kv_heads=recipe.kv_heads,
        vocab=recipe.vocab_size,
        seed=recipe.seed,
    )
    cfg = hf_config(spec)
    cfg.update(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    return cfg


def learning_rate(step: int, steps: int, recipe: DemoRecipe) -> float:
    """Linear warmup, then cosine decay from peak_lr to peak_lr × final_lr_fraction."""
    warmup = max(1, round(steps * recipe.warmup_fraction))
    if step < warmup:
        return recipe.peak_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    floor = recipe.peak_lr * recipe.final_lr_fraction
    return floor + (recipe.peak_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _init_weights(model: StageModel, recipe: DemoRecipe) -> None:
    """GPT-2 init: small normal weights; projections into the residual stream scaled by depth."""
    residual_std = recipe.init_std / math.sqrt(2 * recipe.layers)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(param)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            torch.nn.init.normal_(param, std=residual_std)
        else:
            torch.nn.init.normal_(param, std=recipe.init_std)


def _optimizer(model: StageModel, recipe: DemoRecipe) -> torch.optim.AdamW:
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]  # norm weights: no decay
    groups = [
        {"params": matrices, "weight_decay": recipe.weight_decay},
        {"params": vectors, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=recipe.peak_lr, betas=(0.9, 0.95))


def train_model(
    args: ModelArgs, stream: torch.Tensor, recipe: DemoRecipe, progress: bool
) -> tuple[dict[str, torch.Tensor], float]:
    """Train the whole model on random windows of `stream`; (HF-named tensors, final loss)."""
    torch.manual_seed(recipe.seed)
    model = StageModel(args, 0, args.num_layers, first=True, last=True)
    _init_weights(model, recipe)
    model.train()
    optimizer = _optimizer(model, recipe)
    order = torch.Generator().manual_seed(recipe.seed)
    T, B = recipe.seq_len, recipe.batch_size
    positions = torch.arange(T).expand(B, T)
    loss_value = float("nan")
    bar = tqdm(
        range(recipe.steps),
        desc="training demo model",
        unit="step",
        file=sys.stderr,
        disable=not progress,
    )
    for step in bar:
        starts = torch.randint(0, len(stream) - T - 1, (B,), generator=order)
        window = torch.stack([stream[s : s + T + 1] for s in starts.tolist()])  # [B, T+1]
        inputs, targets = window[:, :-1], window[:, 1:]
        logits = model(inputs, positions, None, None, logits_for_last_only=False)  # [B, T, V]
        loss = F.cross_entropy(logits.reshape(-1, args.vocab_size), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, recipe.steps, recipe)
        optimizer.step()
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
    bar.close()
    tensors = {hf_name(name): t.detach().contiguous() for name, t in model.state_dict().items()}
    return tensors, loss_value


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run with exactly n intra-op threads, then give the caller its setting back."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def is_finished(directory: str | Path) -> bool:
    root = Path(directory)
    return all((root / name).is_file() for name in FINISHED_FILES)


# the demo model knows no chat (it read Python's docs), but chat works with it: each message on a line of
# its own, role first, ended like a document; the answer starts after "assistant:"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _add_chat_template(directory: Path) -> None:
    """A demo built before it had a chat template gets it (the rest of the checkpoint is unchanged)."""
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    if "chat_template" not in config:
        config["chat_template"] = CHAT_TEMPLATE
        path.write_text(json.dumps(config, indent=2) + "\n")


def _write_tokenizer_files(directory: Path, tokenizer: Tokenizer, max_length: int) -> None:
    tokenizer.save(str(directory / "tokenizer.json"))
    eot = tokenizer.token_to_id(END_OF_TEXT)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": END_OF_TEXT,
        "eos_token": END_OF_TEXT,
        "pad_token": END_OF_TEXT,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    generation_config = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}
    for name, content in (
        ("tokenizer_config.json", tokenizer_config),
        ("generation_config.json", generation_config),
    ):
        (directory / name).write_text(json.dumps(content, indent=2) + "\n")


def _write_demo(directory: Path, recipe: DemoRecipe, progress: bool) -> None:
    """Train the tokenizer and the model, and write every file into `directory` (marker last)."""
    documents = corpus_documents()
    tokenizer = train_tokenizer(documents, recipe.vocab_size)
    stream = token_stream(tokenizer, documents)
    cfg = model_config(recipe, tokenizer.token_to_id(END_OF_TEXT))
    args = parse_config(cfg)  # exactly what the serving side will build from config.json
    # the caller gets its own thread count and RNG state back
    with _torch_threads(recipe.torch_threads), torch.random.fork_rng():
        tensors, final_loss = train_model(args, stream, recipe, progress)
    write_checkpoint(directory, cfg, tensors)
    _write_tokenizer_files(directory, tokenizer, cfg["max_position_embeddings"])
    marker = {
        "recipe": asdict(recipe),
        "final_loss": final_loss,
        "corpus": "pydoc_data.topics",
        "corpus_tokens": len(stream),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    (directory / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def build_demo(directory: str | Path, *, progress: bool = True, steps: int | None = None) -> Path:
    """The demo checkpoint in `directory`: reused if already built, trained and written otherwise.

    `steps` overrides the recipe's training steps (tests use a handful); the
    progress bar over them goes to stderr unless `progress` is False.
    """
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    root = Path(directory)
    if is_finished(root):
        _add_chat_template(root)
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(
            f"{root} exists but holds no finished demo checkpoint; "
            "remove it or pick another directory, then build again"
        )
    recipe = DemoRecipe() if steps is None else replace(DemoRecipe(), steps=steps)
    root.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    partial.chmod(0o755)  # mkdtemp makes it private; the checkpoint is for everyone
    try:
        _write_demo(partial, recipe, progress)
        for file in partial.iterdir():
            file.chmod(0o644)  # safetensors writes 0600 whatever the umask
        try:
            os.replace(partial, root)  # atomic; replaces only an empty directory
        except OSError:
            if not is_finished(root):  # not another build finishing first: a real failure
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return root
