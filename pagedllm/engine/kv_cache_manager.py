"""Paged KV cache bookkeeping: a block pool with ref counts, LRU free list and prefix cache.

Blocks hold `block_size` tokens of K/V for every layer. A request owns a list of blocks (its
block table). With prefix caching, every full block is named by a hash of (parent hash,
its token ids); a later request with the same prefix takes those blocks by ref count instead
of recomputing them. Freed blocks keep their hash until evicted (least recently used first).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from pagedllm.engine.request import Request
from pagedllm.utils import cdiv

_ROOT_HASH = b"pagedllm"


def hash_block(parent: bytes | None, token_ids: Iterable[int]) -> bytes:
    """Hash of a full block, chained on its parent block's hash."""
    h = hashlib.sha256(parent or _ROOT_HASH)
    h.update(",".join(map(str, token_ids)).encode())
    return h.digest()


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None


class BlockPool:
    """All KV blocks, the free queue (LRU order) and the hash -> cached block map."""

    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Free blocks, least recently freed first: evicted from the front.
        self.free_queue: OrderedDict[int, KVBlock] = OrderedDict(
            (b.block_id, b) for b in self.blocks
        )
        self.cached: dict[bytes, KVBlock] = {}
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_cached_free_blocks(self) -> int:
        return sum(1 for b in self.free_queue.values() if b.block_hash is not None)

    def get_new_blocks(self, n: int) -> list[KVBlock]:
        if n > len(self.free_queue):
            raise RuntimeError(f"asked for {n} blocks, {len(self.free_queue)} free")
        out = []
        for _ in range(n):
            _, block = self.free_queue.popitem(last=False)
            if block.block_hash is not None:
                if self.cached.get(block.block_hash) is block:
                    del self.cached[block.block_hash]
                block.block_hash = None
                self.num_evictions += 1
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on cached blocks (removing them from the free queue)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[KVBlock]) -> None:
        """Drop a reference; blocks reaching zero join the free queue's tail (MRU end)."""
        for block in blocks:
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, "block freed twice"
            if block.ref_cnt == 0:
                self.free_queue[block.block_id] = block

    def lookup(self, block_hash: bytes) -> KVBlock | None:
        return self.cached.get(block_hash)

    def cache_block(self, block: KVBlock, block_hash: bytes) -> None:
        if block.block_hash is not None:
            return
        block.block_hash = block_hash
        self.cached.setdefault(block_hash, block)

    def reset_prefix_cache(self) -> bool:
        if len(self.free_queue) != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self.cached.clear()
        return True


