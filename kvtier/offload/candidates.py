"""Which device blocks a step may store, per write mode (pure selection, no I/O).

Each function returns *columns*: the blocks of one position (one per KV cache
group) with the id of the request they came from ("" when none) and the
position in that request's chain (-1 when unknown). The manager
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
from kvtier.offload.transfers import Transfers
from kvtier.pool import BlockPool

__all__ = ["Column", "HitCounter", "eager", "selective", "track_blocks"]

Column = tuple[list[KVCacheBlock], str, int]


def track_blocks(
    transfers: Transfers, out: SchedulerOutput, num_groups: int, *, live: bool = True
) -> None:
    """Update the requests' live block ids from the step's scheduler output.

    A new request whose id a finished one still holds gets a state of its
    own (see :meth:`~kvtier.offload.request_book.RequestBook.track`). With
    ``live`` False (only eager stores read the ids), the blocks added to
    running requests are not followed: only new and preempted requests are.
    """
    requests = transfers.requests
    for rid in out.preempted:
        state = requests.get(rid)
        if state is not None:
            state.block_ids = [[] for _ in range(num_groups)]
            state.stored_upto = 0
    for rid, ids in out.new_requests.items():
        transfers.track(rid, [list(group) for group in ids]).stored_upto = 0
    if not live:
        return
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
            found.append((column, rid, position))
            position += 1
        state.stored_upto = position
    return found


def selective(pool: BlockPool, hashes: Iterable[BlockHash], num_groups: int) -> list[Column]:
    """The device blocks (still cached) of hashes that reached the hit threshold."""
    found: list[Column] = []
    for block_hash in hashes:
        column = pool.get_cached_block(block_hash, range(num_groups))
        if column is not None:
            found.append((column, "", -1))
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
