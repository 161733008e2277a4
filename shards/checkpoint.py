"""Hugging Face checkpoint directories: config.json to `ModelArgs`, and per-stage tensor loading.

A stage opens the safetensors files lazily and reads only the tensors it owns
(`load_stage`), so a stage's memory is its share of the weights. Everything a
checkpoint can get wrong is a `CheckpointError` naming the file, field or tensor.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from shards.errors import CheckpointError, UnsupportedModelError
from shards.model import ModelArgs, RopeScaling, StageModel, rope_inv_freq

SUPPORTED_ARCHS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "glm": "GlmForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
UNSUPPORTED_FIELDS = ("quantization_config",)


def _required(cfg: dict, key: str) -> int:
    if key not in cfg or cfg[key] is None:
        raise CheckpointError(f"config.json has no {key!r}")
    return _int(cfg, key, 0)


def _int(cfg: dict, key: str, default: int) -> int:
    value = cfg.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"config.json field {key!r} must be a positive integer, got {value!r}")
    return value


def _float(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"config.json field {key!r} must be a number, got {value!r}")
    return float(value)


def _mapping(cfg: dict, key: str) -> dict:
    value = cfg.get(key) or {}
    if not isinstance(value, dict):
        raise CheckpointError(f"config.json field {key!r} must be an object, got {value!r}")
    return value


def _rope(cfg: dict, arch: str) -> tuple[float, float, RopeScaling | None]:
    """(rope_theta, partial_rotary_factor, scaling) from either the v4 or the v5 config layout."""
    params = _mapping(cfg, "rope_parameters")
    legacy = _mapping(cfg, "rope_scaling")
    field = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    merged = {**legacy, **params}
    theta = _float(merged.get("rope_theta", cfg.get("rope_theta", 10000.0)), f"{field}.rope_theta")
    default_partial = 0.5 if arch == "glm" else 1.0
    partial = _float(
        merged.get("partial_rotary_factor", cfg.get("partial_rotary_factor", default_partial)),
        "partial_rotary_factor",
    )
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(f"{field}.rope_type", rope_type, ", ".join(SUPPORTED_ROPE_TYPES))
    if rope_type == "default":
        return theta, partial, None
    if "factor" not in merged:
        raise CheckpointError(f"config.json field {field}.factor is required for rope_type {rope_type!r}")
    factor = _float(merged["factor"], f"{field}.factor")
    if rope_type == "linear":
        return theta, partial, RopeScaling("linear", factor)
    return theta, partial, RopeScaling(
        "llama3",
        factor,
        _float(merged.get("low_freq_factor", 1.0), f"{field}.low_freq_factor"),
        _float(merged.get("high_freq_factor", 4.0), f"{field}.high_freq_factor"),
        _int(merged, "original_max_position_embeddings", 8192),
    )


def parse_config(cfg: dict) -> ModelArgs:
    """Validate a config.json dict and turn it into `ModelArgs`."""
    if not isinstance(cfg, dict):
        raise CheckpointError(f"config.json must hold a JSON object, got {type(cfg).__name__}")
    arch = cfg.get("model_type")
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModelError("model_type", arch, ", ".join(SUPPORTED_ARCHS))
    declared_archs = cfg.get("architectures") or []
    if isinstance(declared_archs, str):
        declared_archs = [declared_archs]
    for declared in declared_archs:
        if declared != SUPPORTED_ARCHS[arch]:
            raise UnsupportedModelError("architectures", declared, SUPPORTED_ARCHS[arch])
    for key in UNSUPPORTED_FIELDS:
        if cfg.get(key):
            raise UnsupportedModelError(key, cfg[key], "unquantized checkpoints only")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError("hidden_act", act, "silu")
    if arch == "qwen2" and cfg.get("use_sliding_window"):
        raise UnsupportedModelError("use_sliding_window", True, "false")

    hidden = _required(cfg, "hidden_size")
    heads = _required(cfg, "num_attention_heads")
    kv_heads = _int(cfg, "num_key_value_heads", heads)
    default_head_dim = 128 if arch == "glm" else hidden // heads
    head_dim = _int(cfg, "head_dim", default_head_dim)
    if heads % kv_heads:
        raise CheckpointError(
            f"config.json num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
        )
    theta, partial, scaling = _rope(cfg, arch)
    rotary_dim = int(head_dim * partial)
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise UnsupportedModelError("partial_rotary_factor", partial, "a factor giving an even rotary dim")
    bias = bool(cfg.get("attention_bias", arch == "glm"))
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    sliding = _int(cfg, "sliding_window", 0) or None if arch == "mistral" else None
    if arch == "mistral" and "sliding_window" not in cfg:
        sliding = 4096  # MistralConfig's default
    return ModelArgs(
        arch=arch,
        vocab_size=_required(cfg, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_required(cfg, "intermediate_size"),
        num_layers=_required(cfg, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_float(cfg.get("rms_norm_eps", 1.5625e-07 if arch == "glm" else 1e-6), "rms_norm_eps"),
        rope_theta=theta,
        rotary_dim=rotary_dim,
        rope_interleaved=arch == "glm",
        rope_scaling=scaling,
        qkv_bias=True if arch == "qwen2" else bias,
        o_bias=bias if arch == "llama" else False,
        mlp_bias=bool(cfg.get("mlp_bias", False)) if arch == "llama" else False,
        fused_gate_up=arch == "glm",
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        sliding_window=sliding,
        max_position_embeddings=_int(cfg, "max_position_embeddings", 4096),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )


def read_model_args(model_dir: str | Path) -> ModelArgs:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir} is not a checkpoint: {path.name} is missing")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    return parse_config(cfg)


def tensor_files(model_dir: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (single file or sharded index)."""
    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map'")
        files = {name: root / file for name, file in weight_map.items()}
        for file in set(files.values()):
            if not file.is_file():
                raise CheckpointError(f"{index} names {file.name}, which is missing")
        return files
    single = root / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(
            f"{model_dir} has neither model.safetensors nor model.safetensors.index.json"
        )
    with safe_open(single, "pt") as f:
        return {name: single for name in f.keys()}


