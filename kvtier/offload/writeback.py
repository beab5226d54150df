"""Lazy (write-back) store selection: one resumable walk of the device free queue.

A free device block is *safe* when the allocator may evict it without losing
anything: it has no hash, or the first lower tier holds its key (committed).
:class:`WriteBack` walks the free queue from its eviction end (the head) and
plans a store for every hashed block that is neither safe nor being written.
Two rules bound the walk of a step:

* **safety** (bounded only by the first tier's room): it goes on until
  ``target`` safe blocks lie ahead of everything unwritten, so the next
  ``target`` allocations never take an unwritten block, however many stores
  that takes;
* **spreading** (bounded): past that point it goes on writing freed blocks back
  early, up to a per-step *budget* of stores, so the blocks of requests freed
  together are written over the next steps instead of in the one step they
  reach the eviction end. The budget is ``max(target, 2 x rate)``, where rate
  is a moving average of the blocks that joined the queue's tail per step.

The walk resumes where the last one stopped (its *cursor*): every block
ahead of the cursor was found safe or being written, or is unhashed. Since
then the queue can only have lost blocks (taken from the head, or from
anywhere by a prefix hit) or gained unhashed ones at the head; the queue's
counters say how many, so the counts ahead of the cursor stay lower bounds.
The walk starts over from the head when the cursor may have left the queue
(taken, or taken and freed again: then it arrived at the tail or the head
since the last walk), or when the first lower tier dropped blocks (an eviction
or a removal may have made a block ahead of the cursor unsafe).

The step's own reservation evicts blocks too, after the walk counted them:
when it evicted the copy of a block that is free on the device (maybe one the
walk passed as safe), the planner walks again from the head at once
(:meth:`WriteBack.rescan`, the safety part only), so the next allocations
never find such a block among the ones they take. After a few rescans whose
reservations evicted such copies again, one last walk takes nothing (see
:meth:`~kvtier.offload.stores.StorePlanner.plan_lazy`).

The first tier's room bounds what a walk takes: an unwritten block found
past it is left in place, where it was (the queue is not reordered), and
counted in ``dropped_stores`` once for as long as it stays unwritten at the
eviction end from step to step (:meth:`WriteBack.settle`); the next walk
starts over from the head.
"""

from __future__ import annotations

import math

from kvtier.block import KVCacheBlock
from kvtier.free_queue import FreeKVCacheBlockQueue
from kvtier.pool import BlockPool
from kvtier.tiers.base import BlockKey
from kvtier.tiers.index import TierIndex

__all__ = ["WriteBack"]

_RATE_WEIGHT = 0.25  # weight of the latest step in the moving average of arrivals


