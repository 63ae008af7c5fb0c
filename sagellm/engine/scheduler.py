"""Chooses each step's work: every running decode, prefill chunks within the token budget, and
new requests while KV blocks last. Preempts (and later recomputes) the newest sequence rather
than running out of cache. With prefix caching, a new sequence starts from the cached blocks
that hold the longest prefix of its tokens, and one whose next block another prompt computes in
this step waits for it."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from sagellm.engine.kv_cache import PagedKVCache, block_keys
from sagellm.engine.sequence import Sequence, SequenceStatus


# A prompt alone in the engine (nothing else running or waiting) is prefilled in chunks of up to
# this many tokens, where the prefill budget was not set (Scheduler's lone_prefill_tokens): the
# budget's small chunks are there so running decodes are not starved, and alone there are none.
# Measured served, the bench's ~2,000-token prompt alone, alternating in one hold: 1,576 / 1,501
# ms in 512-token chunks, 1,508 / 1,478 ms in one chunk (docs/performance.md, "Prefill"). A request
# arriving meanwhile waits for that step: up to ~1.5 s on 2 cores instead of ~0.4 s.
LONE_PREFILL_TOKENS = 2048


@dataclass
class ScheduledBatch:
    decodes: list[Sequence] = field(default_factory=list)
    # (sequence, number of tokens to prefill this step, from seq.num_computed on)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)

    @property
    def sampling(self) -> list[Sequence]:
        """Sequences that get a new token this step, in logits order."""
        done = [seq for seq, n in self.prefills if seq.num_computed + n == seq.num_tokens]
        return self.decodes + done

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


class Scheduler:
    def __init__(self, cache: PagedKVCache, max_batch_size: int, max_prefill_tokens: int,
                 max_prompt_logprob_rows: int = 512, chunk_align: int = 1, lone_prefill_tokens: int = 0):
        """lone_prefill_tokens: the budget of a step whose only sequence is a prompt, where larger
        than max_prefill_tokens (LONE_PREFILL_TOKENS; 0: none)."""
        self.cache = cache
        # BATCH_INVARIANT (chunk_align = the attention's query block, 64): a prompt chunk starts
        # and ends on a multiple of it (or ends with the prompt), every prompt token is prefilled
        # (none fed as a decode), and prefix-cache hits are cut to a multiple of it; so a prompt
        # is computed the same whether the budget splits it or not. Prompt chunks go whole or not
        # at all, so the budget must hold one.
        if max_prefill_tokens < chunk_align or max_prompt_logprob_rows < chunk_align:
            raise ValueError(f"a prefill budget of {max_prefill_tokens} tokens cannot hold one {chunk_align}-token chunk")
        self.chunk_align = chunk_align
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.lone_prefill_tokens = lone_prefill_tokens
        # Scoring prompt tokens keeps a full logits row per position (vocabulary x 4 bytes, 0.5 MB
        # for a 128k vocabulary): such prefills go in chunks of at most this many tokens a step.
        self.max_prompt_logprob_rows = max_prompt_logprob_rows
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # Prompt tokens of admitted sequences, and how many of them came from the prefix cache.
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence's blocks."""
        self._release(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_prefill_tokens
        if self.lone_prefill_tokens > budget and len(self.running) + len(self.waiting) == 1:
            budget = self.lone_prefill_tokens  # no decode to starve
        rows = self.max_prompt_logprob_rows

        def chunk(seq: Sequence, budget: int) -> int:
            want = min(seq.num_uncomputed, budget)
            want = min(want, rows) if seq.params.prompt_logprobs else want
            if want < seq.num_uncomputed:  # a chunk that does not end the prompt ends aligned
                want -= (seq.num_computed + want) % self.chunk_align
            return want
        # Running sequences, oldest first: decodes always run; unfinished prefills take chunks.
        for seq in list(self.running):
            if seq not in self.running:  # preempted by an older sequence in this loop
                continue
            decode = seq.num_uncomputed == 1 and (self.chunk_align == 1 or bool(seq.output_ids))
            want = 1 if decode else chunk(seq, budget)
            if want == 0:
                continue
            if not self._reserve(seq, want, batch):
                continue
            if decode:
                batch.decodes.append(seq)
            else:
                batch.prefills.append((seq, want))
                self._store_block_keys(seq, seq.num_computed + want)
                budget -= want
                rows -= want if seq.params.prompt_logprobs else 0
        # Admit new sequences in arrival order while there is room. One whose next uncached block
        # another prefill of this step computes waits a step and then takes it from the cache.
        pending = None
        deferred = []
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            self._reuse_prefix(seq)
            if seq.block_keys and self.cache.allocator.prefix_caching and not seq.params.prompt_logprobs:
                pending = self._completed_keys(batch.prefills) if pending is None else pending
                if len(seq.block_table) < len(seq.block_keys) and seq.block_keys[len(seq.block_table)] in pending:
                    self._release(seq)
                    seq.num_computed = 0
                    deferred.append(self.waiting.popleft())
                    continue
            want = chunk(seq, budget)
            if want == 0 or (self.cache.blocks_needed(seq.num_computed + want) - len(seq.block_table)
                             > self.cache.allocator.num_free):
                # No room for its scored rows this step, or it waits until blocks are freed;
                # arrival order is kept.
                self._release(seq)
                seq.num_computed = 0
                break
            self.waiting.popleft()
            self.prefix_query_tokens += seq.num_tokens
            self.prefix_hit_tokens += seq.num_computed
            self._grow(seq, want)
            seq.status = SequenceStatus.RUNNING
            if seq.queue_s is None:
                seq.queue_s = time.monotonic() - seq.arrival
            self.running.append(seq)
            batch.prefills.append((seq, want))
            self._store_block_keys(seq, seq.num_computed + want)
            budget -= want
            rows -= want if seq.params.prompt_logprobs else 0
            if pending is not None:
                pending.update(self._completed_keys([(seq, want)]))
        self.waiting.extendleft(reversed(deferred))  # ahead of later arrivals, in their order
        return batch

    def _completed_keys(self, prefills: list[tuple[Sequence, int]]) -> set:
        """The prefix-cache keys of the whole blocks these prefill chunks complete this step, as
        stored when schedule() added each chunk. Measured (bench/lora.py, 16 requests on 4 adapters
        arriving at once): without waiting for them, the 12 requests behind each adapter's first
        all computed the same prompt in one step (512 tokens, 0.85 s), where their blocks were one
        step away."""
        bs = self.cache.block_size
        keys = set()
        for seq, n in prefills:
            full = (seq.num_computed + n) // bs
            keys.update(seq.block_keys[seq.num_computed // bs:full])
        return keys

    def _store_block_keys(self, seq: Sequence, num_tokens: int) -> None:
        """With prefix caching, store in seq.block_keys the keys of the full blocks among its first
        `num_tokens` tokens; each block's key is computed once (a key hashes the one before it)."""
        if self.cache.allocator.prefix_caching and num_tokens // self.cache.block_size > len(seq.block_keys):
            seq.block_keys = block_keys(seq.all_ids, self.cache.block_size, num_tokens, seq.block_keys, seq.cache_root)

    def _reuse_prefix(self, seq: Sequence) -> None:
        """Start a waiting sequence from the cached blocks holding the longest prefix of its tokens.
        At least its last token is computed again (its logits pick the next token), and requests
        that score their prompt tokens compute every position."""
        alloc = self.cache.allocator
        if not alloc.prefix_caching or seq.num_computed or seq.block_table or seq.params.prompt_logprobs:
            return
        bs = self.cache.block_size
        usable = (seq.num_tokens - 1) // bs
        self._store_block_keys(seq, usable * bs)
        seq.block_table = alloc.match(seq.block_keys[:usable])
        keep = len(seq.block_table) - len(seq.block_table) * bs % self.chunk_align // bs
        if keep < len(seq.block_table):  # BATCH_INVARIANT: the prompt resumes on a chunk boundary
            alloc.free(seq.block_table[keep:])
            del seq.block_table[keep:]
        seq.num_registered = len(seq.block_table)  # already in the cache
        seq.num_computed = seq.num_registered * bs

    def register_computed(self, seqs: list[Sequence]) -> None:
        """Offer the blocks that became full this step to the prefix cache."""
        alloc = self.cache.allocator
        if not alloc.prefix_caching:
            return
        bs = self.cache.block_size
        for seq in seqs:
            full = min(seq.num_computed // bs, len(seq.block_table))
            if full > seq.num_registered:
                self._store_block_keys(seq, full * bs)
                for i in range(seq.num_registered, full):
                    alloc.register(seq.block_table[i], seq.block_keys[i])
                seq.num_registered = full

    def _reserve(self, seq: Sequence, want: int, batch: ScheduledBatch) -> bool:
        """Give `seq` blocks for `want` more tokens, preempting newer sequences if needed."""
        while True:
            need = self.cache.blocks_needed(seq.num_computed + want) - len(seq.block_table)
            if need <= self.cache.allocator.num_free:
                self._grow(seq, want)
                return True
            victim = self.running[-1]
            self._preempt(victim, batch)
            if victim is seq:
                return False

    def _grow(self, seq: Sequence, want: int) -> None:
        need = self.cache.blocks_needed(seq.num_computed + want) - len(seq.block_table)
        if need > 0:
            seq.block_table.extend(self.cache.allocator.allocate(need))

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        if seq in batch.decodes:
            batch.decodes.remove(seq)
        batch.prefills = [(s, n) for s, n in batch.prefills if s is not seq]
        self._release(seq)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        if seq.block_table:
            self.cache.allocator.free(seq.block_table)
            seq.block_table = []
        seq.num_registered = 0
