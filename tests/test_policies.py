"""Eviction policies: LRU order, victim selection past pinned keys, and the registry."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvtier.errors import ConfigError, UnknownNameError
from kvtier.policies.base import (
    EVICTION_POLICIES,
    EvictionPolicy,
    make_eviction_policy,
    register_eviction_policy,
)
from kvtier.policies.lru import LRUPolicy
from kvtier.policies.walk import first_evictable
from kvtier.tiers.index import TierIndex


def k(i: int) -> bytes:
    return b"k%03d" % i


def everything(_: bytes) -> bool:
    return True


# -- LRU ---------------------------------------------------------------------------


def test_lru_evicts_least_recently_inserted_first() -> None:
    lru = LRUPolicy()
    for i in range(4):
        lru.insert(k(i))
    assert len(lru) == 4
    assert list(lru) == [k(0), k(1), k(2), k(3)]
    assert lru.victims(2, everything) == [k(0), k(1)]
    assert len(lru) == 4, "victims() chooses, it does not remove"


def test_lru_access_and_reinsert_refresh() -> None:
    lru = LRUPolicy()
    for i in range(3):
        lru.insert(k(i))
    lru.access(k(0))
    assert lru.victims(3, everything) == [k(1), k(2), k(0)]
    lru.insert(k(1))  # re-insert refreshes, does not duplicate
    assert list(lru) == [k(2), k(0), k(1)]
    assert len(lru) == 3


def test_lru_remove_and_unknown_keys_are_ignored() -> None:
    lru = LRUPolicy()
    lru.insert(k(0))
    lru.insert(k(1))
    lru.remove(k(0))
    assert k(0) not in lru
    assert k(1) in lru
    lru.remove(k(9))
    lru.access(k(9))
    assert k(9) not in lru
    assert list(lru) == [k(1)]


def test_lru_victims_skip_non_evictable_keys() -> None:
    lru = LRUPolicy()
    for i in range(5):
        lru.insert(k(i))
    pinned = {k(0), k(2)}
    assert lru.victims(2, lambda key: key not in pinned) == [k(1), k(3)]
    assert lru.victims(10, lambda key: key not in pinned) == [k(1), k(3), k(4)]
    assert lru.victims(1, lambda key: False) == []
    assert lru.victims(0, everything) == []
    assert list(lru) == [k(i) for i in range(5)], "pinned keys are skipped, not lost"


def test_lru_victims_on_empty_policy() -> None:
    assert LRUPolicy().victims(3, everything) == []


def test_lru_satisfies_the_protocol() -> None:
    assert isinstance(LRUPolicy(), EvictionPolicy)
    assert isinstance(LRUPolicy(capacity=8), EvictionPolicy)
    assert repr(LRUPolicy()) == "LRUPolicy(0 keys)"


ops = st.lists(
    st.tuples(st.sampled_from(["insert", "access", "remove", "victims"]), st.integers(0, 7)),
    max_size=60,
)


@given(ops)
def test_lru_matches_a_list_model(script: list[tuple[str, int]]) -> None:
    lru = LRUPolicy()
    model: list[bytes] = []
    for op, i in script:
        key = k(i)
        if op == "insert":
            if key in model:
                model.remove(key)
            model.append(key)
            lru.insert(key)
        elif op == "access":
            if key in model:
                model.remove(key)
                model.append(key)
            lru.access(key)
        elif op == "remove":
            if key in model:
                model.remove(key)
            lru.remove(key)
        else:
            odd = [key for key in model if key[-1] % 2]
            assert lru.victims(i, lambda key: bool(key[-1] % 2)) == odd[:i]
        assert list(lru) == model
        assert len(lru) == len(model)


# -- registry ----------------------------------------------------------------------


def test_lru_is_registered_and_each_make_is_fresh() -> None:
    assert "lru" in EVICTION_POLICIES
    first = make_eviction_policy("lru", 4)
    second = make_eviction_policy("lru", 4)
    assert isinstance(first, LRUPolicy)
    assert first is not second
    first.insert(k(0))
    assert len(second) == 0


@pytest.mark.parametrize("name", ["LRU", "arc-not-yet", ""])
def test_unknown_policy_name_lists_the_valid_ones(name: str) -> None:
    with pytest.raises(UnknownNameError) as info:
        make_eviction_policy(name, 4)
    error = info.value
    assert isinstance(error, ConfigError)
    assert isinstance(error, KeyError)
    assert error.kind == "eviction policy"
    assert error.name == name
    assert error.valid == sorted(EVICTION_POLICIES)
    assert str(error) == (
        f"unknown eviction policy {name!r}; valid names are: {', '.join(sorted(EVICTION_POLICIES))}"
    )
    assert "lru" in str(error)


def test_unhashable_policy_name_is_unknown() -> None:
    with pytest.raises(UnknownNameError, match=r"valid names are: .*lru"):
        make_eviction_policy(["lru"], 4)  # type: ignore[arg-type]


def test_tier_index_rejects_an_unknown_policy_name() -> None:
    with pytest.raises(UnknownNameError, match="unknown eviction policy 'fifo'"):
        TierIndex("cpu", 4, "fifo")


BUILT_WITH: list[int | None] = []


class _FIFOPolicy(LRUPolicy):
    """Reads do not refresh: first in, first out."""

    def __init__(self, capacity: int | None = None) -> None:
        super().__init__(capacity)
        BUILT_WITH.append(capacity)

    def access(self, key: bytes) -> None:
        pass


def test_registered_policy_is_usable_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(EVICTION_POLICIES, "fifo-test", EVICTION_POLICIES["lru"])
    register_eviction_policy("fifo-test", _FIFOPolicy)
    assert isinstance(make_eviction_policy("fifo-test", 3), _FIFOPolicy)
    index = TierIndex("cpu", 2, "fifo-test")
    assert BUILT_WITH[-1] == 2, "the factory gets the tier's capacity"
    index.commit(index.reserve([k(0)]).keys)  # one by one: k(0) is inserted first
    index.commit(index.reserve([k(1)]).keys)
    index.pin([k(0)])  # a read: no refresh under FIFO
    index.unpin([k(0)])
    evicted = index.reserve([k(2)]).evicted
    assert [key for _, key in evicted] == [k(0)]
    with pytest.raises(UnknownNameError) as info:
        make_eviction_policy("nope", 1)
    assert "fifo-test" in info.value.valid


@pytest.mark.parametrize(("name", "factory"), [("", LRUPolicy), (3, LRUPolicy), ("x", None)])
def test_register_rejects_bad_arguments(name: object, factory: object) -> None:
    before = dict(EVICTION_POLICIES)
    with pytest.raises(ConfigError):
        register_eviction_policy(name, factory)  # type: ignore[arg-type]
    assert before == EVICTION_POLICIES


def test_first_evictable_walks_the_queues_in_order_skipping_pinned_keys() -> None:
    cold, warm = [b"c1", b"c2"], [b"w1", b"w2", b"w3"]
    pinned = {b"c2", b"w1"}
    assert first_evictable((cold, warm), 2, lambda key: key not in pinned) == [b"c1", b"w2"]
    assert first_evictable((cold, warm), 9, lambda key: key not in pinned) == [
        b"c1",
        b"w2",
        b"w3",
    ]
    assert first_evictable((cold, warm), 0, lambda key: True) == []
    assert first_evictable((), 3, lambda key: True) == []
