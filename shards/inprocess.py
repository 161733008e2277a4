"""All stages of a model chained in one process: no Ray, no transport.

The ceiling the pipeline is measured against, and the simplest way to check the
stage split itself (stage outputs fed straight into the next stage).
"""

from __future__ import annotations

from pathlib import Path

import torch

from shards.checkpoint import load_stage, read_model_args
from shards.kv import StageCache
from shards.partition import plan_stages
from shards.sampling import SamplingParams, sample


class InProcessModel:
    def __init__(
        self,
        model_dir: str | Path,
        n_stages: int = 1,
        n_slots: int = 8,
        max_seq_len: int = 256,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.args = read_model_args(model_dir)
        self.plans = plan_stages(self.args, n_stages, n_slots, max_seq_len, dtype)
        self.stages = [
            load_stage(model_dir, self.args, p.layer_start, p.layer_end, p.first, p.last, dtype)
            for p in self.plans
        ]
        self.caches = [
            StageCache(
                range(p.layer_start, p.layer_end),
                n_slots,
                max_seq_len,
                self.args.num_kv_heads,
                self.args.head_dim,
                dtype,
            )
            for p in self.plans
        ]
        self.n_slots, self.max_seq_len = n_slots, max_seq_len

    @torch.inference_mode()
    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, all_logits: bool = False
    ) -> torch.Tensor:
        x = tokens
        for stage, cache in zip(self.stages, self.caches, strict=True):
            x = stage(x, positions, slots, cache, logits_for_last_only=not all_logits)
        return x

    def prefill_logits(self, prompt: list[int], slot: int = 0) -> torch.Tensor:
        """Logits [T, V] for every prompt position."""
        ids = torch.tensor([prompt])
        positions = torch.arange(len(prompt))[None]
        return self.forward(ids, positions, torch.tensor([slot]), all_logits=True)[0]

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        params: SamplingParams | None = None,
    ) -> list[list[int]]:
        """Batched generation: each prompt prefilled alone, then decoded together."""
        params = params or SamplingParams()
        if max_new_tokens <= 0:
            return [[] for _ in prompts]
        if len(prompts) > self.n_slots:
            raise ValueError(f"{len(prompts)} prompts but only {self.n_slots} KV slots")
        outputs: list[list[int]] = []
        last = []
        for slot, prompt in enumerate(prompts):
            logits = self.forward(
                torch.tensor([prompt]), torch.arange(len(prompt))[None], torch.tensor([slot])
            )
            token = sample(logits, [params], [len(prompt)])[0]
            outputs.append([token])
            last.append(token)
        slots = torch.arange(len(prompts))
        for step in range(1, max_new_tokens):
            positions = torch.tensor([[len(p) + step - 1] for p in prompts])
            logits = self.forward(torch.tensor(last)[:, None], positions, slots)
            last = sample(logits, [params] * len(prompts), [len(p) + step for p in prompts])
            for out, token in zip(outputs, last, strict=True):
                out.append(token)
        return outputs
