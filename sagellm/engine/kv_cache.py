"""Paged KV cache: fixed-size blocks of token slots, handed out to sequences on demand."""

from __future__ import annotations

import torch


BlockKey = tuple  # (hash of the previous block's key, or the chain's root, the block's token ids)


def block_keys(token_ids: list[int], block_size: int, limit: int, keys: list[BlockKey] | None = None,
               root: object = None) -> list[BlockKey]:
    """The keys of the full blocks among the first `limit` tokens, extending `keys` (those already
    known): a block's key holds its tokens and the hash of everything before it, so equal keys mean
    equal prefixes (up to a 64-bit hash collision in the chain). `root` starts the chain: the
    LoRA adapter's (Sequence.cache_root), as the same tokens under two adapters have other K/V."""
    keys = list(keys or [])
    for i in range(len(keys), limit // block_size):
        parent = hash(keys[-1]) if keys else root
        keys.append((parent, tuple(token_ids[i * block_size:(i + 1) * block_size])))
    return keys


# The never-used cache kept touched ahead of the blocks handed out (PagedKVCache.warm_ahead):
# a 2,000-token prompt of the bundled model takes 46 MB; each idle slice zeroes whole blocks of
# up to WARM_SLICE_BYTES (a few ms of page faults), so a request arriving meanwhile waits at most
# that long.
WARM_AHEAD_BYTES = 128 << 20
WARM_SLICE_BYTES = 4 << 20


class BlockAllocator:
    """Hands out blocks and, with prefix caching, keeps the contents of freed full blocks findable
    by their key until the space is needed (least recently freed first), so a request that
    starts like an earlier one reuses its K/V instead of computing them again."""

    def __init__(self, num_blocks: int, prefix_caching: bool = False):
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self._free = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks
        self._key_of: dict[int, BlockKey] = {}
        self._block_of: dict[BlockKey, int] = {}
        self._cached: dict[int, None] = {}  # unreferenced blocks with a key, least recently freed first
        # Blocks handed out for the first time hold uninitialised memory (the cache is allocated
        # lazily, not zeroed); the runner zeroes them before use, since 0 * NaN is NaN even
        # where attention masks a slot out.
        self._high_water = 0
        self.fresh: list[int] = []

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out: never used, or cached and unreferenced."""
        return len(self._free) + len(self._cached)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise MemoryError(f"KV cache full: need {n} blocks, {self.num_free} free")
        blocks = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:  # evict the least recently freed cached block
                b = next(iter(self._cached))
                del self._cached[b]
                del self._block_of[self._key_of.pop(b)]
            self._refs[b] = 1
            blocks.append(b)
            if b >= self._high_water:
                self.fresh.append(b)
        if blocks:
            self._high_water = max(self._high_water, max(blocks) + 1)
        return blocks

    @property
    def high_water(self) -> int:
        """One past the highest block ever handed out: blocks from here on were never used."""
        return self._high_water

    def take_fresh(self) -> list[int]:
        fresh, self.fresh = self.fresh, []
        return fresh

    def free(self, blocks: list[int]) -> None:
        for b in reversed(blocks):  # a sequence's last blocks are the least likely to be shared
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in self._key_of:
                    self._cached[b] = None
                else:
                    self._free.append(b)

    def match(self, keys: list[BlockKey]) -> list[int]:
        """The cached blocks holding the longest prefix of `keys`, each now referenced once more."""
        blocks = []
        for key in keys:
            b = self._block_of.get(key)
            if b is None:
                break
            if self._refs[b] == 0:
                del self._cached[b]
            self._refs[b] += 1
            blocks.append(b)
        return blocks

    def register(self, block: int, key: BlockKey) -> None:
        """`block` is full and holds the prefix `key`; later requests may share it. When another
        block already holds the same prefix (computed at the same time), that one stays."""
        if self.prefix_caching and key not in self._block_of and block not in self._key_of:
            self._block_of[key] = block
            self._key_of[block] = key


class PagedKVCache:
    """Per layer, keys and values as [num_kv_heads, num_blocks * block_size, head_dim]: a flat
    slot index (block * block_size + offset) addresses one token of one sequence, in every head.

    Head-major, so a decode step gathers the context of every (sequence, kv head) as whole blocks
    along dim 0, ready for batched matmuls. The token-major layout needed a second, transposing
    copy of the gathered context: a batch-64 step at ~94 (~158) tokens of context took 60.1
    (75.7) ms that way, 54.8 (61.6) ms now (docs/performance.md)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                 prefix_caching: bool = False):
        self.block_size = block_size
        self.num_blocks = num_blocks
        # One tensor for every layer's keys and values, so a step's new blocks are zeroed in one
        # operation rather than two per layer. torch.empty: pages are only touched (and resident)
        # once a sequence writes to them.
        self._store = torch.empty((2, num_layers, num_kv_heads, num_blocks * block_size, head_dim),
                                  dtype=dtype, device=device)
        self.keys = list(self._store[0])
        self.values = list(self._store[1])
        self.allocator = BlockAllocator(num_blocks, prefix_caching)
        # Blocks below this index have had their pages touched (warm_ahead, or handed out).
        self._warm = 0
        bytes_per_block = self._store[:, :, :, :block_size].numel() * self._store.element_size()
        self._warm_ahead = -(-WARM_AHEAD_BYTES // bytes_per_block)
        self._warm_slice = max(1, WARM_SLICE_BYTES // bytes_per_block)

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    def zero_blocks(self, blocks: torch.Tensor) -> None:
        store = self._store
        store.view(-1, self.num_blocks, self.block_size, store.shape[-1])[:, blocks] = 0

    def warm_ahead(self) -> bool:
        """Zero the next few never-used blocks past those handed out, up to WARM_AHEAD_BYTES
        ahead; False when there is nothing to do. Called while the engine is idle, a slice at a
        time: a page's first touch costs a fault (46 MB of never-used cache, a 2,000-token
        prompt's blocks: ~75 ms of faults against 1.7 ms to zero them again), which a request
        then no longer pays inside its first forward pass."""
        if self._store.device.type != "cpu":  # GPU memory is resident once allocated
            return False
        self._warm = max(self._warm, self.allocator.high_water)
        end = min(self._warm + self._warm_slice, self.allocator.high_water + self._warm_ahead, self.num_blocks)
        if end <= self._warm:
            return False
        self.zero_blocks(torch.arange(self._warm, end))
        self._warm = end
        return True

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)
