"""SlotMap: which slot of one tier holds which block, and which are being written.

The storage half of a :class:`~kvtier.tiers.index.TierIndex` (which adds pins,
eviction and events on top). Synchronous and pure. A slot is in exactly one
of three states:

* **free**: on a stack, handed out top first (slot 0 first on a fresh map);
* **pending**: reserved for a block being written. Pending reservations are
  kept apart from the resident map (often 100k+ entries): a reservation adds
  its keys to a small set (what lookups see as "being written") and records
  its ``(keys, slots)`` batch as it is; the key → slot map of pending blocks
  is built from the batches only when a commit or an abort needs it, and the
  keys join the resident map on commit. So a planner that reserves a step's
  stores pays for one set update, and the rest is paid when the writes end,
  outside the planning call;
* **resident**: holding a committed block.

Callers validate: every method here but :meth:`SlotMap.restorable` trusts its
arguments (keys distinct, in the state the method expects), so
:class:`~kvtier.tiers.index.TierIndex` checks once, before changing anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs

from kvtier.errors import InvalidRequestError
from kvtier.policies.hints import BlockHint
from kvtier.tiers._host import format_bytes, host_shortfall
from kvtier.tiers.base import BlockKey

__all__ = ["SLOT_TABLE_BYTES", "Reservation", "SlotMap", "slot_table_shortfall"]

SLOT_TABLE_BYTES = 48
"""Host memory a :class:`SlotMap` allocates up front per slot (its free stack of ``int``
and its slot → key list; measured on CPython 3.11), before any block is stored."""


_UNCHECKED_BYTES = 16 << 20


def slot_table_shortfall(num_slots: int) -> str | None:
    """Why the slot tables of ``num_slots`` slots cannot be allocated now, or None if they can.

    Tables under 16 MiB are not checked (reading the host's memory figures
    costs more than they do).
    """
    if num_slots * SLOT_TABLE_BYTES < _UNCHECKED_BYTES:
        return None
    shortfall = host_shortfall(num_slots * SLOT_TABLE_BYTES)
    if shortfall is None:
        return None
    return (
        f"its index of {num_slots} slots needs about "
        f"{format_bytes(num_slots * SLOT_TABLE_BYTES)} of host memory up front: {shortfall}"
    )


@attrs.frozen
class Reservation:
    """Slots handed out by :meth:`~kvtier.tiers.index.TierIndex.reserve`.

    Attributes:
        keys: The keys reserved, in first-seen order. Keys that were already
            resident, reserved or awaiting removal are left out: the caller
            writes only these.
        slots: One slot per reserved key, in the same order.
        evicted: ``(slot, key)`` of resident blocks evicted to make room; a
            persistent tier discards their bytes (the slots may be reused by
            this reservation).
        evicted_hints: The last hint each evicted block was stored or read
            with, one per ``evicted`` entry (None: none known); empty unless
            the tier's policy is prefix-aware. Demotions pass them on.
    """

    keys: tuple[BlockKey, ...]
    slots: tuple[int, ...]
    evicted: tuple[tuple[int, BlockKey], ...] = ()
    evicted_hints: tuple[BlockHint | None, ...] = ()


class SlotMap:
    """Free, pending and resident slots of one tier (internal to :mod:`kvtier.tiers`).

    The containers are public to the index that owns the map, which reads
    them in its hot paths; they are never rebound, only mutated, so a
    reference taken once stays live.

    Args:
        num_slots: The tier's capacity in blocks (validated by the caller).

    Attributes:
        num_slots: Capacity in blocks.
        free: Free slots, a stack (the last is handed out first).
        resident: Key → slot of every committed block.
        key_at: Slot → key of committed blocks (``None`` for the others).
        pending: Key → slot of reservations not yet committed or aborted, once
            indexed (see :meth:`index_pending`).
        reserved: The keys of every pending reservation (indexed or not).
    """

    __slots__ = ("_batches", "free", "key_at", "num_slots", "pending", "reserved", "resident")

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.free: list[int] = list(range(num_slots - 1, -1, -1))  # slot 0 on top
        self.resident: dict[BlockKey, int] = {}
        self.key_at: list[BlockKey | None] = [None] * num_slots
        self.pending: dict[BlockKey, int] = {}
        self.reserved: set[BlockKey] = set()
        self._batches: list[tuple[tuple[BlockKey, ...], tuple[int, ...]]] = []

    def holds(self, key: BlockKey) -> bool:
        """Whether ``key`` holds a slot, resident or pending."""
        return key in self.resident or key in self.reserved

    def take(self, keys: tuple[BlockKey, ...]) -> tuple[int, ...]:
        """Reserve a free slot for each key (distinct, holding none; enough free).

        Returns:
            The slots, in the order of ``keys`` (the stack's top first).
        """
        count = len(keys)
        if not count:
            return ()
        free = self.free
        slots = tuple(free[: -count - 1 : -1])
        del free[-count:]
        self.reserved.update(keys)
        self._batches.append((keys, slots))
        return slots

    def index_pending(self) -> None:
        """Build :attr:`pending` from the reservations recorded since the last call."""
        batches = self._batches
        if batches:
            update = self.pending.update
            for keys, slots in batches:
                update(zip(keys, slots, strict=True))
            batches.clear()

    def commit(self, keys: Iterable[BlockKey]) -> None:
        """Pending keys were written: make them resident."""
        self.index_pending()
        pending, resident, key_at = self.pending, self.resident, self.key_at
        discard = self.reserved.discard
        for key in keys:
            slot = resident[key] = pending.pop(key)
            key_at[slot] = key
            discard(key)

    def abort(self, keys: Iterable[BlockKey]) -> None:
        """Pending keys were not written: free their slots."""
        self.index_pending()
        pending, free = self.pending, self.free
        discard = self.reserved.discard
        for key in keys:
            free.append(pending.pop(key))
            discard(key)

    def release(self, key: BlockKey) -> int:
        """Free the slot of a resident key; returns it."""
        slot = self.resident.pop(key)
        self.key_at[slot] = None
        self.free.append(slot)
        return slot

    def restorable(
        self, pairs: Iterable[tuple[int, BlockKey]], tier: str
    ) -> tuple[list[int], list[BlockKey]]:
        """Check ``(slot, key)`` pairs for :meth:`place`; the slots and the keys.

        Raises:
            InvalidRequestError: A slot is not an integer in range or not free,
                a key is not ``bytes`` or already held, or a slot or key
                repeats (``tier`` names the tier in the message).
        """
        slots: list[int] = []
        keys: list[BlockKey] = []
        for pair in pairs:
            slot, key = pair if isinstance(pair, tuple | list) and len(pair) == 2 else (-1, None)
            if not (
                isinstance(slot, int)
                and not isinstance(slot, bool)
                and 0 <= slot < self.num_slots
                and self.is_free(slot)
                and isinstance(key, bytes)
                and not self.holds(key)
            ):
                raise InvalidRequestError(
                    f"tier {tier!r}: cannot restore {pair!r}: need (slot, key) with a "
                    f"free slot in [0, {self.num_slots}) and a bytes key not already held"
                )
            slots.append(slot)
            keys.append(key)
        if len(set(slots)) != len(slots) or len(set(keys)) != len(keys):
            raise InvalidRequestError(f"tier {tier!r}: restore repeats a slot or a key")
        return slots, keys

    def place(self, slots: Sequence[int], keys: Sequence[BlockKey]) -> None:
        """Make keys resident in the given free slots (a warm restart)."""
        taken = set(slots)
        self.free[:] = [slot for slot in self.free if slot not in taken]
        for slot, key in zip(slots, keys, strict=True):
            self.resident[key] = slot
            self.key_at[slot] = key

    def is_free(self, slot: int) -> bool:
        """Whether ``slot`` (in range) is neither resident nor pending. O(pending)."""
        self.index_pending()
        return self.key_at[slot] is None and slot not in self.pending.values()

    def clear(self) -> None:
        """Forget every resident key (the caller checked that none is pending)."""
        self.resident.clear()
        self.key_at[:] = [None] * self.num_slots
        self.free[:] = range(self.num_slots - 1, -1, -1)

    def problems(self) -> list[str]:
        """Broken invariants of the map, in words (empty when sound). O(num_slots)."""
        self.index_pending()
        problems = []
        held = {slot: key for slot, key in enumerate(self.key_at) if key is not None}
        if {key: slot for slot, key in held.items()} != self.resident:
            problems.append("the slot → key and key → slot maps disagree")
        free = set(self.free)
        if len(free) != len(self.free) or any(not 0 <= s < self.num_slots for s in free):
            problems.append("a free slot is repeated or out of range")
        pending = set(self.pending.values())
        if len(pending) != len(self.pending) or pending & (free | held.keys()):
            problems.append("a pending slot is repeated, free or resident")
        if free & held.keys() or len(free) + len(held) + len(pending) != self.num_slots:
            problems.append("a slot is both free and held, or neither")
        if not self.reserved <= self.pending.keys():
            problems.append("a reserved key holds no slot")
        if self.reserved != self.pending.keys() or not self.resident.keys().isdisjoint(
            self.pending
        ):
            problems.append("the reserved keys are not exactly the pending ones")
        return problems
