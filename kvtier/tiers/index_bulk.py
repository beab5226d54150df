"""Whole-tier changes of a :class:`~kvtier.tiers.index.TierIndex`: restore, clear, retire.

A base of :class:`~kvtier.tiers.index.TierIndex`: the blocks a warm restart
found entered at once, and every block forgotten at once, freeing the slots
at once (:meth:`IndexBulk.clear`) or holding them until the caller deleted
the bytes (:meth:`IndexBulk.retire`; the offload manager's reset retires
every tier it covers, the ones in host memory included).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from kvtier.tiers.base import BlockKey
from kvtier.tiers.index_events import IndexEvents

if TYPE_CHECKING:
    from kvtier.policies.base import EvictionPolicy
    from kvtier.tiers.index_hints import HintMemory
    from kvtier.tiers.slots import SlotMap

__all__ = ["IndexBulk"]


class IndexBulk(IndexEvents):
    """Restore, clear and retire of a tier index (not constructed on its own).

    :class:`~kvtier.tiers.index.TierIndex` sets the state these change; the
    events go through :class:`~kvtier.tiers.index_events.IndexEvents`.
    """

    _name: str
    _slots: SlotMap
    _slot_of: dict[BlockKey, int]
    _reserved: set[BlockKey]
    _pins: dict[BlockKey, int]
    _doomed: set[BlockKey]
    _drops: int
    _hints: HintMemory
    policy: EvictionPolicy

    def restore(self, pairs: Iterable[tuple[int, BlockKey]]) -> None:
        """Enter blocks found on open (a warm restart) as resident, in one ``BlockStored``.

        They join the policy in the given order (the first is evicted first).

        Raises:
            InvalidRequestError: A slot is not an integer in range or not free,
                a key is not ``bytes`` or already known, or a slot or key
                repeats; nothing changed.
        """
        slots, keys = self._slots.restorable(pairs, self._name)
        self._slots.place(slots, keys)
        for key in keys:
            self.policy.insert(key)
        self._emit_stored(keys)

    def clear(self) -> bool:
        """Forget every block, unless a block is pinned or reserved; the slots are free at once.

        Nothing may delete the old bytes afterwards (a new block may take a
        slot at once): a caller that deletes them (a disk tier's files) uses
        :meth:`retire`.

        Returns:
            True when cleared (an ``AllBlocksCleared`` event is recorded);
            False, changing nothing, while a load or a store is in flight.
        """
        if self._pins or self._reserved:
            return False
        self._drops += len(self._slot_of)
        for key in self._slot_of:
            self.policy.remove(key)
        self._hints.clear()
        self._slots.clear()
        self._doomed.clear()
        self._emit_cleared()
        return True

    def retire(self) -> list[tuple[int, BlockKey]] | None:
        """Forget every block now, keeping their slots until the caller deleted the bytes.

        :meth:`clear` for a caller that deletes the bytes afterwards (a disk
        tier's files): every block becomes invisible at once (one
        ``AllBlocksCleared``) and is pinned once, as :meth:`remove` leaves a
        pinned block, so no store reuses a slot, or writes a key, whose file
        is still being deleted. :meth:`unpin` of the keys afterwards frees
        the slots.

        Returns:
            ``(slot, key)`` of every block retired (pinned once each); None,
            changing nothing, while a block is pinned or reserved.
        """
        if self._pins or self._reserved:
            return None
        retired = [(slot, key) for key, slot in self._slot_of.items()]
        self._drops += len(retired)
        for _, key in retired:
            self.policy.remove(key)
            self._pins[key] = 1
        self._doomed.update(self._slot_of)
        self._hints.clear()
        self._emit_cleared()
        return retired
