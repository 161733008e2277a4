"""The one config schema: validated when read, with errors that name the key.

YAML files and command-line flags both land here; the rest of ringpipe only
ever sees the plain immutable objects these models turn into (`ReplicaSpec`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from failover.adaptive import AdaptiveSettings
from shards.spec import ReplicaSpec


class ConfigError(Exception):
    """A config file or value that cannot be used; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def demo_model_dir() -> Path:
    """Where the demo model is built on first use: $XDG_CACHE_HOME/ringpipe/demo (~/.cache/...)."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "ringpipe" / "demo"


class ModelConfig(_Strict):
    path: str | None = Field(
        None, description="Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json)"
    )
    demo: bool = Field(False, description="serve the demo model, trained into `path` (or the cache) on first use")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["cpu", "cuda"] = "cpu"
    name: str | None = Field(
        None, min_length=1, max_length=256,
        description="the model id of the OpenAI API (/v1/models); default: the checkpoint directory's name")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.device == "cpu" and self.dtype == "float16":
            raise ValueError("dtype float16 needs device cuda; on cpu use float32 or bfloat16")
        if self.path is None and not self.demo:
            raise ValueError("set model.path to a checkpoint directory (or model.demo: true)")
        return self

    @property
    def directory(self) -> str:
        return self.path if self.path is not None else str(demo_model_dir())

    @property
    def served_name(self) -> str:
        return self.name or Path(self.directory).resolve().name


class PipelineConfig(_Strict):
    stages: int = Field(2, ge=1, le=64, description="pipeline stages per replica")
    max_batch: int = Field(8, ge=1, le=1024, description="KV slots per stage (sequences decoded at once)")
    max_seq_len: int = Field(512, ge=2, le=1 << 20, description="longest prompt + completion, in tokens")
    max_queue: int = Field(16, ge=0, description="requests waiting for a slot per replica; more are refused")
    prefill_chunk: int = Field(
        256, ge=1, description="prompt tokens per micro-batch: waiting prompts packed into one forward, a longer one split")
    max_prefill_tokens: int = Field(
        2048, ge=1, description="prompt tokens per micro-batch while no request is generating (none waits on the step)")
    batch_window_ms: float = Field(
        0.0, ge=0, le=10_000,
        description="an idle replica waits up to this long for more prompts to prefill in one forward (0: none)")
    prefix_cache: bool = Field(True, description="reuse a finished sequence's KV for a prompt extending it")
    tensor_parallel: int = Field(1, ge=1, le=16, description="processes (GPUs) per stage, splitting its layers")
    tp_engine: Literal["native", "deepspeed"] = Field(
        "native", description="tensor-parallel layers: ours (shards/tp.py) or DeepSpeed's (needs deepspeed installed)")
    cpus_per_stage: float = Field(1.0, gt=0)
    torch_threads: int = Field(0, ge=0, description="torch threads per stage; 0 = cores / stages")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "SPREAD", description="Ray placement-group strategy for a replica's stages (SPREAD: over nodes where possible)"
    )


class TransportConfig(_Strict):
    timeout_s: float = Field(10.0, gt=0, description="a send/receive waiting longer fails the replica")
    keepalive_s: float = Field(1.0, gt=0, description="an idle head probes its pipeline this often")
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="torch.distributed backend between stages: auto is NCCL on CUDA, Gloo on CPU")
    socket_ifname: str | None = Field(
        None, min_length=1, description="network interface for stage-to-stage traffic on every node "
        "(GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME); default: the one carrying the node's Ray address")

    @model_validator(mode="after")
    def _keepalive_below_timeout(self) -> TransportConfig:
        if self.keepalive_s >= self.timeout_s:
            raise ValueError("keepalive_s must be smaller than timeout_s")
        return self


class ReplicasConfig(_Strict):
    count: int = Field(2, ge=1, le=1024, description="pipeline replicas on the hash ring")
    standby: int = Field(0, ge=0, le=64, description="warm spares (loaded, not on the ring) promoted when one dies")


class RoutingConfig(_Strict):
    key: Literal["session", "prefix", "random"] = Field(
        "session", description="session id (else prompt prefix), prompt prefix only, or random"
    )
    prefix_tokens: int = Field(32, ge=1, description="prompt tokens hashed when there is no session id")
    load_factor: float = Field(1.25, ge=1.0, description="bounded loads: no replica above c × the mean load")
    vnodes: int = Field(128, ge=1, le=4096, description="points per replica on the hash ring")


class AuthConfig(_Strict):
    token_env: str | None = Field(None, description="environment variable holding the bearer token")
    token_file: str | None = Field(None, description="file holding the bearer token")

    @model_validator(mode="after")
    def _one_source(self) -> AuthConfig:
        if self.token_env and self.token_file:
            raise ValueError("set token_env or token_file, not both")
        return self

    def token(self) -> str | None:
        """The secret, read where the config says; None when auth is off."""
        if self.token_env:
            value = os.environ.get(self.token_env, "").strip()
            if not value:
                raise ValueError(f"environment variable {self.token_env} is empty or unset")
            return value
        if self.token_file:
            try:
                value = Path(self.token_file).read_text().strip()
            except OSError as exc:
                raise ValueError(f"cannot read {self.token_file}: {exc.strerror}") from None
            if not value:
                raise ValueError(f"{self.token_file} is empty")
            return value
        return None


class ServerConfig(_Strict):
    port: int = Field(50051, ge=1, le=65535, description="gRPC port of Serve's proxy")
    http_port: int = Field(8000, ge=1, le=65535, description="Serve's HTTP proxy port (Serve always opens one)")
    metrics_port: int = Field(
        8080, ge=0, le=65535,
        description="local mode: the Prometheus port of the head's Ray metrics export (the worker nodes of --nodes: "
        "the next ports up); 0: ports Ray picks. A joined cluster's are `ray start --metrics-export-port`'s",
    )
    coordinators: int = Field(2, ge=1, le=256, description="coordinator replicas (Serve deployment)")
    max_ongoing_requests: int = Field(1024, ge=1, description="calls one coordinator replica takes at once")
    max_health_watches: int = Field(
        64, ge=0, description="grpc.health.v1 Watch streams one coordinator replica holds open (each takes one of its "
        "max_ongoing_requests for as long as it lasts); more are refused with RESOURCE_EXHAUSTED"
    )
    max_request_bytes: int = Field(1 << 20, ge=1024, description="larger GenerateRequest messages (gRPC) and bodies (HTTP, 413) are refused")
    max_new_tokens: int | None = Field(None, ge=1, description="the most a request may ask for; default max_seq_len")
    request_timeout_s: float | None = Field(None, gt=0, description="end-to-end limit per call: gRPC DEADLINE_EXCEEDED (Serve's proxy), HTTP 504 (the OpenAI API)")
    host: str = Field(
        "auto", min_length=1,
        description="address the proxies listen on; auto: the node's own address when it is a loopback one, else 0.0.0.0",
    )
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        "EveryNode", description="Serve proxies on every node, or on the head only (nodes sharing one machine)"
    )
    auth: AuthConfig = AuthConfig()


class SlowConfig(_Strict):
    threshold_ms: float = Field(200, gt=0, description="a heartbeat answered slower than this is slow")
    count: int = Field(5, ge=1, description="this many slow heartbeats in a row pause the replica")
    pause_s: float = Field(5.0, gt=0, description="how long a slow replica takes no new work")
    max_paused_fraction: float = Field(
        0.5, ge=0, le=1, description="never pause more than this fraction of serving replicas at once"
    )
    peer_factor: float = Field(
        1.5, ge=1, description="a replica is slow only when its latency is also this many times its peers' median"
    )


class HeartbeatConfig(_Strict):
    interval_s: float = Field(0.5, gt=0, description="every stage is pinged this often")
    timeout_s: float = Field(3.0, gt=0, description="a stage silent this long is dead")
    slow: SlowConfig = SlowConfig()

    @model_validator(mode="after")
    def _interval_below_timeout(self) -> HeartbeatConfig:
        if self.interval_s >= self.timeout_s:
            raise ValueError("interval_s must be smaller than timeout_s")
        return self


class TakeoverConfig(_Strict):
    max_retries: int = Field(3, ge=0, le=100, description="times one request is resumed on another replica")
    retry_interval_s: float = Field(0.1, ge=0, description="wait before a resume, doubled for each further one")
    max_resume_tokens: int = Field(
        8192, ge=0, description="a generation longer than this is not resumed by the server (the client still can)"
    )
    wait_s: float = Field(
        30.0, ge=0, description="how long a request waits for a replica while none can take it (every one lost, "
        "a standby or rebuild coming); the client's deadline still ends it sooner"
    )


class ConsulConfig(_Strict):
    address: str = Field("127.0.0.1:8500", description="host:port of the Consul agent's HTTP API")
    scheme: Literal["http", "https"] = "http"
    token_env: str | None = Field(None, description="environment variable holding a Consul ACL token")
    service: str = Field("ringpipe-replica", description="Consul service name of the replicas")
    ttl_s: float = Field(10.0, gt=0, description="TTL of each replica's check (renewed every heartbeat interval, or every third of the TTL if shorter)")
    key: str = Field("ringpipe/state", description="Consul KV key of the controller's state")


class RegistryConfig(_Strict):
    backend: Literal["gcs", "consul"] = Field("gcs", description="where membership is kept: Ray's GCS or Consul")
    consul: ConsulConfig = ConsulConfig()


class AdaptiveConfig(_Strict):
    enabled: bool = Field(True, description="weigh each replica's load bound by its node's CPU")
    hot_cpu: float = Field(0.8, gt=0, le=1, description="node CPU (a fraction) above which a node is hot")
    hot_s: float = Field(10.0, gt=0, description="hot this long lowers the weight 30 % (again every further hot_s)")
    idle_cpu: float = Field(0.2, ge=0, lt=1, description="node CPU (a fraction) below which a node is idle")
    idle_s: float = Field(30.0, gt=0, description="idle this long raises the weight 20 % (again every further idle_s)")
    recover_s: float = Field(10.0, gt=0, description="neither hot nor idle this long: one step back toward 1.0")
    min_weight: float = Field(0.1, gt=0, le=1, description="the lowest weight")
    max_weight: float = Field(2.0, ge=1, le=100, description="the highest weight")
    stale_s: float = Field(5.0, gt=0, description="CPU samples further apart than this start the count again")

    @model_validator(mode="after")
    def _idle_below_hot(self) -> AdaptiveConfig:
        if self.idle_cpu >= self.hot_cpu:
            raise ValueError("idle_cpu must be smaller than hot_cpu")
        return self

    def adaptive_settings(self) -> AdaptiveSettings:
        """The plain settings `failover.adaptive.AdaptiveWeights` runs on (−30 % / +20 % steps, as designed)."""
        return AdaptiveSettings(
            enabled=self.enabled,
            hot_cpu=self.hot_cpu,
            hot_s=self.hot_s,
            idle_cpu=self.idle_cpu,
            idle_s=self.idle_s,
            recover_s=self.recover_s,
            min_weight=self.min_weight,
            max_weight=self.max_weight,
            stale_s=self.stale_s,
        )


class FailoverConfig(_Strict):
    heartbeat: HeartbeatConfig = HeartbeatConfig()
    adaptive: AdaptiveConfig = AdaptiveConfig()
    takeover: TakeoverConfig = TakeoverConfig()
    registry: RegistryConfig = RegistryConfig()


class RingpipeConfig(_Strict):
    model: ModelConfig
    pipeline: PipelineConfig = PipelineConfig()
    transport: TransportConfig = TransportConfig()
    replicas: ReplicasConfig = ReplicasConfig()
    routing: RoutingConfig = RoutingConfig()
    server: ServerConfig = ServerConfig()
    failover: FailoverConfig = FailoverConfig()

    @model_validator(mode="after")
    def _nccl_needs_cuda(self) -> RingpipeConfig:
        if self.transport.backend == "nccl" and self.model.device != "cuda":
            raise ValueError("transport.backend nccl needs model.device cuda (on cpu: auto or gloo)")
        return self

    def replica_spec(self) -> ReplicaSpec:
        p, t = self.pipeline, self.transport
        return ReplicaSpec(
            model_dir=self.model.directory,
            stages=p.stages,
            max_batch=p.max_batch,
            max_seq_len=p.max_seq_len,
            max_queue=p.max_queue,
            prefill_chunk=p.prefill_chunk,
            batch_window_ms=p.batch_window_ms,
            max_prefill_tokens=p.max_prefill_tokens,
            prefix_cache=p.prefix_cache,
            dtype=self.model.dtype,
            device=self.model.device,
            tensor_parallel=p.tensor_parallel,
            tp_engine=p.tp_engine,
            torch_threads=p.torch_threads,
            cpus_per_stage=p.cpus_per_stage,
            transport_timeout_s=t.timeout_s,
            transport_backend="" if t.backend == "auto" else t.backend,
            socket_ifname=t.socket_ifname or "",
            keepalive_s=t.keepalive_s,
            placement_strategy=p.placement_strategy,
        )


# `ringpipe serve` with no --config; configs/local.yaml spells out the same
LOCAL_DEFAULTS: dict = {
    "model": {"demo": True},
    "pipeline": {"stages": 2, "max_batch": 8, "max_seq_len": 512},
    "replicas": {"count": 2},
    "server": {"port": 50051, "coordinators": 2},
}


def auth_token(cfg: RingpipeConfig) -> str | None:
    """The configured bearer token; a ConfigError naming the key when it cannot be read."""
    try:
        return cfg.server.auth.token()
    except ValueError as exc:
        key = "token_env" if cfg.server.auth.token_env else "token_file"
        raise ConfigError(f"config key 'server.auth.{key}': {exc}") from None


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
