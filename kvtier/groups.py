"""Per-group block management: which blocks a request holds in one KV cache group.

Each KV cache group has a manager that knows its attention kind: how far a
prefix hit reaches, how many blocks a request needs, which blocks it may drop.
:class:`FullAttentionManager` is the full-attention kind. Sliding-window and
Mamba-state kinds implement the same :class:`GroupManager` protocol.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from itertools import islice
from typing import Protocol

from kvtier.block import KVCacheBlock
from kvtier.hashing import BlockHash
from kvtier.pool import BlockPool
from kvtier.request import KVCacheRequest
from kvtier.spec import FullAttentionSpec

__all__ = ["FullAttentionManager", "GroupManager", "make_group_manager"]


class GroupManager(Protocol):
    """The per-group half of :class:`~kvtier.manager.KVCacheManager`."""

    group_id: int
    block_size: int
    req_to_blocks: dict[str, list[KVCacheBlock]]
    num_cached_block: dict[str, int]

    def find_longest_cache_hit(
        self, block_hashes: Sequence[BlockHash], max_num_blocks: int
    ) -> list[KVCacheBlock]:
        """Return the cached blocks of the longest hit prefix, at most ``max_num_blocks``."""
        ...

    def get_num_blocks_to_allocate(
        self, request_id: str, num_tokens: int, new_computed_blocks: Sequence[KVCacheBlock]
    ) -> int:
        """Free blocks needed to hold ``num_tokens`` tokens.

        Computed blocks that would leave the free queue count too.
        """
        ...

    def save_new_computed_blocks(
        self, request_id: str, new_computed_blocks: Sequence[KVCacheBlock]
    ) -> None:
        """Record prefix-hit blocks as the start of a new request's blocks."""
        ...

    def allocate_new_blocks(self, request_id: str, num_tokens: int) -> list[KVCacheBlock]:
        """Allocate blocks so the request can hold ``num_tokens`` tokens."""
        ...

    def cache_blocks(self, request: KVCacheRequest, num_tokens: int) -> None:
        """Cache the request's blocks that are full within ``num_tokens``."""
        ...

    def free(self, request_id: str) -> None:
        """Release the request's blocks, tail first. Unknown ids are ignored."""
        ...


class FullAttentionManager:
    """Block management for a full-attention group.

    Args:
        spec: The group's spec.
        block_pool: The pool shared by all groups.
        group_id: The group's id (part of its cache keys).
    """

    __slots__ = (
        "_suffix",
        "block_pool",
        "block_size",
        "group_id",
        "num_cached_block",
        "req_to_blocks",
    )

    def __init__(self, spec: FullAttentionSpec, block_pool: BlockPool, group_id: int) -> None:
        self.block_pool = block_pool
        self.block_size = spec.block_size
        self.group_id = group_id
        self._suffix = group_id.to_bytes(4, "big")
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self.num_cached_block: dict[str, int] = {}

    def find_longest_cache_hit(
        self, block_hashes: Sequence[BlockHash], max_num_blocks: int
    ) -> list[KVCacheBlock]:
        """Return the cached blocks of the longest hit prefix."""
        cache = self.block_pool.cached_block_hash_to_block._cache
        get = cache.get
        suffix = self._suffix
        hit: list[KVCacheBlock] = []
        append = hit.append
        for block_hash in islice(block_hashes, max_num_blocks):
            block = get(block_hash + suffix)  # type: ignore[call-overload]
            if block is None:
                break
            if type(block) is not KVCacheBlock:
                block = next(iter(block.values()))
            append(block)
        return hit

    def get_num_blocks_to_allocate(
        self, request_id: str, num_tokens: int, new_computed_blocks: Sequence[KVCacheBlock]
    ) -> int:
        """Free blocks needed to hold ``num_tokens`` tokens."""
        held = self.req_to_blocks.get(request_id)
        num_required = -(-num_tokens // self.block_size)
        num_new = num_required - len(new_computed_blocks) - (len(held) if held else 0)
        num_evictable = 0
        for block in new_computed_blocks:
            if block.ref_cnt == 0 and not block.is_null:
                num_evictable += 1
        return max(num_new, 0) + num_evictable

    def save_new_computed_blocks(
        self, request_id: str, new_computed_blocks: Sequence[KVCacheBlock]
    ) -> None:
        """Record prefix-hit blocks as the start of a new request's blocks."""
        if request_id not in self.num_cached_block:
            self.req_to_blocks[request_id] = list(new_computed_blocks)
            self.num_cached_block[request_id] = len(new_computed_blocks)

    def allocate_new_blocks(self, request_id: str, num_tokens: int) -> list[KVCacheBlock]:
        """Allocate blocks so the request can hold ``num_tokens`` tokens."""
        held = self.req_to_blocks.get(request_id)
        if held is None:
            held = self.req_to_blocks[request_id] = []
            self.num_cached_block[request_id] = 0
        num_new = -(-num_tokens // self.block_size) - len(held)
        if num_new <= 0:
            return []
        new = self.block_pool.get_new_blocks(num_new)
        held.extend(new)
        return new

    def cache_blocks(self, request: KVCacheRequest, num_tokens: int) -> None:
        """Cache the request's blocks that are full within ``num_tokens``.

        Blocks beyond the request's known hashes (a request without a block
        hasher) are left uncached.
        """
        request_id = request.request_id
        num_cached = self.num_cached_block.get(request_id, 0)
        # operator.index: an engine's counts may be NumPy integers (the pool takes ints).
        num_full = operator.index(min(num_tokens // self.block_size, len(request.block_hashes)))
        if num_cached >= num_full:
            return
        self.block_pool.cache_full_blocks(
            request,
            self.req_to_blocks[request_id],
            num_cached,
            num_full,
            self.block_size,
            self.group_id,
            kv_cache_spec_kind=FullAttentionSpec.kind,
        )
        self.num_cached_block[request_id] = num_full

    def free(self, request_id: str) -> None:
        """Release the request's blocks, tail first. Unknown ids are ignored."""
        blocks = self.req_to_blocks.pop(request_id, None)
        self.num_cached_block.pop(request_id, None)
        if blocks:
            self.block_pool.free_blocks(reversed(blocks))


def make_group_manager(
    spec: FullAttentionSpec, block_pool: BlockPool, group_id: int
) -> GroupManager:
    """Build the manager for a group's attention kind."""
    return FullAttentionManager(spec, block_pool, group_id)
