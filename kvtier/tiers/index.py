"""TierIndex: the slot bookkeeping of one lower tier.

Synchronous and pure (no I/O): it maps block keys to slots, keeps the free
slots, pins blocks that a load is reading so they cannot be evicted, asks an
:class:`~kvtier.policies.base.EvictionPolicy` for victims, and records
``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared`` events with the
tier's name as ``medium``.

A block's life. :meth:`TierIndex.reserve` hands out slots for a store; a
reserved block is *pending*: :meth:`TierIndex.holds` reports it (being
written), :meth:`TierIndex.contains` does not, and it cannot be evicted.
Pending reservations are kept apart from the resident blocks (see
:class:`~kvtier.tiers.slots.SlotMap`), so reserving touches only a small map.
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
from collections.abc import Collection, Iterable
from typing import TypeGuard

from kvtier.errors import ConfigError, InvalidRequestError, KVTierError, TierFullError
from kvtier.events import KVCacheEvent
from kvtier.policies.base import EvictionPolicy, make_eviction_policy
from kvtier.policies.hints import BlockHint
from kvtier.tiers.base import BlockKey, keys_text
from kvtier.tiers.index_bulk import IndexBulk
from kvtier.tiers.index_hints import (
    HintMemory,
    Hints,
    check_hints,
    notify_access,
    notify_insert,
)
from kvtier.tiers.index_queries import IndexQueries
from kvtier.tiers.slots import Reservation, SlotMap, slot_table_shortfall

__all__ = ["Reservation", "TierIndex"]


_BYTES = frozenset({bytes})
# Concrete types whose items are distinct (an isinstance test against them is
# cheap; other sets are checked by counting).
_DISTINCT: tuple[type, ...] = (set, frozenset, type({}.keys()))


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


class TierIndex(IndexQueries, IndexBulk):
    """Key → slot bookkeeping, pins and eviction for one tier.

    Chain order: the keys of one :meth:`commit` or :meth:`pin` call are taken
    as the offload manager lists them, each request's blocks head first; the
    policy hears of them tail first, so a recency policy evicts a chain's
    tail before its head (a head evicted first would orphan the blocks after
    it: prefix lookups stop at the first miss). :meth:`commit` and :meth:`pin`
    take optional hints, one :class:`~kvtier.policies.hints.BlockHint` (or
    None) per key, passed to a
    :class:`~kvtier.policies.base.PrefixAwarePolicy` (other policies get the
    plain calls; see :mod:`kvtier.tiers.index_hints`).

    The queries (:meth:`contains`, :meth:`holds`, :meth:`lookup`, the
    counters…) are inherited from
    :class:`~kvtier.tiers.index_queries.IndexQueries`, :meth:`take_events`
    from :class:`~kvtier.tiers.index_events.IndexEvents`, the whole-tier
    changes (:meth:`restore`, :meth:`clear`, :meth:`retire`) from
    :class:`~kvtier.tiers.index_bulk.IndexBulk`.

    Args:
        name: The tier's name, reported as ``medium`` in events.
        num_slots: The tier's capacity in blocks.
        policy: An empty eviction policy, or the registered name of one (see
            :data:`~kvtier.policies.base.EVICTION_POLICIES`).
        enable_events: Record events for :meth:`take_events`.
        block_size: Tokens per block, reported in ``BlockStored`` events.

    Raises:
        ConfigError: ``name`` is empty, ``num_slots`` is not a positive
            integer, ``block_size`` is negative, ``policy`` is not an
            empty :class:`~kvtier.policies.base.EvictionPolicy`, or the slot
            tables (:data:`~kvtier.tiers.slots.SLOT_TABLE_BYTES` per slot, up
            front) do not fit in the host memory available now (a disk of
            small blocks: 10 TiB of 16 KiB blocks is 32 GB of index).
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
        shortfall = slot_table_shortfall(num_slots)
        if shortfall is not None:  # an oversized disk would be killed for memory, silently
            raise ConfigError(
                f"tier {name!r}: {shortfall}: lower its capacity, or use larger blocks"
            )
        if isinstance(policy, str):
            policy = make_eviction_policy(policy, num_slots)
        elif not isinstance(policy, EvictionPolicy) or len(policy):
            raise ConfigError(f"policy must be an empty EvictionPolicy or a name, got {policy!r}")
        self._name = name
        self._num_slots = num_slots
        self.policy: EvictionPolicy = policy
        self.enable_events = enable_events
        self.block_size = block_size
        self._slots = slots = SlotMap(num_slots)
        # Aliases of the map's containers (never rebound), read by the hot paths.
        self._free = slots.free  # a stack: slot 0 first
        self._slot_of = slots.resident  # committed keys (removed-but-pinned included)
        self._key_at = slots.key_at
        self._reserved = slots.reserved  # pending: being written, not evictable
        self._pins: dict[BlockKey, int] = {}  # resident blocks being read
        self._doomed: set[BlockKey] = set()  # removed while pinned: leave on last unpin
        self._events: list[KVCacheEvent] = []
        self._drops = 0
        self._hints = HintMemory(policy)  # passed on with demotions

    def __repr__(self) -> str:
        counts = f"free={self.num_free}, reserved={self.num_reserved}"
        return (
            f"TierIndex({self._name!r}, {counts}, resident={len(self)}, pinned={len(self._pins)})"
        )

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
        holds = self._slots.holds
        return self._assign([key for key in dict.fromkeys(wanted) if not holds(key)])

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
        if not set(map(type, keys)) <= _BYTES:
            self._require_bytes(list(keys))
        distinct = isinstance(keys, _DISTINCT) or len(set(keys)) == len(keys)
        reserved = self._reserved
        unheld = self._slot_of.keys().isdisjoint(keys) and (
            not reserved or reserved.isdisjoint(keys)
        )
        if not distinct or not unheld:
            raise InvalidRequestError(
                f"tier {self._name!r}: reserve_new needs distinct keys holding no slot"
            )
        return self._assign(keys)

    def _assign(self, new: Collection[BlockKey]) -> Reservation:
        """Give each key (distinct, holding no slot: checked by the caller) a pending slot."""
        count = len(new)
        shortfall = count - len(self._free)
        evicted: tuple[tuple[int, BlockKey], ...] = ()
        hints: tuple[BlockHint | None, ...] = ()
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
            hints = self._hints.of(victims)
            for key in victims:
                self._release(key)
            self._emit_removed(victims)
        keys = tuple(new)
        return Reservation(keys, self._slots.take(keys), evicted, hints)

    def _choose_victims(self, count: int) -> list[BlockKey]:
        pins = self._pins
        victims = self.policy.victims(count, lambda key: key not in pins)
        valid = (
            len(victims) == count
            and len(set(victims)) == count
            and all(key in self._slot_of for key in victims)
            and not any(key in pins for key in victims)
        )
        if not valid:
            raise KVTierError(
                f"tier {self._name!r}: eviction policy {self.policy!r} returned invalid "
                f"victims for {count} of {self.num_evictable} evictable blocks: {victims!r}"
            )
        return victims

    def commit(self, keys: Iterable[BlockKey], hints: Hints | None = None) -> None:
        """The reserved blocks were written: make them resident and visible.

        Args:
            keys: The blocks written, each request's chain head first.
            hints: Optional, one per key: where it sits in its request's chain.

        Raises:
            InvalidRequestError: A key is not reserved or is repeated, or the
                hints do not match the keys; nothing changed.
        """
        done = self._require_reserved(keys, "commit")
        check_hints(self._name, done, hints)
        self._slots.commit(done)
        self._hints.remember(done, hints)
        notify_insert(self.policy, done, hints)  # tail first
        self._emit_stored(done)

    def abort(self, keys: Iterable[BlockKey]) -> None:
        """The reserved blocks were not written: free their slots. Records no event.

        Raises:
            InvalidRequestError: A key is not reserved or is repeated; nothing changed.
        """
        self._slots.abort(self._require_reserved(keys, "abort"))

    def _require_reserved(self, keys: Iterable[BlockKey], what: str) -> list[BlockKey]:
        items = list(keys)
        self._require_bytes(items)
        reserved = self._reserved
        missing = sum(key not in reserved for key in items)
        if missing or len(set(items)) != len(items):
            raise InvalidRequestError(
                f"tier {self._name!r}: cannot {what} {len(items)} keys: {missing} are not "
                "reserved or a key is repeated"
            )
        return items

    # -- loads -------------------------------------------------------------------

    def pin(
        self, keys: Iterable[BlockKey], hints: Hints | None = None, *, access: bool = True
    ) -> list[int]:
        """Pin visible blocks for a load and count the read as an access (unless ``access``).

        A key may appear more than once (and be pinned again by another load):
        each occurrence takes one pin, released by one :meth:`unpin`.

        Args:
            keys: The blocks to read, each request's chain head first.
            hints: Optional, one per key: where it sits in its request's chain.
            access: False to only keep the blocks from being evicted (nothing
                is read): the policy is not told and the hints are ignored.

        Returns:
            The slot of each key, in order.

        Raises:
            InvalidRequestError: A key is not visible, or the hints do not
                match the keys; nothing changed.
        """
        items = list(keys)
        self._require_bytes(items)
        missing = [key for key in items if not self.contains(key)]
        if missing:
            raise InvalidRequestError(
                f"tier {self._name!r}: cannot pin blocks it does not hold, {keys_text(missing)}"
            )
        check_hints(self._name, items, hints)
        pins = self._pins
        for key in items:
            pins[key] = pins.get(key, 0) + 1
        if access:
            self._hints.remember(items, hints)
            notify_access(self.policy, items, hints)  # tail first: see the class docstring
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
            raise InvalidRequestError(
                f"tier {self._name!r}: unpin below zero pins, {keys_text(short)}"
            )
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
                self._hints.forget(key)
            else:
                left.append((self._slot_of[key], key))
                self._release(key)
        self._emit_removed(gone)
        return left

    # -- internals ---------------------------------------------------------------

    def _release(self, key: BlockKey) -> None:
        """Forget a resident block (no event: the caller records it)."""
        self._doomed.discard(key)
        self.policy.remove(key)
        self._hints.forget(key)
        self._slots.release(key)
