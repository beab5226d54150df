"""Per-block metadata of the device KV cache."""

from __future__ import annotations

import attrs

from kvtier.hashing import BlockHashWithGroupId

__all__ = ["BlockId", "KVCacheBlock"]

BlockId = int
"""Index of a block in the device KV cache (0 is the null block)."""


@attrs.define(eq=False, weakref_slot=False, repr=False)
class KVCacheBlock:
    """Metadata of one device block: its id, ref count, hash and free-list links.

    Blocks compare by identity. ``prev_free_block`` / ``next_free_block`` belong
    to :class:`~kvtier.free_queue.FreeKVCacheBlockQueue` and are ``None`` while
    the block is not in the queue.

    Attributes:
        block_id: Index in the KV cache tensors.
        ref_cnt: Requests holding the block (0 means free).
        block_hash: The prefix-cache key when the block is full and cached.
        prev_free_block: Previous block in the free queue.
        next_free_block: Next block in the free queue.
        is_null: True for the null block (id 0), which stands for "no block"
            and is never handed out, freed or hashed.
    """

    block_id: BlockId
    ref_cnt: int = 0
    block_hash: BlockHashWithGroupId | None = None
    prev_free_block: KVCacheBlock | None = None
    next_free_block: KVCacheBlock | None = None
    is_null: bool = False

    def reset_hash(self) -> None:
        """Forget the block's hash (when it is evicted from the prefix cache)."""
        self.block_hash = None

    def __repr__(self) -> str:
        return (
            f"KVCacheBlock(block_id={self.block_id}, ref_cnt={self.ref_cnt}, "
            f"cached={self.block_hash is not None}{', null' if self.is_null else ''})"
        )
