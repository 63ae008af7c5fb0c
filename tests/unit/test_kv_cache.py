"""The block allocator's prefix cache: keys, sharing, reference counts and eviction; the cache's
never-used blocks zeroed ahead of use while the engine is idle."""

from __future__ import annotations

import pytest
import torch

from sagellm.engine import kv_cache
from sagellm.engine.kv_cache import BlockAllocator, PagedKVCache, block_keys


def test_keys_cover_full_blocks_and_chain_the_prefix():
    a = block_keys(list(range(40)), 16, 40)
    assert len(a) == 2 and a[0] == (None, tuple(range(16))) and a[1][1] == tuple(range(16, 32))
    # The same second block after a different first block is a different prefix.
    b = block_keys([99] + list(range(1, 40)), 16, 40)
    assert b[1][1] == a[1][1] and b[1] != a[1]
    # Extending known keys gives the same keys as computing them at once.
    assert block_keys(list(range(64)), 16, 64, a) == block_keys(list(range(64)), 16, 64)


def test_freed_blocks_stay_findable_until_needed():
    alloc = BlockAllocator(4, prefix_caching=True)
    keys = block_keys(list(range(32)), 16, 32)
    blocks = alloc.allocate(2)
    for b, k in zip(blocks, keys):
        alloc.register(b, k)
    assert alloc.match(keys) == blocks  # shared while still running: two references each
    alloc.free(blocks)
    alloc.free(blocks)
    assert alloc.num_free == 4  # cached blocks count as free space
    assert alloc.match(keys) == blocks  # ... and are found again
    alloc.free(blocks)
    # Needing every block evicts the cached ones; their prefixes are gone.
    assert sorted(alloc.allocate(4)) == [0, 1, 2, 3]
    assert alloc.num_free == 0
    assert alloc.match(keys) == []
    with pytest.raises(MemoryError):
        alloc.allocate(1)


def test_match_stops_at_the_first_missing_block_and_eviction_is_least_recent_first():
    alloc = BlockAllocator(3, prefix_caching=True)
    chain = block_keys(list(range(48)), 16, 48)
    other = block_keys(list(range(100, 116)), 16, 16)
    b1, b2 = alloc.allocate(1), alloc.allocate(1)
    alloc.register(b1[0], chain[0])
    alloc.register(b2[0], other[0])
    alloc.free(b1)
    alloc.free(b2)
    assert alloc.match(chain) == b1  # the chain's second block was never cached
    alloc.free(b1)  # now b2 is the least recently freed
    alloc.allocate(2)  # the never-used block, then b2
    assert alloc.match(other) == [] and alloc.match(chain) == b1


def test_a_prefix_already_cached_keeps_its_block_and_caching_off_registers_nothing():
    alloc = BlockAllocator(4, prefix_caching=True)
    key = block_keys(list(range(16)), 16, 16)[0]
    one, two = alloc.allocate(1)[0], alloc.allocate(1)[0]
    alloc.register(one, key)
    alloc.register(two, key)  # computed at the same time by another request
    alloc.free([two])
    assert alloc.match([key]) == [one]
    off = BlockAllocator(2)
    b = off.allocate(1)
    off.register(b[0], key)
    off.free(b)
    assert off.match([key]) == [] and off.num_free == 2


def test_warm_ahead_zeroes_never_used_blocks_a_slice_at_a_time_up_to_its_bound(monkeypatch):
    # 2 layers x 2 kv heads x 4 dims x 2 (k, v) x 4 bytes = 128 bytes a token, 512 a block of 4
    monkeypatch.setattr(kv_cache, "WARM_AHEAD_BYTES", 5 * 512)
    monkeypatch.setattr(kv_cache, "WARM_SLICE_BYTES", 2 * 512)
    cache = PagedKVCache(2, 16, 4, 2, 4, torch.float32)
    cache._store.fill_(float("nan"))  # what never-touched memory may hold

    def zeroed() -> list[bool]:
        return [bool((cache._store.view(-1, 16, 4, 4)[:, b] == 0).all()) for b in range(16)]

    slices = 0
    while cache.warm_ahead():
        slices += 1
    assert slices == 3 and zeroed() == [True] * 5 + [False] * 11  # 2 + 2 + 1 blocks, then done
    cache.allocator.allocate(6)  # blocks 0-5 handed out (5 unzeroed: the runner zeroes it), bound 6 + 5
    while cache.warm_ahead():
        slices += 1
    assert zeroed() == [True] * 5 + [False] + [True] * 5 + [False] * 5
    # Blocks handed out are not zeroed again here (the runner zeroes fresh blocks before use).
    cache._store.view(-1, 16, 4, 4)[:, 0] = 7.0
    assert not cache.warm_ahead() and bool((cache._store.view(-1, 16, 4, 4)[:, 0] == 7.0).all())
    cache.allocator.allocate(8)  # blocks 6-13: the bound, 14 + 5, lies past the cache's end
    while cache.warm_ahead():
        slices += 1
    assert zeroed()[14:] == [True, True]
