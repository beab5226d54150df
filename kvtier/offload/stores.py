"""Store planning: which device blocks a step copies to the lower tiers.

:class:`StorePlanner` turns a write mode's candidates into the step's store
events: it drops null, unhashed, in-flight and already-held blocks, reserves
first-tier slots (demoting what the reservation evicts, see
:mod:`kvtier.offload.placement`), references the device blocks until the
store ends, and records the event with the manager's
:class:`~kvtier.offload.transfers.Transfers`. In eager and selective modes the
blocks the first tier has no room for (its slots pinned by loads or being
written) *spill*: they are stored straight from the device into the next tier
down with room, one more event per tier, instead of being dropped. Eager
stores know each block's request and position: the event carries a
:class:`~kvtier.policies.hints.BlockHint` per block for the tier's policy
(depth, the request's hashed blocks so far, the parent block's key).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from kvtier.block import KVCacheBlock
from kvtier.hashing import BlockHashWithGroupId
from kvtier.offload import candidates, placement
from kvtier.offload._state import Demotion, StoreEvent
from kvtier.offload.plan import StoreSpec, WriteMode
from kvtier.offload.transfers import Transfers
from kvtier.offload.writeback import WriteBack
from kvtier.policies.base import PrefixAwarePolicy
from kvtier.policies.hints import BlockHint
from kvtier.tiers.base import BlockKey
from kvtier.tiers.index import TierIndex

__all__ = ["StorePlanner", "keeping", "protect"]

_block_id = operator.attrgetter("block_id")
_RESCANS = 3  # lazy mode: walks from the head with room a step may add after its evictions


def protect(index: TierIndex, held: Sequence[BlockKey], needed: int) -> list[BlockKey]:
    """Pin ``index``'s copies of ``held`` if reserving ``needed`` slots there may evict.

    The step's blocks a tier holds are kept there instead of being stored,
    and a reservation for its other blocks (or for the blocks demoted into
    it) must not take their slots. The pins are not accesses: nothing is
    read, and the tier's policy must not learn of a block by whether a slot
    happened to be free. Returns the keys pinned, for ``index.unpin``.
    """
    if not held or needed <= index.num_free:
        return []
    keep = [key for key in held if index.contains(key)]
    if keep:
        index.pin(keep, access=False)
    return keep


@contextmanager
def keeping(index: TierIndex, held: Sequence[BlockKey], needed: int) -> Iterator[None]:
    """:func:`protect` for the duration of a ``with`` block."""
    keep = protect(index, held, needed)
    try:
        yield
    finally:
        if keep:
            index.unpin(keep)


class StorePlanner:
    """Plans a step's stores (internal to :mod:`kvtier.offload`).

    Args:
        transfers: The manager's events in flight (and the pool, tiers,
            indexes, counters and requests they share).
        event_ids: The manager's event id counter (shared with loads).
        mode: The write mode.
        writeback: Lazy mode's free-queue walk.
        spill: Asked each step that the first tier is short of room (eager
            and selective modes): whether the blocks it has no room for go
            to the next tier down with room (else they are dropped); None:
            never.
    """

    def __init__(
        self,
        transfers: Transfers,
        event_ids: Iterator[int],
        mode: WriteMode,
        writeback: WriteBack,
        *,
        spill: Callable[[], bool] | None = None,
    ) -> None:
        self.block_pool = transfers.block_pool
        self.tier_names = [tier.name for tier in transfers.tiers]
        self.indexes = transfers.indexes
        self.tier_stats = transfers.tier_stats
        self.transfers = transfers
        self.requests = transfers.requests
        self.event_ids = event_ids
        self.mode = mode
        self.writeback = writeback
        self.spill = spill or (lambda: False)
        # Hints cost an object per block: built only for a policy that reads them.
        written = self.indexes if spill is not None else self.indexes[:1]
        self.hinted = any(isinstance(index.policy, PrefixAwarePolicy) for index in written)

    def plan(self, step_id: int, columns: list[candidates.Column]) -> tuple[StoreSpec, ...]:
        """Eager and selective modes: store the candidates not held below or in flight.

        The first lower tier takes what its room allows, in the candidates'
        order (a request's blocks head first). With ``spill``, each tier
        below in turn takes what is left and it does not hold, up to its
        room: one event per tier written. What no tier takes is dropped.
        """
        first = self.indexes[0]
        in_flight = self.transfers.in_flight
        blocks: list[KVCacheBlock] = []
        keys: list[BlockKey] = []
        rids: list[str] = []  # the request each block was found for ("" if none)
        hints: dict[BlockKey, BlockHint] = {}
        seen: set[BlockKey] = set()
        held: list[BlockKey] = []  # the step's blocks the first tier holds: kept there
        for column, rid, position in columns:
            for group, block in enumerate(column):
                key = block.block_hash
                if block.is_null or key is None or block.block_id in in_flight:
                    continue
                if key in seen:
                    continue
                seen.add(key)
                if first.holds(key):  # held below, or being stored by an earlier step's event
                    held.append(key)
                    continue
                blocks.append(block)
                keys.append(key)
                rids.append(rid)
                if rid and self.hinted:
                    hint = self._hint(rid, group, position)
                    if hint is not None:
                        hints[key] = hint
        if not keys:
            return ()
        keep = protect(first, held, len(keys))
        try:
            room = first.num_reservable
            if len(keys) <= room:  # the usual case
                owners = set(rids)
                owners.discard("")
                return (self._event(step_id, 0, blocks, keys, owners, hints),)
            return self._place(step_id, blocks, keys, rids, hints, room, spill=self.spill())
        finally:
            if keep:
                first.unpin(keep)

    def _place(
        self,
        step_id: int,
        blocks: list[KVCacheBlock],
        keys: list[BlockKey],
        rids: list[str],
        hints: dict[BlockKey, BlockHint],
        room: int,
        *,
        spill: bool,
    ) -> tuple[StoreSpec, ...]:
        """The first tier takes ``room`` blocks, each tier below what is left (``spill``).

        What no tier takes is dropped. Called with the first tier's copies of
        the step's blocks pinned; each tier below has its own pinned while it
        reserves, and while the tier above reserves (its evictions are demoted
        into it), so no reservation evicts a block of the step it keeps (the
        chain would lose a block before the ones stored after it), spilling
        or not.
        """
        rows = list(range(len(keys)))
        specs: list[StoreSpec] = []
        indexes = self.indexes
        for level, index in enumerate(indexes):
            kept: list[int] = []  # rows
            here = rows  # (plan left out every key the first tier holds)
            if level:  # a key this tier holds (or is writing) is kept there
                left: list[int] = []
                for row in rows:
                    (kept if index.keeps(keys[row]) else left).append(row)
                rows = left
                # A key removed while pinned holds its slot until unpinned: not kept,
                # not storable here, left for the tiers below.
                here = [row for row in rows if not index.holds(keys[row])]
            with keeping(index, [keys[row] for row in kept], len(here)):
                if level:
                    room = index.num_reservable
                take = here[:room]
                if take:
                    taken_rows = set(take)
                    rows = [row for row in rows if row not in taken_rows]
                    below = indexes[level + 1] if level + 1 < len(indexes) else None
                    taken = (
                        [blocks[row] for row in take],
                        [keys[row] for row in take],
                        {rids[row] for row in take if rids[row]},
                    )
                    if below is None:
                        specs.append(self._event(step_id, level, *taken, hints))
                    else:
                        with keeping(below, [keys[row] for row in rows], len(take)):
                            specs.append(self._event(step_id, level, *taken, hints))
            if not rows or not spill:
                break
        if rows and not spill:  # a block a tier below keeps is not lost
            lower = indexes[1:]
            rows = [row for row in rows if not any(index.keeps(keys[row]) for index in lower)]
        self.tier_stats[0].dropped_stores += len(rows)
        return tuple(specs)

    def _event(
        self,
        step_id: int,
        level: int,
        blocks: list[KVCacheBlock],
        keys: list[BlockKey],
        owners: set[str],
        hints: dict[BlockKey, BlockHint],
    ) -> StoreSpec:
        """Reserve slots in tier ``level`` for ``keys``; record the store event.

        ``keys`` are distinct and hold no slot there: ``reserve_new`` raises
        rather than skip one, which would pair the event's device blocks with
        the slots of other keys.
        """
        reservation = self.indexes[level].reserve_new(keys)
        ids = tuple(map(_block_id, blocks))
        event = StoreEvent(
            next(self.event_ids),
            step_id,
            ids,
            reservation.keys,
            reservation.slots,
            placement.demotions(self.indexes, self.tier_stats, level, reservation),
            owners,
            hints=[hints.get(key) for key in reservation.keys] if hints else None,
            level=level,
        )
        self.block_pool.touch(blocks)
        self.transfers.in_flight.update(ids)
        self.transfers.stores[event.event_id] = event
        for rid in owners:
            self.requests[rid].store_events.add(event.event_id)
        # Not dispatched here, in either mode: a block is a prefix-cache hit (and
        # so a selective candidate) from its allocation on, before its forward
        # pass wrote it. ``step_computed(step_id)`` starts the copy.
        return StoreSpec(event.event_id, self.tier_names[level], ids, reservation.slots)

    def _hint(self, rid: str, group: int, position: int) -> BlockHint | None:
        """The chain place of request ``rid``'s block ``position`` of ``group`` (None: unknown)."""
        state = self.requests.get(rid)
        if state is None or position < 0 or group >= len(state.block_ids):
            return None
        ids = state.block_ids[group]
        length = state.stored_upto  # eager's cursor: the request's hashed positions so far
        if position >= min(length, len(ids)):
            return None
        parent = self.block_pool.blocks[ids[position - 1]].block_hash if position else None
        return BlockHint(position, length, parent, state.tag)

    def plan_lazy(self, step_id: int) -> tuple[StoreSpec, ...]:
        """Write-back: the blocks :class:`WriteBack` picks, in one batch (no owners).

        A reservation that evicted the copy of a block free on the device
        (one the walk may have passed as safe) makes the walk start over from
        the head, for the safety part only, with the room left: up to
        ``_RESCANS`` times, then once more taking nothing (the blocks it finds
        unwritten count as dropped). Each such walk's stores can evict the
        next blocks' copies in turn: the bound keeps a first tier smaller
        than the device from being rewritten whole in one step.
        """
        first = self.indexes[0]
        lazy = self.writeback
        pool = self.block_pool
        # Every candidate came out of the free queue, so no store references it:
        # none is in flight (a store keeps its blocks referenced until it ends).
        found = lazy.scan(pool, first, first.num_reservable)  # taken and referenced
        ids: list[int] = []
        keys: list[BlockKey] = []
        slots: list[int] = []
        demotions: list[Demotion] = []
        rescans = _RESCANS
        while found:
            reservation = first.reserve_new(found.keys())  # pending: the resident map untouched
            ids.extend(found.values())
            keys.extend(reservation.keys)
            slots.extend(reservation.slots)
            demotions.extend(placement.demotions(self.indexes, self.tier_stats, 0, reservation))
            if not self._exposed(reservation.evicted):
                break
            room = first.num_reservable if rescans else 0
            rescans -= 1
            found = lazy.rescan(pool, first, room)
        self.tier_stats[0].dropped_stores += lazy.settle(pool, first)
        if not ids:
            return ()
        event = StoreEvent(next(self.event_ids), step_id, tuple(ids), keys, slots, demotions, set())
        self.transfers.stores[event.event_id] = event
        # Not dispatched here either: under async scheduling a request can be
        # freed while the forward pass that writes its newest (already hashed)
        # blocks still runs. ``step_computed(step_id)`` starts the copy.
        return (StoreSpec(event.event_id, self.tier_names[0], event.block_ids, tuple(slots)),)

    def _exposed(self, evicted: Sequence[tuple[int, BlockKey]]) -> bool:
        """Whether a block free on the device lost its first-tier copy to ``evicted``."""
        if not evicted:
            return False
        cached = self.block_pool.cached_block_hash_to_block
        for _, key in evicted:
            block_hash = BlockHashWithGroupId(key)
            if block_hash in cached and any(not b.ref_cnt for b in cached.get_blocks(block_hash)):
                return True
        return False
