"""Which device blocks a step may store, per write mode (pure selection, no I/O).

Each function returns *columns*: the blocks of one position (one per KV cache
group) with the id of the request they came from ("" when none). The manager
then drops null, unhashed, in-flight and already-held blocks and reserves
slots for the rest.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

from kvtier.block import KVCacheBlock
from kvtier.hashing import BlockHash
from kvtier.offload._state import RequestState
from kvtier.offload.plan import SchedulerOutput
from kvtier.pool import BlockPool
from kvtier.tiers.index import TierIndex

__all__ = ["Column", "HitCounter", "LazyScanner", "eager", "selective", "track_blocks"]

Column = tuple[list[KVCacheBlock], str]


def track_blocks(requests: dict[str, RequestState], out: SchedulerOutput, num_groups: int) -> None:
    """Update the requests' live block ids from the step's scheduler output."""
    for rid in out.preempted:
        state = requests.get(rid)
        if state is not None:
            state.block_ids = [[] for _ in range(num_groups)]
            state.stored_upto = 0
    for rid, ids in out.new_requests.items():
        state = requests.get(rid)
        fresh = [list(group) for group in ids]
        if state is None:
            requests[rid] = RequestState(rid, fresh)
        else:
            state.block_ids, state.stored_upto = fresh, 0
    for rid, added in out.cached_requests.items():
        state = requests.get(rid)
        if state is not None and added is not None:
            for group, more in zip(state.block_ids, added, strict=True):
                group.extend(more)


def eager(
    pool: BlockPool, requests: Mapping[str, RequestState], out: SchedulerOutput
) -> list[Column]:
    """Write-through: the scheduled requests' blocks that became full and hashed.

    Each request keeps a cursor, so a block is considered once: chunked
    prefill yields only the blocks each chunk completed.
    """
    blocks = pool.blocks
    found: list[Column] = []
    for rid in out.num_scheduled_tokens:
        state = requests.get(rid)
        if state is None or not state.block_ids:
            continue
        group0 = state.block_ids[0]
        position = state.stored_upto
        while position < len(group0):
            column = [blocks[ids[position]] for ids in state.block_ids]
            if any(b.block_hash is None and not b.is_null for b in column):
                break  # not full, or not computed yet
            found.append((column, rid))
            position += 1
        state.stored_upto = position
    return found


class LazyScanner:
    """Write-back: keeps the ``target`` blocks next to be evicted safe to evict.

    Walks the device free queue from its eviction end. A block is *safe* when
    it has no hash or the first lower tier holds its key; a hashed block that
    is neither safe nor being written already becomes a candidate. Candidates
    leave the free queue while they are copied, so they do not count: the
    walk goes on until ``target`` safe blocks lie ahead of everything unsafe
    (or the queue ends), so the next ``target`` allocations never take an
    unwritten block; its cost is the safe blocks it adds plus the candidates.

    The walk resumes where the last one stopped. Blocks ahead of that point
    were all safe, candidates or being written; since then the queue can only
    have lost blocks from its head (allocations) or gained unhashed ones there
    (both known from the queue's counters). When a block was taken from
    anywhere else (a prefix hit), or the point itself left the queue, the walk
    starts over from the head.

    Args:
        target: Safe blocks to keep at the eviction end.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.verified: dict[int, bytes] = {}  # block id -> key found held below
        self._cursor: KVCacheBlock | None = None
        self._safe = 0
        self._marks = (0, 0, 0)

    def scan(self, pool: BlockPool, first: TierIndex, in_flight: set[int]) -> list[Column]:
        """This step's candidates; call :meth:`settle` once they are referenced."""
        queue = pool.free_block_queue
        popped = queue.popped - self._marks[0]
        prepended = queue.prepended - self._marks[1]
        removed = queue.removed - self._marks[2]
        cursor = self._cursor
        blocks: Iterable[KVCacheBlock]
        if (
            cursor is not None
            and removed == 0
            and popped < self._safe
            and cursor.ref_cnt == 0
            and cursor.prev_free_block is not None
        ):
            safe = self._safe - popped + prepended
            blocks = queue.iter_after(cursor)
        else:
            safe, cursor, blocks = 0, None, queue
        found: list[Column] = []
        verified = self.verified
        for block in blocks:
            if safe >= self.target:
                break
            key = block.block_hash
            if key is None or verified.get(block.block_id) == key:
                safe += 1
                cursor = block
            elif first.contains(key):
                verified[block.block_id] = key
                safe += 1
                cursor = block
            elif block.block_id in in_flight or first.holds(key):
                cursor = block  # being written: safe soon
            else:
                found.append(([block], ""))
        self._cursor, self._safe = cursor, safe
        return found

    def settle(self, pool: BlockPool) -> None:
        """Note the queue's counters after the candidates left it."""
        queue = pool.free_block_queue
        self._marks = (queue.popped, queue.prepended, queue.removed)


def selective(pool: BlockPool, hashes: Iterable[BlockHash], num_groups: int) -> list[Column]:
    """The device blocks (still cached) of hashes that reached the hit threshold."""
    found: list[Column] = []
    for block_hash in hashes:
        column = pool.get_cached_block(block_hash, range(num_groups))
        if column is not None:
            found.append((column, ""))
    return found


class HitCounter:
    """Device prefix-cache hits per block hash, for selective writes.

    Keeps the most recently hit ``capacity`` hashes (least recently hit ones
    are forgotten first), and queues a hash the moment its count reaches
    ``threshold``.
    """

    def __init__(self, threshold: int, capacity: int) -> None:
        self.threshold = threshold
        self.capacity = capacity
        self._counts: OrderedDict[BlockHash, int] = OrderedDict()
        self.due: list[BlockHash] = []

    def record(self, hashes: Sequence[BlockHash]) -> None:
        """Count one hit on each hash."""
        counts = self._counts
        for block_hash in hashes:
            count = counts.pop(block_hash, 0) + 1
            counts[block_hash] = count
            if count == self.threshold:
                self.due.append(block_hash)
        while len(counts) > self.capacity:
            counts.popitem(last=False)

    def take_due(self) -> list[BlockHash]:
        """Hashes that reached the threshold since the last call."""
        due, self.due = self.due, []
        return due
