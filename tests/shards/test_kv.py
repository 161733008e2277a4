"""KV slots: the allocator against a model set, and cache writes against a brute-force loop."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shards.kv import LayerCache, SlotAllocator, SlotBatch, StageCache, kv_bytes


def test_allocator_hands_out_distinct_slots_until_full() -> None:
    alloc = SlotAllocator(5)
    slots = [alloc.acquire() for _ in range(5)]
    assert sorted(slots) == list(range(5))
    assert alloc.free == 0
    assert alloc.acquire() is None


def test_released_slot_is_reused() -> None:
    alloc = SlotAllocator(3)
    a, b, c = alloc.acquire(), alloc.acquire(), alloc.acquire()
    alloc.release(b)
    assert alloc.free == 1
    assert alloc.acquire() == b
    assert alloc.acquire() is None
    assert len({a, b, c}) == 3


def test_double_release_raises() -> None:
    alloc = SlotAllocator(3)
    slot = alloc.acquire()
    alloc.release(slot)
    with pytest.raises(ValueError):
        alloc.release(slot)
    assert alloc.free == 3


@pytest.mark.parametrize("slot", [-1, 3, 100])
def test_releasing_a_slot_that_does_not_exist_raises(slot: int) -> None:
    alloc = SlotAllocator(3)
    alloc.acquire()
    with pytest.raises(ValueError):
        alloc.release(slot)
    assert alloc.free == 2


def test_releasing_a_never_acquired_slot_raises() -> None:
    alloc = SlotAllocator(4)
    alloc.acquire()  # slot 0 is in use; slot 2 never was
    with pytest.raises(ValueError):
        alloc.release(2)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 8), st.lists(st.tuples(st.booleans(), st.integers(-1, 9)), max_size=40))
def test_allocator_matches_a_model_set(n_slots: int, ops: list[tuple[bool, int]]) -> None:
    """Acquire gives the lowest free slot (or None); release works exactly for slots in use."""
    alloc = SlotAllocator(n_slots)
    in_use: set[int] = set()
    for is_acquire, slot in ops:
        if is_acquire:
            free = set(range(n_slots)) - in_use
            got = alloc.acquire()
            assert got == (min(free) if free else None)
            if got is not None:
                in_use.add(got)
        elif slot in in_use:
            alloc.release(slot)
            in_use.discard(slot)
        else:
            with pytest.raises(ValueError):
                alloc.release(slot)
        assert alloc.free == n_slots - len(in_use)


def brute_force_update(cache_k, cache_v, slots, positions, k, v):
    """Writes one (slot, position) at a time; returns the expected caches."""
    k_out, v_out = cache_k.clone(), cache_v.clone()
    for b in range(len(slots)):
        for t in range(positions.shape[1]):
            k_out[slots[b], :, positions[b, t]] = k[b, :, t]
            v_out[slots[b], :, positions[b, t]] = v[b, :, t]
    return k_out, v_out


def write_rows(layer: LayerCache, slots: list[int], positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [B, kv_heads, T, head_dim] at positions [B, T], written token by token as a packed forward
    does (each token with its row's slot), then read back for every row."""
    B, kv_heads, T, head_dim = k.shape
    token_slots = torch.tensor(slots).repeat_interleave(T)
    flat = lambda t: t.transpose(1, 2).reshape(B * T, kv_heads, head_dim)  # noqa: E731
    layer.write(token_slots, positions.reshape(-1), flat(k), flat(v))
    return layer.read(SlotBatch.of(slots), length)


