"""The device block pool: ref counts, the free queue and the prefix-cache index.

Block 0 is the *null block*: it stands for "no block" in block tables (for
example for positions a sliding window has dropped), is never handed out,
freed or hashed, and its ref count is not maintained.

Eviction order. Free blocks wait in :class:`FreeKVCacheBlockQueue`; the head is
reused first. A request's blocks are freed in reverse, so the tail of a chain
is evicted before its head (a hit needs the head). Freed blocks that carry no
hash can never be hit, so they go to the head of the queue, ahead of every
cached block, and are reused first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

from kvtier.block import BlockId, KVCacheBlock
from kvtier.block_map import BlockHashToBlockMap
from kvtier.errors import ConfigError, InvalidRequestError, KVTierError
from kvtier.events import AllBlocksCleared, BlockRemoved, BlockStored, KVCacheEvent
from kvtier.extra_keys import event_extra_keys
from kvtier.free_queue import FreeKVCacheBlockQueue
from kvtier.hashing import (
    BlockHash,
    BlockHashWithGroupId,
    get_block_hash,
    get_group_id,
    make_block_hash_with_group_id,
)
from kvtier.log import get_logger
from kvtier.request import KVCacheRequest, request_lora_id

__all__ = ["MEDIUM_GPU", "BlockPool"]

MEDIUM_GPU = "GPU"
"""The ``medium`` of events from the device prefix cache: ``"GPU"``, vLLM's value."""

_log = get_logger("kvtier.pool")


