"""The free block queue: an intrusive doubly linked list of free blocks.

The head is evicted (reused) first. Unlike :class:`collections.deque`, a block
can be taken out of the middle in O(1) when a prefix-cache hit revives it. The
links live on the blocks themselves, so the queue allocates nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from kvtier.block import KVCacheBlock
from kvtier.errors import NoFreeBlocksError

__all__ = ["FreeKVCacheBlockQueue"]


class FreeKVCacheBlockQueue:
    """Free blocks in eviction order, head first.

    Two sentinel blocks (``fake_free_list_head`` and ``fake_free_list_tail``,
    id -1) bound the list, so no operation tests for an empty end.

    Args:
        blocks: The initial free blocks, head first.
    """

    __slots__ = (
        "fake_free_list_head",
        "fake_free_list_tail",
        "num_free_blocks",
        "popped",
        "prepended",
        "removed",
    )

    def __init__(self, blocks: Sequence[KVCacheBlock]) -> None:
        self.num_free_blocks = 0
        # Cumulative counts of blocks taken from the head, put at the head and
        # taken from anywhere: they let a scanner tell what changed ahead of it.
        self.popped = self.prepended = self.removed = 0
        head = self.fake_free_list_head = KVCacheBlock(-1)
        tail = self.fake_free_list_tail = KVCacheBlock(-1)
        head.next_free_block = tail
        tail.prev_free_block = head
        self.append_n(blocks)

    def __len__(self) -> int:
        return self.num_free_blocks

    def popleft(self) -> KVCacheBlock:
        """Remove and return the head block.

        Raises:
            NoFreeBlocksError: The queue is empty.
        """
        return self.popleft_n(1)[0]

    def popleft_n(self, n: int) -> list[KVCacheBlock]:
        """Remove and return the first ``n`` blocks, head first.

        Raises:
            NoFreeBlocksError: Fewer than ``n`` blocks are free.
        """
        if n > self.num_free_blocks:
            raise NoFreeBlocksError(f"asked for {n} free blocks, {self.num_free_blocks} are free")
        if n <= 0:
            return []
        out: list[KVCacheBlock] = []
        append = out.append
        block = self.fake_free_list_head.next_free_block
        for _ in range(n):
            append(block)  # type: ignore[arg-type]
            nxt = block.next_free_block  # type: ignore[union-attr]
            block.prev_free_block = block.next_free_block = None  # type: ignore[union-attr]
            block = nxt
        self.fake_free_list_head.next_free_block = block
        block.prev_free_block = self.fake_free_list_head  # type: ignore[union-attr]
        self.num_free_blocks -= n
        self.popped += n
        return out

    def remove(self, block: KVCacheBlock) -> None:
        """Take ``block`` out of the queue, wherever it is.

        Raises:
            ValueError: ``block`` is not in the queue.
        """
        prev, nxt = block.prev_free_block, block.next_free_block
        if prev is None or nxt is None:
            raise ValueError(f"block {block.block_id} is not in the free queue")
        prev.next_free_block = nxt
        nxt.prev_free_block = prev
        block.prev_free_block = block.next_free_block = None
        self.num_free_blocks -= 1
        self.removed += 1

    def close_gap(self, before: KVCacheBlock, after: KVCacheBlock | None, count: int) -> None:
        """Link ``before`` to ``after`` once the caller unlinked the ``count`` blocks between.

        The batch form of :meth:`remove` for a walk that takes a run of
        consecutive blocks as it passes them: it clears each taken block's
        links itself (``None``, as :meth:`remove` leaves them), then calls
        this once per run. ``before`` and ``after`` stay in the queue (either
        may be a sentinel; ``after`` is ``None`` only past the tail, which a
        walk never is).
        """
        before.next_free_block = after
        if after is not None:
            after.prev_free_block = before
        self.num_free_blocks -= count
        self.removed += count

    def append(self, block: KVCacheBlock) -> None:
        """Put ``block`` at the tail (evicted last)."""
        self.append_n((block,))

    def append_n(self, blocks: Sequence[KVCacheBlock]) -> None:
        """Put ``blocks`` at the tail, in order (the last one is evicted last)."""
        if not blocks:
            return
        tail = self.fake_free_list_tail
        prev = tail.prev_free_block
        for block in blocks:
            block.prev_free_block = prev
            prev.next_free_block = block  # type: ignore[union-attr]
            prev = block
        prev.next_free_block = tail  # type: ignore[union-attr]
        tail.prev_free_block = prev
        self.num_free_blocks += len(blocks)

    def prepend_n(self, blocks: Sequence[KVCacheBlock]) -> None:
        """Put ``blocks`` at the head, in order (the first one is evicted first)."""
        if not blocks:
            return
        head = self.fake_free_list_head
        nxt = head.next_free_block
        prev = head
        for block in blocks:
            block.prev_free_block = prev
            prev.next_free_block = block
            prev = block
        prev.next_free_block = nxt
        nxt.prev_free_block = prev  # type: ignore[union-attr]
        self.num_free_blocks += len(blocks)
        self.prepended += len(blocks)

    def iter_after(self, block: KVCacheBlock) -> Iterator[KVCacheBlock]:
        """The free blocks after ``block`` (which must be in the queue), toward the tail."""
        tail = self.fake_free_list_tail
        current = block.next_free_block
        while current is not tail and current is not None:
            yield current
            current = current.next_free_block

    def __iter__(self) -> Iterator[KVCacheBlock]:
        block = self.fake_free_list_head.next_free_block
        tail = self.fake_free_list_tail
        while block is not tail and block is not None:
            yield block
            block = block.next_free_block

    def get_all_free_blocks(self) -> list[KVCacheBlock]:
        """All free blocks, head (evicted first) to tail."""
        return list(self)
