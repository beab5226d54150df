"""The prefix cache's index: block hash (with group id) → cached blocks.

Two requests can compute the same block at the same time, so one key may map
to several blocks. The common case of one block per key stores the block
itself; only a duplicated key pays for an inner ``{block_id: block}`` dict.
"""

from __future__ import annotations

from collections.abc import Iterator

from kvtier.block import BlockId, KVCacheBlock
from kvtier.hashing import BlockHashWithGroupId

__all__ = ["BlockHashToBlockMap"]


class BlockHashToBlockMap:
    """Maps a prefix-cache key to the cached blocks that carry it."""

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache: dict[BlockHashWithGroupId, KVCacheBlock | dict[BlockId, KVCacheBlock]] = {}

    def __len__(self) -> int:
        """The number of distinct keys."""
        return len(self._cache)

    def __bool__(self) -> bool:
        return bool(self._cache)

    def __contains__(self, key: object) -> bool:
        return key in self._cache

    def __iter__(self) -> Iterator[BlockHashWithGroupId]:
        return iter(self._cache)

    def get_one_block(self, key: BlockHashWithGroupId) -> KVCacheBlock | None:
        """Return a block cached under ``key`` (the oldest one), or ``None``."""
        blocks = self._cache.get(key)
        if blocks is None or type(blocks) is KVCacheBlock:
            return blocks
        return next(iter(blocks.values()))  # type: ignore[union-attr]

    def get_blocks(self, key: BlockHashWithGroupId) -> list[KVCacheBlock]:
        """Return every block cached under ``key``, oldest first."""
        blocks = self._cache.get(key)
        if blocks is None:
            return []
        if isinstance(blocks, KVCacheBlock):
            return [blocks]
        return list(blocks.values())

    def insert(self, key: BlockHashWithGroupId, block: KVCacheBlock) -> None:
        """Cache ``block`` under ``key``, beside any block already there."""
        blocks = self._cache.get(key)
        if blocks is None:
            self._cache[key] = block
        elif isinstance(blocks, KVCacheBlock):
            if blocks is not block:
                self._cache[key] = {blocks.block_id: blocks, block.block_id: block}
        else:
            blocks[block.block_id] = block

    def pop(self, key: BlockHashWithGroupId, block_id: BlockId) -> KVCacheBlock | None:
        """Remove the block ``block_id`` from under ``key``.

        Returns:
            The removed block, or ``None`` when ``key`` does not map to it.
        """
        blocks = self._cache.get(key)
        if blocks is None:
            return None
        if isinstance(blocks, KVCacheBlock):
            if blocks.block_id != block_id:
                return None
            del self._cache[key]
            return blocks
        block = blocks.pop(block_id, None)
        if block is not None and len(blocks) == 1:
            self._cache[key] = next(iter(blocks.values()))
        return block

    def clear(self) -> None:
        """Forget every key."""
        self._cache.clear()
