"""Paged KV cache bookkeeping: fixed-size blocks, reference counts, prefix caching (vLLM PagedAttention).

The KV pool (owned by the runner) is ``num_blocks`` blocks of ``block_size`` token slots. Each sequence
has a block table: logical block i of the sequence lives in physical block ``block_table[i]``, so token
position p is slot ``block_table[p // block_size] * block_size + p % block_size``.

Prefix caching (vLLM "automatic prefix caching"): a *full* block whose K/V are computed is registered
under a chained hash ``hash((parent_hash, tokens_of_block))``, so a block is identified by its whole
prefix. The chain starts from the request's ``SamplingParams.cache_salt`` (vLLM's ``cache_salt``; None for
the shared namespace), so requests with different salts (the HTTP server salts by API key) share no block.
A new sequence whose leading blocks hash the same reuses them (reference count + 1) and skips their prefill.
Blocks with reference count 0 go to a free list in LRU order; a cached one stays reusable until it is handed
out for new data (evicted, least recently used first).

Reference: Kwon et al. 2023, "Efficient Memory Management for Large Language Model Serving with
PagedAttention"; nano-vllm ``block_manager.py``.
"""

from __future__ import annotations

from collections import OrderedDict

from lmstack.serve.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_key: list[tuple | None] = [None] * num_blocks  # (parent_hash, tokens) to rule out collisions
        self.hash_to_block: dict[int, int] = {}
        # free blocks, front = next to hand out; uncached blocks go first, cached ones in LRU order behind
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.prefix_queries = 0  # prompt blocks looked up
        self.prefix_hits = 0

    # ------------------------------------------------------------------ accounting
    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------ allocation
    def _take(self, block: int) -> None:
        if self.ref_count[block] == 0:
            del self.free[block]
        self.ref_count[block] += 1

    def _fresh(self) -> int:
        block, _ = self.free.popitem(last=False)
        h = self.block_hash[block]
        if h is not None:  # evict its cached content
            if self.hash_to_block.get(h) == block:
                del self.hash_to_block[h]
            self.block_hash[block] = None
            self.block_key[block] = None
        self.ref_count[block] = 1
        return block

    @staticmethod
    def _root(seq: Sequence) -> int | None:
        """The parent hash of a sequence's first block: its request's cache salt (None: shared)."""
        salt = seq.request.params.cache_salt if seq.request is not None else None
        return None if salt is None else hash(("cache_salt", salt))

    def match_prefix(self, seq: Sequence) -> int:
        """For a sequence with no blocks: reuse cached full blocks of its tokens. Returns tokens reused.

        At least one token is always left to compute (its logits give the next token)."""
        assert not seq.block_table
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        parent = self._root(seq)
        hashes: list[int] = []
        for i in range(max_blocks):
            key = (parent, tuple(seq.token_ids[i * bs:(i + 1) * bs]))
            h = hash(key)
            self.prefix_queries += 1
            block = self.hash_to_block.get(h)
            if block is None or self.block_key[block] != key:
                break
            self.prefix_hits += 1
            self._take(block)
            seq.block_table.append(block)
            hashes.append(h)
            parent = h
        seq.block_hashes = hashes
        seq.num_hashed_blocks = len(hashes)
        seq.num_computed_tokens = len(hashes) * bs
        return seq.num_computed_tokens

    def ensure_slots(self, seq: Sequence, num_tokens: int) -> bool:
        """Give ``seq`` enough blocks for ``num_tokens`` tokens; False (nothing changed) if the pool is short."""
        need = self.blocks_needed(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need > len(self.free):
            return False
        seq.block_table.extend(self._fresh() for _ in range(need))
        return True

    def free_seq(self, seq: Sequence) -> None:
        """Release a sequence's blocks (finished, aborted or preempted). Cached blocks stay matchable."""
        for block in reversed(seq.block_table):  # tail first: it is the least likely to be shared
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free[block] = None
                if self.block_hash[block] is None:
                    self.free.move_to_end(block, last=False)  # nothing cached: reuse first
        seq.block_table = []
        seq.block_hashes = []
        seq.num_hashed_blocks = 0
        seq.num_computed_tokens = 0

    def uncache(self, blocks: list[int]) -> None:
        """Take these blocks out of the prefix cache (their K/V must not be matched again: non-finite values)."""
        for block in blocks:
            h = self.block_hash[block]
            if h is not None and self.hash_to_block.get(h) == block:
                del self.hash_to_block[h]
            self.block_hash[block] = None
            self.block_key[block] = None

    def register_computed(self, seq: Sequence) -> None:
        """Register the sequence's newly completed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        parent = seq.block_hashes[-1] if seq.block_hashes else self._root(seq)
        for i in range(seq.num_hashed_blocks, full):
            key = (parent, tuple(seq.token_ids[i * bs:(i + 1) * bs]))
            h = hash(key)
            block = seq.block_table[i]
            if h not in self.hash_to_block and self.block_hash[block] is None:
                self.hash_to_block[h] = block
                self.block_hash[block] = h
                self.block_key[block] = key
            seq.block_hashes.append(h)
            parent = h
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)