class KVCacheManager:
    """Allocates and frees the blocks of requests; finds prefix-cache hits."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self.req_block_ids: dict[str, list[int]] = {}
        self.req_num_cached: dict[str, int] = {}  # leading blocks already registered
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # tokens found there

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    def _update_hashes(self, request: Request) -> None:
        """Extend request.block_hashes over every full block of its known tokens."""
        hashes = request.block_hashes
        tokens = request.all_token_ids
        bs = self.block_size
        for i in range(len(hashes), len(tokens) // bs):
            hashes.append(hash_block(hashes[-1] if hashes else None, tokens[i * bs:(i + 1) * bs]))

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest cached prefix of the request, in whole blocks; never its last token.
        Requests with prompt_logprobs get none (as in vLLM): every prompt position must
        be computed to score it."""
        if not self.enable_caching or request.wants_prompt_logprobs:
            return [], 0
        self._update_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        self.prefix_queries += request.num_tokens
        self.prefix_hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[KVBlock] | None = None,
                       num_lookahead_tokens: int = 0) -> list[KVBlock] | None:
        """Give the request room for num_new_tokens more tokens (after any cached prefix
        in computed_blocks), plus `num_lookahead_tokens` slots past them that this step
        writes without computing them for good (a draft model's proposals). Returns the
        new blocks, or None when too few are free."""
        rid = request.request_id
        blocks = self.req_blocks.get(rid)
        if not computed_blocks and blocks is not None:
            # Fast path for running requests (decodes): often no new block is needed.
            total = request.num_computed_tokens + num_new_tokens
            num_needed = cdiv(total + num_lookahead_tokens, self.block_size) - len(blocks)
            if num_needed <= 0:
                if (self.enable_caching and total // self.block_size
                        > self.req_num_cached.get(rid, 0)):
                    self._cache_full_blocks(request, blocks, total)
                return []
        computed_blocks = computed_blocks or []
        blocks = blocks or []
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        total = num_computed + num_new_tokens
        num_needed = (cdiv(total + num_lookahead_tokens, self.block_size) - len(blocks)
                      - len(computed_blocks))
        # Cached blocks held only by the free queue count as free but would be taken.
        num_evictable_hits = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if num_needed > self.pool.num_free_blocks - num_evictable_hits:
            return None
        if computed_blocks:
            self.pool.touch(computed_blocks)
        new_blocks = self.pool.get_new_blocks(max(num_needed, 0))
        added = computed_blocks + new_blocks
        blocks = blocks + added
        self.req_blocks[rid] = blocks
        self.req_block_ids.setdefault(rid, []).extend(b.block_id for b in added)
        if self.enable_caching:
            self._cache_full_blocks(request, blocks, total)
        return new_blocks

    def _cache_full_blocks(self, request: Request, blocks: list[KVBlock], total: int) -> None:
        """Register the blocks that are full once this step's tokens are computed."""
        rid = request.request_id
        done = self.req_num_cached.get(rid, 0)
        if total // self.block_size <= done:
            return
        self._update_hashes(request)
        num_full = min(total // self.block_size, len(request.block_hashes))
        for i in range(done, num_full):
            if blocks[i].block_hash is None:
                self.pool.cache_block(blocks[i], request.block_hashes[i])
        self.req_num_cached[rid] = max(done, num_full)

    def rollback(self, request: Request, num_tokens: int) -> int:
        """Free the request's blocks past the first cdiv(num_tokens, block_size): the slots
        of rejected draft tokens. Those blocks hold no known token, so none is registered in
        the prefix cache. Returns the number of blocks the request keeps."""
        rid = request.request_id
        blocks = self.req_blocks.get(rid, [])
        keep = cdiv(num_tokens, self.block_size)
        if len(blocks) > keep:
            dropped = blocks[keep:]
            assert all(b.block_hash is None for b in dropped), "a rolled-back block was cached"
            del blocks[keep:]
            del self.req_block_ids[rid][keep:]
            self.pool.free_blocks(reversed(dropped))
        return len(blocks)

    def fork(self, parent: Request, child: Request) -> list[tuple[int, int]] | None:
        """Give `child` the parent's computed blocks: full blocks by reference (ref count),
        a partially filled last block as a new block to be copied from the parent's
        (copy-on-write: both will write their next tokens into it). Returns the (src, dst)
        block copies to make before the child's next step, or None (nothing done) when no
        free block is left for the copy."""
        blocks = self.req_blocks.get(parent.request_id, [])
        num_full = parent.num_computed_tokens // self.block_size
        shared, partial = blocks[:num_full], blocks[num_full:]
        if len(partial) > self.pool.num_free_blocks:
            return None
        self.pool.touch(shared)
        copies = self.pool.get_new_blocks(len(partial))
        rid = child.request_id
        self.req_blocks[rid] = shared + copies
        self.req_block_ids[rid] = [b.block_id for b in self.req_blocks[rid]]
        self.req_num_cached[rid] = min(self.req_num_cached.get(parent.request_id, 0), num_full)
        # Hashes of the shared prompt blocks hold for the child too (same tokens).
        child.block_hashes = parent.block_hashes[:num_full]
        return [(src.block_id, dst.block_id) for src, dst in zip(partial, copies)]

    def free(self, request: Request) -> None:
        """Return a request's blocks, tail first (so its tail is evicted before its head)."""
        blocks = self.req_blocks.pop(request.request_id, [])
        self.req_block_ids.pop(request.request_id, None)
        self.req_num_cached.pop(request.request_id, None)
        self.pool.free_blocks(reversed(blocks))

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table (a live list owned by the manager: do not modify)."""
        return self.req_block_ids.get(request_id, [])

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()
