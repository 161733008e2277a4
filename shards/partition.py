"""Cut a model's layers into S contiguous pipeline stages balanced by compute.

A stage's compute per token is the parameters it multiplies by: its layers', and
on the last stage the LM head's. The embedding, which goes with the first stage,
is a lookup of one row per token and costs next to nothing, so the first stage
takes more layers than the last (balanced by parameter count, the last stage of a
12-layer Llama with a 16k vocabulary did 1.3x the first's work and set the
pipeline's pace). The final norm and LM head go with the last stage (a tied head
still costs the last stage a copy of the embedding matrix).
Each stage's memory — its weights plus its KV slots — is computed here from
shapes alone, before any stage starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch

from shards.checkpoint import stage_shapes
from shards.errors import CheckpointError
from shards.kv import kv_bytes
from shards.model import ModelArgs


@dataclass(frozen=True)
class StagePlan:
    index: int
    n_stages: int
    layer_start: int
    layer_end: int
    params: int
    weight_bytes: int
    kv_bytes: int

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.n_stages - 1

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes


def activation_bytes(args: ModelArgs, tokens: int, dtype: torch.dtype, tp: int = 1, last: bool = False,
                     logit_rows: int = 0) -> int:
    """The largest transient a forward of `tokens` tokens holds at once, estimated from shapes: per
    token the residual stream, its norm and the attention output, this rank's q/k/v, and its gate, up
    and their product; on the last stage float32 logits for `logit_rows` rows. (A 2048-token forward
    of a 12-layer, 768-wide Llama: ~80 MiB in float32.)"""
    element = torch.empty((), dtype=dtype).element_size()
    per_token = (3 * args.hidden_size + (args.num_heads + 2 * args.num_kv_heads) * args.head_dim // tp
                 + 3 * args.intermediate_size // tp)
    return tokens * per_token * element + (4 * logit_rows * args.vocab_size if last else 0)


def balanced_layers(layer_cost: int, n_layers: int, first_extra: int, last_extra: int, n_stages: int) -> list[int]:
    """Layer counts per stage (each ≥ 1) minimising the largest stage cost."""
    if not 1 <= n_stages <= n_layers:
        raise CheckpointError(f"cannot cut {n_layers} layers into {n_stages} stages (need 1 ≤ stages ≤ layers)")

    def cost(stage: int, count: int) -> int:
        return count * layer_cost + (first_extra if stage == 0 else 0) + (last_extra if stage == n_stages - 1 else 0)

    # best[k][i]: (max cost, counts) for stages k.. given that layers i.. remain
    best: dict[tuple[int, int], tuple[int, list[int]]] = {}
    for k in range(n_stages - 1, -1, -1):
        for i in range(n_layers):
            remaining = n_layers - i
            if k == n_stages - 1:
                best[k, i] = (cost(k, remaining), [remaining])
                continue
            options = []
            for count in range(1, remaining - (n_stages - 1 - k) + 1):
                tail_max, tail = best[k + 1, i + count]
                options.append((max(cost(k, count), tail_max), [count, *tail]))
            if options:
                best[k, i] = min(options, key=lambda o: o[0])
    return best[0, 0][1]


def plan_stages(
    args: ModelArgs, n_stages: int, n_slots: int, max_seq_len: int, dtype: torch.dtype
) -> list[StagePlan]:
    element = torch.empty((), dtype=dtype).element_size()
    layer_params = sum(prod(s) for s in stage_shapes(args, 0, 1, False, False).values())
    embed = args.vocab_size * args.hidden_size
    head = embed + args.hidden_size
    counts = balanced_layers(layer_params, args.num_layers, 0, head, n_stages)  # the embedding: a lookup
    plans, start = [], 0
    for index, count in enumerate(counts):
        first, last = index == 0, index == n_stages - 1
        params = sum(prod(s) for s in stage_shapes(args, start, start + count, first, last).values())
        plans.append(
            StagePlan(
                index=index,
                n_stages=n_stages,
                layer_start=start,
                layer_end=start + count,
                params=params,
                weight_bytes=params * element,
                kv_bytes=kv_bytes(count, n_slots, max_seq_len, args.num_kv_heads, args.head_dim, dtype),
            )
        )
        start += count
    return plans
