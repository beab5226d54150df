"""What an ended load adds to the counters and to the staging cost model (internal)."""

from __future__ import annotations

from collections.abc import Sequence

from kvtier.offload._state import LoadEvent
from kvtier.offload.stats import TierStats
from kvtier.policies.prefetch import StagingCostModel
from kvtier.tiers.base import BlockKey

__all__ = ["count", "observe_staging"]


def observe_staging(
    costs: StagingCostModel, event: LoadEvent, seconds: dict[int, float], demotion_seconds: float
) -> None:
    """Feed ``costs`` the time each staged tier took (a load whose every block arrived).

    ``demotion_seconds`` (room made in the first tier) is shared among the
    staged blocks.
    """
    staged_blocks = sum(len(stage.keys) for stage in event.stages)
    for stage in event.stages:
        if stage.level in seconds:
            share = demotion_seconds * len(stage.keys) / staged_blocks
            costs.observe(stage.level, len(stage.keys), seconds[stage.level] + share)


def count(
    tier_stats: Sequence[TierStats],
    block_bytes: int,
    event: LoadEvent,
    arrived: set[BlockKey],
    seconds: dict[int, float],
) -> None:
    """Count the blocks each tier gave (``arrived``) as loads, the others as failed transfers.

    A block staged through the first tier counts as a load of both tiers
    (each copied it); ``seconds`` is the time spent reading from each level.
    """
    levels = (0, *(stage.level for stage in event.stages))
    good, bad = dict.fromkeys(levels, 0), dict.fromkeys(levels, 0)
    for key, slot in zip(event.keys, event.first_slots, strict=True):
        if slot >= 0:  # read from the first tier
            (good if key in arrived else bad)[0] += 1
    for stage in event.stages:
        for key in stage.keys:
            (good if key in arrived else bad)[stage.level] += 1
    for level, n in good.items():
        stats = tier_stats[level]
        stats.failed_transfers += bad[level]
        if n:
            stats.loads += n
            stats.bytes_loaded += n * block_bytes
            stats.load_seconds += seconds.get(level, 0.0)
