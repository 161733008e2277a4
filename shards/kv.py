"""Static KV cache slots for one stage's layers, and the head's slot allocator.

Each layer holds keys and values of shape [n_slots, kv_heads, max_seq_len, head_dim],
allocated once when the stage starts, so a stage's memory is fixed and known in
advance (`kv_bytes`). A sequence owns one slot from admission until it
finishes; the head stage hands out slot ids and every stage indexes the same
slot, so no stage needs to know which request a slot belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def kv_bytes(
    n_layers: int, n_slots: int, max_seq_len: int, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * n_layers * n_slots * kv_heads * max_seq_len * head_dim * element


@dataclass(frozen=True)
class SlotBatch:
    """The slots of a batch's rows, and how to read them: a slice when they are consecutive
    (the common decode case: a view, no copy of the cache), else an index tensor.
    Built once per forward, not once per layer."""

    ids: torch.Tensor  # [B]
    read: slice | torch.Tensor

    @staticmethod
    def of(slots: torch.Tensor) -> SlotBatch:
        first, n = int(slots[0]), slots.numel()
        consecutive = bool((slots == torch.arange(first, first + n, device=slots.device)).all())
        return SlotBatch(slots, slice(first, first + n) if consecutive else slots)


class LayerCache:
    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v  # [n_slots, kv_heads, max_seq_len, head_dim]

    def update(
        self,
        slots: SlotBatch | torch.Tensor,  # [B]
        positions: torch.Tensor,  # [B, T]
        k: torch.Tensor,  # [B, kv_heads, T, head_dim]
        v: torch.Tensor,
        length: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v at (slot, position) and return each row's keys/values [B, kv_heads, length, head_dim]."""
        batch = slots if isinstance(slots, SlotBatch) else SlotBatch.of(slots)
        rows = batch.ids[:, None]
        self.k[rows, :, positions] = k.transpose(1, 2)
        self.v[rows, :, positions] = v.transpose(1, 2)
        return self.k[batch.read, :, :length], self.v[batch.read, :, :length]


class StageCache:
    """The KV slots of every layer a stage holds, keyed by global layer index."""

    def __init__(
        self,
        layer_ids: range,
        n_slots: int,
        max_seq_len: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (n_slots, kv_heads, max_seq_len, head_dim)
        self._layers = {
            i: LayerCache(
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
            for i in layer_ids
        }
        self.n_slots, self.max_seq_len = n_slots, max_seq_len

    def layer(self, index: int) -> LayerCache:
        return self._layers[index]

    def nbytes(self) -> int:
        return sum(c.k.nbytes + c.v.nbytes for c in self._layers.values())


class SlotAllocator:
    """Free list of KV slot ids; the lowest free slot is handed out first."""

    def __init__(self, n_slots: int) -> None:
        self._free = list(range(n_slots - 1, -1, -1))
        self.n_slots = n_slots

    def acquire(self) -> int | None:
        return self._free.pop() if self._free else None

    def release(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.n_slots:
            raise ValueError(f"slot {slot} is not in use")
        self._free.append(slot)
        self._free.sort(reverse=True)

    @property
    def free(self) -> int:
        return len(self._free)
