"""Tests for the SLRU and priority-LRU eviction policies."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvtier.errors import ConfigError
from kvtier.policies import PriorityLRUPolicy, SLRUPolicy, make_eviction_policy
from kvtier.policies.priority import DEFAULT_PRIORITY
from kvtier.policies.simulation import simulate


def k(i: int) -> bytes:
    return i.to_bytes(2, "big")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def always(_: bytes) -> bool:
    return True


def test_registered_by_name() -> None:
    assert isinstance(make_eviction_policy("slru", 10), SLRUPolicy)
    assert isinstance(make_eviction_policy("priority_lru", 10), PriorityLRUPolicy)


def test_slru_known_answer() -> None:
    policy = SLRUPolicy(10)  # probation share 1, protected 9
    for i in range(4):
        policy.insert(k(i))
    policy.access(k(1))  # shared by a second request: protected
    assert list(policy.protected) == [k(1)]
    assert policy.victims(2, always) == [k(0), k(2)]
    policy.remove(k(0))
    assert k(0) in policy.ghost
    policy.insert(k(0))  # remembered: straight to protected
    assert list(policy.protected) == [k(1), k(0)]


def test_slru_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        SLRUPolicy(0)
    with pytest.raises(ConfigError):
        SLRUPolicy(10, probation_fraction=1.0)


def test_priority_lru_known_answer() -> None:
    policy = PriorityLRUPolicy()
    for i in range(4):
        policy.insert(k(i))
    assert policy.victims(4, always) == [k(0), k(1), k(2), k(3)]  # plain LRU
    policy.set_priority(k(0), 90)
    policy.set_priority(k(3), 10)
    assert policy.victims(4, always) == [k(3), k(1), k(2), k(0)]


def test_priority_set_before_insert_and_forgotten_on_remove() -> None:
    policy = PriorityLRUPolicy()
    policy.set_priority(k(1), 0)
    policy.insert(k(0))
    policy.insert(k(1))
    assert policy.victims(1, always) == [k(1)]
    policy.remove(k(1))
    assert policy.priority(k(1)) == DEFAULT_PRIORITY


def test_priority_expiry_with_fake_clock() -> None:
    clock = FakeClock()
    policy = PriorityLRUPolicy(offload_min_priority=35, clock=clock)
    policy.insert(k(0))
    policy.insert(k(1))
    policy.set_priority(k(0), 100, duration_s=5.0)
    policy.set_priority(k(1), 0, duration_s=10.0)
    assert policy.victims(2, always) == [k(1), k(0)]
    assert not policy.should_offload(k(1))
    clock.now = 5.0  # k(0) back to the default; k(1) still low
    assert policy.priority(k(0)) == DEFAULT_PRIORITY
    assert policy.victims(2, always) == [k(1), k(0)]
    clock.now = 10.0  # both default; a reverted key joins the least recent end
    assert policy.should_offload(k(1))
    assert policy.victims(2, always) == [k(1), k(0)]


def test_priorities_of_keys_never_stored_are_bounded() -> None:
    """Keys below offload_min_priority may never be stored: their priorities must not pile up."""
    policy = PriorityLRUPolicy(offload_min_priority=50, max_pending=3)
    policy.insert(k(9))
    policy.set_priority(k(9), 10)  # tracked: never forgotten for room
    for i in range(5):
        policy.set_priority(k(i), 0)
    assert [policy.priority(k(i)) for i in range(5)] == [DEFAULT_PRIORITY] * 2 + [0] * 3
    policy.set_priority(k(2), 0)  # set again: the most recent now
    policy.set_priority(k(5), 0)
    assert policy.priority(k(3)) == DEFAULT_PRIORITY  # the oldest went
    assert [policy.priority(k(i)) for i in (2, 4, 5)] == [0, 0, 0]
    assert policy.priority(k(9)) == 10
    for i in (2, 4, 5):
        policy.insert(k(i))  # stored after all: their priorities apply
    assert policy.victims(4, always) == [k(2), k(4), k(5), k(9)]
    for i in range(20):
        policy.set_priority(k(100 + i), 0)
    assert [policy.priority(k(i)) for i in (2, 4, 5, 9)] == [0, 0, 0, 10]  # tracked: kept


def test_refreshed_priorities_expire_at_their_latest_time_and_stay_bounded() -> None:
    clock = FakeClock()
    policy = PriorityLRUPolicy(clock=clock)
    policy.insert(k(0))
    policy.insert(k(1))
    policy.set_priority(k(1), 90, duration_s=5.0)
    for step in range(10_000):  # refreshed every 1 ms, each for 5 s
        clock.now = step / 1000
        policy.set_priority(k(1), 90, duration_s=5.0)
    assert len(policy._expiries) <= 2 * 1 + 64  # stale entries are dropped, not kept
    clock.now = 14.0  # 5 s after the last refresh at 9.999: not yet
    assert policy.victims(1, always) == [k(0)]
    assert policy.priority(k(1)) == 90
    clock.now = 15.0
    assert policy.victims(1, always) == [k(1)]  # back to the default, at the LRU end
    with pytest.raises(ConfigError, match="max_pending"):
        PriorityLRUPolicy(max_pending=0)


def test_priority_rejects_bad_values() -> None:
    policy = PriorityLRUPolicy()
    with pytest.raises(ConfigError):
        policy.set_priority(k(0), 101)
    with pytest.raises(ConfigError):
        policy.set_priority(k(0), 5, duration_s=0.0)
    with pytest.raises(ConfigError):
        PriorityLRUPolicy(offload_min_priority=-1)


ops = st.lists(
    st.tuples(st.sampled_from(["insert", "access", "remove", "evict", "prio"]), st.integers(0, 15)),
    max_size=80,
)


@given(ops=ops, capacity=st.integers(1, 8), pinned=st.sets(st.integers(0, 15), max_size=4))
def test_invariants(ops: list[tuple[str, int]], capacity: int, pinned: set[int]) -> None:
    pins = {k(i) for i in pinned}
    for policy in (SLRUPolicy(capacity), PriorityLRUPolicy(capacity)):
        resident: set[bytes] = set()
        for op, i in ops:
            key = k(i)
            if op == "insert" and key not in resident:
                resident.add(key)
                policy.insert(key)
            elif op == "access":
                policy.access(key)
            elif op == "remove":
                resident.discard(key)
                policy.remove(key)
            elif op == "prio" and isinstance(policy, PriorityLRUPolicy):
                policy.set_priority(key, i * 6)
            excess = len(resident) - capacity
            if excess > 0:
                victims = policy.victims(excess, lambda x: x not in pins)
                assert not pins & set(victims)
                assert len(set(victims)) == len(victims) <= excess
                for victim in victims:
                    resident.remove(victim)
                    policy.remove(victim)
            assert len(policy) == len(resident)
            assert all(x in policy for x in resident)
            if isinstance(policy, SLRUPolicy):
                assert not set(policy.probation) & set(policy.protected)
                assert len(policy.ghost) <= capacity
                assert not set(policy.ghost) & resident


@given(chains=st.lists(st.lists(st.integers(0, 30), min_size=1, max_size=6), max_size=30))
def test_simulation_capacity_never_exceeded(chains: list[list[int]]) -> None:
    keyed = [[k(i) for i in chain] for chain in chains]
    for policy in (SLRUPolicy(4), PriorityLRUPolicy(4)):
        result = simulate(keyed, 4, policy)
        assert len(policy) <= 4
        assert result.hit_blocks <= result.blocks


def test_setting_the_priority_a_key_has_keeps_its_recency() -> None:
    """An engine re-applying a retention config per request must not push its hot
    blocks toward eviction; a new priority (not a use) joins that priority's LRU end."""
    policy = PriorityLRUPolicy()
    for key in (b"a", b"b", b"hot"):
        policy.insert(key)
    policy.set_priority(b"hot", DEFAULT_PRIORITY)
    assert policy.victims(3, lambda key: True) == [b"a", b"b", b"hot"]
    policy.set_priority(b"a", 80)
    policy.set_priority(b"b", 80)  # joins the least recent end of 80, before a
    policy.set_priority(b"a", 80)  # again: a stays where it is
    assert policy.victims(3, lambda key: True) == [b"hot", b"b", b"a"]


def test_removing_an_untracked_key_keeps_the_priority_set_for_it() -> None:
    policy = PriorityLRUPolicy()
    policy.set_priority(b"k", 90)
    policy.remove(b"k")  # not stored yet: ignored
    policy.insert(b"k")
    assert policy.priority(b"k") == 90
