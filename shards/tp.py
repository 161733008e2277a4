"""Tensor parallelism inside a stage, applied to a `StageModel` as a transformation.

Like gpt-fast's tp.py: the model code stays as it is; this rewrites its linears.
`load_stage` applies it to the stage's model before any weight is read (on the
meta device), and reads each rank's slices only (`rank_slices`, through
safetensors' `get_slice`), so a rank never holds more than its share.
Column-parallel: q/k/v (split by heads, so grouped KV heads stay with their
queries), gate/up (split by the intermediate dimension; GLM's fused gate_up
keeps a gate half and an up half per rank). Row-parallel: o_proj and down_proj,
whose partial products are summed over the tensor-parallel group. Embedding,
norms and LM head are replicated. Every rank ends with the same hidden states,
so only the stage's leader (tp rank 0) talks to the neighbouring stages.

Two engines (`pipeline.tp_engine`) compute the split layers. "native": ours,
below (`RowParallelLinear` sums with `torch.distributed.all_reduce`).
"deepspeed" (`use_deepspeed`): DeepSpeed's tensor-parallel layers, `LinearLayer`
for the column-parallel linears and `LinearAllreduce` for the row-parallel ones
(its inference all-reduce through `deepspeed.comm`, over the stage's group),
holding the same slices. The split itself stays ours: DeepSpeed's AutoTP
parser finds only `nn.ModuleList` layers (ours are keyed by global index), it
splits k/v wrongly under GQA unless the head counts are on a config it reads,
and a row split of GLM's fused gate_up would mix gate and up rows; and
`init_inference` builds its group from ranks 0..tp-1, wrong for every stage but
the first. Measured on DeepSpeed 0.19.8 with its CPU accelerator: its
shared-memory all-reduce sets up its buffers only under DeepSpeed's launcher
and segfaults otherwise, so `use_deepspeed` turns that op off before first use
(`__compatible_ops__["deepspeed_shm_comm"] = False`; upstream tracks a fallback,
deepspeedai/DeepSpeed#7625): all-reduce then runs on torch.distributed, Gloo on
CPU, NCCL on GPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from shards.errors import CheckpointError
from shards.model import ModelArgs, StageModel


class RowParallelLinear(nn.Module):
    """A linear whose input features are split over the group; outputs are summed across it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        dist.all_reduce(out, group=self.group)
        return out if self.bias is None else out + self.bias


def _rows(linear: nn.Linear, start: int, end: int) -> nn.Linear:
    """Keep output features [start, end) of a linear (column parallelism)."""
    out = nn.Linear(linear.in_features, end - start, bias=linear.bias is not None, device="meta")
    out.weight = nn.Parameter(linear.weight[start:end].clone(), requires_grad=False)
    if linear.bias is not None:
        out.bias = nn.Parameter(linear.bias[start:end].clone(), requires_grad=False)
    return out


def check_divisible(args: ModelArgs, tp: int) -> None:
    for name, value in (
        ("num_attention_heads", args.num_heads),
        ("num_key_value_heads", args.num_kv_heads),
        ("intermediate_size", args.intermediate_size),
    ):
        if value % tp:
            raise CheckpointError(f"tensor_parallel={tp} does not divide the model's {name}={value}")


def use_deepspeed(model: StageModel, group: dist.ProcessGroup, backend: str) -> StageModel:
    """Swap the split linears of a sharded stage (`shard_stage`'s output, weights loaded) for DeepSpeed's
    tensor-parallel layers holding the same tensors; the function it computes is unchanged."""
    try:
        import deepspeed
        from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer
    except ImportError as exc:
        raise CheckpointError(f"pipeline.tp_engine deepspeed needs DeepSpeed installed on every node "
                              f"(pip install 'ringpipe[deepspeed]'): {exc}") from None

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # see the module's opening comment
    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)  # wraps the process group this process has
    tp = dist.get_world_size(group)

    def column(linear: nn.Linear) -> nn.Module:  # already this rank's slice: DeepSpeed must not split it
        return LinearLayer(linear, mp_group=group, skip_partition=True)

    def row(linear: RowParallelLinear) -> nn.Module:
        out, part = linear.weight.shape
        whole = nn.Linear(part * tp, out, bias=linear.bias is not None, device="meta")  # its shape, no data
        layer = LinearAllreduce(whole, group)  # partitions the meta tensors: the shapes of our slice
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer

    for decoder in model.layers.values():
        attn, mlp = decoder.self_attn, decoder.mlp
        attn.q_proj, attn.k_proj, attn.v_proj = (column(attn.q_proj), column(attn.k_proj), column(attn.v_proj))
        attn.o_proj = row(attn.o_proj)
        if mlp.fused:
            mlp.gate_up_proj = column(mlp.gate_up_proj)
        else:
            mlp.gate_proj, mlp.up_proj = column(mlp.gate_proj), column(mlp.up_proj)
        mlp.down_proj = row(mlp.down_proj)
    return model


