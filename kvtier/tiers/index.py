"""TierIndex: the slot bookkeeping of one lower tier.

Synchronous and pure (no I/O): it maps block keys to slots, keeps the free
slots, pins blocks that a load is reading so they cannot be evicted, asks an
:class:`~kvtier.policies.base.EvictionPolicy` for victims, and records
``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared`` events with the
tier's name as ``medium``.

A block's life. :meth:`TierIndex.reserve` hands out slots for a store; a
reserved block is invisible to lookups and cannot be evicted.
:meth:`TierIndex.commit` makes it resident once written, or
:meth:`TierIndex.abort` frees its slot if the write failed. A load brackets its
read with :meth:`TierIndex.pin` and :meth:`TierIndex.unpin`.
:meth:`TierIndex.remove` drops blocks found corrupt; a pinned one stops being
visible at once and gives its slot back on its last unpin. Every method
validates its arguments first: when it raises, it has changed nothing.

Events. Keys are reported as they are (a key is a block hash with its group id
appended), with ``group_idx=0``, no parent hash and no tokens; ``block_size``
is the constructor's. One ``BlockStored`` is recorded per :meth:`commit` (and
per :meth:`restore`), one ``BlockRemoved`` per call that makes blocks
invisible (eviction by :meth:`reserve`, or :meth:`remove`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from collections.abc import Set as AbstractSet
from itertools import takewhile
from typing import TypeGuard

import attrs

from kvtier.errors import ConfigError, InvalidRequestError, KVTierError, TierFullError
from kvtier.events import AllBlocksCleared, BlockRemoved, BlockStored, KVCacheEvent
from kvtier.hashing import BlockHash
from kvtier.policies.base import EvictionPolicy, make_eviction_policy
from kvtier.tiers.base import BlockKey

__all__ = ["Reservation", "TierIndex"]


@attrs.frozen
class Reservation:
    """Slots handed out by :meth:`TierIndex.reserve`.

    Attributes:
        keys: The keys reserved, in first-seen order. Keys that were already
            resident, reserved or awaiting removal are left out: the caller
            writes only these.
        slots: One slot per reserved key, in the same order.
        evicted: ``(slot, key)`` of resident blocks evicted to make room; a
            persistent tier discards their bytes (the slots may be reused by
            this reservation).
    """

    keys: tuple[BlockKey, ...]
    slots: tuple[int, ...]
    evicted: tuple[tuple[int, BlockKey], ...] = ()


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


class TierIndex:
    """Key → slot bookkeeping, pins and eviction for one tier.

    Args:
        name: The tier's name, reported as ``medium`` in events.
        num_slots: The tier's capacity in blocks.
        policy: An empty eviction policy, or the registered name of one (see
            :data:`~kvtier.policies.base.EVICTION_POLICIES`).
        enable_events: Record events for :meth:`take_events`.
        block_size: Tokens per block, reported in ``BlockStored`` events.

    Raises:
        ConfigError: ``name`` is empty, ``num_slots`` is not a positive
            integer, ``block_size`` is negative, or ``policy`` is not an
            empty :class:`~kvtier.policies.base.EvictionPolicy`.
        UnknownNameError: ``policy`` names no registered policy.
    """

    def __init__(
        self,
        name: str,
        num_slots: int,
        policy: EvictionPolicy | str = "lru",
        *,
        enable_events: bool = True,
        block_size: int = 0,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a tier name must be a non-empty string, got {name!r}")
        if not _is_int(num_slots) or num_slots <= 0:
            raise ConfigError(f"num_slots must be a positive integer, got {num_slots!r}")
        if not _is_int(block_size) or block_size < 0:
            raise ConfigError(f"block_size must be an integer >= 0, got {block_size!r}")
        if isinstance(policy, str):
            policy = make_eviction_policy(policy, num_slots)
        elif not isinstance(policy, EvictionPolicy) or len(policy):
            raise ConfigError(f"policy must be an empty EvictionPolicy or a name, got {policy!r}")
        self._name = name
        self._num_slots = num_slots
        self.policy: EvictionPolicy = policy
        self.enable_events = enable_events
        self.block_size = block_size
        self._free: list[int] = list(range(num_slots - 1, -1, -1))  # a stack: slot 0 first
        self._slot_of: dict[BlockKey, int] = {}  # every key holding a slot
        self._key_at: list[BlockKey | None] = [None] * num_slots
        self._reserved: set[BlockKey] = set()  # being written: invisible, not evictable
        self._pins: dict[BlockKey, int] = {}  # resident blocks being read
        self._doomed: set[BlockKey] = set()  # removed while pinned: leave on last unpin
        self._events: list[KVCacheEvent] = []
        self._drops = 0

    def __repr__(self) -> str:
        counts = f"free={self.num_free}, reserved={self.num_reserved}"
        return (
            f"TierIndex({self._name!r}, {counts}, resident={len(self)}, pinned={len(self._pins)})"
        )

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

    @property
    def num_evictable(self) -> int:
        """Resident blocks that a reservation may evict (those not pinned)."""
        return self.num_resident - len(self._pins)

    def __len__(self) -> int:
        return len(self._slot_of) - len(self._reserved)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and self.contains(key)

    def contains(self, key: BlockKey) -> bool:
        """Whether ``key`` is resident and visible (committed, not removed)."""
        return key in self._slot_of and key not in self._reserved and key not in self._doomed

    def holds(self, key: BlockKey) -> bool:
        """Whether ``key`` holds a slot: resident, reserved or awaiting removal."""
        return key in self._slot_of

    def key_sets(
        self,
    ) -> tuple[AbstractSet[BlockKey], AbstractSet[BlockKey], AbstractSet[BlockKey]]:
        """Live read-only views for hot loops: ``(held, reserved, removed_pinned)``.

        A key is visible (:meth:`contains`) when it is in the first and in
        neither of the others. The views follow later changes.
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

    def blocks(self) -> list[tuple[int, BlockKey]]:
        """``(slot, key)`` of every visible block, by slot."""
        return sorted((slot, key) for key, slot in self._slot_of.items() if self.contains(key))

    # -- stores ------------------------------------------------------------------

    def reserve(self, keys: Iterable[BlockKey]) -> Reservation:
        """Reserve slots for blocks about to be written.

        Free slots are used first, then unpinned resident blocks are evicted
        in policy order (recorded as one ``BlockRemoved``). Keys already
        resident, reserved or awaiting removal are skipped, and a key repeated
        in ``keys`` is reserved once; :attr:`Reservation.keys` says which were
        reserved.

        Raises:
            InvalidRequestError: A key is not ``bytes``; nothing changed.
            TierFullError: Fewer free plus evictable slots than new keys;
                nothing changed (no partial reservation, no eviction).
            KVTierError: The policy returned invalid victims; nothing changed.
        """
        wanted = list(keys)
        self._require_bytes(wanted)
        return self._assign([key for key in dict.fromkeys(wanted) if key not in self._slot_of])

    def reserve_new(self, keys: Collection[BlockKey]) -> Reservation:
        """:meth:`reserve` for keys known to be distinct and to hold no slot.

        The batch path of a planner that already checked :meth:`holds`: it
        validates with set operations instead of a test per key (a set, or a
        dict's keys, is distinct by construction), and every key is reserved
        (:attr:`Reservation.keys` holds ``keys`` in order).

        Raises:
            InvalidRequestError: A key is not ``bytes``, repeats or holds a
                slot; nothing changed.
            TierFullError: Fewer free plus evictable slots than keys; nothing
                changed.
            KVTierError: The policy returned invalid victims; nothing changed.
        """
        if not set(map(type, keys)) <= {bytes}:
            self._require_bytes(list(keys))
        distinct = isinstance(keys, AbstractSet) or len(set(keys)) == len(keys)
        if not distinct or not self._slot_of.keys().isdisjoint(keys):
            raise InvalidRequestError(
                f"tier {self._name!r}: reserve_new needs distinct keys holding no slot"
            )
        return self._assign(list(keys))

    def _assign(self, new: list[BlockKey]) -> Reservation:
        """Give each key (distinct, holding no slot: checked by the caller) a slot."""
        count = len(new)
        free = self._free
        shortfall = count - len(free)
        evicted: tuple[tuple[int, BlockKey], ...] = ()
        if shortfall > 0:
            if shortfall > self.num_evictable:
                raise TierFullError(
                    f"tier {self._name!r}: {count} slots needed, {self.num_free} free, "
                    f"{self.num_evictable} evictable, {self.num_pinned} pinned, "
                    f"{self.num_reserved} reserved",
                    tier=self._name,
                )
            victims = self._choose_victims(shortfall)
            evicted = tuple((self._slot_of[key], key) for key in victims)
            for key in victims:
                self._release(key)
            self._emit_removed(victims)
        if not count:
            return Reservation((), (), evicted)
        slots = free[: -count - 1 : -1]  # the stack's top first, as pops would give
        del free[-count:]
        self._slot_of.update(zip(new, slots))  # noqa: B905 (one slot per key, by construction)
        for _ in map(self._key_at.__setitem__, slots, new):  # a C loop, not a Python one
            pass
        self._reserved.update(new)
        return Reservation(tuple(new), tuple(slots), evicted)

    def _choose_victims(self, count: int) -> list[BlockKey]:
        pins = self._pins
        victims = self.policy.victims(count, lambda key: key not in pins)
        valid = (
            len(victims) == count
            and len(set(victims)) == count
            and all(key in self._slot_of and key not in self._reserved for key in victims)
            and not any(key in pins for key in victims)
        )
        if not valid:
            raise KVTierError(
                f"tier {self._name!r}: eviction policy {self.policy!r} returned invalid "
                f"victims for {count} of {self.num_evictable} evictable blocks: {victims!r}"
            )
        return victims

    def commit(self, keys: Iterable[BlockKey]) -> None:
        """The reserved blocks were written: make them resident and visible.

        Raises:
            InvalidRequestError: A key is not reserved or is repeated; nothing changed.
        """
        done = self._require_reserved(keys, "commit")
        for key in done:
            self._reserved.discard(key)
            self.policy.insert(key)
        self._emit_stored(done)

    def abort(self, keys: Iterable[BlockKey]) -> None:
        """The reserved blocks were not written: free their slots. Records no event.

        Raises:
            InvalidRequestError: A key is not reserved or is repeated; nothing changed.
        """
        for key in self._require_reserved(keys, "abort"):
            self._reserved.discard(key)
            self._free_slot(key)

    def _require_reserved(self, keys: Iterable[BlockKey], what: str) -> list[BlockKey]:
        items = list(keys)
        self._require_bytes(items)
        missing = sum(key not in self._reserved for key in items)
        if missing or len(set(items)) != len(items):
            raise InvalidRequestError(
                f"tier {self._name!r}: cannot {what} {len(items)} keys: {missing} are not "
                "reserved or a key is repeated"
            )
        return items

    # -- loads -------------------------------------------------------------------

    def pin(self, keys: Iterable[BlockKey]) -> list[int]:
        """Pin visible blocks for a load and count the read as an access.

        A key may appear more than once (and be pinned again by another load):
        each occurrence takes one pin, released by one :meth:`unpin`.

        Returns:
            The slot of each key, in order.

        Raises:
            InvalidRequestError: A key is not visible; nothing changed.
        """
        items = list(keys)
        self._require_bytes(items)
        missing = [key for key in items if not self.contains(key)]
        if missing:
            raise InvalidRequestError(f"tier {self._name!r}: cannot pin absent {missing!r}")
        for key in items:
            self._pins[key] = self._pins.get(key, 0) + 1
            self.policy.access(key)
        return [self._slot_of[key] for key in items]

    def unpin(self, keys: Iterable[BlockKey]) -> list[tuple[int, BlockKey]]:
        """Release one pin per occurrence of each key.

        Returns:
            ``(slot, key)`` of removed blocks whose last pin this released:
            their slots are free now (a persistent tier discards the bytes).

        Raises:
            InvalidRequestError: A key would drop below zero pins; nothing changed.
        """
        items = list(keys)
        self._require_bytes(items)
        counts = Counter(items)
        short = [key for key, n in counts.items() if self._pins.get(key, 0) < n]
        if short:
            raise InvalidRequestError(f"tier {self._name!r}: unpin below zero pins: {short!r}")
        left = []
        for key, n in counts.items():
            remaining = self._pins[key] - n
            if remaining:
                self._pins[key] = remaining
                continue
            del self._pins[key]
            if key in self._doomed:
                left.append((self._slot_of[key], key))
                self._release(key)
        return left

    # -- removal -----------------------------------------------------------------

    def remove(self, keys: Iterable[BlockKey]) -> list[tuple[int, BlockKey]]:
        """Drop visible blocks (for example found corrupt) in one ``BlockRemoved``.

        Keys that are not visible (unknown, reserved, already removed) are
        ignored. A pinned block becomes invisible now and frees its slot on
        its last :meth:`unpin`.

        Returns:
            ``(slot, key)`` of blocks whose slots are free now.
        """
        items = list(keys)
        self._require_bytes(items)
        gone = [key for key in dict.fromkeys(items) if self.contains(key)]
        left = []
        for key in gone:
            if key in self._pins:
                self._doomed.add(key)
                self.policy.remove(key)
            else:
                left.append((self._slot_of[key], key))
                self._release(key)
        self._emit_removed(gone)
        return left

    def restore(self, pairs: Iterable[tuple[int, BlockKey]]) -> None:
        """Enter blocks found on open (a warm restart) as resident, in one ``BlockStored``.

        They join the policy in the given order (the first is evicted first).

        Raises:
            InvalidRequestError: A slot is not an integer in range or not free,
                a key is not ``bytes`` or already known, or a slot or key
                repeats; nothing changed.
        """
        slots: list[int] = []
        keys: list[BlockKey] = []
        for pair in pairs:
            slot, key = pair if isinstance(pair, tuple | list) and len(pair) == 2 else (-1, None)
            if not (
                _is_int(slot)
                and 0 <= slot < self._num_slots
                and self._key_at[slot] is None
                and isinstance(key, bytes)
                and key not in self._slot_of
            ):
                raise InvalidRequestError(
                    f"tier {self._name!r}: cannot restore {pair!r}: need (slot, key) with a "
                    f"free slot in [0, {self._num_slots}) and a bytes key not already held"
                )
            slots.append(slot)
            keys.append(key)
        if len(set(slots)) != len(slots) or len(set(keys)) != len(keys):
            raise InvalidRequestError(f"tier {self._name!r}: restore repeats a slot or a key")
        taken = set(slots)
        self._free = [slot for slot in self._free if slot not in taken]
        for slot, key in zip(slots, keys, strict=True):
            self._slot_of[key] = slot
            self._key_at[slot] = key
            self.policy.insert(key)
        self._emit_stored(keys)

    def clear(self) -> bool:
        """Forget every block, unless a block is pinned or reserved.

        A persistent tier discards every slot afterwards.

        Returns:
            True when cleared (an ``AllBlocksCleared`` event is recorded);
            False, changing nothing, while a load or a store is in flight.
        """
        if self._pins or self._reserved:
            return False
        self._drops += len(self._slot_of)
        for key in self._slot_of:
            self.policy.remove(key)
        self._slot_of.clear()
        self._key_at = [None] * self._num_slots
        self._doomed.clear()
        self._free = list(range(self._num_slots - 1, -1, -1))
        if self.enable_events:
            self._events.append(AllBlocksCleared(medium=self._name))
        return True

    # -- internals ---------------------------------------------------------------

    def _require_bytes(self, keys: Sequence[object]) -> None:
        for bad in keys:
            if isinstance(bad, bytes):
                continue
            raise InvalidRequestError(
                f"tier {self._name!r}: a block key must be bytes, got {type(bad).__name__} {bad!r}"
            )

    def _release(self, key: BlockKey) -> None:
        """Forget a resident block (no event: the caller records it)."""
        self._doomed.discard(key)
        self.policy.remove(key)
        self._free_slot(key)

    def _free_slot(self, key: BlockKey) -> None:
        slot = self._slot_of.pop(key)
        self._key_at[slot] = None
        self._free.append(slot)

    def _emit_stored(self, keys: Sequence[BlockKey]) -> None:
        if self.enable_events and keys:
            hashes = [BlockHash(key) for key in keys]
            size = self.block_size
            self._events.append(BlockStored(hashes, None, [], size, None, self._name, 0))

    def _emit_removed(self, keys: Sequence[BlockKey]) -> None:
        self._drops += len(keys)
        if self.enable_events and keys:
            hashes = [BlockHash(key) for key in keys]
            self._events.append(BlockRemoved(hashes, medium=self._name, group_idx=0))

    # -- events and checks ---------------------------------------------------------

    def take_events(self) -> list[KVCacheEvent]:
        """Events recorded since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    def check_invariants(self) -> None:
        """Verify the bookkeeping (for tests and debugging). O(num_slots).

        Raises:
            KVTierError: Naming every broken invariant.
        """
        problems = []
        held = {slot: key for slot, key in enumerate(self._key_at) if key is not None}
        if {key: slot for slot, key in held.items()} != self._slot_of:
            problems.append("the slot → key and key → slot maps disagree")
        free = set(self._free)
        if len(free) != len(self._free) or any(not 0 <= s < self._num_slots for s in free):
            problems.append("a free slot is repeated or out of range")
        if free & held.keys() or len(free) + len(held) != self._num_slots:
            problems.append("a slot is both free and held, or neither")
        resident = self._slot_of.keys() - self._reserved
        if not self._reserved <= self._slot_of.keys():
            problems.append("a reserved key holds no slot")
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
