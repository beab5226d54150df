"""The read side of a :class:`~kvtier.tiers.index.TierIndex`: lookups and counters.

Pure queries over the index's state (no method here changes anything):
visibility and slot lookups, the prefix-hit count, live key views for hot
loops, the slot counters, with
``num_free + num_reserved + num_resident == num_slots``, and the check of
every invariant (for tests and debugging).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from itertools import takewhile
from typing import TYPE_CHECKING

from kvtier.errors import InvalidRequestError, KVTierError
from kvtier.tiers.base import BlockKey, keys_text

if TYPE_CHECKING:
    from kvtier.policies.base import EvictionPolicy
    from kvtier.tiers.slots import SlotMap

__all__ = ["IndexQueries"]


class IndexQueries:
    """Lookups and counters of a tier index (the base of :class:`~kvtier.tiers.index.TierIndex`).

    Not constructed on its own: :class:`~kvtier.tiers.index.TierIndex` sets
    the state these read.
    """

    _name: str
    _num_slots: int
    _slots: SlotMap
    _free: list[int]
    _slot_of: dict[BlockKey, int]
    _reserved: set[BlockKey]
    _pins: dict[BlockKey, int]
    _doomed: set[BlockKey]
    _drops: int
    policy: EvictionPolicy

    # -- queries -----------------------------------------------------------------

    @property
    def name(self) -> str:
        """The tier's name (the ``medium`` of its events)."""
        return self._name

    @property
    def num_slots(self) -> int:
        """Capacity in blocks."""
        return self._num_slots

    @property
    def num_free(self) -> int:
        """Slots holding nothing."""
        return len(self._free)

    @property
    def num_reserved(self) -> int:
        """Slots reserved for stores in flight."""
        return len(self._reserved)

    @property
    def num_resident(self) -> int:
        """Committed blocks holding a slot (removed-but-pinned ones included).

        ``num_free + num_reserved + num_resident == num_slots``.
        """
        return len(self)

    @property
    def num_pinned(self) -> int:
        """Resident blocks pinned by loads in flight."""
        return len(self._pins)

    def pin_count(self, key: BlockKey) -> int:
        """How many pins hold ``key`` (0: none)."""
        return self._pins.get(key, 0)

    @property
    def num_evictable(self) -> int:
        """Resident blocks that a reservation may evict (those not pinned)."""
        return self.num_resident - len(self._pins)

    @property
    def num_reservable(self) -> int:
        """Slots a reservation may take now: free ones plus evictable ones."""
        return len(self._free) + len(self._slot_of) - len(self._pins)

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and self.contains(key)

    def contains(self, key: BlockKey) -> bool:
        """Whether ``key`` is resident and visible (committed, not removed)."""
        return key in self._slot_of and key not in self._doomed

    def holds(self, key: BlockKey) -> bool:
        """Whether ``key`` holds a slot: resident, reserved (being written) or awaiting removal."""
        return key in self._slot_of or key in self._reserved

    def keeps(self, key: BlockKey) -> bool:
        """Whether ``key`` is visible or being written (holds a slot, not awaiting removal)."""
        return key in self._reserved or self.contains(key)

    def key_sets(
        self,
    ) -> tuple[AbstractSet[BlockKey], AbstractSet[BlockKey], AbstractSet[BlockKey]]:
        """Live read-only views for hot loops: ``(resident, reserved, removed_pinned)``.

        A key holds a slot (:meth:`holds`) when it is in the first or the
        second (never both); it is visible (:meth:`contains`) when it is in
        the first and not in the third. The views follow later changes.
        """
        return self._slot_of.keys(), self._reserved, self._doomed

    @property
    def drops(self) -> int:
        """Blocks made invisible so far (evicted or removed), a cumulative count.

        It changes whenever a key that was visible stops being so, which lets a
        caller that remembered what was visible tell when to look again.
        """
        return self._drops

    def slot_of(self, key: BlockKey) -> int | None:
        """The slot of a visible block, else ``None``."""
        return self._slot_of[key] if self.contains(key) else None

    def lookup(self, keys: Iterable[BlockKey]) -> int:
        """How many leading ``keys`` are visible (a prefix hit). Pins nothing."""
        return sum(1 for _ in takewhile(self.contains, keys))

    def check_task_slots(
        self, keys: Sequence[BlockKey], slots: Sequence[int], *, written: bool
    ) -> None:
        """Check that a transfer may touch these slots (the pipeline asks before queuing).

        A task's destination must hold a reservation of each key at its
        slot (:meth:`~kvtier.tiers.index.TierIndex.reserve`), its source a
        pin of each key at its slot (:meth:`~kvtier.tiers.index.TierIndex.pin`):
        otherwise the copy could overwrite a resident block's bytes, or read
        a slot being reused, before the index could refuse it.

        Raises:
            InvalidRequestError: A key is not ``bytes``, or the first key
                that is not reserved (or pinned) at its slot; nothing changed.
        """
        self._require_bytes(keys)
        if written:
            self._slots.index_pending()
            held, state = self._slots.pending, "reserved"
        else:
            held, state = self._slot_of, "pinned"
        pins = self._pins
        for key, slot in zip(keys, slots, strict=True):
            if held.get(key) != slot or (not written and key not in pins):
                raise InvalidRequestError(
                    f"tier {self._name!r}: {keys_text([key])} is not {state} at slot "
                    f"{slot}: {'reserve' if written else 'pin'} it before posting the transfer"
                )

    def _require_bytes(self, keys: Sequence[object]) -> None:
        for bad in keys:
            if isinstance(bad, bytes):
                continue
            raise InvalidRequestError(
                f"tier {self._name!r}: a block key must be bytes, got {type(bad).__name__} {bad!r}"
            )

    def blocks(self) -> list[tuple[int, BlockKey]]:
        """``(slot, key)`` of every visible block, by slot."""
        return sorted((slot, key) for key, slot in self._slot_of.items() if self.contains(key))

    def check_invariants(self) -> None:
        """Verify the bookkeeping (for tests and debugging). O(num_slots).

        Raises:
            KVTierError: Naming every broken invariant.
        """
        problems = self._slots.problems()
        resident = self._slot_of.keys()
        if not self._pins.keys() <= resident:
            problems.append("a pinned key is not resident")
        if any(n <= 0 for n in self._pins.values()):
            problems.append("a pin count is not positive")
        if not self._doomed <= self._pins.keys():
            problems.append("a removed key awaiting release is not pinned")
        visible = resident - self._doomed
        if len(self.policy) != len(visible) or any(key not in self.policy for key in visible):
            problems.append("the policy does not track exactly the visible resident keys")
        if problems:
            raise KVTierError(f"tier index {self._name!r}: " + "; ".join(problems))
