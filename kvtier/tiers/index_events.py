"""The events a :class:`~kvtier.tiers.index.TierIndex` records for its tier.

``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared`` with the tier's name
as ``medium``. Keys are reported as they are (a key is a block hash with its
group id appended), with ``group_idx=0``, no parent hash and no tokens;
``block_size`` is the index's. The outbox is drained by :meth:`take_events`.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvtier.events import AllBlocksCleared, BlockRemoved, BlockStored, KVCacheEvent
from kvtier.hashing import BlockHash
from kvtier.tiers.base import BlockKey

__all__ = ["IndexEvents"]


class IndexEvents:
    """The event outbox of a tier index (a base of :class:`~kvtier.tiers.index.TierIndex`).

    Not constructed on its own: :class:`~kvtier.tiers.index.TierIndex` sets
    the state these use.
    """

    _name: str
    _drops: int
    _events: list[KVCacheEvent]
    enable_events: bool
    block_size: int

    def _emit_stored(self, keys: Sequence[BlockKey]) -> None:
        if self.enable_events and keys:
            hashes = [BlockHash(key) for key in keys]
            size = self.block_size
            self._events.append(BlockStored(hashes, None, [], size, None, self._name, 0))

    def _emit_removed(self, keys: Sequence[BlockKey]) -> None:
        """Record blocks that became invisible (and count them as dropped)."""
        self._drops += len(keys)
        if self.enable_events and keys:
            hashes = [BlockHash(key) for key in keys]
            self._events.append(BlockRemoved(hashes, medium=self._name, group_idx=0))

    def _emit_cleared(self) -> None:
        if self.enable_events:
            self._events.append(AllBlocksCleared(medium=self._name))

    def take_events(self) -> list[KVCacheEvent]:
        """Events recorded since the last call, oldest first."""
        events, self._events = self._events, []
        return events
