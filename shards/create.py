"""Write a random-weight checkpoint in Hugging Face layout (config.json + safetensors).

Used by `ringpipe model create`, the tests and the benchmarks. Weights are drawn
with a scale that keeps the network's outputs varied (greedy continuations of a
random model with tiny weights repeat one token, which hides bugs). With
`tokenizer=True` the directory also gets a tokenizer.json: byte-level BPE
trained on the pydoc topics, its special tokens at the ids config.json names,
and a tokenizer_config.json naming them, with a chat template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from shards.checkpoint import SUPPORTED_ARCHS, hf_name, parse_config, stage_shapes

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2: pad, bos, eos in hf_config
# the chat template a checkpoint with a tokenizer gets: Zephyr-like, and it uses what real templates
# use (special tokens as variables, a filter, the loop, raise_exception)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('a system message must come first') }}{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] | trim }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class RandomModelSpec:
    arch: str = "llama"
    layers: int = 4
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 256
    intermediate: int | None = None  # default: about 8/3 × hidden, rounded to 16
    head_dim: int | None = None
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # mistral only
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    seed: int = 0


def hf_config(spec: RandomModelSpec) -> dict:
    if spec.arch not in SUPPORTED_ARCHS:
        raise ValueError(f"arch must be one of {sorted(SUPPORTED_ARCHS)}, got {spec.arch!r}")
    intermediate = spec.intermediate or max(16, (spec.hidden * 8 // 3 + 15) // 16 * 16)
    head_dim = spec.head_dim or spec.hidden // spec.heads
    rope: dict = {"rope_type": "default", "rope_theta": spec.rope_theta}
    cfg: dict = {
        "architectures": [SUPPORTED_ARCHS[spec.arch]],
        "model_type": spec.arch,
        "vocab_size": spec.vocab,
        "hidden_size": spec.hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": spec.rope_theta,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "float32",
    }
    if spec.arch == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    if spec.arch == "mistral":
        cfg["sliding_window"] = spec.sliding_window
    if spec.arch == "qwen2":
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=spec.layers)
    if spec.arch == "glm":
        cfg.update(attention_bias=True, partial_rotary_factor=0.5)
        rope["partial_rotary_factor"] = 0.5
    cfg["rope_parameters"] = rope
    return cfg


def random_tensors(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random weights (HF names) for every tensor the config calls for."""
    args = parse_config(cfg)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in stage_shapes(args, 0, args.num_layers, True, True).items():
        if name == "lm_head.weight" and args.tie_word_embeddings:
            continue
        if name.endswith("norm.weight"):
            value = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            value = 0.1 * torch.randn(shape, generator=gen)
        elif name == "embed_tokens.weight":
            value = torch.randn(shape, generator=gen)
        else:  # linear weights [out, in]: unit-variance outputs keep the signal alive
            value = torch.randn(shape, generator=gen) * (1.5 / shape[-1] ** 0.5)
        tensors[hf_name(name)] = value.contiguous()
    return tensors


def write_checkpoint(
    directory: str | Path, cfg: dict, tensors: dict[str, torch.Tensor], max_shard_bytes: int | None = None
) -> Path:
    """Save config.json and the tensors, sharded with an index when they exceed max_shard_bytes."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
        return _readable(root)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(root / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return _readable(root)


def _readable(root: Path) -> Path:
    """safetensors writes 0600 whatever the umask; stages may run as another user."""
    for file in root.glob("*.safetensors"):
        file.chmod(0o644)
    return root


def train_byte_level_bpe(documents: list[str], vocab_size: int, special_tokens: tuple[str, ...]):
    """Byte-level BPE, GPT-2 style (no BOS added); special tokens take the first ids, in order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer)
    return tokenizer


def create_random_checkpoint(
    directory: str | Path, spec: RandomModelSpec, max_shard_bytes: int | None = None, tokenizer: bool = False
) -> Path:
    cfg = hf_config(spec)
    root = write_checkpoint(directory, cfg, random_tensors(cfg, spec.seed), max_shard_bytes)
    if tokenizer:
        from pydoc_data.topics import topics

        if spec.vocab < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"a byte-level tokenizer needs vocab ≥ {256 + len(SPECIAL_TOKENS)}, got {spec.vocab}")
        bpe = train_byte_level_bpe([topics[k] for k in sorted(topics)], spec.vocab, SPECIAL_TOKENS)
        bpe.save(str(root / "tokenizer.json"))
        pad, bos, eos = SPECIAL_TOKENS
        tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
                            "pad_token": pad, "chat_template": CHAT_TEMPLATE}
        (root / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (root / name).chmod(0o644)
    return root
