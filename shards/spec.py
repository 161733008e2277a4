"""What a replica needs to know to start: plain, immutable data built from the validated config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config, and so every `ringpipe` command, reads this module: torch is imported
    import torch  # only where a dtype is asked for, so a command that never touches a tensor starts fast


@dataclass(frozen=True)
class ReplicaSpec:
    model_dir: str
    stages: int = 2
    max_batch: int = 8  # KV slots per stage = sequences decoded at once
    max_seq_len: int = 512
    max_queue: int = 16  # requests waiting for a slot beyond max_batch; more are refused (Overloaded)
    prefill_chunk: int = 256  # prompt tokens per micro-batch (packed prompts, split ones)
    max_prefill_tokens: int = 2048  # prompt tokens per micro-batch while nothing decodes
    batch_window_ms: float = 0.0  # an idle head waits up to this long to gather prompts into one prefill
    prefix_cache: bool = True  # finished sequences keep their slot's KV for prompts that extend them
    dtype: str = "float32"
    device: str = "cpu"  # "cpu" or "cuda"
    tensor_parallel: int = 1
    tp_engine: str = "native"  # "native" (shards/tp.py) or "deepspeed" (DeepSpeed's tensor-parallel layers)
    torch_threads: int = 0  # 0: this node's cores divided among the stages
    cpus_per_stage: float = 1.0
    transport_timeout_s: float = 10.0
    # the torch.distributed backend between stages; "": NCCL on CUDA, Gloo on CPU. Any other name must be
    # a backend registered in the stages' processes
    transport_backend: str = ""
    socket_ifname: str = ""  # the interface stage-to-stage traffic uses; "": the one of the node's Ray address
    keepalive_s: float = 1.0
    placement_strategy: str = "PACK"  # Ray placement group strategy for the stages

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)

    @property
    def backend(self) -> str:
        return self.transport_backend or ("nccl" if self.device == "cuda" else "gloo")
