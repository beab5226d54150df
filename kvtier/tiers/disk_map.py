"""DiskMap: which block key each slot of a disk tier holds, and what a write does to files.

A disk tier names each block's file after its key only, so its map of slots
to keys decides which files are live. A batch write first unmaps every slot
it overwrites and every key it moves to another slot (those blocks are gone,
whatever happens to the write), and picks for each block a file it may
*recycle* (rename over and rewrite, instead of creating one); after the
batch, the blocks written are mapped and any file under a key left unmapped
is stale and must be deleted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kvtier.tiers.base import BlockKey

__all__ = ["DiskMap"]


class DiskMap:
    """Slot ↔ key of the blocks a disk tier serves (each key in one slot at most)."""

    def __init__(self) -> None:
        self.slot_keys: dict[int, BlockKey] = {}
        self.key_slots: dict[BlockKey, int] = {}

    def load(self, pairs: Iterable[tuple[int, BlockKey]]) -> None:
        """Map ``(slot, key)`` pairs found on disk (warm restart), replacing the map."""
        self.slot_keys = dict(pairs)
        self.key_slots = {key: slot for slot, key in self.slot_keys.items()}

    def plan_write(
        self, slots: Sequence[int], keys: Sequence[BlockKey]
    ) -> tuple[list[BlockKey | None], set[BlockKey]]:
        """Unmap what a batch overwrites or moves; the files it may reuse and may orphan.

        Returns:
            For each block, the key of a file to recycle (None: create one),
            and the keys whose files must be deleted unless the batch maps
            them again (see :meth:`settle`).
        """
        batch_keys = set(keys)
        unmapped: set[BlockKey] = set()
        recycle: list[BlockKey | None] = []
        for slot, key in zip(slots, keys, strict=True):
            old = self.slot_keys.pop(slot, None)  # overwritten: gone whatever happens
            if old is not None:
                del self.key_slots[old]
                unmapped.add(old)
            moved = self.key_slots.pop(key, None)  # the same key in another slot
            if moved is not None:
                del self.slot_keys[moved]
                unmapped.add(key)
            if old is not None and (old == key or old not in batch_keys):
                recycle.append(old)
            else:  # (an old key written again in this batch is that write's file)
                recycle.append(key if moved is not None else None)
        return recycle, unmapped | batch_keys

    def settle(
        self,
        slots: Sequence[int],
        keys: Sequence[BlockKey],
        candidates: Iterable[BlockKey],
        done: Iterable[int],
    ) -> list[BlockKey]:
        """Map the blocks written (positions ``done``); the ``candidates`` left unmapped.

        File names come only from keys, so a file under the name of a key the
        map does not hold (one the batch overwrote or moved, or one whose
        write failed) is stale.
        """
        for index in done:
            self.slot_keys[slots[index]] = keys[index]
            self.key_slots[keys[index]] = slots[index]
        return [key for key in candidates if key not in self.key_slots]

    def forget(self, slots: Iterable[int]) -> list[BlockKey]:
        """Unmap ``slots``; the keys they held (their files are to be deleted)."""
        doomed: list[BlockKey] = []
        for slot in slots:
            key = self.slot_keys.pop(slot, None)
            if key is not None:
                del self.key_slots[key]
                doomed.append(key)
        return doomed