class WriteBack:
    """Picks the device blocks a lazy step stores (internal to :mod:`kvtier.offload`).

    Args:
        target: Safe blocks to keep at the eviction end of the free queue;
            also the least number of stores a step may plan.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.budget = target
        self._rate = 0.0
        self._cursor: KVCacheBlock | None = None
        self._safe = 0  # safe blocks up to the cursor (a lower bound)
        self._pos = 0  # blocks up to the cursor (a lower bound)
        self._marks = (0, 0, 0, 0)  # queue popped, prepended, removed, length
        self._drops = 0
        self._left: set[BlockKey] = set()  # this step's unwritten blocks that found no room
        self._dropped: set[BlockKey] = set()  # the last step's (counted already)

    def scan(self, pool: BlockPool, first: TierIndex, room: int) -> dict[BlockKey, int]:
        """This step's candidates: key → device block id, safety ones first.

        The candidates are taken out of the queue and referenced, as
        :meth:`~kvtier.pool.BlockPool.touch` would, no more than ``room``:
        the caller stores them all. Every block in the free queue is
        unreferenced, so none of them is being stored (a store references its
        blocks until it ends): no candidate is in flight, and the caller need
        not check.

        Call :meth:`settle` once they are reserved (after any :meth:`rescan`).

        Args:
            pool: The device block pool.
            first: The first lower tier's index.
            room: Stores the first tier can take: the walk takes no more
                candidates (the unwritten blocks the safety part finds past
                them stay in place, counted by :meth:`settle`).
        """
        queue = pool.free_block_queue
        head = queue.fake_free_list_head
        popped = queue.popped - self._marks[0]
        prepended = queue.prepended - self._marks[1]
        removed = queue.removed - self._marks[2]
        arrivals = len(queue) - self._marks[3] + popped + removed - prepended
        self._rate += (max(0, arrivals) - self._rate) * _RATE_WEIGHT
        budget = self.budget = max(self.target, math.ceil(2 * self._rate))

        cursor = self._cursor
        lost = removed + popped
        if (
            cursor is None
            or first.drops != self._drops
            or cursor.ref_cnt
            or cursor.prev_free_block is None
            or lost >= self._pos  # the cursor may have been taken (and freed again)
            or (removed and _returned(cursor, queue, arrivals, prepended))
        ):
            cursor, self._safe, self._pos = head, 0, 0
        else:
            self._safe = max(0, self._safe - lost) + prepended
            self._pos = max(0, self._pos - lost) + prepended
        found: dict[BlockKey, int] = {}
        self._walk(cursor, queue, first, found, room, min(budget, room))
        return found

    def rescan(self, pool: BlockPool, first: TierIndex, room: int) -> dict[BlockKey, int]:
        """Walk again from the head, safety only: the step's reservation evicted blocks.

        The candidates are taken as :meth:`scan` takes them. With ``room``
        0 the walk takes nothing: it only finds (and leaves for
        :meth:`settle` to count) the unwritten blocks at the eviction end.
        """
        queue = pool.free_block_queue
        self._safe = self._pos = 0
        found: dict[BlockKey, int] = {}
        self._walk(queue.fake_free_list_head, queue, first, found, room, 0)
        return found

    def _walk(
        self,
        cursor: KVCacheBlock,
        queue: FreeKVCacheBlockQueue,
        first: TierIndex,
        found: dict[BlockKey, int],
        room: int,
        limit: int,
    ) -> None:
        """Walk on from ``cursor`` (taking up to ``room`` candidates); sets the new cursor.

        ``limit`` (at most ``room``) bounds the spreading part. The cursor is
        the last block passed that stays in the queue, or None (start over)
        when that is the head or an unwritten block was left for want of room.
        """
        head, tail = queue.fake_free_list_head, queue.fake_free_list_tail
        left = self._left
        short = False
        resident, reserved, doomed = first.key_sets()
        pending = bool(doomed)  # else a resident key is a safe one
        target, safe, pos = self.target, self._safe, self._pos
        visits = 4 * self.budget  # passed blocks the spreading part may look at
        count = run = 0  # candidates so far; `run`: the count before the current run
        # Links inside the queue are never None (the tail sentinel ends it).
        block: KVCacheBlock = cursor.next_free_block or tail
        if safe >= target and limit <= 0:
            block = tail
        # Candidates are unlinked as they are passed and the queue is mended
        # once per run of them (`cursor` is the block before the run): what
        # pool.touch does to each, block by block. Safety reached, the walk
        # goes on (spreading) until `limit` candidates or `visits` blocks
        # passed; the tests run after each block.
        while block is not tail:
            key = block.block_hash
            if key is not None and key not in resident and key not in reserved and key not in found:
                if count < room:
                    found[key] = block.block_id
                    count += 1
                    nxt = block.next_free_block
                    block.prev_free_block = block.next_free_block = None
                    block.ref_cnt = 1
                    block = nxt  # type: ignore[assignment]  # in the queue: not None
                    if count >= limit and safe >= target:
                        break
                    continue
                left.add(key)  # no room: it stays where it is, unwritten (not safe)
                short = True
            if count != run:
                queue.close_gap(cursor, block, count - run)
                run = count
            pos += 1  # unhashed, held below, being written by a block of its key, or left
            cursor = block
            if key is None or (key in resident and (not pending or key not in doomed)):
                safe += 1
            if safe >= target:
                visits -= 1
                if count >= limit or visits <= 0:
                    break
            block = block.next_free_block  # type: ignore[assignment]  # in the queue
        if count != run:
            queue.close_gap(cursor, block, count - run)
        self._safe, self._pos = safe, pos
        self._cursor = None if cursor is head or short else cursor

    def restart(self) -> None:
        """Walk from the head next time: the first tier's blocks changed under the cursor."""
        self._cursor = None

    def at_tail(self, pool: BlockPool) -> bool:
        """The walk's cursor is the last block of the queue (nothing left to look at)."""
        cursor = self._cursor
        return (
            cursor is not None
            and not cursor.ref_cnt
            and cursor.prev_free_block is not None
            and cursor.next_free_block is pool.free_block_queue.fake_free_list_tail
        )

    def returned(self, pool: BlockPool, blocks: list[KVCacheBlock]) -> None:
        """Written blocks were just freed while :meth:`at_tail`: pass over them.

        The ones that became free were appended at the tail, in order, and the
        first tier holds them (committed): they are safe, so the next walk
        need not look at them, and they are not counted as arrivals.
        """
        count = sum(1 for block in blocks if not block.ref_cnt and block.block_hash is not None)
        if not count:
            return
        self._cursor = pool.free_block_queue.fake_free_list_tail.prev_free_block
        self._safe += count
        self._pos += count
        popped, prepended, removed, length = self._marks
        self._marks = (popped, prepended, removed, length + count)

    def settle(self, pool: BlockPool, first: TierIndex) -> int:
        """Note the queue's counters once this step's candidates are reserved.

        Returns:
            The unwritten blocks this step's walks left for want of room that
            the last step's did not: a block left step after step counts once.
        """
        queue = pool.free_block_queue
        self._marks = (queue.popped, queue.prepended, queue.removed, len(queue))
        self._drops = first.drops
        new = len(self._left - self._dropped) if self._left else 0
        self._dropped, self._left = self._left, set()
        return new


def _returned(
    block: KVCacheBlock, queue: FreeKVCacheBlockQueue, appended: int, prepended: int
) -> bool:
    """Whether ``block`` is among the blocks the queue gained since the last walk.

    A cursor taken from the middle of the queue (a prefix hit) and freed
    again before the next walk is back in the queue, unreferenced, with a
    ``prev`` link, and its one removal may be fewer than the blocks ahead of
    it (or offset by its own return): only its place tells. Blocks enter the
    queue at the tail (freed with a hash) or at the head (freed without one,
    say evicted from the prefix cache while held), so it is among the last
    ``appended`` or the first ``prepended`` blocks; resuming from it would
    skip, or count twice, the blocks between its old and new places.
    """
    tail = queue.fake_free_list_tail.prev_free_block
    head = queue.fake_free_list_head.next_free_block
    return _among(block, tail, appended, backwards=True) or _among(block, head, prepended)


def _among(
    block: KVCacheBlock, start: KVCacheBlock | None, count: int, *, backwards: bool = False
) -> bool:
    """Whether ``block`` is one of the ``count`` blocks from ``start`` on.

    Walks toward the tail unless ``backwards``; stops at the queue's end.
    """
    other = start
    for _ in range(count):
        if other is None:
            return False
        if other is block:
            return True
        other = other.prev_free_block if backwards else other.next_free_block
    return False