@pytest.mark.parametrize(
    ("slots", "starts", "T"),
    [
        ([2], [0], 5),  # prefill into one slot
        ([0, 3, 1], [4, 0, 9], 1),  # decode step: rows at different positions
        ([1, 0], [3, 6], 3),  # chunked prefill of two sequences
        ([1, 2, 3], [2, 0, 5], 1),  # decode step over consecutive slots
        ([0, 1, 2, 3], [0, 0, 0, 0], 2),  # every slot, same positions
    ],
)
def test_layer_cache_update_writes_at_slot_and_position(
    slots: list[int], starts: list[int], T: int
) -> None:
    n_slots, kv_heads, max_seq_len, head_dim = 4, 2, 16, 3
    gen = torch.Generator().manual_seed(sum(slots) + T)
    # existing contents, so the test sees both what changed and what must not
    cache_k = torch.randn(n_slots, kv_heads, max_seq_len, head_dim, generator=gen)
    cache_v = torch.randn(n_slots, kv_heads, max_seq_len, head_dim, generator=gen)
    B = len(slots)
    positions = torch.tensor([[s + t for t in range(T)] for s in starts])
    k = torch.randn(B, kv_heads, T, head_dim, generator=gen)
    v = torch.randn(B, kv_heads, T, head_dim, generator=gen)
    expected_k, expected_v = brute_force_update(cache_k, cache_v, slots, positions, k, v)
    length = int(positions.max()) + 1

    layer = LayerCache(cache_k.clone(), cache_v.clone())
    keys, values = write_rows(layer, slots, positions, k, v, length)

    torch.testing.assert_close(layer.k, expected_k, atol=0, rtol=0)
    torch.testing.assert_close(layer.v, expected_v, atol=0, rtol=0)
    assert keys.shape == values.shape == (B, kv_heads, length, head_dim)
    for b, slot in enumerate(slots):
        torch.testing.assert_close(keys[b], expected_k[slot, :, :length], atol=0, rtol=0)
        torch.testing.assert_close(values[b], expected_v[slot, :, :length], atol=0, rtol=0)


def test_stage_cache_keeps_layers_apart_by_global_index() -> None:
    cache = StageCache(
        range(3, 6), n_slots=2, max_seq_len=8, kv_heads=1, head_dim=2, dtype=torch.float32
    )
    k = torch.ones(1, 1, 1, 2)
    write_rows(cache.layer(4), [1], torch.tensor([[5]]), k, 2 * k, 6)
    assert cache.layer(4).k.sum() == 2 and cache.layer(4).v.sum() == 4
    for other in (3, 5):
        assert cache.layer(other).k.abs().sum() == 0 and cache.layer(other).v.abs().sum() == 0
    with pytest.raises(KeyError):
        cache.layer(2)  # layer 2 belongs to another stage


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kv_bytes_equals_the_allocated_tensors(dtype: torch.dtype) -> None:
    n_layers, n_slots, max_seq_len, kv_heads, head_dim = 3, 4, 10, 2, 8
    cache = StageCache(range(n_layers), n_slots, max_seq_len, kv_heads, head_dim, dtype)
    allocated = sum(
        t.numel() * t.element_size()
        for i in range(n_layers)
        for t in (cache.layer(i).k, cache.layer(i).v)
    )
    assert all(cache.layer(i).k.dtype == dtype for i in range(n_layers))
    assert kv_bytes(n_layers, n_slots, max_seq_len, kv_heads, head_dim, dtype) == allocated
    assert cache.nbytes() == allocated


@st.composite
def cache_writes(draw):
    n_slots, max_seq_len = 5, 12
    B = draw(st.integers(1, n_slots))
    slots = draw(st.permutations(range(n_slots)))[:B]
    T = draw(st.integers(1, 4))
    starts = [draw(st.integers(0, max_seq_len - T)) for _ in range(B)]
    return n_slots, max_seq_len, slots, starts, T


@settings(max_examples=100, deadline=None)
@given(cache_writes(), st.integers(0, 2**31 - 1))
def test_layer_cache_update_matches_brute_force(write, seed: int) -> None:
    n_slots, max_seq_len, slots, starts, T = write
    kv_heads, head_dim = 2, 3
    gen = torch.Generator().manual_seed(seed)
    cache_k = torch.randn(n_slots, kv_heads, max_seq_len, head_dim, generator=gen)
    cache_v = torch.randn(n_slots, kv_heads, max_seq_len, head_dim, generator=gen)
    positions = torch.tensor([[s + t for t in range(T)] for s in starts])
    k = torch.randn(len(slots), kv_heads, T, head_dim, generator=gen)
    v = torch.randn(len(slots), kv_heads, T, head_dim, generator=gen)
    expected_k, expected_v = brute_force_update(cache_k, cache_v, slots, positions, k, v)
    length = int(positions.max()) + 1

    layer = LayerCache(cache_k, cache_v)
    keys, values = write_rows(layer, slots, positions, k, v, length)

    assert torch.equal(layer.k, expected_k) and torch.equal(layer.v, expected_v)
    assert torch.equal(keys, expected_k[slots, :, :length])
    assert torch.equal(values, expected_v[slots, :, :length])
