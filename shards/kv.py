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


def to_device(values: list[int], device: torch.device | str | None) -> torch.Tensor:
    """An int64 tensor of host integers on `device`. To a GPU through pinned memory and without
    blocking: a plain copy from pageable memory would wait for the work queued on the GPU."""
    t = torch.tensor(values, dtype=torch.int64)
    if device is None or torch.device(device).type != "cuda":
        return t if device is None else t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class SlotBatch:
    """The slots of a run of rows, and how to read them: a slice when they are consecutive
    (the common decode case: a view, no copy of the cache), else an index tensor.
    Built from host-side integers once per forward, not once per layer."""

    ids: torch.Tensor  # [B]
    read: slice | torch.Tensor

    @staticmethod
    def of(slots: list[int], device: torch.device | str | None = None) -> SlotBatch:
        ids = to_device(slots, device)
        first, n = slots[0], len(slots)
        consecutive = slots == list(range(first, first + n))
        return SlotBatch(ids, slice(first, first + n) if consecutive else ids)


class LayerCache:
    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v  # [n_slots, kv_heads, max_seq_len, head_dim]

    def write(self, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store each token's keys/values [N, kv_heads, head_dim] at (its slot, its position), both [N]."""
        self.k[slots, :, positions] = k
        self.v[slots, :, positions] = v

    def read(self, slots: SlotBatch, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys/values [B, kv_heads, length, head_dim] of positions 0..length-1 of each slot."""
        return self.k[slots.read, :, :length], self.v[slots.read, :, :length]


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
