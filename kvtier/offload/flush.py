"""Flushing volatile tiers down the stack when the offload manager closes.

Blocks reach a tier below only when the tier above evicts them (demotion), so
without a flush the blocks a CPU tier holds when the engine stops are lost,
and a warm restart on the same disk directory finds only what had been
evicted: the older blocks. With ``flush_on_close`` the manager copies, once
its jobs have ended and before the tiers close, the blocks of the tiers held
in memory (those that declare ``in_memory = True``, see
:class:`~kvtier.tiers.base.BlockStore`: the CPU tier), whose blocks die with
the process, into the first tier below them that is not (a disk or Redis
tier), unless that tier holds them already.

Which blocks: those of the upper tier first, each tier's in the reverse of
its eviction order (most valuable first), as many as the tier below has free
or evictable slots. The tier below keeps its copies of blocks the flushed
tiers hold too (they are pinned while the room is reserved, so the flush
cannot evict the disk copy of a block it does not write), and one
reservation is made for all, so the flush never evicts what it wrote.

The copies go through the transfer pipeline in batches with the indexes as
ledgers (pinned above, reserved below): a failed batch aborts its
reservation and is counted in ``failed_transfers``, and the flush into that
tier stops there (a full or failing disk fails every batch after the
first); what was not copied is released.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvtier.log import get_logger
from kvtier.offload.jobs import discard
from kvtier.offload.stats import TierStats
from kvtier.tiers.base import BlockKey, BlockStore
from kvtier.tiers.index import TierIndex
from kvtier.transfer import StoreTask, TransferPipeline

__all__ = ["flush", "flush_order", "flush_targets", "volatile"]

_log = get_logger("kvtier.offload")


def volatile(tier: BlockStore) -> bool:
    """The tier's blocks die with the process: it is held in memory (``in_memory``)."""
    return getattr(tier, "in_memory", False) is True


def flush_targets(tiers: Sequence[BlockStore]) -> list[tuple[list[int], int]]:
    """``(source levels, target level)`` for each run of volatile tiers above a lasting one."""
    targets: list[tuple[list[int], int]] = []
    sources: list[int] = []
    for level, tier in enumerate(tiers):
        if volatile(tier):
            sources.append(level)
        elif sources:
            targets.append((sources, level))
            sources = []
    return targets


def flush_order(uppers: Sequence[TierIndex], below: TierIndex) -> list[tuple[int, BlockKey]]:
    """``(position in uppers, key)`` of the blocks to flush into ``below``, in order.

    The first index's blocks first, each index's most valuable first (the
    reverse of its policy's eviction order), each key once, none that
    ``below`` holds, as many as ``below`` has free plus evictable slots
    (counted as they are: the caller protects ``below``'s copies first).
    """
    room = below.num_free + below.num_evictable
    chosen: list[tuple[int, BlockKey]] = []
    seen: set[BlockKey] = set()
    for position, index in enumerate(uppers):
        if len(chosen) >= room:
            break

        def wanted(key: BlockKey, index: TierIndex = index) -> bool:
            return index.contains(key) and not below.holds(key) and key not in seen

        keys = index.policy.victims(len(index.policy), wanted)
        for key in reversed(keys):  # the last victim is the most valuable block
            chosen.append((position, key))
            seen.add(key)
    return chosen[:room]


async def flush(
    pipeline: TransferPipeline,
    tiers: Sequence[BlockStore],
    indexes: Sequence[TierIndex],
    stats: Sequence[TierStats],
    *,
    batch_blocks: int,
) -> int:
    """Copy the volatile tiers' blocks into the lasting tiers below them; how many landed."""
    total = 0
    for sources, target in flush_targets(tiers):
        total += await _flush_into(pipeline, tiers, indexes, stats, sources, target, batch_blocks)
    return total


def _protect(uppers: Sequence[TierIndex], below: TierIndex) -> list[BlockKey]:
    """Pin ``below``'s copies of blocks ``uppers`` hold (so no reservation evicts them)."""
    shared = {key for index in uppers for _, key in index.blocks() if below.contains(key)}
    keys = list(shared)
    if keys:
        below.pin(keys)
    return keys


async def _flush_into(
    pipeline: TransferPipeline,
    tiers: Sequence[BlockStore],
    indexes: Sequence[TierIndex],
    stats: Sequence[TierStats],
    sources: list[int],
    target: int,
    batch_blocks: int,
) -> int:
    below = indexes[target]
    uppers = [indexes[level] for level in sources]
    protected = _protect(uppers, below)
    try:
        order = flush_order(uppers, below)
        if not order:
            return 0
        keys = [key for _, key in order]
        reservation = below.reserve_new(keys)  # one for all: never evicts what it wrote
    finally:
        if protected:
            below.unpin(protected)
    slots = dict(zip(keys, reservation.slots, strict=True))
    below_stats = stats[target]
    below_stats.evictions += len(reservation.evicted)
    pending = [  # each source tier's blocks, in batches: popped as they are posted
        (sources[position], chunk)
        for position in range(len(sources))
        for chunk in _chunks([k for p, k in order if p == position], batch_blocks)
    ]
    landed = 0
    try:
        while pending:
            level, chunk = pending[0]
            index = indexes[level]
            task = StoreTask(
                tiers[level],
                index.pin(chunk),
                tiers[target],
                [slots[key] for key in chunk],
                chunk,
                src_ledger=index,
                dst_ledger=below,
            )
            try:
                completion = await pipeline.submit(task)
            except BaseException:
                index.unpin(chunk)  # never queued: its reservation is released below
                raise
            pending.pop(0)  # queued: the pipeline settles its pins and slots
            try:
                result = await completion
            except Exception as exc:  # aborted and unpinned by the pipeline
                # Written files, or blocks evicted from these slots, would come
                # back at the warm restart, unknown to the index: deleted.
                await discard(tiers[target], [slots[key] for key in chunk])
                below_stats.failed_transfers += task.num_blocks
                _log.warning(
                    "flush_failed",
                    tier=f"{tiers[level].name}->{tiers[target].name}",
                    n_blocks=len(keys) - landed,
                    error=repr(exc),
                )
                break
            landed += task.num_blocks
            below_stats.flushed += task.num_blocks
            below_stats.bytes_stored += task.num_blocks * tiers[level].layout.block_bytes
            below_stats.store_seconds += result.seconds
    finally:
        rest = [key for _, chunk in pending for key in chunk]  # never posted
        if rest:  # their slots may hold blocks the reservation evicted
            await discard(tiers[target], [slots[key] for key in rest])
            below.abort(rest)
    _log.info("flushed", tier=tiers[target].name, n_blocks=landed, of=len(keys))
    return landed


def _chunks(keys: list[BlockKey], size: int) -> list[list[BlockKey]]:
    return [keys[start : start + size] for start in range(0, len(keys), size)]