class BlockPool:
    """All device blocks, their ref counts, the free queue and the hash index.

    Args:
        num_gpu_blocks: Blocks in the device KV cache, the null block included
            (at least 2).
        enable_caching: Keep full blocks in the prefix cache after they are
            freed. When off, nothing is hashed or looked up.
        enable_kv_cache_events: Record :mod:`kvtier.events` for
            :meth:`take_events`.
        medium: The tier name reported in events.

    Raises:
        ConfigError: ``num_gpu_blocks`` is not an integer >= 2.
    """

    def __init__(
        self,
        num_gpu_blocks: int,
        enable_caching: bool = True,
        *,
        enable_kv_cache_events: bool = False,
        medium: str = MEDIUM_GPU,
    ) -> None:
        if isinstance(num_gpu_blocks, bool) or not isinstance(num_gpu_blocks, int):
            raise ConfigError(f"num_gpu_blocks must be an integer, got {num_gpu_blocks!r}")
        if num_gpu_blocks < 2:
            raise ConfigError(
                f"num_gpu_blocks must be >= 2 (block 0 is the null block), got {num_gpu_blocks}"
            )
        self.num_gpu_blocks = num_gpu_blocks
        self.enable_caching = enable_caching
        self.enable_kv_cache_events = enable_kv_cache_events
        self.medium = medium
        self.blocks: list[KVCacheBlock] = [KVCacheBlock(i) for i in range(num_gpu_blocks)]
        self.null_block = self.blocks[0]
        self.null_block.is_null = True
        self.free_block_queue = FreeKVCacheBlockQueue(self.blocks[1:])
        self.cached_block_hash_to_block = BlockHashToBlockMap()
        self.kv_event_queue: list[KVCacheEvent] = []

    # -- lookups ---------------------------------------------------------------

    def get_cached_block(
        self, block_hash: BlockHash, kv_cache_group_ids: Sequence[int]
    ) -> list[KVCacheBlock] | None:
        """Return one cached block per group for ``block_hash``; ``None`` if any misses."""
        out = []
        for group_id in kv_cache_group_ids:
            key = make_block_hash_with_group_id(block_hash, group_id)
            block = self.cached_block_hash_to_block.get_one_block(key)
            if block is None:
                return None
            out.append(block)
        return out

    def get_num_free_blocks(self) -> int:
        """Blocks in the free queue (cached or not)."""
        return self.free_block_queue.num_free_blocks

    def get_usage(self) -> float:
        """Fraction of usable blocks (null block aside) held by requests."""
        return 1.0 - self.free_block_queue.num_free_blocks / (self.num_gpu_blocks - 1)

    # -- caching ---------------------------------------------------------------

    def cache_full_blocks(
        self,
        request: KVCacheRequest,
        blocks: Sequence[KVCacheBlock],
        num_cached_blocks: int,
        num_full_blocks: int,
        block_size: int,
        kv_cache_group_id: int,
        *,
        kv_cache_spec_kind: str | None = None,
    ) -> None:
        """Enter a request's newly full blocks into the prefix cache.

        Blocks ``blocks[num_cached_blocks:num_full_blocks]`` get the request's
        hashes at the same positions. Null blocks and blocks that already carry
        a hash are skipped. Nothing to do when ``num_cached_blocks`` equals
        ``num_full_blocks``.

        Args:
            request: The request; its ``block_hashes`` must cover
                ``num_full_blocks`` blocks.
            blocks: The request's blocks in this group, in sequence order: at
                least ``num_full_blocks`` of them.
            num_cached_blocks: Blocks already cached, ``0 <= num_cached_blocks
                <= num_full_blocks``.
            num_full_blocks: Blocks full now, at most ``len(blocks)``.
            block_size: Tokens per block in this group (> 0).
            kv_cache_group_id: The group, ``0 <= kv_cache_group_id < 2**32``.
            kv_cache_spec_kind: The group's attention kind, for events.

        Raises:
            InvalidRequestError: A count, ``block_size`` or
                ``kv_cache_group_id`` that is not an ``int`` (bools refused)
                in its range; fewer ``blocks`` than ``num_full_blocks``; a
                request with fewer block hashes than ``num_full_blocks``; with
                events on, a request ``lora_id`` that is not a positive
                integer or None. Nothing is changed: no block is hashed, the
                index and the event queue are as they were.
        """
        if not (
            type(num_cached_blocks) is int
            and type(num_full_blocks) is int
            and 0 <= num_cached_blocks <= num_full_blocks <= len(blocks)
            and type(block_size) is int
            and block_size > 0
            and type(kv_cache_group_id) is int
            and 0 <= kv_cache_group_id < 2**32
        ):
            _refuse_cache_arguments(
                blocks, num_cached_blocks, num_full_blocks, block_size, kv_cache_group_id
            )
        if num_cached_blocks == num_full_blocks:
            return
        hashes = request.block_hashes
        if len(hashes) < num_full_blocks:
            raise InvalidRequestError(
                f"request {request.request_id!r} has {len(hashes)} block hashes, "
                f"{num_full_blocks} needed: was it created with a block hasher of "
                f"block size {block_size}?"
            )
        suffix = kv_cache_group_id.to_bytes(4, "big")
        cache = self.cached_block_hash_to_block._cache
        insert = self.cached_block_hash_to_block.insert
        events = self.enable_kv_cache_events
        lora_id = request_lora_id(request) if events else None  # checked before any change
        extra = (
            event_extra_keys(request, range(num_cached_blocks, num_full_blocks), block_size)
            if events
            else None
        )
        stored: list[BlockHash] | None = [] if events else None
        stored_extra: list[tuple[Any, ...] | None] = []
        for index in range(num_cached_blocks, num_full_blocks):
            block = blocks[index]
            if block.is_null or block.block_hash is not None:
                continue
            block_hash = hashes[index]
            key = BlockHashWithGroupId(block_hash + suffix)
            block.block_hash = key
            if key in cache:
                insert(key, block)
            else:
                cache[key] = block
            if stored is not None and extra is not None:
                stored.append(block_hash)
                stored_extra.append(extra[index - num_cached_blocks])
        if stored:
            self.kv_event_queue.append(
                BlockStored(
                    block_hashes=stored,
                    parent_block_hash=hashes[num_cached_blocks - 1] if num_cached_blocks else None,
                    token_ids=list(
                        request.all_token_ids[
                            num_cached_blocks * block_size : num_full_blocks * block_size
                        ]
                    ),
                    block_size=block_size,
                    lora_name=request.lora_name,
                    medium=self.medium,
                    group_idx=kv_cache_group_id,
                    lora_id=lora_id,
                    kv_cache_spec_kind=kv_cache_spec_kind,
                    extra_keys=stored_extra,
                )
            )

    def maybe_evict_cached_block(self, block: KVCacheBlock) -> bool:
        """Drop ``block`` from the prefix cache if it is in it.

        Returns:
            True when the block was cached (a ``BlockRemoved`` event is
            recorded), False otherwise.
        """
        key = block.block_hash
        if key is None:
            return False
        block.block_hash = None
        if self.cached_block_hash_to_block.pop(key, block.block_id) is None:
            return False
        if self.enable_kv_cache_events:
            self.kv_event_queue.append(
                BlockRemoved(
                    block_hashes=[get_block_hash(key)],
                    medium=self.medium,
                    group_idx=get_group_id(key),
                )
            )
        return True

    # -- allocation --------------------------------------------------------------

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Take ``num_blocks`` blocks from the head of the free queue.

        A taken block that still carries a hash is evicted from the prefix
        cache. Each returned block has ref count 1.

        Raises:
            NoFreeBlocksError: Fewer than ``num_blocks`` blocks are free.
        """
        blocks = self.free_block_queue.popleft_n(num_blocks)
        if self.enable_caching:
            evict = self.maybe_evict_cached_block
            for block in blocks:
                if block.block_hash is not None:
                    evict(block)
                block.ref_cnt = 1
        else:
            for block in blocks:
                block.ref_cnt = 1
        return blocks

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on each block, pulling free ones out of the queue.

        Used for prefix-cache hits: a hit block that is free (ref count 0) is
        an eviction candidate until it is touched.
        """
        remove = self.free_block_queue.remove
        for block in blocks:
            if block.is_null:
                continue
            if block.ref_cnt == 0:
                remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Release one reference on each block.

        Blocks whose ref count drops to 0 join the free queue: unhashed ones at
        the head (in the given order), cached ones at the tail (in the given
        order), so pass a request's blocks tail first.

        Raises:
            KVTierError: A block was already free; nothing is changed.
        """
        blocks = list(ordered_blocks)
        evict_first: list[KVCacheBlock] = []
        evict_last: list[KVCacheBlock] = []
        for index, block in enumerate(blocks):
            if block.is_null:
                continue
            ref_cnt = block.ref_cnt - 1
            if ref_cnt < 0:
                for done in blocks[:index]:
                    if not done.is_null:
                        done.ref_cnt += 1
                raise KVTierError(f"block {block.block_id} freed while already free")
            block.ref_cnt = ref_cnt
            if ref_cnt == 0:
                if block.block_hash is None:
                    evict_first.append(block)
                else:
                    evict_last.append(block)
        self.free_block_queue.prepend_n(evict_first)
        self.free_block_queue.append_n(evict_last)

    def evict_blocks(self, block_ids: Iterable[BlockId]) -> int:
        """Drop the given blocks from the prefix cache (they stay allocated or free).

        Returns:
            How many of them were cached.

        Raises:
            InvalidRequestError: An id is not an integer or is out of range;
                nothing is evicted.
        """
        ids = list(block_ids)
        for block_id in ids:
            if (
                isinstance(block_id, bool)
                or not isinstance(block_id, int)
                or not 0 <= block_id < self.num_gpu_blocks
            ):
                raise InvalidRequestError(
                    f"block id {block_id!r} is not an integer in [0, {self.num_gpu_blocks})"
                )
        return sum(self.maybe_evict_cached_block(self.blocks[i]) for i in ids)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block, if no block is in use.

        Returns:
            True on success; False (and nothing changed) while any block is
            held by a request.
        """
        num_used = self.num_gpu_blocks - 1 - self.free_block_queue.num_free_blocks
        if num_used:
            _log.warning("reset_prefix_cache_refused", blocks_in_use=num_used)
            return False
        self.cached_block_hash_to_block.clear()
        for block in self.blocks:
            block.block_hash = None
        if self.enable_kv_cache_events:
            self.kv_event_queue.append(AllBlocksCleared(medium=self.medium))
        return True

    def take_events(self) -> list[KVCacheEvent]:
        """Return the events recorded since the last call, and forget them."""
        events, self.kv_event_queue = self.kv_event_queue, []
        return events


