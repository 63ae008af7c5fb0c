"""Paged KV cache: fixed-size blocks of token slots, handed out to sequences on demand."""

from __future__ import annotations

import torch


class BlockAllocator:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))
        # Blocks handed out for the first time hold uninitialised memory (the cache is allocated
        # lazily, not zeroed); the runner zeroes them before use, since 0 * NaN is NaN even
        # where attention masks a slot out.
        self._high_water = 0
        self.fresh: list[int] = []

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"KV cache full: need {n} blocks, {len(self._free)} free")
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            if b >= self._high_water:
                self.fresh.append(b)
        if blocks:
            self._high_water = max(self._high_water, max(blocks) + 1)
        return blocks

    def take_fresh(self) -> list[int]:
        fresh, self.fresh = self.fresh, []
        return fresh

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class PagedKVCache:
    """Per layer, keys and values as [num_kv_heads, num_blocks * block_size, head_dim]: a flat
    slot index (block * block_size + offset) addresses one token of one sequence, in every head.

    Head-major, so a decode step gathers the context of every (kv head, sequence) as whole blocks
    along dim 0, ready for batched matmuls. The token-major layout needed a second, transposing
    copy of the gathered context: a batch-64 step at ~94 (~158) tokens of context took 60.1
    (75.7) ms that way, 54.8 (61.6) ms now (docs/performance.md)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.num_kv_heads = num_kv_heads
        shape = (num_kv_heads, num_blocks * block_size, head_dim)
        # torch.empty: pages are only touched (and resident) once a sequence writes to them.
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.allocator = BlockAllocator(num_blocks)

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    def zero_blocks(self, blocks: torch.Tensor) -> None:
        for layer in self.keys + self.values:
            layer.view(layer.shape[0], self.num_blocks, self.block_size, layer.shape[2])[:, blocks] = 0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)
