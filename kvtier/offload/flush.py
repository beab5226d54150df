"""Flushing volatile tiers down the stack when the offload manager closes.

Blocks reach a tier below only when the tier above evicts them (demotion), so
without a flush the blocks a CPU tier holds when the engine stops are lost,
and a warm restart on the same disk directory finds only what had been
evicted: the older blocks. With ``flush_on_close`` the manager copies, once
its jobs have ended and before the tiers close, every block of a tier held
in memory (one that declares ``in_memory = True``, see
:class:`~kvtier.tiers.base.BlockStore`: the CPU tier), whose blocks die with
the process, into the tier below it, unless that tier holds it already.

What does not fit in the tier below (its free slots plus the blocks it may
evict) is left, most valuable first kept: the blocks are taken in the reverse
of the upper tier's eviction order. The copies go through the transfer
pipeline with the two indexes as ledgers (pinned above, reserved below): a
failed copy aborts its reservation and is counted in ``failed_transfers``,
and the flush of that tier stops there (a full or failing disk fails every
copy after the first).
"""

from __future__ import annotations

from collections.abc import Sequence

from kvtier.log import get_logger
from kvtier.offload.stats import TierStats
from kvtier.tiers.base import BlockKey, BlockStore
from kvtier.tiers.index import TierIndex
from kvtier.transfer import StoreTask, TransferPipeline

__all__ = ["flush", "flush_order", "volatile"]

_log = get_logger("kvtier.offload")


def volatile(tier: BlockStore) -> bool:
    """The tier's blocks die with the process: it is held in memory (``in_memory``)."""
    return getattr(tier, "in_memory", False) is True


def flush_order(index: TierIndex, below: TierIndex) -> list[BlockKey]:
    """The blocks of ``index`` that ``below`` does not hold, most valuable first, as many as fit.

    "Fit" counts the free slots of ``below`` and the blocks it may evict.
    """
    room = below.num_free + below.num_evictable
    if room <= 0:
        return []
    wanted = index.policy.victims(
        len(index.policy), lambda key: index.contains(key) and not below.holds(key)
    )
    wanted.reverse()  # the last victim is the most valuable block
    return wanted[:room]


async def flush(
    pipeline: TransferPipeline,
    tiers: Sequence[BlockStore],
    indexes: Sequence[TierIndex],
    stats: Sequence[TierStats],
    *,
    batch_blocks: int,
) -> int:
    """Copy each volatile tier's blocks into the tier below; how many blocks landed.

    Tiers are flushed top down, so a chain of volatile tiers ends in the
    first persistent one.
    """
    total = 0
    for level in range(len(tiers) - 1):
        if volatile(tiers[level]):
            total += await _flush_level(pipeline, tiers, indexes, stats, level, batch_blocks)
    return total


async def _flush_level(
    pipeline: TransferPipeline,
    tiers: Sequence[BlockStore],
    indexes: Sequence[TierIndex],
    stats: Sequence[TierStats],
    level: int,
    batch_blocks: int,
) -> int:
    index, below = indexes[level], indexes[level + 1]
    keys = flush_order(index, below)
    if not keys:
        return 0
    # One reservation for all: the evictions below are chosen once, so a later
    # chunk can never evict what an earlier one just wrote.
    src_slots = index.pin(keys)
    reservation = below.reserve_new(keys)
    below_stats = stats[level + 1]
    below_stats.evictions += len(reservation.evicted)
    block_bytes = tiers[level].layout.block_bytes
    route = f"{tiers[level].name}->{tiers[level + 1].name}"
    landed = submitted = 0
    try:
        for start in range(0, len(keys), batch_blocks):
            end = start + batch_blocks
            task = StoreTask(
                tiers[level],
                src_slots[start:end],
                tiers[level + 1],
                list(reservation.slots[start:end]),
                keys[start:end],
                src_ledger=index,
                dst_ledger=below,
            )
            completion = await pipeline.submit(task)
            submitted = start + task.num_blocks  # the pipeline settles its ledgers now
            try:
                result = await completion
            except Exception as exc:  # aborted and unpinned by the pipeline
                below_stats.failed_transfers += task.num_blocks
                _log.warning(
                    "flush_failed", tier=route, n_blocks=len(keys) - landed, error=repr(exc)
                )
                break
            landed += task.num_blocks
            below_stats.flushed += task.num_blocks
            below_stats.bytes_stored += task.num_blocks * block_bytes
            below_stats.store_seconds += result.seconds
    finally:
        rest = keys[submitted:]  # never posted: release them here
        if rest:
            below.abort(rest)
            index.unpin(rest)
    _log.info("flushed", tier=route, n_blocks=landed, bytes=landed * block_bytes)
    return landed