def rank_slices(name: str, args: ModelArgs, rank: int, tp: int) -> list[tuple[int, slice]] | None:
    """The parts of parameter `name` that tensor-parallel rank `rank` of `tp` holds, as (dim, slice)
    pieces concatenated along that dim, in the layout `shard_stage` gives; None: the whole tensor."""
    if tp == 1 or not name.startswith("layers."):
        return None
    module, kind = name.split(".")[-2:]
    hd, q_per, kv_per = args.head_dim, args.num_heads // tp, args.num_kv_heads // tp
    i_per, inter = args.intermediate_size // tp, args.intermediate_size
    q, kv, cols = (slice(rank * n, (rank + 1) * n) for n in (q_per * hd, kv_per * hd, i_per))
    if module == "q_proj":
        return [(0, q)]
    if module in ("k_proj", "v_proj"):
        return [(0, kv)]
    if module in ("gate_proj", "up_proj"):
        return [(0, cols)]
    if module == "gate_up_proj":  # a gate half and an up half per rank
        return [(0, cols), (0, slice(inter + cols.start, inter + cols.stop))]
    if kind == "weight" and module == "o_proj":
        return [(1, q)]
    if kind == "weight" and module == "down_proj":
        return [(1, cols)]
    return None  # norms, and the row-parallel linears' biases (added once, after the sum)


def rank_numel(name: str, shape: tuple[int, ...], args: ModelArgs, rank: int, tp: int) -> int:
    """Elements of parameter `name` (whole shape `shape`) that rank `rank` of `tp` holds."""
    numel = 1
    for n in shape:
        numel *= n
    pieces = rank_slices(name, args, rank, tp)
    if pieces is None:
        return numel
    dim = pieces[0][0]
    return numel // shape[dim] * sum(s.stop - s.start for _, s in pieces)


def shard_stage(model: StageModel, rank: int, tp: int, group: dist.ProcessGroup) -> StageModel:
    """Keep this rank's slice of every decoder layer; the result computes the same function."""
    args = model.args
    check_divisible(args, tp)
    hd = args.head_dim
    q_per, kv_per = args.num_heads // tp, args.num_kv_heads // tp
    i_per = args.intermediate_size // tp
    for layer in model.layers.values():
        attn = layer.self_attn
        attn.q_proj = _rows(attn.q_proj, rank * q_per * hd, (rank + 1) * q_per * hd)
        attn.k_proj = _rows(attn.k_proj, rank * kv_per * hd, (rank + 1) * kv_per * hd)
        attn.v_proj = _rows(attn.v_proj, rank * kv_per * hd, (rank + 1) * kv_per * hd)
        o = attn.o_proj
        attn.o_proj = RowParallelLinear(
            o.weight[:, rank * q_per * hd : (rank + 1) * q_per * hd].clone(), o.bias, group
        )
        mlp = layer.mlp
        cols = slice(rank * i_per, (rank + 1) * i_per)
        if mlp.fused:
            gate, up = mlp.gate_up_proj.weight.chunk(2, dim=0)
            fused = nn.Linear(args.hidden_size, 2 * i_per, bias=False, device="meta")
            fused.weight = nn.Parameter(torch.cat([gate[cols], up[cols]]).clone(), requires_grad=False)
            mlp.gate_up_proj = fused
        else:
            mlp.gate_proj = _rows(mlp.gate_proj, cols.start, cols.stop)
            mlp.up_proj = _rows(mlp.up_proj, cols.start, cols.stop)
        down = mlp.down_proj
        mlp.down_proj = RowParallelLinear(down.weight[:, cols].clone(), down.bias, group)
    return model
