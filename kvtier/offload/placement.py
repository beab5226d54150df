"""Slot reservations across the tier stack: demotions and staging (no I/O)."""

from __future__ import annotations

from collections.abc import Sequence

from kvtier.errors import TierFullError
from kvtier.offload._state import Demotion, LoadEvent
from kvtier.offload.stats import TierStats
from kvtier.policies.hints import BlockHint
from kvtier.tiers.base import BlockKey
from kvtier.tiers.index import Reservation, TierIndex

__all__ = ["demotions", "release_stages", "reserve_stages", "reserved"]


def reserved(index: TierIndex, key: BlockKey) -> bool:
    """``key`` holds a slot in ``index`` without being visible (being written)."""
    return index.holds(key) and not index.contains(key)


def demotions(
    indexes: Sequence[TierIndex], stats: Sequence[TierStats], level: int, reservation: Reservation
) -> list[Demotion]:
    """Reserve room one tier down for the blocks ``reservation`` evicted from ``level``.

    Blocks the next tier already holds, or that do not fit, are dropped. A
    chain of demotions is not followed: what the next tier evicts to make
    room is dropped. When the evicting tier kept the blocks' hints (a
    prefix-aware policy), they go along, and the blocks are listed by chain
    depth, heads first, as a store lists them, so the next tier's policy hears
    of them tail first.
    """
    stats[level].evictions += len(reservation.evicted)
    if level + 1 >= len(indexes) or not reservation.evicted:
        return []
    below = indexes[level + 1]
    known: dict[BlockKey, BlockHint | None] = {}
    if reservation.evicted_hints:
        evicted_keys = (key for _, key in reservation.evicted)
        known = dict(zip(evicted_keys, reservation.evicted_hints, strict=True))
    wanted = [(slot, key) for slot, key in reservation.evicted if key not in below]
    wanted = wanted[: below.num_free + below.num_evictable]
    if not wanted:
        return []
    lower = below.reserve(key for _, key in wanted)
    stats[level + 1].evictions += len(lower.evicted)
    by_key = dict(zip(lower.keys, lower.slots, strict=True))
    moved = [(slot, key) for slot, key in wanted if key in by_key]
    if not moved:
        return []
    hints: list[BlockHint | None] | None = None
    if any(known.get(key) is not None for _, key in moved):
        moved.sort(key=lambda pair: _depth(known.get(pair[1])))
        hints = [known.get(key) for _, key in moved]
    return [
        Demotion(
            level,
            [s for s, _ in moved],
            [by_key[k] for _, k in moved],
            [k for _, k in moved],
            hints,
        )
    ]


def _depth(hint: BlockHint | None) -> int:
    return 0 if hint is None else hint.depth


def reserve_stages(
    indexes: Sequence[TierIndex], stats: Sequence[TierStats], event: LoadEvent
) -> None:
    """Reserve first-tier slots for the event's blocks held only by slower tiers.

    A staged block goes up through the first tier, where the next request
    finds it. Blocks the first tier holds already (another load is staging
    them, or they arrived since the load was planned), and every staged block
    when the first tier has no room, are loaded straight from their tier into
    the device instead (``Stage.dst_slots`` -1): their source pins hold them,
    so the load never fails for want of room above.
    """
    first = indexes[0]
    keys = [key for stage in event.stages for key in stage.keys if not first.holds(key)]
    by_key: dict[BlockKey, int] = {}
    if keys:
        try:
            reservation = first.reserve(keys)
        except TierFullError:
            pass
        else:
            by_key = dict(zip(reservation.keys, reservation.slots, strict=True))
            event.demotions = demotions(indexes, stats, 0, reservation)
    for stage in event.stages:
        stage.dst_slots = [by_key.get(key, -1) for key in stage.keys]
    event.first_slots = [
        by_key.get(key, slot) for key, slot in zip(event.keys, event.first_slots, strict=True)
    ]


def release_stages(indexes: Sequence[TierIndex], event: LoadEvent) -> None:
    """Undo :func:`reserve_stages` for a load that could not start."""
    staged = set(event.staged_keys())
    indexes[0].abort(list(staged))
    for demotion in event.demotions:
        indexes[demotion.level + 1].abort(demotion.keys)
    event.demotions = []
    for stage in event.stages:
        stage.dst_slots = []
    event.first_slots = [
        -1 if key in staged else slot
        for key, slot in zip(event.keys, event.first_slots, strict=True)
    ]
