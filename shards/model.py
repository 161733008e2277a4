"""The model: Llama-family and GLM decoder layers, cut into pipeline stages.

One `ModelArgs` describes every supported architecture; the differences are
flags (q/k/v bias, fused gate/up, partial or interleaved rotary, sliding window,
tied embeddings). A `StageModel` holds a contiguous run of decoder layers, plus
the token embedding on the first stage and the final norm and LM head on the
last, with parameter names that are the Hugging Face names minus the `model.`
prefix, so loading a stage is a name lookup.

Attention reads and writes a static KV cache addressed by (slot, position):
every row of a batch is one sequence in its own slot, so sequences of different
lengths share a forward pass without padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shards.kv import LayerCache, SlotBatch, StageCache, to_device

Device = torch.device | str | None


@dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling (`rope_type` "linear" or "llama3")."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelArgs:
    arch: str  # "llama" | "mistral" | "qwen2" | "glm"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rotary_dim: int = 0  # 0 means head_dim
    rope_interleaved: bool = False  # GLM rotates (even, odd) pairs, Llama rotates halves
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    fused_gate_up: bool = False  # GLM: one gate_up_proj, gate first
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def rope_dim(self) -> int:
        return self.rotary_dim or self.head_dim


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device: Device = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    dim = args.rope_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    scaling = args.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3: long wavelengths are divided by `factor`, short ones kept, the
    # band between them interpolated smoothly.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, interleaved: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [N, 1, rope_dim] for integer positions [N] (one head axis to broadcast over)."""
    freqs = positions[:, None, None].float() * inv_freq.to(positions.device)  # [N, 1, rope_dim/2]
    if interleaved:
        emb = freqs.repeat_interleave(2, dim=-1)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((-x2, x1), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool
) -> torch.Tensor:
    """x: [N, heads, head_dim], cos/sin [N, 1, rope_dim]; rotates the first rope_dim features, passes the rest."""
    rot_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    x_rot = x_rot * cos + _rotate(x_rot, interleaved) * sin
    return torch.cat((x_rot, x_pass), dim=-1) if x_pass.shape[-1] else x_rot


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, device: Device = None) -> None:
        super().__init__()
        self.args = args
        h, hd = args.hidden_size, args.head_dim
        self.q_proj = nn.Linear(h, args.num_heads * hd, bias=args.qkv_bias, device=device)
        self.k_proj = nn.Linear(h, args.num_kv_heads * hd, bias=args.qkv_bias, device=device)
        self.v_proj = nn.Linear(h, args.num_kv_heads * hd, bias=args.qkv_bias, device=device)
        self.o_proj = nn.Linear(args.num_heads * hd, h, bias=args.o_bias, device=device)

    def forward(
        self,
        x: torch.Tensor,  # [N, hidden]: the micro-batch's tokens, row after row
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin [N, 1, rope_dim]
        packed: Packed,
        cache: LayerCache | None,
    ) -> torch.Tensor:
        a = self.args
        N = x.shape[0]
        # heads are read off the projections, not the config: under tensor
        # parallelism each rank holds a slice of them
        q = self.q_proj(x).view(N, -1, a.head_dim)
        k = self.k_proj(x).view(N, -1, a.head_dim)
        v = self.v_proj(x).view(N, -1, a.head_dim)
        cos, sin = rope
        q = apply_rope(q, cos, sin, a.rope_interleaved)
        k = apply_rope(k, cos, sin, a.rope_interleaved)
        if cache is not None:
            cache.write(packed.token_slots, packed.positions, k, v)
        outs = []
        for run in packed.runs:
            n, L = run.rows, run.length
            span = slice(run.begin, run.begin + n * L)
            qr = q[span].view(n, L, -1, a.head_dim).transpose(1, 2)  # [n, heads, L, hd]
            if cache is None:  # training / no-cache forward: each row attends to its own tokens
                keys = k[span].view(n, L, -1, a.head_dim).transpose(1, 2)
                values = v[span].view(n, L, -1, a.head_dim).transpose(1, 2)
            else:
                keys, values = cache.read(run.slots, run.kv_len)
            out = F.scaled_dot_product_attention(
                qr, keys, values, attn_mask=run.mask, enable_gqa=qr.shape[1] != keys.shape[1]
            )
            outs.append(out.transpose(1, 2).reshape(n * L, -1))
        return self.o_proj(outs[0] if len(outs) == 1 else torch.cat(outs))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, device: Device = None) -> None:
        super().__init__()
        h, i, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.fused = args.fused_gate_up
        if self.fused:
            self.gate_up_proj = nn.Linear(h, 2 * i, bias=False, device=device)
        else:
            self.gate_proj = nn.Linear(h, i, bias=bias, device=device)
            self.up_proj = nn.Linear(h, i, bias=bias, device=device)
        self.down_proj = nn.Linear(i, h, bias=bias, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, device: Device = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, device)
        self.self_attn = Attention(args, device)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, device)
        self.mlp = FeedForward(args, device)

    def forward(self, x, rope, packed: Packed, cache: LayerCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, packed, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask(positions: torch.Tensor, length: int, window: int | None) -> torch.Tensor:
    """[B, 1, T, length] bool: query at position p sees keys 0..p (the last `window` of them)."""
    keys = torch.arange(length, device=positions.device)
    q = positions[:, None, :, None]
    allowed = keys <= q
    if window is not None:
        allowed &= keys > q - window
    return allowed


@dataclass(frozen=True)
class Run:
    """Consecutive rows of one length, attended in one call: flat tokens
    [begin, begin + rows * length), each row reading keys 0..kv_len-1 of its own slot."""

    begin: int
    rows: int
    length: int
    slots: SlotBatch | None
    kv_len: int
    mask: torch.Tensor  # [rows, 1, length, kv_len]


@dataclass(frozen=True)
class Packed:
    """A micro-batch laid out token after token: row r is `lengths[r]` tokens of the sequence in
    KV slot `slots[r]`, at positions starts[r] onwards. Rows of any lengths share a forward with
    no padding (a prefill chunk beside decode steps); every matmul runs over all N tokens at once,
    attention once per run of equal-length rows. Built once per forward from host-side integers,
    copied to a GPU asynchronously (`to_device`), so it costs no device synchronisation."""

    positions: torch.Tensor  # [N]
    token_slots: torch.Tensor  # [N] each token's slot (where its keys/values are written)
    runs: tuple[Run, ...]
    ends: tuple[int, ...]  # the flat index of each row's last token (host integers: pick those to score)

    @staticmethod
    def of(
        slots: list[int], starts: list[int], lengths: list[int], window: int | None, device: Device = None,
        cached: bool = True,
    ) -> Packed:
        positions, token_slots, ends, runs = [], [], [], []
        r = 0
        while r < len(lengths):
            e = r
            while e + 1 < len(lengths) and lengths[e + 1] == lengths[r]:
                e += 1
            L, rows = lengths[r], e - r + 1
            begin = len(positions)
            for b in range(r, e + 1):
                positions.extend(range(starts[b], starts[b] + L))
                token_slots.extend([slots[b]] * L)
                ends.append(len(positions) - 1)
            pos = to_device(positions[begin:], device).view(rows, L)
            kv_len = max(starts[r : e + 1]) + L if cached else L
            mask = attention_mask(pos if cached else pos - pos[:, :1], kv_len, window)
            run_slots = SlotBatch.of(slots[r : e + 1], device) if cached else None
            runs.append(Run(begin, rows, L, run_slots, kv_len, mask))
            r = e + 1
        return Packed(
            to_device(positions, device), to_device(token_slots, device), tuple(runs), tuple(ends),
        )


class StageModel(nn.Module):
    """Decoder layers [layer_start, layer_end) with the embedding and/or head when this stage owns them."""

    def __init__(
        self,
        args: ModelArgs,
        layer_start: int,
        layer_end: int,
        first: bool,
        last: bool,
        device: Device = None,  # "meta": shapes only, filled later by load_state_dict(assign=True)
    ) -> None:
        super().__init__()
        self.args = args
        self.layer_start, self.layer_end = layer_start, layer_end
        self.first, self.last = first, last
        if first:
            # a given _weight skips the random init, which on "meta" pulls in torch's
            # decomposition machinery (~70 MiB per stage process) for nothing
            weight = torch.empty(args.vocab_size, args.hidden_size, device=device) if device == "meta" else None
            self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size, _weight=weight, device=device)
        self.layers = nn.ModuleDict(
            {str(i): DecoderLayer(args, device) for i in range(layer_start, layer_end)}
        )
        if last:
            self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, device)
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False, device=device)
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    def forward(
        self,
        inputs: torch.Tensor,  # token ids [B, T] on the first stage, hidden states [B, T, H] after
        positions: torch.Tensor,  # [B, T], each row consecutive
        slots: torch.Tensor | None,  # [B]
        cache: StageCache | None,
        logits_for_last_only: bool = True,
    ) -> torch.Tensor:
        """Hidden states [B, T, H]; on the last stage, logits [B, V] (or [B, T, V]).

        The rectangular form of `forward_packed`, for callers with equal-length rows (training,
        tests, the in-process model). With cache=None (training) every row attends only to its
        own tokens, positions 0..T-1.
        """
        B, T = positions.shape
        packed = Packed.of(
            slots.tolist() if slots is not None else [0] * B, positions[:, 0].tolist(), [T] * B,
            self.args.sliding_window, positions.device, cached=cache is not None,
        )
        flat = inputs.reshape(B * T, *inputs.shape[2:])
        if not self.last:
            return self.forward_packed(flat, packed, cache).view(B, T, -1)
        if logits_for_last_only:
            return self.forward_packed(flat, packed, cache, to_device(list(packed.ends), positions.device))
        return self.forward_packed(flat, packed, cache, torch.arange(B * T, device=positions.device)).view(B, T, -1)

    def forward_packed(
        self,
        inputs: torch.Tensor,  # token ids [N] on the first stage, hidden states [N, H] after
        packed: Packed,
        cache: StageCache | None,
        logits_at: torch.Tensor | None = None,  # [R] flat indices of the tokens to score (last stage)
    ) -> torch.Tensor:
        """Hidden states [N, H]; on the last stage, float32 logits [R, V] of the tokens `logits_at`
        (only those: the LM head is the largest matmul, and a prompt's other tokens need none)."""
        x = self.embed_tokens(inputs) if self.first else inputs
        rope = rope_cos_sin(self.inv_freq, packed.positions, self.args.rope_interleaved, x.dtype)
        for i, layer in self.layers.items():
            x = layer(x, rope, packed, cache.layer(int(i)) if cache else None)
        if not self.last:
            return x
        if logits_at is not None:
            x = x[logits_at]
        return self.lm_head(self.norm(x)).float()
