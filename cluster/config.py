"""The one config schema: validated when read, with errors that name the key.

YAML files and command-line flags both land here; the rest of ringpipe only
ever sees the plain immutable objects these models turn into (`ReplicaSpec`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shards.spec import ReplicaSpec


class ConfigError(Exception):
    """A config file or value that cannot be used; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    path: str = Field(description="Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["cpu", "cuda"] = "cpu"

    @model_validator(mode="after")
    def _half_needs_gpu(self) -> ModelConfig:
        if self.device == "cpu" and self.dtype == "float16":
            raise ValueError("dtype float16 needs device cuda; on cpu use float32 or bfloat16")
        return self


class PipelineConfig(_Strict):
    stages: int = Field(2, ge=1, le=64, description="pipeline stages per replica")
    max_batch: int = Field(8, ge=1, le=1024, description="KV slots per stage (sequences decoded at once)")
    max_seq_len: int = Field(512, ge=2, le=1 << 20, description="longest prompt + completion, in tokens")
    prefill_chunk: int = Field(128, ge=1, description="prompts longer than this are prefilled in chunks")
    prefix_cache: bool = Field(True, description="reuse a finished sequence's KV for a prompt extending it")
    tensor_parallel: int = Field(1, ge=1, le=16, description="processes (GPUs) per stage, splitting its layers")
    cpus_per_stage: float = Field(1.0, gt=0)
    torch_threads: int = Field(0, ge=0, description="torch threads per stage; 0 = cores / stages")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class TransportConfig(_Strict):
    timeout_s: float = Field(10.0, gt=0, description="a send/receive waiting longer fails the replica")
    keepalive_s: float = Field(1.0, gt=0, description="an idle head probes its pipeline this often")

    @model_validator(mode="after")
    def _keepalive_below_timeout(self) -> TransportConfig:
        if self.keepalive_s >= self.timeout_s:
            raise ValueError("keepalive_s must be smaller than timeout_s")
        return self


class RingpipeConfig(_Strict):
    model: ModelConfig
    pipeline: PipelineConfig = PipelineConfig()
    transport: TransportConfig = TransportConfig()

    def replica_spec(self) -> ReplicaSpec:
        p, t = self.pipeline, self.transport
        return ReplicaSpec(
            model_dir=self.model.path,
            stages=p.stages,
            max_batch=p.max_batch,
            max_seq_len=p.max_seq_len,
            prefill_chunk=p.prefill_chunk,
            prefix_cache=p.prefix_cache,
            dtype=self.model.dtype,
            device=self.model.device,
            tensor_parallel=p.tensor_parallel,
            torch_threads=p.torch_threads,
            cpus_per_stage=p.cpus_per_stage,
            transport_timeout_s=t.timeout_s,
            keepalive_s=t.keepalive_s,
            placement_strategy=p.placement_strategy,
        )


def _describe(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: config key '{key}': {msg}")
    return "\n".join(lines)


def parse_config(data: dict, source: str = "config") -> RingpipeConfig:
    try:
        return RingpipeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def load_config(path: str | Path, overrides: dict | None = None) -> RingpipeConfig:
    """Read a YAML config; `overrides` ({"pipeline": {"stages": 3}}) win over the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return parse_config(merge(data, overrides or {}), str(path))


def merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out