def _refuse_cache_arguments(
    blocks: Sequence[KVCacheBlock],
    num_cached_blocks: int,
    num_full_blocks: int,
    block_size: int,
    kv_cache_group_id: int,
) -> NoReturn:
    """Raise the :class:`InvalidRequestError` that explains bad ``cache_full_blocks`` arguments."""
    for name, value in (
        ("num_cached_blocks", num_cached_blocks),
        ("num_full_blocks", num_full_blocks),
        ("block_size", block_size),
        ("kv_cache_group_id", kv_cache_group_id),
    ):
        if type(value) is not int:
            raise InvalidRequestError(f"{name} must be an int, got {value!r}")
    if block_size <= 0:
        raise InvalidRequestError(f"block_size must be > 0, got {block_size}")
    if not 0 <= kv_cache_group_id < 2**32:
        raise InvalidRequestError(
            f"kv_cache_group_id must be in [0, 2**32), got {kv_cache_group_id}"
        )
    if not 0 <= num_cached_blocks <= num_full_blocks:
        raise InvalidRequestError(
            f"need 0 <= num_cached_blocks <= num_full_blocks, got {num_cached_blocks} "
            f"and {num_full_blocks}"
        )
    raise InvalidRequestError(
        f"num_full_blocks is {num_full_blocks} but only {len(blocks)} blocks were given"
    )
