"""TierIndex: reservations, commits, pins, eviction, removal, restore and events.

Every error path is checked to change nothing (a snapshot before and after),
and a hypothesis state machine drives the index against a simple model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from kvtier.errors import (
    ConfigError,
    InvalidRequestError,
    KVTierError,
    TierError,
    TierFullError,
    UnknownNameError,
)
from kvtier.events import AllBlocksCleared, BlockRemoved, BlockStored
from kvtier.hashing import BlockHash
from kvtier.policies.lru import LRUPolicy
from kvtier.tiers.index import Reservation, TierIndex


def k(i: int) -> bytes:
    return b"k%03d" % i


def ks(*ids: int) -> list[bytes]:
    return [k(i) for i in ids]


def removed(keys: list[bytes], medium: str = "cpu") -> BlockRemoved:
    return BlockRemoved([BlockHash(key) for key in keys], medium, 0)


def stored(keys: list[bytes], block_size: int = 0, medium: str = "cpu") -> BlockStored:
    return BlockStored([BlockHash(key) for key in keys], None, [], block_size, None, medium, 0)


def snapshot(index: TierIndex) -> tuple[object, ...]:
    return (
        dict(index._slot_of),
        list(index._key_at),
        list(index._free),
        set(index._reserved),
        dict(index._pins),
        set(index._doomed),
        list(index.policy),  # type: ignore[call-overload]
        list(index._events),
    )


def filled(num_slots: int, *ids: int, **kwargs: object) -> TierIndex:
    """An index with ``ids`` committed one by one (the first is least recent)."""
    index = TierIndex("cpu", num_slots, **kwargs)  # type: ignore[arg-type]
    for block_id in ids:
        index.commit(index.reserve(ks(block_id)).keys)
    index.take_events()
    return index


def unchanged(index: TierIndex, error: type[Exception], call: Callable[[], object]) -> None:
    before = snapshot(index)
    with pytest.raises(error):
        call()
    assert snapshot(index) == before
    index.check_invariants()


# -- construction ------------------------------------------------------------------


@pytest.mark.parametrize("num_slots", [0, -1, True, 1.5, "4"])
def test_bad_num_slots(num_slots: object) -> None:
    with pytest.raises(ConfigError, match="num_slots"):
        TierIndex("cpu", num_slots)  # type: ignore[arg-type]


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ConfigError, match="name"):
        TierIndex("", 4)
    with pytest.raises(ConfigError, match="block_size"):
        TierIndex("cpu", 4, block_size=-1)
    with pytest.raises(UnknownNameError):
        TierIndex("cpu", 4, "nope")
    with pytest.raises(ConfigError, match="EvictionPolicy"):
        TierIndex("cpu", 4, object())  # type: ignore[arg-type]
    used = LRUPolicy()
    used.insert(k(0))
    with pytest.raises(ConfigError, match="empty"):
        TierIndex("cpu", 4, used)


def test_fresh_index() -> None:
    policy = LRUPolicy()
    index = TierIndex("disk", 3, policy, block_size=16)
    assert index.policy is policy
    assert (index.name, index.num_slots, index.num_free, index.num_resident) == ("disk", 3, 3, 0)
    assert (index.num_reserved, index.num_pinned, index.num_evictable, len(index)) == (0, 0, 0, 0)
    assert index.take_events() == []
    assert "TierIndex('disk'" in repr(index)
    index.check_invariants()


# -- reserve / commit / abort ---------------------------------------------------------


def test_reserved_blocks_are_invisible_until_committed() -> None:
    index = TierIndex("cpu", 4, block_size=16)
    reservation = index.reserve(ks(0, 1, 2))
    assert reservation == Reservation(tuple(ks(0, 1, 2)), (0, 1, 2), ())
    assert (index.num_free, index.num_reserved, index.num_resident) == (1, 3, 0)
    assert index.lookup(ks(0, 1, 2)) == 0
    assert not index.contains(k(0))
    assert index.slot_of(k(0)) is None
    assert k(0) not in index
    unchanged(index, InvalidRequestError, lambda: index.pin(ks(0)))
    index.commit(ks(0, 1, 2))
    assert index.lookup(ks(0, 1, 2, 3)) == 3
    assert [index.slot_of(key) for key in ks(0, 1, 2)] == [0, 1, 2]
    assert k(1) in index
    assert (index.num_free, index.num_reserved, index.num_resident, len(index)) == (1, 0, 3, 3)
    assert index.blocks() == [(0, k(0)), (1, k(1)), (2, k(2))]
    assert index.take_events() == [stored(ks(0, 1, 2), 16)]
    index.check_invariants()


def test_reserve_skips_known_and_repeated_keys() -> None:
    index = filled(6, 0, 1)
    index.reserve(ks(2))
    reservation = index.reserve(ks(0, 2, 3, 3, 4, 1))
    assert reservation.keys == tuple(ks(3, 4))
    assert len(reservation.slots) == 2
    assert index.reserve([]) == Reservation((), (), ())
    assert index.reserve(ks(0, 1, 2)) == Reservation((), (), ())
    index.check_invariants()


def test_abort_frees_slots_without_events() -> None:
    index = TierIndex("cpu", 2)
    slots = index.reserve(ks(0, 1)).slots
    index.abort(ks(1, 0))
    assert (index.num_free, index.num_reserved) == (2, 0)
    assert index.take_events() == []
    assert index.reserve(ks(5, 6)).slots == tuple(sorted(slots))
    index.check_invariants()


@pytest.mark.parametrize("method", ["commit", "abort"])
@pytest.mark.parametrize(
    "keys",
    [ks(1, 3), ks(1, 0), ks(1, 1), ["k001"]],
    ids=["unknown", "committed", "repeated", "str"],
)
def test_commit_and_abort_errors_change_nothing(method: str, keys: list[object]) -> None:
    index = filled(4, 0)
    index.reserve(ks(1, 2))
    unchanged(index, InvalidRequestError, lambda: getattr(index, method)(keys))
    getattr(index, method)([])
    assert index.take_events() == []


@pytest.mark.parametrize("method", ["reserve", "pin", "unpin", "remove", "commit", "abort"])
def test_non_bytes_keys_are_rejected(method: str) -> None:
    index = filled(4, 0)
    unchanged(index, InvalidRequestError, lambda: getattr(index, method)([k(0), 7]))


# -- eviction ------------------------------------------------------------------------


def test_reserve_evicts_least_recently_used_first() -> None:
    index = filled(3, 0, 1, 2)
    reservation = index.reserve(ks(3, 4))
    assert reservation.evicted == ((0, k(0)), (1, k(1)))
    assert sorted(reservation.slots) == [0, 1]
    assert index.take_events() == [removed(ks(0, 1))]
    assert index.lookup(ks(0)) == 0
    assert index.contains(k(2))
    index.check_invariants()


def test_reads_refresh_recency() -> None:
    index = filled(3, 0, 1, 2)
    index.pin(ks(0))
    index.unpin(ks(0))
    assert [key for _, key in index.reserve(ks(3)).evicted] == [k(1)]
    assert index.lookup(ks(0)) == 1, "lookup does not pin or refresh"
    assert [key for _, key in index.reserve(ks(4)).evicted] == [k(2)]


def test_pinned_blocks_survive_eviction() -> None:
    index = filled(3, 0, 1, 2)
    index.pin(ks(0, 1))
    reservation = index.reserve(ks(3))
    assert [key for _, key in reservation.evicted] == [k(2)]
    assert index.lookup(ks(0, 1)) == 2
    unchanged(index, TierFullError, lambda: index.reserve(ks(4)))  # 0, 1 pinned, 3 reserved
    index.unpin(ks(0))
    assert [key for _, key in index.reserve(ks(4)).evicted] == [k(0)]
    index.check_invariants()


def test_tier_full_is_atomic() -> None:
    index = filled(4, 0, 1, 2)
    index.pin(ks(0))
    assert (index.num_free, index.num_evictable) == (1, 2)
    unchanged(index, TierFullError, lambda: index.reserve(ks(5, 6, 7, 8)))  # 4 > 1 + 2
    with pytest.raises(TierFullError, match="4 slots needed, 1 free, 2 evictable") as info:
        index.reserve(ks(5, 6, 7, 8))
    assert isinstance(info.value, TierError)
    assert info.value.tier == "cpu"
    assert len(index.reserve(ks(5, 6, 7)).evicted) == 2  # exactly enough


def test_more_keys_than_slots() -> None:
    index = TierIndex("cpu", 2)
    unchanged(index, TierFullError, lambda: index.reserve(ks(0, 1, 2)))


class _BadPolicy(LRUPolicy):
    def __init__(self, answer: Callable[[list[bytes]], list[bytes]]) -> None:
        super().__init__()
        self.answer = answer

    def victims(self, count: int, evictable: Callable[[bytes], bool]) -> list[bytes]:
        return self.answer(list(self))


@pytest.mark.parametrize(
    "answer",
    [
        lambda keys: [],
        lambda keys: keys[:1] * 2,
        lambda keys: [k(99), k(98)],
        lambda keys: keys[-2:],  # k(0), pinned, is the most recent
    ],
)
def test_a_policy_returning_bad_victims_changes_nothing(
    answer: Callable[[list[bytes]], list[bytes]],
) -> None:
    index = TierIndex("cpu", 3, _BadPolicy(answer))
    index.commit(index.reserve(ks(0, 1, 2)).keys)
    index.pin(ks(0))
    unchanged(index, KVTierError, lambda: index.reserve(ks(3, 4)))


# -- pin / unpin ---------------------------------------------------------------------


def test_a_pin_without_access_keeps_a_block_but_leaves_its_policy_untouched() -> None:
    """What a planner pins only so that its own reservation cannot evict it."""
    for access, victim in ((False, 0), (True, 1)):
        index = filled(2, 0, 1)  # k0 least recent
        assert index.pin(ks(0), access=access) == [0]
        assert index.num_pinned == 1
        unchanged(index, TierFullError, functools.partial(index.reserve, ks(2, 3)))  # k0 kept
        index.unpin(ks(0))
        assert [key for _, key in index.reserve(ks(2)).evicted] == [k(victim)]
        index.check_invariants()


def test_keeps_is_visible_or_being_written_not_awaiting_removal() -> None:
    index = filled(4, 0, 1)
    index.reserve(ks(2))
    index.pin(ks(1))
    index.remove(ks(1))  # pinned: its slot waits for the last unpin
    assert [index.keeps(key) for key in ks(0, 1, 2, 3)] == [True, False, True, False]
    assert [index.holds(key) for key in ks(0, 1, 2, 3)] == [True, True, True, False]


def test_pin_returns_slots_and_counts_each_occurrence() -> None:
    index = filled(4, 0, 1)
    assert index.pin(ks(1, 0, 1)) == [1, 0, 1]
    assert index.num_pinned == 2
    assert index.unpin(ks(1)) == []
    assert index._pins == {k(0): 1, k(1): 1}
    assert index.unpin(ks(0, 1)) == []
    assert index.num_pinned == 0
    index.check_invariants()


def test_pin_and_unpin_errors_change_nothing() -> None:
    index = filled(4, 0, 1)
    index.reserve(ks(2))
    index.pin(ks(0))
    unchanged(index, InvalidRequestError, lambda: index.pin(ks(0, 5)))  # unknown
    unchanged(index, InvalidRequestError, lambda: index.pin(ks(1, 2)))  # reserved
    unchanged(index, InvalidRequestError, lambda: index.unpin(ks(0, 0)))  # underflow
    unchanged(index, InvalidRequestError, lambda: index.unpin(ks(0, 1)))  # 1 not pinned
    unchanged(index, InvalidRequestError, lambda: index.unpin(ks(7)))  # unknown


# -- remove ------------------------------------------------------------------------


def test_remove_unpinned_frees_now() -> None:
    index = filled(4, 0, 1, 2)
    assert index.remove(ks(1, 1, 0, 9)) == [(1, k(1)), (0, k(0))]
    assert index.take_events() == [removed(ks(1, 0))]
    assert (index.num_free, index.num_resident) == (3, 1)
    assert index.remove(ks(1)) == []
    assert index.take_events() == []
    index.check_invariants()


def test_remove_while_pinned_is_deferred_to_the_last_unpin() -> None:
    index = filled(2, 0, 1)
    index.pin(ks(0, 0))
    assert index.remove(ks(0)) == []
    assert index.take_events() == [removed(ks(0))], "invisible now"
    assert not index.contains(k(0))
    assert index.lookup(ks(0)) == 0
    assert index.blocks() == [(1, k(1))]
    assert (index.num_free, index.num_resident, index.num_evictable) == (0, 2, 1)
    unchanged(index, InvalidRequestError, lambda: index.pin(ks(0)))
    assert index.remove(ks(0)) == [], "removing twice is a no-op"
    assert index.reserve(ks(0)).keys == (), "its slot is still held: no second copy"
    index.check_invariants()
    assert index.unpin(ks(0)) == []
    assert index.unpin(ks(0)) == [(0, k(0))]
    assert index.take_events() == [], "the event was recorded at remove()"
    assert (index.num_free, index.num_resident) == (1, 1)
    index.check_invariants()


def test_remove_ignores_reserved_keys() -> None:
    index = TierIndex("cpu", 2)
    index.reserve(ks(0))
    unchanged(index, InvalidRequestError, lambda: index.remove([None]))  # type: ignore[list-item]
    assert index.remove(ks(0)) == []
    assert index.num_reserved == 1


# -- restore ---------------------------------------------------------------------------


def test_restore_enters_blocks_in_policy_order() -> None:
    index = TierIndex("disk", 4)
    index.restore([(3, k(0)), (1, k(1))])
    assert index.blocks() == [(1, k(1)), (3, k(0))]
    assert index.take_events() == [stored(ks(0, 1), medium="disk")]
    assert sorted(index.reserve(ks(5, 6)).slots) == [0, 2]
    assert index.reserve(ks(7)).evicted == ((3, k(0)),)
    index.restore([])
    assert index.take_events() == [removed(ks(0), "disk")]
    index.check_invariants()


@pytest.mark.parametrize(
    "pairs",
    [
        [(4, k(5))],  # out of range
        [(-1, k(5))],
        [(True, k(5))],
        [(1.0, k(5))],
        [(0, k(5))],  # held by a resident block
        [(1, k(5))],  # held by a reservation
        [(2, k(0))],  # key already resident
        [(2, k(1))],  # key already reserved
        [(2, "k005")],
        [(2, k(5)), (2, k(6))],  # repeated slot
        [(2, k(5)), (3, k(5))],  # repeated key
        [(2,)],
        [(2, k(5), 0)],
        [None],
    ],
)
def test_restore_errors_change_nothing(pairs: list[object]) -> None:
    index = filled(4, 0)
    index.reserve(ks(1))
    unchanged(index, InvalidRequestError, lambda: index.restore(pairs))  # type: ignore[arg-type]


# -- clear, events, invariants -------------------------------------------------------------


def test_clear_refuses_while_in_flight() -> None:
    index = filled(4, 0, 1)
    index.pin(ks(0))
    before = snapshot(index)
    assert index.clear() is False
    assert snapshot(index) == before
    index.unpin(ks(0))
    index.reserve(ks(2))
    assert index.clear() is False
    index.abort(ks(2))
    assert index.clear() is True
    assert (index.num_free, index.num_resident, len(index.policy)) == (4, 0, 0)
    assert index.take_events() == [AllBlocksCleared("cpu")]
    assert index.reserve(ks(0)).slots == (0,)
    index.check_invariants()


def test_retire_hides_every_block_and_holds_its_slot_until_unpinned() -> None:
    index = filled(4, 0, 1, 2)
    drops = index.drops
    assert sorted(index.retire() or []) == [(0, k(0)), (1, k(1)), (2, k(2))]
    assert index.take_events() == [AllBlocksCleared("cpu")]
    assert index.drops == drops + 3
    assert not any(index.contains(key) for key in ks(0, 1, 2))
    assert all(index.holds(key) for key in ks(0, 1, 2))  # a store skips them meanwhile
    assert index.reserve(ks(0, 3)).keys == (k(3),)
    counts = (index.num_free, index.num_pinned, len(index.policy), index.num_evictable)
    assert counts == (0, 3, 0, 0)
    index.check_invariants()
    with pytest.raises(TierFullError):
        index.reserve(ks(4))  # the retired slots are not evictable
    assert sorted(index.unpin(ks(0, 1, 2))) == [(0, k(0)), (1, k(1)), (2, k(2))]
    assert (index.num_free, index.num_resident) == (3, 0)
    index.check_invariants()
    assert index.take_events() == []  # the one AllBlocksCleared said it all


def test_retire_refuses_while_a_block_is_pinned_or_reserved() -> None:
    index = filled(4, 0, 1)
    index.pin(ks(0))
    before = snapshot(index)
    assert index.retire() is None
    assert snapshot(index) == before
    index.unpin(ks(0))
    index.reserve(ks(2))
    assert index.retire() is None
    index.abort(ks(2))
    assert index.retire() is not None
    assert index.retire() is None  # retired blocks stay pinned until released
    assert TierIndex("cpu", 2).retire() == []


def test_events_can_be_disabled() -> None:
    index = TierIndex("cpu", 1, enable_events=False)
    index.commit(index.reserve(ks(0)).keys)
    index.commit(index.reserve(ks(1)).keys)
    index.remove(ks(1))
    index.clear()
    assert index.take_events() == []


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda ix: ix._free.append(0), "free"),
        (lambda ix: ix._slot_of.__setitem__(k(0), 1), "maps disagree"),
        (lambda ix: ix._pins.__setitem__(k(0), 0), "pin count"),
        (lambda ix: ix._pins.__setitem__(k(9), 1), "pinned key is not resident"),
        (lambda ix: ix._doomed.add(k(1)), "awaiting release"),
        (lambda ix: ix.policy.remove(k(0)), "policy"),
        (lambda ix: ix._reserved.add(k(9)), "reserved key"),
    ],
)
def test_check_invariants_reports_corruption(
    corrupt: Callable[[TierIndex], object], message: str
) -> None:
    index = filled(4, 0, 1)
    index.check_invariants()
    corrupt(index)
    with pytest.raises(KVTierError, match=message):
        index.check_invariants()


# -- pending reservations ----------------------------------------------------------------


def test_pending_reservations_are_held_but_not_visible() -> None:
    index = filled(8, 0, 1)
    reservation = index.reserve_new(dict.fromkeys(ks(2, 3)).keys())
    assert reservation == Reservation(tuple(ks(2, 3)), (2, 3), ())
    assert all(index.holds(key) for key in ks(0, 1, 2, 3))  # "being written" counts as held
    assert [index.contains(key) for key in ks(0, 1, 2, 3)] == [True, True, False, False]
    assert index.lookup(ks(0, 1, 2, 3)) == 2
    resident, reserved, removed_pinned = index.key_sets()
    assert (set(resident), set(reserved), set(removed_pinned)) == (
        set(ks(0, 1)),
        set(ks(2, 3)),
        set(),
    )
    assert (index.num_reserved, index.num_resident, index.num_free, index.num_reservable) == (
        2,
        2,
        4,
        6,
    )
    with pytest.raises(InvalidRequestError):
        index.reserve_new(ks(3, 4))  # k(3) is pending: it holds a slot
    assert index.reserve(ks(2, 3, 4)).keys == (k(4),)
    index.check_invariants()


def test_pending_reservations_commit_into_the_resident_map() -> None:
    index = filled(8, 0)
    first = index.reserve_new(ks(1, 2))
    second = index.reserve_new(ks(3))
    index.commit([k(2), k(3)])  # across reservations, in any order
    assert [index.slot_of(key) for key in ks(1, 2, 3)] == [None, first.slots[1], second.slots[0]]
    index.commit([k(1)])
    assert [index.slot_of(key) for key in ks(1, 2, 3)] == [*first.slots, *second.slots]
    assert index.num_reserved == 0
    assert list(index.policy) == ks(0, 3, 2, 1)  # type: ignore[call-overload]  # tail first
    index.check_invariants()


def test_pending_reservations_dropped_on_abort() -> None:
    index = filled(4, 0)
    reservation = index.reserve_new(ks(1, 2))
    index.abort([k(2)])
    assert not index.holds(k(2))
    assert index.holds(k(1))
    index.abort([k(1)])
    assert (index.num_free, index.num_reserved, len(index)) == (3, 0, 1)
    assert index.reserve_new(ks(5, 6)).slots == reservation.slots  # freed slots back on the stack
    index.check_invariants()


def test_pending_reservations_are_never_evicted() -> None:
    index = filled(3, 0)
    index.reserve_new(ks(1, 2))
    assert index.num_reservable == 1
    with pytest.raises(TierFullError):
        index.reserve(ks(3, 4))  # only k(0) may go: the pending ones stay
    reservation = index.reserve(ks(3))
    assert reservation.evicted == ((0, k(0)),)
    index.commit(ks(1, 2, 3))
    assert (index.num_resident, index.num_reserved) == (3, 0)
    index.check_invariants()


def test_restore_and_clear_respect_pending_reservations() -> None:
    index = TierIndex("cpu", 3)
    slot = index.reserve_new(ks(0)).slots[0]
    with pytest.raises(InvalidRequestError):
        index.restore([(slot, k(1))])  # the slot is pending, not free
    assert index.clear() is False
    index.commit(ks(0))
    assert index.clear() is True
    index.check_invariants()


# -- state machine ---------------------------------------------------------------------

NUM_KEYS = 10
some_keys = st.lists(st.integers(0, NUM_KEYS - 1).map(k), max_size=5)


class TierIndexMachine(RuleBasedStateMachine):
    """Random stores, loads, removals, clears and retires against a model of LRU residency."""

    @initialize(num_slots=st.integers(1, 6))
    def setup(self, num_slots: int) -> None:
        self.index = TierIndex("cpu", num_slots)
        self.num_slots = num_slots
        self.reserved: set[bytes] = set()
        self.order: list[bytes] = []  # visible resident keys, least recent first
        self.pins: dict[bytes, int] = {}
        self.doomed: set[bytes] = set()

    def known(self) -> set[bytes]:
        return self.reserved | set(self.order) | self.doomed

    def touch(self, key: bytes) -> None:
        self.order.remove(key)
        self.order.append(key)

    @rule(
        keys=st.lists(st.integers(0, NUM_KEYS - 1).map(k), max_size=3),
        then=st.sampled_from(["commit", "keep", "abort"]),
    )
    def reserve(self, keys: list[bytes], then: str) -> None:
        new = [key for key in dict.fromkeys(keys) if key not in self.known()]
        shortfall = len(new) - (self.num_slots - len(self.known()))
        evictable = [key for key in self.order if key not in self.pins]
        if shortfall > len(evictable):
            unchanged(self.index, TierFullError, lambda: self.index.reserve(keys))
            return
        reservation = self.index.reserve(keys)
        victims = evictable[: max(shortfall, 0)]
        assert reservation.keys == tuple(new)
        assert [key for _, key in reservation.evicted] == victims
        assert len(set(reservation.slots)) == len(new)
        events = self.index.take_events()
        assert events == ([removed(victims)] if victims else [])
        for key in victims:
            self.order.remove(key)
        if then == "commit":
            self.index.commit(new)
            self.order += reversed(new)  # a batch is a chain: its head ends most recent
        elif then == "abort":
            self.index.abort(new)
        else:
            self.reserved |= set(new)

    @precondition(lambda self: self.reserved)
    @rule(data=st.data(), commit=st.booleans())
    def settle(self, data: st.DataObject, commit: bool) -> None:
        pool = sorted(self.reserved)
        keys = data.draw(st.lists(st.sampled_from(pool), min_size=1, unique=True))
        if commit:
            self.index.commit(keys)
            self.order += reversed(keys)
        else:
            self.index.abort(keys)
        self.reserved -= set(keys)

    @rule(keys=some_keys, commit=st.booleans())
    def settle_unreserved(self, keys: list[bytes], commit: bool) -> None:
        if all(key in self.reserved for key in keys) and len(set(keys)) == len(keys):
            return
        call = self.index.commit if commit else self.index.abort
        unchanged(self.index, InvalidRequestError, lambda: call(keys))

    @rule(keys=some_keys)
    def pin(self, keys: list[bytes]) -> None:
        if any(key not in self.order for key in keys):
            unchanged(self.index, InvalidRequestError, lambda: self.index.pin(keys))
            return
        slots = self.index.pin(keys)
        assert slots == [self.index.slot_of(key) for key in keys]
        for key in reversed(keys):  # read as a chain: the head ends most recent
            self.pins[key] = self.pins.get(key, 0) + 1
            self.touch(key)

    @rule(keys=st.lists(st.integers(0, NUM_KEYS - 1).map(k), max_size=3))
    def store(self, keys: list[bytes]) -> None:
        """The common path, weighted up so the tier fills and evicts."""
        self.reserve(keys, "commit")

    @precondition(lambda self: self.order)
    @rule(data=st.data(), done=st.booleans())
    def load(self, data: st.DataObject, done: bool) -> None:
        keys = data.draw(st.lists(st.sampled_from(self.order), min_size=1, max_size=3))
        self.pin(keys)
        if done:
            self.unpin(keys)

    @precondition(lambda self: self.pins)
    @rule(data=st.data(), remove_first=st.booleans())
    def unpin_pinned(self, data: st.DataObject, remove_first: bool) -> None:
        keys = data.draw(st.lists(st.sampled_from(sorted(self.pins)), min_size=1, unique=True))
        if remove_first:  # a load found them corrupt
            self.remove(keys)
        self.unpin(keys)

    @rule(keys=some_keys)
    def unpin(self, keys: list[bytes]) -> None:
        if any(self.pins.get(key, 0) < keys.count(key) for key in keys):
            unchanged(self.index, InvalidRequestError, lambda: self.index.unpin(keys))
            return
        slots = {key: self.index._slot_of[key] for key in keys}
        left = self.index.unpin(keys)
        expected = []
        for key in dict.fromkeys(keys):
            self.pins[key] -= keys.count(key)
            if not self.pins[key]:
                del self.pins[key]
                if key in self.doomed:
                    self.doomed.remove(key)
                    expected.append((slots[key], key))
        assert left == expected

    @rule(keys=some_keys)
    def remove(self, keys: list[bytes]) -> None:
        gone = [key for key in dict.fromkeys(keys) if key in self.order]
        left = self.index.remove(keys)
        assert [key for _, key in left] == [key for key in gone if key not in self.pins]
        assert self.index.take_events() == ([removed(gone)] if gone else [])
        for key in gone:
            self.order.remove(key)
            if key in self.pins:
                self.doomed.add(key)

    @rule(data=st.data())
    def restore(self, data: st.DataObject) -> None:
        free = sorted(self.index._free)
        unknown = [k(i) for i in range(NUM_KEYS, NUM_KEYS + 3) if k(i) not in self.known()]
        if not free or not unknown:
            return
        slot = data.draw(st.sampled_from(free))
        self.index.restore([(slot, unknown[0])])
        assert self.index.slot_of(unknown[0]) == slot
        self.order.append(unknown[0])

    @rule(really=st.integers(0, 5))
    def clear(self, really: int) -> None:
        if really != 5:  # keep clears rare, so the tier fills up
            return
        expected = not self.pins and not self.reserved
        before = snapshot(self.index)
        assert self.index.clear() is expected
        if expected:
            self.order = []
            self.doomed = set()
        else:
            assert snapshot(self.index) == before

    @rule(really=st.integers(0, 5))
    def retire(self, really: int) -> None:
        """A reset of a disk tier: every block hidden, pinned once until its file is gone."""
        if really != 5:
            return
        before = snapshot(self.index)
        retired = self.index.retire()
        if self.pins or self.reserved:
            assert retired is None
            assert snapshot(self.index) == before
            return
        assert retired is not None
        assert sorted(key for _, key in retired) == sorted(self.order)
        assert self.index.take_events() == [AllBlocksCleared("cpu")]
        for key in self.order:
            self.pins[key] = 1
            self.doomed.add(key)
        self.order = []

    @invariant()
    def matches_the_model(self) -> None:
        index = self.index
        index.check_invariants()
        index.take_events()
        assert list(index.policy) == self.order  # type: ignore[call-overload]
        assert index.num_reserved == len(self.reserved)
        assert index.num_resident == len(self.order) + len(self.doomed)
        assert index.num_free == self.num_slots - len(self.known())
        assert index.num_pinned == len(self.pins)
        for i in range(NUM_KEYS + 3):
            assert index.contains(k(i)) is (k(i) in self.order)
        assert [key for _, key in index.blocks()] == sorted(
            self.order, key=lambda key: index._slot_of[key]
        )


TestTierIndexMachine = TierIndexMachine.TestCase


def test_a_chain_committed_head_first_loses_its_tail_first() -> None:
    index = TierIndex("cpu", 3, "lru")
    chain = ks(1, 2, 3)  # head, middle, tail, stored in one batch
    index.commit(index.reserve(chain).keys)
    assert [key for _, key in index.reserve(ks(9)).evicted] == [k(3)]


def test_a_chain_pinned_for_a_load_keeps_its_head_longest() -> None:
    index = filled(4, 7, 3, 2, 1)  # 7 least recent; the chain 1, 2, 3 stored out of order
    chain = ks(1, 2, 3)
    index.pin(chain)  # a load reads the chain head first
    index.unpin(chain)
    evicted = index.reserve(ks(8, 9, 10)).evicted
    assert [key for _, key in evicted] == [k(7), k(3), k(2)]


def test_pin_and_unpin_errors_name_the_keys_by_their_first_hex_digits() -> None:
    index = TierIndex("cpu", 8)
    missing = [bytes([i]) * 32 for i in range(6)]
    with pytest.raises(InvalidRequestError) as pinned:
        index.pin(missing)
    message = str(pinned.value)
    assert "cannot pin blocks it does not hold, 6 key(s): 0000000000000000…" in message
    assert message.endswith("0303030303030303… and 2 more")
    with pytest.raises(InvalidRequestError, match=r"zero pins, 1 key\(s\): 0505050505050505…$"):
        index.unpin(missing[5:])