def hf_name(name: str) -> str:
    """Our StageModel parameter name -> the Hugging Face tensor name."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def stage_shapes(
    args: ModelArgs, layer_start: int, layer_end: int, first: bool, last: bool
) -> dict[str, tuple[int, ...]]:
    """Every parameter a stage holds (our names) with its expected shape."""
    model = StageModel(args, layer_start, layer_end, first, last, device="meta")
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _source_name(name: str, args: ModelArgs, available: Iterable[str]) -> str:
    wanted = hf_name(name)
    if name == "lm_head.weight" and args.tie_word_embeddings and wanted not in available:
        return "model.embed_tokens.weight"
    return wanted


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class _Mapped:
    """A safetensors file mapped copy-on-write, its tensors as views of the mapping: a slice of one
    copies only the slice's bytes. (safetensors 0.8's `get_slice(...)[rows]` reads the whole tensor
    first, measured: a rank would hold every split tensor whole while it loads.)"""

    def __init__(self, path: Path) -> None:
        import mmap

        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        size = int.from_bytes(self._map[:8], "little")
        self._header = json.loads(self._map[8 : 8 + size])
        self._start = 8 + size

    def view(self, name: str) -> torch.Tensor:
        meta = self._header[name]
        dtype = _DTYPES.get(meta["dtype"])
        if dtype is None:
            raise CheckpointError(f"tensor {name} has dtype {meta['dtype']}, which is not supported")
        begin, end = meta["data_offsets"]
        count = (end - begin) // dtype.itemsize
        flat = torch.frombuffer(self._map, dtype=dtype, count=count, offset=self._start + begin)
        return flat.view(meta["shape"])


def _cat_shape(parts: list[torch.Tensor], dim: int) -> tuple[int, ...]:
    shape = list(parts[0].shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    return tuple(shape)


def load_stage(
    model_dir: str | Path,
    args: ModelArgs,
    layer_start: int,
    layer_end: int,
    first: bool,
    last: bool,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    tp_rank: int = 0,
    tp: int = 1,
    tp_group=None,
) -> StageModel:
    """Build one stage and fill it with its own tensors only, read lazily from safetensors.

    `tp` > 1: tensor-parallel rank `tp_rank`'s share of it (`shards/tp.py`, summing over `tp_group`),
    reading only that rank's slice of each split tensor."""
    from shards.tp import rank_slices, shard_stage

    files = tensor_files(model_dir)
    shapes = stage_shapes(args, layer_start, layer_end, first, last)
    state: dict[str, torch.Tensor] = {}
    handles: dict[Path, object] = {}
    mapped_files: dict[Path, _Mapped] = {}
    try:
        for name, shape in shapes.items():
            source = _source_name(name, args, files)
            if source not in files:
                raise CheckpointError(f"missing tensor {source} in {model_dir}")
            file = files[source]
            if file not in handles:
                handles[file] = safe_open(file, "pt", device="cpu")
            found = tuple(handles[file].get_slice(source).get_shape())
            if found != shape:
                raise CheckpointError(
                    f"tensor {source} in {file.name} has shape {list(found)}, expected {list(shape)}"
                )
            pieces = rank_slices(name, args, tp_rank, tp)
            if pieces is None:
                # copy=True: own the memory instead of keeping the file mapped, so the
                # stage's footprint is its weights from the start, whatever the page cache does
                state[name] = handles[file].get_tensor(source).to(device=device, dtype=dtype, copy=True)
                continue
            if file not in mapped_files:
                mapped_files[file] = _Mapped(file)
            whole = mapped_files[file].view(source)
            parts = [whole[s] if dim == 0 else whole[:, s] for dim, s in pieces]
            # one copy, of the rank's slices only, converted on the way
            out = torch.empty(_cat_shape(parts, pieces[0][0]), dtype=dtype, device=device)
            torch.cat(parts, dim=pieces[0][0], out=out)
            state[name] = out
    finally:
        handles.clear()
        mapped_files.clear()
    model = StageModel(args, layer_start, layer_end, first, last, device="meta")
    if tp > 1:
        model = shard_stage(model, tp_rank, tp, tp_group)  # on meta: the shapes of the slices read
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq = rope_inv_freq(args).to(device)
    return model.eval().requires_grad_(False)


def load_tokenizer(model_dir: str | Path):
    """The checkpoint's `tokenizers.Tokenizer` from tokenizer.json, or None when it has none."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 — tokenizers raises plain Exception on bad files
        raise CheckpointError(f"{path} cannot be read: {exc}") from None
